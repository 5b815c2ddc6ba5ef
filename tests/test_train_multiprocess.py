"""The train stage under `accelerate launch`: DDP over 2 CPU processes (gloo), tiny profile."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from smpo_core.errors import SmpoError
from smpo_core.settings import load_settings
from smpo_core.store import Store

pytestmark = pytest.mark.integration

# 3 steps of 8 pairs (the tiny profile's effective batch) in micro-batches of 4, from a 16-pair
# cache; a checkpoint after step 2.
SMALL = ["invert.max_pairs=16", "train.max_steps=3", "train.batch_size=4",
         "train.checkpoint_every=2"]


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(Path(result.path) / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two processes with one micro-batch each, one process accumulating 2, the base
    UNet, and the two-process stage redone after it was killed past its checkpoint."""
    from mlflow.tracking import MlflowClient

    from stages.common import RunContext, stage_task
    from stages.tracking import experiment_id

    store = tmp_path_factory.mktemp("store").resolve()
    uri = Store(store).tracking_uri
    experiment = experiment_id(MlflowClient(uri), uri, store)
    download, invert, score, train = (stage_task(name).fn
                                      for name in ("download", "invert", "score", "train"))

    def context(*overrides: str) -> RunContext:
        return RunContext(load_settings("tiny", [*SMALL, *overrides]), str(store), uri,
                          experiment)

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ctx = context()
        pairs = {"download": download(ctx)}
        inputs = {"invert": invert(ctx, pairs), "score": score(ctx, pairs)}
        two = train(context("train.num_processes=2"), inputs)
        # One thread, as torch.distributed.run gives each of its processes: CPU kernels sum
        # in another order with more threads, and Adam turns that 1e-7 gradient noise into
        # weight differences up to 2e-5 where a gradient is nearly 0.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        # Another store: same settings but for num_processes, so the same key.
        alone = tmp_path_factory.mktemp("store-one").resolve()
        alone_uri = Store(alone).tracking_uri
        try:
            one = train(RunContext(context().settings, str(alone), alone_uri, experiment_id(
                MlflowClient(alone_uri), alone_uri, alone)), inputs)
        finally:
            torch.set_num_threads(threads)
        two_weights = _weights(two)
        (Path(two.path) / "manifest.json").unlink()
        resumed = train(context("train.num_processes=2"), inputs)
        empty = tmp_path_factory.mktemp("not-a-cache")
        broken = dataclasses.replace(inputs["invert"], key="0" * 16, path=str(empty))
        with pytest.raises(SmpoError) as failed:
            train(context("train.num_processes=2"), {"invert": broken, "score": inputs["score"]})
    base = load_file(store / "builtin" / "tiny-sd" / "unet" / "diffusion_pytorch_model.safetensors")
    return {"two": two, "one": one, "two_weights": two_weights, "resumed": resumed,
            "base": base, "store": store, "failed": str(failed.value), "empty": empty}


def test_two_processes_train_three_finite_steps_and_change_the_unet(trained):
    two = trained["two"]
    assert two.summary["num_processes"] == 2
    assert two.summary["pairs_seen"] == 3 * 8
    assert (two.summary["grad_accum"], two.summary["micro_batch"]) == (1, 4)
    history = json.loads((Path(two.path) / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3]
    assert all(np.isfinite(v) for h in history for v in h.values())
    # Step 1 starts from policy == reference on both processes: the mean loss is log 2.
    assert history[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    moved = max((trained["two_weights"][k] - v).abs().max().item()
                for k, v in trained["base"].items())
    assert moved > 0


def test_the_stage_logs_the_launched_training_to_mlflow(trained):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{trained['store'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smpo")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`smpo.key` = '{trained['two'].key}'",
                              order_by=["attributes.start_time ASC"])
    first, resumed = runs
    history = json.loads((Path(trained["two"].path) / "history.json").read_text())
    losses = client.get_metric_history(first.info.run_id, "train.loss")
    assert [(m.step, m.value) for m in losses] == [(h["step"], h["loss"]) for h in history]
    logged = json.loads(Path(client.download_artifacts(first.info.run_id, "manifest.json"))
                        .read_text())
    assert logged["num_processes"] == 2
    # The resumed run logs only the step it trained.
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "train.loss")] == [3]


def test_two_processes_equal_one_process_with_twice_the_accumulation(trained):
    """Process r of 2 takes micro-batch 2i + r of the step's draws: together exactly the
    micro-batches (pairs, caption dropout, timesteps) of one process accumulating 2, and DDP
    averages the gradients as accumulation does. num_processes is not in the stage key, as
    it does not change the result. (With more micro-batches per process the gradients sum in
    another order, and Adam turns that float noise into weight differences of ~1e-5.)"""
    assert trained["one"].key == trained["two"].key
    one, two = _weights(trained["one"]), trained["two_weights"]
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst <= 1e-6
    history = {name: json.loads((Path(trained[name].path) / "history.json").read_text())
               for name in ("one", "two")}
    for a, b in zip(history["one"], history["two"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_killed_two_process_training_resumes_from_its_checkpoint(trained):
    resumed = trained["resumed"]
    assert not resumed.reused and resumed.key == trained["two"].key
    assert resumed.summary["resumed_from_step"] == 2
    weights = _weights(resumed)
    worst = max((weights[k] - trained["two_weights"][k]).abs().max().item() for k in weights)
    assert worst < 1e-6


def test_a_failed_launch_says_what_went_wrong_in_the_processes(trained):
    message = trained["failed"]
    assert "`accelerate launch` of 2 processes failed" in message
    assert f"trajectory cache {str(trained['empty'])!r}: cache.json missing" in message
    assert "train.num_processes=1" in message
