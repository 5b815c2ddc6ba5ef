"""Score, invert and evaluate's generation on 2 processes under `accelerate launch` (gloo on
the CPU): each process writes its own shards, the output is what one process writes, and a
stage killed mid-way redoes only its missing shards."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from smpo_core.settings import load_settings
from smpo_core.store import Store

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# 16 pairs in 4 pair shards of 4; 4 cache shards of 4 pairs; 4 prompts in 2 chunks of 2.
SMALL = ["download.max_pairs=16", "download.shard_rows=4", "score.batch_size=3",
         "invert.shard_pairs=4", "invert.batch_size=2", "train.max_steps=1",
         "evaluate.num_prompts=4", "evaluate.chunk_prompts=2",
         "evaluate.num_inference_steps=2", "evaluate.metrics={pickscore: builtin:tiny-clip}",
         "evaluate.bootstrap_resamples=50"]


def _files(folder: Path, pattern: str) -> dict[str, bytes]:
    # Keyed by the path below `folder`: the base's and the tuned model's images share names.
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob(pattern))}


def _tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(folder.glob("shard-*.safetensors"))}


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """Each stage once on one process, then again (forced) on two; the invert stage on two
    processes once more after two of its shards were lost (a kill before they were written)."""
    from mlflow.tracking import MlflowClient

    from stages.common import RunContext, stage_task
    from stages.tracking import experiment_id

    store = tmp_path_factory.mktemp("store").resolve()
    uri = Store(store).tracking_uri
    experiment = experiment_id(MlflowClient(uri), uri, store)
    task = {name: stage_task(name).fn
            for name in ("download", "score", "invert", "train", "evaluate")}

    def ctx(*overrides: str) -> RunContext:
        return RunContext(load_settings("tiny", [*SMALL, *overrides]), str(store), uri,
                          experiment)

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
                             "cache": _files(folder, "*.json")}
            two = task[stage](ctx(f"{stage}.num_processes=2"), pairs, force=True)
            out[stage, 2] = {"result": two, "files": _files(folder, "*.parquet"),
                             "tensors": _tensors(folder), "cache": _files(folder, "*.json"),
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
        train = task["train"](ctx(), inputs)
        one = task["evaluate"](ctx(), {"train": train})
        generations = store / "generations"
        out["evaluate", 1] = {"result": one, "images": _files(generations, "*/*/images/*.png"),
                              "scores": pq.read_table(Path(one.path) / "scores.parquet")}
        for image in generations.glob("*/*/images/*.png"):
            image.unlink()
        two = task["evaluate"](ctx("evaluate.num_processes=2"), {"train": train}, force=True)
        out["evaluate", 2] = {"result": two, "images": _files(generations, "*/*/images/*.png"),
                              "scores": pq.read_table(Path(two.path) / "scores.parquet")}
    torch.set_num_threads(threads)
    return out


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
