"""The trajectory cache and the training state: written in pieces, resumed after a crash."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from smpo_core.errors import SmpoError
from smpo_core.models import PromptEmbeds
from smpo_core.store import folder_size
from smpo_core.trajectories import (
    InvertedBatch,
    TrajectoryCache,
    build_cache,
    check_cache,
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


@pytest.mark.parametrize("resumed_shard_pairs", [3, 8])
def test_cache_resumed_with_another_shard_size_holds_each_pair_once(tmp_path,
                                                                   resumed_shard_pairs):
    """shard_pairs is a runtime setting: a resume with another value continues after exactly
    the pairs on disk (the issue: 32 duplicated, or 64 lost while the manifest said 128)."""
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    for folder in (clean, crashed):
        write_meta(folder)
    build_cache(clean, iter(rows()), fake_invert, batch_size=2, shard_pairs=4)

    def dies_in_second_shard(batch):
        if batch[0]["pair_id"] >= 104:
            raise RuntimeError("killed")
        return fake_invert(batch)

    with pytest.raises(RuntimeError, match="killed"):
        build_cache(crashed, iter(rows()), dies_in_second_shard, batch_size=2, shard_pairs=4)
    stats = build_cache(crashed, iter(rows()), fake_invert, batch_size=2,
                        shard_pairs=resumed_shard_pairs)
    assert stats["pairs"] == 10
    check_cache(crashed, 10)
    resumed, reference = TrajectoryCache(crashed), TrajectoryCache(clean)
    assert resumed.pair_ids == reference.pair_ids == [100 + i for i in range(10)]
    for key in ("z0", "z", "text"):
        assert torch.equal(resumed.get(range(10))[key], reference.get(range(10))[key])


def test_cache_that_disagrees_with_its_count_is_not_marked_complete(tmp_path):
    write_meta(tmp_path)
    build_cache(tmp_path, iter(rows(8)), fake_invert, batch_size=2, shard_pairs=4)
    with pytest.raises(SmpoError, match=r"8 pairs \(8 distinct\) indexed.*but 10 pairs"):
        check_cache(tmp_path, 10)
    (tmp_path / "shard-00001.safetensors").unlink()
    with pytest.raises(SmpoError, match=r"shards missing: \[1\]"):
        check_cache(tmp_path, 8)


def test_cache_written_from_other_pairs_is_refused_on_resume(tmp_path):
    write_meta(tmp_path)
    build_cache(tmp_path, iter(rows(4)), fake_invert, batch_size=2, shard_pairs=4)
    others = [{"pair_id": 7 + i, "caption": "x"} for i in range(8)]
    with pytest.raises(SmpoError, match="pair 0 on disk is 100 but the input's is 7"):
        build_cache(tmp_path, iter(others), fake_invert, batch_size=2, shard_pairs=4)


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


def test_owners_refuse_a_cache_written_with_another_shard_size(tmp_path):
    """Several processes place pairs by shard number x shard_pairs: shards of another size
    would make them skip or repeat pairs, so the resume is refused, naming the index."""
    write_meta(tmp_path)
    build_cache(tmp_path, iter(rows()), fake_invert, batch_size=2, shard_pairs=4)
    (tmp_path / "index-00002.parquet").unlink()
    with pytest.raises(SmpoError, match=r"index-00000\.parquet holds 4 pairs, not the 3"):
        build_cache(tmp_path, iter(rows()), fake_invert, batch_size=2, shard_pairs=3,
                    owned=lambda shard: True)


def test_one_process_finishes_what_several_left_with_gaps(tmp_path):
    """A crashed two-process run left shards 0 and 2; one process redoes shard 1 only."""
    write_meta(tmp_path)
    build_cache(tmp_path, iter(rows()), fake_invert, batch_size=2, shard_pairs=4,
                owned=lambda shard: shard != 1)
    calls = []

    def records(batch):
        calls.append([r["pair_id"] for r in batch])
        return fake_invert(batch)

    stats = build_cache(tmp_path, iter(rows()), records, batch_size=2, shard_pairs=4)
    assert calls == [[104, 105], [106, 107]]
    assert (stats["shards"], stats["resumed_shards"]) == (3, 2)
    check_cache(tmp_path, 10)
    assert TrajectoryCache(tmp_path).pair_ids == [100 + i for i in range(10)]
