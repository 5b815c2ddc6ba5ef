"""The score stage's computation: reward per unique image, then smoothed soft labels per pair."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from smpo_core import faults
from smpo_core.errors import SmpoError
from smpo_core.losses import human_weight
from smpo_core.pickapic import iter_pairs, pair_shards
from smpo_core.rewards import RewardModel
from smpo_core.smoothing import SmoothingBounds, smoothed_preference, smoothed_weight
from smpo_core.store import atomic_path

LABELS_SCHEMA = pa.schema(
    [
        ("pair_id", pa.int64()),
        ("image_0_uid", pa.string()),
        ("image_1_uid", pa.string()),
        ("reward_0", pa.float64()),
        ("reward_1", pa.float64()),
        ("p", pa.float64()),  # smoothed P(image 0 preferred)
        ("weight", pa.float64()),  # w = gamma (2p - 1)
        ("label_0", pa.float64()),  # the human label: 1.0 image 0 won, 0.0 image 1 won
    ]
)


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _batched(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _image_queue(shard: Path, wanted: set[str]) -> Iterator[tuple[str, Image.Image, str]]:
    """(uid, image, caption) of each image of a pair shard whose uid is in `wanted`, once."""
    columns = ["caption", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1"]
    wanted = set(wanted)
    for batch in pq.ParquetFile(shard).iter_batches(batch_size=256, columns=columns):
        for row in batch.to_pylist():
            for i in (0, 1):
                uid = row[f"image_{i}_uid"]
                if uid in wanted:
                    wanted.discard(uid)
                    yield uid, decode_image(row[f"jpg_{i}"]), row["caption"]


def rewards_file(out_dir: Path, shard: int) -> Path:
    """Where the rewards of the images first seen in pair shard `shard` are kept."""
    return Path(out_dir) / f"rewards-{shard:05d}.parquet"


def first_seen(shards: list[Path]) -> list[set[str]]:
    """Per pair shard, the image uids no earlier shard holds: pairs share images, and each is
    scored once, in the first shard that holds it. Reads only the uid columns, so any process
    knows every shard's images without scoring the shards before it."""
    seen: set[str] = set()
    firsts = []
    for shard in shards:
        table = pq.read_table(shard, columns=["image_0_uid", "image_1_uid"])
        uids = set(table.column("image_0_uid").to_pylist()) | set(
            table.column("image_1_uid").to_pylist())
        firsts.append(uids - seen)
        seen |= uids
    return firsts


def score_shards(
    pairs_dir: Path,
    reward: RewardModel,
    batch_size: int,
    out_dir: Path,
    owned: Callable[[int], bool] = lambda shard: True,
    on_scored: Callable[[int], None] | None = None,
) -> int:
    """Score the images first seen in each pair shard this process owns, one
    `rewards-NNNNN.parquet` (image uid -> reward) per shard, written when the shard is done;
    shards whose file exists are skipped (resume). Returns how many shards were scored now.

    A shard's images go to the model in the same batches whichever process owns it, so N
    processes write the same files as one.
    """
    shards = pair_shards(pairs_dir)
    scored = 0
    for index, (shard, wanted) in enumerate(zip(shards, first_seen(shards), strict=True)):
        part = rewards_file(out_dir, index)
        if not owned(index) or part.is_file():
            continue
        done: dict[str, float] = {}
        # Decoded images are held one batch at a time: a shard's worth would not fit.
        for chunk in _batched(_image_queue(shard, wanted), batch_size):
            uids, images, captions = zip(*chunk, strict=True)
            values = reward.score(list(images), list(captions), batch_size=batch_size)
            done.update(zip(uids, values.tolist(), strict=True))
            if on_scored:
                on_scored(len(chunk))
        with atomic_path(part) as tmp:
            pq.write_table(pa.table({"uid": pa.array(list(done), pa.string()),
                                     "reward": pa.array(list(done.values()), pa.float64())}),
                           tmp)
        faults.reached("score.shard")
        scored += 1
    return scored


