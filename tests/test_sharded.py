"""Score, invert and evaluate's generation on 2 processes under `accelerate launch` (gloo on
the CPU): each process writes its own shards, the output is what one process writes, and a
stage killed mid-way redoes only its missing shards. Two "machines" on 127.0.0.1 (the same
stage started twice, with SMPO_MACHINE_RANK 0 and 1) train what one machine trains on as many
processes, and score what one process scores. One store serves every test."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from smpo_core.settings import load_settings
from smpo_core.store import Store
from tests.conftest import REPO, free_ports

pytestmark = pytest.mark.integration

# 16 pairs in 4 pair shards of 4; 4 cache shards of 4 pairs; 2 training steps of 4 pairs (2
# per process); 4 prompts in 2 chunks of 2. The invert stage computes the reference's errors
# too (split between its processes), and training on two machines reads them by draw.
SMALL = ["download.max_pairs=16", "download.shard_rows=4", "score.batch_size=3",
         "invert.shard_pairs=4", "invert.batch_size=2", "train.reference_errors=cached",
         "train.max_steps=2",
         "train.batch_size=2", "train.effective_batch=4", "train.checkpoint_every=1",
         "evaluate.num_prompts=4", "evaluate.chunk_prompts=2",
         "evaluate.num_inference_steps=2", "evaluate.metrics={pickscore: builtin:tiny-clip}",
         "evaluate.bootstrap_resamples=50"]
UPSTREAM = {"download": (), "score": ("download",), "invert": ("download",),
            "train": ("invert", "score")}


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    # Keyed by the path below `folder`: the base's and the tuned model's images share names.
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob(pattern))}


def _tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(folder.glob("shard-*.safetensors"))}


def context(store: Path, *overrides: str):
    from mlflow.tracking import MlflowClient

    from stages.common import RunContext
    from stages.tracking import experiment_id

    uri = Store(store).tracking_uri
    return RunContext(load_settings("tiny", [*SMALL, *overrides]), str(store), uri,
                      experiment_id(MlflowClient(uri), uri, store))


def run_stages(store: str, forced: list[str], *overrides: str) -> None:
    """What `smpo run <last of forced> --force <each of forced>` runs on one machine, without
    Prefect: the stages up to the last forced one (the others reused), in this process."""
    import logging

    from stages.common import stage_result, stage_task

    logging.basicConfig(level=logging.INFO, force=True)  # the stage log: launch commands
    ctx = context(Path(store), *overrides)
    results = {}
    for name in [*UPSTREAM][:max(map([*UPSTREAM].index, forced)) + 1]:
        inputs = {up: results[up] for up in UPSTREAM[name]}
        results[name] = stage_result(stage_task(name).fn(ctx, inputs, force=name in forced))


def two_machines(store: Path, forced: list[str], *overrides: str
                 ) -> list[subprocess.CompletedProcess]:
    """The `forced` stages run on machine 0 and machine 1 at once (two processes here), each
    stage's launches meeting on one free local port; both machines killed, with their
    launches, if they have not ended in 10 min."""
    port = free_ports(1)[0]
    code = (f"from tests.test_sharded import run_stages; "
            f"run_stages({str(store)!r}, {forced!r}, *{list(overrides)!r})")
    machines = [subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=os.environ | {"SMPO_NUM_MACHINES": "2", "SMPO_MACHINE_RANK": str(rank),
                          "SMPO_MAIN_PROCESS_IP": "127.0.0.1",
                          "SMPO_MAIN_PROCESS_PORT": str(port), "PYTHONPATH": str(REPO)})
        for rank in (0, 1)]
    done = []
    try:
        for machine in machines:
            output, _ = machine.communicate(timeout=600)
            done.append(subprocess.CompletedProcess(machine.args, machine.returncode, output))
    finally:
        for machine in machines:
            if machine.poll() is None:
                os.killpg(machine.pid, signal.SIGKILL)
    return done


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Each stage once on one process, then again (forced) on two; the invert stage on two
    processes once more after two of its shards were lost (a kill before they were written);
    then score and train again (forced) on two machines."""
    from stages.common import RunContext, stage_task

    store = tmp_path_factory.mktemp("store").resolve()
    task = {name: stage_task(name).fn
            for name in ("download", "score", "invert", "train", "evaluate")}

    def ctx(*overrides: str) -> RunContext:
        return context(store, *overrides)

    out: dict = {"store": store}
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # torch.distributed.run gives each launched process one CPU thread; a CPU matmul split
        # over more threads sums in another order, so one process uses one thread too, and
        # the comparison is of the sharding, not of the thread count.
        mp.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        pairs = {"download": task["download"](ctx())}
        for stage in ("score", "invert"):
            one = task[stage](ctx(), pairs)
            folder = Path(one.path)
            out[stage, 1] = {"result": one, "files": _files(folder, "*.parquet"),
                             "tensors": _tensors(folder),
                             "cache": _files(folder, "*.json"),
                             "reference": _files(folder, "reference_errors.safetensors")}
            two = task[stage](ctx(f"{stage}.num_processes=2"), pairs, force=True)
            out[stage, 2] = {"result": two, "files": _files(folder, "*.parquet"),
                             "tensors": _tensors(folder), "cache": _files(folder, "*.json"),
                             "reference": _files(folder, "reference_errors.safetensors"),
                             "launched": json.loads((folder / "launch.json").read_text())}
        invert = Path(out["invert", 2]["result"].path)
        kept = {p.name: p.stat().st_mtime_ns for p in invert.glob("shard-*")}
        for shard in (1, 2):  # lost before their index was written: as a kill leaves them
            (invert / f"index-{shard:05d}.parquet").unlink()
            (invert / f"shard-{shard:05d}.safetensors").unlink()
        (invert / "manifest.json").unlink()
        resumed = task["invert"](ctx("invert.num_processes=2"), pairs)
        out["resumed"] = {"result": resumed, "tensors": _tensors(invert),
                          "files": _files(invert, "*.parquet"), "kept": kept,
                          "mtimes": {p.name: p.stat().st_mtime_ns
                                     for p in invert.glob("shard-*")}}
        inputs = {"invert": resumed, "score": out["score", 2]["result"]}
        train = task["train"](ctx(), inputs)  # one machine, one process
        out["train", 1] = _unet(Path(train.path))
        one = task["evaluate"](ctx(), {"train": train})
        generations = store / "generations"
        out["evaluate", 1] = {"result": one, "images": _files(generations, "*/*/images/*.png"),
                              "scores": pq.read_table(Path(one.path) / "scores.parquet")}
        for image in generations.glob("*/*/images/*.png"):
            image.unlink()
        two = task["evaluate"](ctx("evaluate.num_processes=2"), {"train": train}, force=True)
        out["evaluate", 2] = {"result": two, "images": _files(generations, "*/*/images/*.png"),
                              "scores": pq.read_table(Path(two.path) / "scores.parquet")}
        # Score and train again, on two machines of one process each.
        out["machines"] = two_machines(store, ["score", "train"], "score.num_processes=2",
                                       "train.num_processes=2")
        out["score", "machines"] = _files(Path(out["score", 2]["result"].path), "*.parquet")
        out["train", "machines"] = _unet(Path(train.path))
    torch.set_num_threads(threads)
    return out


