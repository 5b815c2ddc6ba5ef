"""The trajectory cache and the training state: written in pieces, resumed after a crash."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from smpo_core.errors import SmpoError
from smpo_core.models import PromptEmbeds
from smpo_core.store import folder_size
from smpo_core.training import load_train_state, make_optimizer, save_train_state
from smpo_core.trajectories import (
    InvertedBatch,
    TrajectoryCache,
    build_cache,
    expected_bytes,
    write_cache_meta,
)

K, LATENT, TEXT = 3, (4, 8, 8), (77, 32)


def fake_invert(rows):
    """A deterministic stand-in for the model: each pair's tensors are a function of its id."""
    ids = torch.tensor([row["pair_id"] for row in rows], dtype=torch.float32)
    z0 = ids.view(-1, 1, 1, 1, 1) + torch.zeros(len(rows), 2, *LATENT)
    z = ids.view(-1, 1, 1, 1, 1, 1) + torch.arange(K).view(1, 1, K, 1, 1, 1) / 10
    z = z.expand(len(rows), 2, K, *LATENT).clone()
    text = ids.view(-1, 1, 1) + torch.zeros(len(rows), *TEXT)
    return InvertedBatch(z0, z, text)


def rows(n=10):
    return [{"pair_id": 100 + i, "caption": f"c{i}"} for i in range(n)]


def write_meta(folder):
    write_cache_meta(folder, {"base_model": "m", "resolution": 32, "levels": [1, 2, 3]},
                     PromptEmbeds(torch.zeros(1, *TEXT)))


def test_cache_reads_back_what_was_inverted(tmp_path):
    write_meta(tmp_path)
    stats = build_cache(tmp_path, iter(rows()), fake_invert, batch_size=3, shard_pairs=4)
    assert stats == {"pairs": 10, "shards": 3, "resumed_shards": 0,
                     "bytes_written": stats["bytes_written"]}
    cache = TrajectoryCache(tmp_path)
    assert len(cache) == 10 and cache.pair_ids == [100 + i for i in range(10)]
    got = cache.get([0, 5, 9])
    assert got["z0"].dtype == torch.float16
    assert got["z0"][:, 0, 0, 0, 0].tolist() == [100, 105, 109]
    assert got["z"][1, 1, 2, 0, 0, 0].item() == pytest.approx(105.2, abs=0.1)
    assert tuple(got["text"].shape) == (3, *TEXT)


def test_expected_size_is_said_before_and_matches_after(tmp_path):
    write_meta(tmp_path)
    stats = build_cache(tmp_path, iter(rows()), fake_invert, batch_size=3, shard_pairs=4)
    expected = expected_bytes(10, LATENT, K, TEXT)
    assert expected <= stats["bytes_written"] < expected * 1.01  # safetensors headers only
    assert folder_size(tmp_path) > expected


