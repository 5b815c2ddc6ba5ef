"""The score stage's computation: each unique image once, soft labels, resume after a crash."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from smpo_core.rewards.base import RewardModel
from smpo_core.schema import PAIRS_SCHEMA
from smpo_core.scoring import pair_rewards, score_unique_images, soft_labels
from smpo_core.smoothing import SmoothingBounds


class MeanBrightness(RewardModel):
    """A deterministic stand-in reward: mean pixel value, recording what it was asked."""

    name = "brightness"

    def __init__(self, fail_after: int | None = None):
        super().__init__("none", None)
        self.seen: list[float] = []
        self.fail_after = fail_after

    def score_batch(self, images, captions):
        if self.fail_after is not None and len(self.seen) >= self.fail_after:
            raise RuntimeError("killed")
        values = [float(np.asarray(image).mean()) / 255 for image in images]
        self.seen += values
        return np.array(values)


def _jpeg(level: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (level, level, level)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _pairs(folder, shards=3, per_shard=4):
    """Pairs whose images are shared across pairs and shards: uid k is image level 10 k."""
    folder.mkdir()
    pair = 0
    for shard in range(shards):
        rows = []
        for _ in range(per_shard):
            a, b = pair % 5, (pair + 1) % 5
            rows.append({"pair_id": pair, "caption": "c", "image_0_uid": f"u{a}",
                         "image_1_uid": f"u{b}", "jpg_0": _jpeg(10 * a), "jpg_1": _jpeg(10 * b),
                         "label_0": float(pair % 2), "model_0": "", "model_1": "",
                         "user_id": 1})
            pair += 1
        pq.write_table(pa.Table.from_pylist(rows, PAIRS_SCHEMA),
                       folder / f"pairs-{shard:05d}.parquet")
    return folder


def test_each_unique_image_is_scored_once(tmp_path):
    pairs = _pairs(tmp_path / "pairs")
    reward = MeanBrightness()
    scores = score_unique_images(pairs, reward, batch_size=3, out_dir=tmp_path / "out")
    assert sorted(scores) == [f"u{k}" for k in range(5)]
    assert len(reward.seen) == 5
    rewards = pair_rewards(pairs, scores)
    assert rewards.num_rows == 12
    assert rewards.column("reward_0").to_pylist()[1] == pytest.approx(scores["u1"])


def test_crashed_scoring_resumes_after_its_last_complete_shard(tmp_path):
    pairs = _pairs(tmp_path / "pairs", shards=3, per_shard=2)
    clean = score_unique_images(pairs, MeanBrightness(), 2, tmp_path / "clean")
    with pytest.raises(RuntimeError, match="killed"):
        score_unique_images(pairs, MeanBrightness(fail_after=3), 2, tmp_path / "crashed")
    assert sorted(p.name for p in (tmp_path / "crashed").glob("rewards-*")) == \
        ["rewards-00000.parquet"]
    again = MeanBrightness()
    resumed = score_unique_images(pairs, again, 2, tmp_path / "crashed")
    assert resumed == clean
    assert len(again.seen) == len(clean) - 3  # shard 0's three images were not scored again


def test_soft_labels_follow_the_smoothing_formula(tmp_path):
    pairs = _pairs(tmp_path / "pairs", shards=1, per_shard=4)
    scores = score_unique_images(pairs, MeanBrightness(), 8, tmp_path / "out")
    labels = soft_labels(pair_rewards(pairs, scores), SmoothingBounds(0.0, 0.2, "test"), 10.0)
    r0 = labels.column("reward_0").to_numpy()
    r1 = labels.column("reward_1").to_numpy()
    p = 1 / (1 + np.exp(-(r0 - r1) / 0.2))
    np.testing.assert_allclose(labels.column("p").to_numpy(), p)
    np.testing.assert_allclose(labels.column("weight").to_numpy(), 10 * (2 * p - 1))
    assert labels.column("label_0").to_pylist() == [0.0, 1.0, 0.0, 1.0]


def test_preference_targets_per_cached_pair(tmp_path):
    import torch

    from smpo_core.errors import SmpoError
    from smpo_core.scoring import preference_targets

    labels = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"pair_id": [7, 8, 9], "weight": [2.5, -1.0, 0.25],
                             "label_0": [1.0, 0.0, 0.0]}), labels)
    weight, winner = preference_targets(labels, [9, 7], "smoothed")
    assert weight.tolist() == [0.25, 2.5] and winner.tolist() == [1, 0]
    weight, _ = preference_targets(labels, [9, 7], "human")
    assert weight.tolist() == [-1.0, 1.0]
    assert weight.dtype == torch.float32
    with pytest.raises(SmpoError, match="no labels for 1 cached pairs"):
        preference_targets(labels, [7, 10], "smoothed")


def test_two_owners_score_each_image_once_and_write_what_one_writes(tmp_path):
    """Pair shard s scored by process s mod 2: each image still once (in the first shard
    that holds it), in the same batches, into the same files."""
    from smpo_core.scoring import read_scores, score_shards

    pairs = _pairs(tmp_path / "pairs", shards=3, per_shard=2)
    one = MeanBrightness()
    score_shards(pairs, one, 2, tmp_path / "one")
    owners = [MeanBrightness(), MeanBrightness()]
    for rank in (1, 0):
        score_shards(pairs, owners[rank], 2, tmp_path / "two",
                     owned=lambda shard, r=rank: shard % 2 == r)
    assert sorted(owners[0].seen + owners[1].seen) == sorted(one.seen)
    for part in sorted((tmp_path / "one").glob("rewards-*")):
        assert (tmp_path / "two" / part.name).read_bytes() == part.read_bytes()
    assert read_scores(pairs, tmp_path / "two") == read_scores(pairs, tmp_path / "one")
