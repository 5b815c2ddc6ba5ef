"""MLflow: one parent run per flow run, one nested child run per stage.

Runs are created with `MlflowClient` and explicit ids rather than the fluent API, because the
fluent active-run stack is per thread and Prefect runs tasks in worker threads.

Tracking is a side channel: a tracking server that stops answering costs one warning line and
seconds, never the computation or its manifest. What was not logged is recorded in the store
and logged later (stages/resync.py: the next run, or `smpo sync`).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from smpo_core.environment import environment
from smpo_core.errors import SmpoError, first_line
from smpo_core.store import Store

# MLflow's HTTP client retries a refused connection 7 times with exponential backoff and waits
# 120 s per request: minutes per call once a server is gone. A refused connection is final
# and 10 s tell a hung server; what a lost run missed is logged later anyway (resync).
for _name, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
                      ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")):
    os.environ.setdefault(_name, _value)

# Tracking URIs that failed in this process, with the first error: not asked again.
_LOST: dict[str, str] = {}


def tracking_lost(uri: str) -> str | None:
    """The error that made this process stop tracking into `uri`, or None."""
    return _LOST.get(uri)


def _lose(uri: str, exc: BaseException) -> None:
    if uri in _LOST:
        return
    _LOST[uri] = f"{type(exc).__name__}: {first_line(exc)}"[:200]
    logging.getLogger("smpo").warning(
        "tracking: MLflow at %s failed (%s); the run goes on untracked and is logged there "
        "by the next run or `smpo sync` once it answers", uri, _LOST[uri])


class Tracker:
    """Logging into one MLflow run; every call names the run id explicitly. A failing call
    stops all tracking into that URI for this process (see module docstring)."""

    def __init__(self, client: MlflowClient, run_id: str | None):
        self.client, self.run_id = client, run_id

    @property
    def lost(self) -> bool:
        return self.run_id is None or tracking_lost(self.client.tracking_uri) is not None

    def call(self, log: Callable[[], Any]) -> None:
        """Run one logging call; a failure warns once and stops tracking, never the work."""
        if self.lost:
            return
        try:
            log()
        except Exception as exc:  # any failure of the side channel: warn once, go on
            _lose(self.client.tracking_uri, exc)

    def params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for start in range(0, len(items), 100):
            self.call(lambda s=start: self.client.log_batch(self.run_id,
                                                             params=items[s:s + 100]))

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in values.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)]
        if items:
            self.call(lambda: self.client.log_batch(self.run_id, metrics=items))

    def tags(self, tags: dict[str, Any]) -> None:
        self.call(lambda: self.client.log_batch(
            self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()]))

    def artifact(self, path: Path, folder: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.call(lambda: self.client.log_artifacts(self.run_id, str(path), folder))
        elif path.is_file():
            self.call(lambda: self.client.log_artifact(self.run_id, str(path), folder))

    def terminate(self, status: str) -> None:
        self.call(lambda: self.client.set_terminated(self.run_id, status))


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


def process_tag() -> str:
    """`host:pid:start time` of this process: lets a later run tell whether the process that
    opened a RUNNING run is gone (stages/resync.py closes such runs)."""
    import socket

    import psutil

    return f"{socket.gethostname()}:{os.getpid()}:{psutil.Process().create_time():.2f}"
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
    with global_tracking_uri(client.tracking_uri), warnings.catch_warnings():
        # an input example would mean drawing images at log time
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
def global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` for the block only (what Model.log and
    pyfunc.load_model read). Setting it also exports MLFLOW_TRACKING_URI into this process's
    environment: left behind, it would send every later run of the process, on any store,
    to this store's database."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)  # None: unset again, the variable too


@contextmanager
def run(client: MlflowClient, experiment: str, name: str, tags: dict[str, Any],
        parent_id: str | None = None):
    """An MLflow run closed FINISHED, or FAILED with the error message as a tag. If the
    tracking store does not answer, the block runs with a tracker that logs nothing."""
    all_tags = {"mlflow.runName": name, "smpo.process": process_tag(), **tags}
    if parent_id:
        all_tags["mlflow.parentRunId"] = parent_id
    run_id = None
    if not tracking_lost(client.tracking_uri):
        try:
            created = client.create_run(experiment,
                                        tags={k: str(v) for k, v in all_tags.items()},
                                        run_name=name)
            run_id = created.info.run_id
        except Exception as exc:  # the side channel is down: compute untracked
            _lose(client.tracking_uri, exc)
    tracker = Tracker(client, run_id)
    try:
        yield tracker
    except BaseException as exc:
        tracker.tags({"smpo.error": f"{type(exc).__name__}: {exc}"[:5000]})
        tracker.terminate("FAILED")
        raise
    tracker.terminate("FINISHED")


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