def read_scores(pairs_dir: Path, out_dir: Path) -> dict[str, float]:
    """The reward of every image uid, from the rewards files of all pair shards."""
    scores: dict[str, float] = {}
    for index in range(len(pair_shards(pairs_dir))):
        part = rewards_file(out_dir, index)
        if not part.is_file():
            raise SmpoError(f"{part}: missing; the score stage did not score pair shard {index}")
        table = pq.read_table(part)
        scores.update(zip(table.column("uid").to_pylist(), table.column("reward").to_pylist(),
                          strict=True))
    return scores


def score_unique_images(
    pairs_dir: Path,
    reward: RewardModel,
    batch_size: int,
    out_dir: Path,
    on_scored: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Reward of every distinct image uid in the pairs (pairs share images: score each once).

    Rewards are written per pair shard as each shard finishes, so a crashed run resumes
    after its last complete shard.
    """
    score_shards(pairs_dir, reward, batch_size, out_dir, on_scored=on_scored)
    return read_scores(pairs_dir, out_dir)


def pair_rewards(pairs_dir: Path, scores: dict[str, float]) -> pa.Table:
    """pair_id, uids, human label and the two rewards of every pair."""
    columns = ["pair_id", "image_0_uid", "image_1_uid", "label_0"]
    tables = [pa.Table.from_batches([b]) for b in iter_pairs(pairs_dir, columns=columns)]
    table = pa.concat_tables(tables) if tables else pa.schema(
        [LABELS_SCHEMA.field(c) for c in columns]).empty_table()
    for i in (0, 1):
        uids = table.column(f"image_{i}_uid").to_pylist()
        table = table.append_column(f"reward_{i}", pa.array([scores[u] for u in uids],
                                                            pa.float64()))
    return table


def soft_labels(rewards: pa.Table, bounds: SmoothingBounds, gamma: float) -> pa.Table:
    """Add p and w (METHOD.md §2) to a table of pair rewards; columns in LABELS_SCHEMA order."""
    r0 = rewards.column("reward_0").to_numpy()
    r1 = rewards.column("reward_1").to_numpy()
    p = np.asarray(smoothed_preference(r0, r1, bounds.r_min, bounds.r_max), dtype=np.float64)
    w = np.asarray(smoothed_weight(p, gamma), dtype=np.float64)
    columns = {name: rewards.column(name) for name in LABELS_SCHEMA.names if name in
               rewards.column_names}
    columns["p"] = pa.array(p)
    columns["weight"] = pa.array(w)
    table = pa.table({name: columns[name] for name in LABELS_SCHEMA.names})
    return table.cast(LABELS_SCHEMA)


def label_metadata(table: pa.Table, metadata: dict[str, str]) -> pa.Table:
    """Attach what produced the labels (reward model, checkpoint hash, bounds, gamma)."""
    return table.replace_schema_metadata({f"smpo.{k}": str(v) for k, v in metadata.items()})


def human_agreement(labels: pa.Table) -> float:
    """Fraction of pairs where the reward model prefers the human winner."""
    p = labels.column("p").to_numpy()
    human = labels.column("label_0").to_numpy()
    if len(p) == 0:
        return float("nan")
    return float(np.mean((p > 0.5) == (human > 0.5)))


def preference_targets(labels_file: Path, pair_ids: list[int], labels: str
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per cached pair: the preference weight (smoothed w or human ±1) and the human winner."""
    table = pq.read_table(labels_file, columns=["pair_id", "weight", "label_0"]).to_pandas()
    table = table.set_index("pair_id")
    missing = [p for p in pair_ids if p not in table.index]
    if missing:
        raise SmpoError(f"{labels_file}: no labels for {len(missing)} cached pairs "
                        f"(e.g. pair {missing[0]}); rerun score and invert on the same download")
    rows = table.loc[pair_ids]
    label_0 = rows["label_0"].to_numpy(np.float64, copy=True)  # torch wants a writable array
    smoothed = torch.tensor(rows["weight"].to_numpy(np.float64), dtype=torch.float32)
    weight = human_weight(label_0) if labels == "human" else smoothed
    winner = torch.tensor((label_0 < 0.5).astype(np.int64))
    return weight, winner
