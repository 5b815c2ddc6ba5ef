"""The pairs the invert stage caches: a seeded random sample of all downloaded pairs, read
row group by row group (METHOD.md §6: cache only what training consumes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from smpo_core.errors import SmpoError
from smpo_core.pickapic import count_pairs, read_pairs_at, sample_positions

SHARDS = (700, 1300, 1000)  # 3000 pairs in shards of unequal size, row groups of 128


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """A download stage's folder: pair_id = 10 x position + 7, a caption per pair."""
    folder = tmp_path_factory.mktemp("download")
    start = 0
    for index, rows in enumerate(SHARDS):
        ids = np.arange(start, start + rows) * 10 + 7
        table = pa.table({"pair_id": ids, "caption": [f"caption {i}" for i in ids]})
        pq.write_table(table, folder / f"pairs-{index:05d}.parquet", row_group_size=128)
        start += rows
    return folder


def test_the_sample_is_seeded_and_spread_over_the_whole_source(pairs):
    total = count_pairs(pairs)
    assert total == sum(SHARDS)
    sample = sample_positions(total, 300, seed=0)
    assert sample == sample_positions(total, 300, seed=0)
    assert sample != sample_positions(total, 300, seed=1)
    assert len(set(sample)) == 300 and sample == sorted(sample)
    # Spread: 300 of 3000 uniformly is 30 per tenth of the source (sd ~5.2); the first 300
    # pairs in file order, what the cache held before, would put all 300 in the first tenth.
    per_tenth = np.bincount(np.asarray(sample) * 10 // total, minlength=10)
    assert per_tenth.min() >= 10 and per_tenth.max() <= 55, per_tenth
    # Kolmogorov-Smirnov distance to the uniform distribution, 1.63 / sqrt(n) at p = 0.01.
    positions = np.sort(np.asarray(sample)) / total
    ks = np.max(np.abs(np.arange(1, 301) / 300 - positions))
    assert ks < 1.63 / np.sqrt(300)


def test_every_pair_when_the_sample_is_not_smaller_than_the_source():
    assert sample_positions(50, None, seed=3) == list(range(50))
    assert sample_positions(50, 80, seed=3) == list(range(50))


def test_sampled_rows_are_read_exactly_across_shards_and_row_groups(pairs):
    every = pq.read_table(sorted(pairs.glob("pairs-*.parquet"))).to_pylist()
    sample = sample_positions(len(every), 400, seed=5)
    rows = list(read_pairs_at(pairs, sample, columns=["pair_id", "caption"]))
    assert rows == [every[i] for i in sample]
    edges = [0, 699, 700, 1999, 2000, 2999]  # first and last rows of each shard
    assert [row["pair_id"] for row in read_pairs_at(pairs, edges, ["pair_id"])] == \
        [10 * p + 7 for p in edges]
    with pytest.raises(SmpoError, match="position 3000 is past its 3000 pairs"):
        list(read_pairs_at(pairs, [5, 3000], ["pair_id"]))
