"""Two "machines" on 127.0.0.1: the same stage started twice, with SMPO_MACHINE_RANK 0 and 1,
meets through accelerate's multi-machine launch on one store; training equals the one-machine
training on as many processes, and the sharded score stage writes the labels one process
writes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from smpo_core.settings import load_settings
from smpo_core.store import Store
from tests.conftest import REPO, free_ports


def run_task(name: str):
    """A stage task's body with its result unwrapped: a reused stage returns a `Reused` state."""
    from types import SimpleNamespace

    from stages.common import stage_result, stage_task

    task = stage_task(name)
    return SimpleNamespace(fn=lambda *args, **kwargs: stage_result(task.fn(*args, **kwargs)))


pytestmark = [
    pytest.mark.integration,
    # Run once here (2 busy cores): the two machines' processes scored every shard and wrote
    # the launch result, but machine 0's `accelerate launch` (torch.distributed.run's agent)
    # did not exit afterwards; not yet understood, so skipped rather than left to hang.
    pytest.mark.skip(reason="issue 13: machine 0's launcher hung after the work finished in "
                     "the one run so far; see the module comment"),
]

SMALL = ["download.max_pairs=16", "download.shard_rows=4", "invert.max_pairs=16",
         "invert.shard_pairs=8", "train.max_steps=2", "train.batch_size=2",
         "train.effective_batch=4", "train.checkpoint_every=1"]
STAGES = ("download", "score", "invert", "train")


def run_stages(store: str, last: str, *overrides: str) -> None:
    """What `smpo run <last>` runs on one machine, without Prefect: the stages up to `last`
    (those before it reused), in this process."""
    from mlflow.tracking import MlflowClient

    from stages.common import RunContext
    from stages.tracking import experiment_id

    uri = Store(store).tracking_uri
    ctx = RunContext(load_settings("tiny", [*SMALL, *overrides]), store, uri,
                     experiment_id(MlflowClient(uri), uri, Path(store)))
    results = {}
    for name in STAGES[:STAGES.index(last) + 1]:
        inputs = {up: results[up] for up in {"download": (), "score": ("download",),
                                             "invert": ("download",),
                                             "train": ("invert", "score")}[name]}
        results[name] = run_task(name).fn(ctx, inputs)


def two_machines(store: Path, last: str, *overrides: str) -> list[subprocess.CompletedProcess]:
    """`last` started on machine 0 and machine 1 at once, meeting on a free local port."""
    port = free_ports(1)[0]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    code = (f"from tests.test_multimachine import run_stages; "
            f"run_stages({str(store)!r}, {last!r}, *{list(overrides)!r})")
    machines = [subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
        env=env | {"SMPO_NUM_MACHINES": "2", "SMPO_MACHINE_RANK": str(rank),
                   "SMPO_MAIN_PROCESS_IP": "127.0.0.1", "SMPO_MAIN_PROCESS_PORT": str(port),
                   # One thread per process, as torch.distributed.run gives each of 2
                   # processes on one machine: CPU sums then run in the same order.
                   "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}) for rank in (0, 1)]
    done = []
    for machine in machines:
        output, _ = machine.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(machine.args, machine.returncode, output))
    return done


def _unet(store: Path) -> dict:
    (train,) = [p for p in (store / "train").iterdir() if (p / "manifest.json").is_file()]
    return load_file(train / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def machines(tmp_path_factory):
    one, two = (tmp_path_factory.mktemp(name).resolve() for name in ("one", "two"))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for store in (one, two):
            run_stages(str(store), "download")
        run_stages(str(one), "train", "train.num_processes=2")  # one machine, 2 processes
        scored = two_machines(two, "score", "score.num_processes=2")
        run_stages(str(two), "invert")
        trained = two_machines(two, "train", "train.num_processes=2")
    return {"one": one, "two": two, "scored": scored, "trained": trained}


def test_two_machines_train_what_one_machine_with_as_many_processes_trains(machines):
    for done in machines["trained"]:
        assert done.returncode == 0, done.stdout[-3000:]
    assert "--machine_rank 1" in machines["trained"][1].stdout
    one, two = _unet(machines["one"]), _unet(machines["two"])
    assert one.keys() == two.keys()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst <= 1e-6


def test_two_machines_score_the_labels_one_process_scores(machines):
    for done in machines["scored"]:
        assert done.returncode == 0, done.stdout[-3000:]
    (one,) = (machines["one"] / "score").iterdir()
    (two,) = (machines["two"] / "score").iterdir()
    assert (two / "labels.parquet").read_bytes() == (one / "labels.parquet").read_bytes()
    assert sorted(p.name for p in two.glob("rewards-*")) == \
        [f"rewards-{i:05d}.parquet" for i in range(4)]