def _unet(train: Path) -> dict[str, torch.Tensor]:
    return load_file(train / "unet" / "diffusion_pytorch_model.safetensors")


def test_two_processes_score_the_same_rewards_and_labels_as_one(sharded):
    one, two = sharded["score", 1], sharded["score", 2]
    assert two["result"].summary["num_processes"] == 2
    assert sorted(one["files"]) == ["labels.parquet", *[f"rewards-{i:05d}.parquet"
                                                        for i in range(4)]]
    assert sorted(two["files"]) == sorted(one["files"])
    # Same rows, same order, same floats, same metadata: byte-identical Parquet files.
    assert two["files"] == one["files"]
    assert two["result"].summary["unique_images"] == one["result"].summary["unique_images"]


def test_two_processes_invert_the_same_cache_as_one(sharded):
    one, two = sharded["invert", 1], sharded["invert", 2]
    assert two["result"].summary["num_processes"] == 2
    assert sorted(one["tensors"]) == [f"shard-{i:05d}.safetensors" for i in range(4)]
    assert two["files"] == one["files"]  # the index: pair ids, shards, rows
    assert two["cache"]["cache.json"] == one["cache"]["cache.json"]
    # Each process computed half the draws' reference errors; merged, one process's bytes.
    assert list(one["reference"]) == ["reference_errors.safetensors"]
    assert two["reference"] == one["reference"]
    for name, tensors in one["tensors"].items():
        for key, value in tensors.items():
            assert torch.equal(two["tensors"][name][key], value), (name, key)


def test_a_killed_sharded_invert_redoes_only_its_missing_shards(sharded):
    resumed, two = sharded["resumed"], sharded["invert", 2]
    assert resumed["result"].summary["resumed_shards"] == 2
    assert resumed["result"].summary["shards"] == 4
    for name in ("shard-00000.safetensors", "shard-00003.safetensors"):
        assert resumed["mtimes"][name] == resumed["kept"][name]  # not rewritten
    for name in ("shard-00001.safetensors", "shard-00002.safetensors"):
        assert resumed["mtimes"][name] != resumed["kept"][name]
    assert resumed["files"] == two["files"]
    for name, tensors in two["tensors"].items():
        for key, value in tensors.items():
            assert torch.equal(resumed["tensors"][name][key], value), (name, key)


def test_two_processes_draw_the_same_images_as_one(sharded):
    one, two = sharded["evaluate", 1], sharded["evaluate", 2]
    assert len(one["images"]) == 2 * 4  # base and tuned, 4 prompts
    assert two["images"] == one["images"]  # byte-identical PNGs
    assert two["scores"].equals(one["scores"])
    drawn = two["result"].summary["generation"]["drawn"]
    assert drawn == {"base": 4, "tuned": 4}  # drawn in this run, by the two processes


def test_two_machines_meet_and_both_finish(sharded):
    for machine in sharded["machines"]:
        assert machine.returncode == 0, machine.stdout[-3000:]
    for stage in ("score", "train"):  # machine 1 launched its part of each stage
        assert re.search(rf"--num_machines 2 --machine_rank 1 .* -m stages\.{stage} ",
                         sharded["machines"][1].stdout), stage


def test_two_machines_score_the_labels_one_process_scores(sharded):
    assert sharded["score", "machines"] == sharded["score", 1]["files"]


def test_two_machines_train_what_one_machine_trains(sharded):
    """Two machines of one process each against one process on one machine (which trains
    what two processes do: tests/test_train_multiprocess.py)."""
    one, two = sharded["train", 1], sharded["train", "machines"]
    assert one.keys() == two.keys()
    assert max((one[k] - two[k]).abs().max().item() for k in one) <= 1e-6
