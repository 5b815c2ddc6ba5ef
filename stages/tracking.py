"""MLflow: one parent run per flow run, one nested child run per stage.

Runs are created with `MlflowClient` and explicit ids rather than the fluent API, because the
fluent active-run stack is per thread and Prefect runs tasks in worker threads.
"""

from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from smpo_core.environment import environment
from smpo_core.errors import SmpoError
from smpo_core.store import Store


class Tracker:
    """Logging into one MLflow run; every call names the run id explicitly."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def tags(self, tags: dict[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def artifact(self, path: Path, folder: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), folder)
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path), folder)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


# MLflow 3 opens an experiment on its GenAI overview unless this tag says it holds model
# training runs; then it opens on the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: MlflowClient, uri: str, store_root: Path) -> str:
    """The experiment's id, created on first use, marked as one of model training."""
    name = environment().experiment
    found = client.get_experiment_by_name(name)
    if found:
        if found.tags.get("mlflow.experimentKind") is None:  # created by an older smpo
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(found.experiment_id, key, value)
        return found.experiment_id
    # A remote server decides where artifacts live; a local store keeps them beside the data.
    location = None if uri.startswith(("http://", "https://")) else Store(store_root).artifacts_uri
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # created concurrently by another process: read it back
        found = client.get_experiment_by_name(name)
        if not found:
            raise
        return found.experiment_id


def runs_table_url(server: str, experiment: str) -> str:
    """The experiment's runs table on an MLflow server, in the UI's model-training view
    (without `workflowType` MLflow 3.17 opens its GenAI overview, whatever the kind tag)."""
    return f"{server.rstrip('/')}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def training_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A training step's metrics as MLflow names them: `train.loss`, and `train.stats.<name>`
    for the others, so that the run page, which orders its charts by name, shows the loss
    curve first."""
    return {f"train.{name}" if name == "loss" else f"train.stats.{name}": value
            for name, value in metrics.items()}


MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def log_tuned_model(tracker: Tracker, weights: Path, kind: str, base: dict[str, Any]) -> str:
    """A train stage's weights (`kind`: unet or lora) as an MLflow logged model of its run,
    a pyfunc whose code is stages/mlflow_model.py and which loads as a diffusers pipeline
    on `base` (base, revision, vae). Returns its `models:/` URI."""
    import importlib.metadata

    import mlflow
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        params=ParamSchema([ParamSpec("num_inference_steps", "long", 25),
                            ParamSpec("guidance_scale", "double", 7.5),
                            ParamSpec("seed", "long", 0)]))
    requirements = [f"{name}=={importlib.metadata.version(name)}"
                    for name in ("mlflow", "torch", "diffusers", "transformers", "peft")]
    # Made here, in the run's experiment: Model.log would put it in the fluent API's active
    # experiment (Default, with artifacts in ./mlruns).
    client = tracker.client
    experiment = client.get_run(tracker.run_id).info.experiment_id
    model = client.create_logged_model(experiment, name=f"tuned-{kind}",
                                       source_run_id=tracker.run_id, model_type="diffusers",
                                       tags={"smpo.weights": kind})
    # Model.log reads the tracking URI from MLflow's global setting, not from our client.
    mlflow.set_tracking_uri(client.tracking_uri)
    with warnings.catch_warnings():  # an input example would mean drawing images at log time
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        info = Model.log(artifact_path=None, flavor=mlflow.pyfunc, run_id=tracker.run_id,
                         model_id=model.model_id, python_model=str(MODEL_CODE),
                         artifacts={"weights": str(weights)},
                         model_config={"pipeline": {"weights_kind": kind} | {
                             k: v for k, v in base.items() if v is not None}},
                         signature=signature, pip_requirements=requirements)
    client.finalize_logged_model(model.model_id, "READY")
    tracker.tags({"smpo.model_uri": info.model_uri})
    return info.model_uri


@contextmanager
def run(client: MlflowClient, experiment: str, name: str, tags: dict[str, Any],
        parent_id: str | None = None):
    """An MLflow run closed FINISHED, or FAILED with the error message as a tag."""
    all_tags = {"mlflow.runName": name, **tags}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    created = client.create_run(experiment, tags={k: str(v) for k, v in all_tags.items()},
                                run_name=name)
    tracker = Tracker(client, created.info.run_id)
    try:
        yield tracker
    except BaseException as exc:
        tracker.tags({"smpo.error": f"{type(exc).__name__}: {exc}"[:5000]})
        client.set_terminated(created.info.run_id, "FAILED")
        raise
    client.set_terminated(created.info.run_id, "FINISHED")


def train_output_of_run(client: MlflowClient, run_id: str) -> Path:
    """The train stage output an MLflow run points at: a train stage run's own, or that of
    the train stage run nested under a flow's parent run."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_run(run_id)
    except MlflowException as exc:
        raise SmpoError(f"model run:{run_id}: no such MLflow run at "
                        f"{client.tracking_uri}") from exc
    if found.data.tags.get("smpo.stage") != "train":
        children = client.search_runs(
            [found.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run_id}' and tags.`smpo.stage` = 'train'")
        if not children:
            raise SmpoError(f"model run:{run_id}: neither a train stage run nor a flow run "
                            f"with one")
        found = children[0]
    output = Path(found.data.tags["smpo.output"])
    if not (output / "manifest.json").is_file():
        raise SmpoError(f"model run:{run_id}: its train output {output} is gone or incomplete")
    return output