def test_crashed_cache_resumes_from_its_last_complete_shard(tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    for folder in (clean, crashed):
        write_meta(folder)
    build_cache(clean, iter(rows()), fake_invert, batch_size=2, shard_pairs=4)

    calls = []

    def dies_in_second_shard(batch):
        calls.append([r["pair_id"] for r in batch])
        if len(calls) == 3:
            raise RuntimeError("killed")
        return fake_invert(batch)

    with pytest.raises(RuntimeError, match="killed"):
        build_cache(crashed, iter(rows()), dies_in_second_shard, batch_size=2, shard_pairs=4)
    assert len(list(crashed.glob("index-*.parquet"))) == 1

    resumed_calls = []

    def records(batch):
        resumed_calls.append([r["pair_id"] for r in batch])
        return fake_invert(batch)

    stats = build_cache(crashed, iter(rows()), records, batch_size=2, shard_pairs=4)
    assert stats["resumed_shards"] == 1
    assert resumed_calls[0] == [104, 105]  # the first shard's pairs are not inverted again
    for name in ("shard-00000", "shard-00001", "shard-00002"):
        with safe_open(str(clean / f"{name}.safetensors"), "pt") as a, \
                safe_open(str(crashed / f"{name}.safetensors"), "pt") as b:
            for key in ("z0", "z", "text"):
                assert torch.equal(a.get_tensor(key), b.get_tensor(key))
    assert TrajectoryCache(crashed).pair_ids == TrajectoryCache(clean).pair_ids


def test_cache_from_another_model_or_grid_is_refused(tmp_path):
    write_meta(tmp_path)
    build_cache(tmp_path, iter(rows(2)), fake_invert, batch_size=2, shard_pairs=4)
    cache = TrajectoryCache(tmp_path)
    cache.check_compatible({"base_model": "m", "resolution": 32, "levels": [1, 2, 3]})
    with pytest.raises(SmpoError, match="built with resolution=32 but training expects 64"):
        cache.check_compatible({"base_model": "m", "resolution": 64, "levels": [1, 2, 3]})
    with pytest.raises(SmpoError, match="levels"):
        cache.check_compatible({"base_model": "m", "resolution": 32, "levels": [1, 2]})
    with pytest.raises(SmpoError, match=r"cache\.json missing"):
        TrajectoryCache(tmp_path / "nothing")


def _train(model, optimizer, schedule, steps, start=0):
    for step in range(start, steps):
        x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
        loss = model(x).pow(2).mean()
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()


def _fresh():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    optimizer = make_optimizer("adamw", model.parameters(), lr=1e-2, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    return model, optimizer, schedule


def test_training_state_resumes_to_the_same_weights(tmp_path):
    straight = _fresh()
    _train(*straight, steps=6)

    first = _fresh()
    _train(*first, steps=3)
    logged = [{"step": s, "loss": 1.0 / s, "implicit_accuracy": 0.25 * s} for s in (1, 2, 3)]
    save_train_state(tmp_path / "state.pt", *first, step=3, history=logged)
    resumed = _fresh()  # a new process: fresh objects, then the saved state
    step, history = load_train_state(tmp_path / "state.pt", *resumed)
    # The history comes back as the plain numbers history.json is written from.
    assert (step, json.loads(json.dumps(history))) == (3, logged)
    _train(*resumed, steps=6, start=step)
    for a, b in zip(straight[0].parameters(), resumed[0].parameters(), strict=True):
        assert torch.equal(a, b)
    assert load_train_state(tmp_path / "missing.pt", *_fresh()) == (0, [])


def test_two_owners_write_the_shards_one_writer_writes(tmp_path):
    """Process r of 2 writes shards s with s mod 2 = r: together the same files as one
    process, and each batch holds the pairs it holds in one process's run."""
    one, two = tmp_path / "one", tmp_path / "two"
    batches: dict[str, list[list[int]]] = {"one": [], "two": []}

    def recording(name):
        def invert(batch):
            batches[name].append([r["pair_id"] for r in batch])
            return fake_invert(batch)
        return invert

    build_cache(one, iter(rows()), recording("one"), batch_size=3, shard_pairs=4)
    stats = [build_cache(two, iter(rows()), recording("two"), batch_size=3, shard_pairs=4,
                         owned=lambda shard, r=rank: shard % 2 == r) for rank in (1, 0)]
    assert sorted(batches["two"]) == sorted(batches["one"])
    assert [s["shards"] for s in stats] == [3, 3]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    for path in one.glob("*"):
        assert (two / path.name).read_bytes() == path.read_bytes(), path.name


def test_an_owner_redoes_only_its_missing_shards_wherever_they_are(tmp_path):
    write_meta(tmp_path)
    build_cache(tmp_path, iter(rows()), fake_invert, batch_size=2, shard_pairs=4)
    (tmp_path / "index-00001.parquet").unlink()  # shard 1 lost; shards 0 and 2 complete
    calls = []

    def records(batch):
        calls.append([r["pair_id"] for r in batch])
        return fake_invert(batch)

    stats = build_cache(tmp_path, iter(rows()), records, batch_size=2, shard_pairs=4,
                        owned=lambda shard: shard % 2 == 1)
    assert calls == [[104, 105], [106, 107]]
    assert stats["resumed_shards"] == 0  # shard 1 (this owner's only shard) was redone
    assert TrajectoryCache(tmp_path).pair_ids == [100 + i for i in range(10)]
