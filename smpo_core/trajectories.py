"""The trajectory cache: ReNoise-inverted latents of every pair, written once, read by training.

Layout of a cache folder:
  cache.json               what the latents were computed with (model, resolution, levels, ...)
  shard-NNNNN.safetensors  z0 (N, 2, C, H, W), z (N, 2, K, C, H, W), text (N, L, D); fp16;
                           SDXL adds pooled (N, P) and time_ids (N, 2, 6)
  index-NNNNN.parquet      pair_id, shard, row of each pair in that shard; written after the shard,
                           so a shard counts as complete once its index exists (resume point)
A planned cache (invert.levels=planned) keeps, of each pair, only the levels training will
read: its shards hold z as (M, 2, C, H, W) rows, one per kept (pair, level), with z_row and
z_level (M,) saying whose and which; its index adds `levels`, the kept level indices of
each pair (empty for a pair training never draws).
  empty_text.safetensors   the empty caption's embedding (for caption dropout in training)
  reference_errors.safetensors  (train.reference_errors=cached) one row per draw of the training
                           run the settings describe (step x effective batch + slot): error
                           (N, 2) float32, the reference's r_j, and the draw it was computed
                           at: position, t (N,) int64, drop_caption (N,) bool
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smpo_core import faults
from smpo_core.errors import SmpoError
from smpo_core.inversion import renoise_invert
from smpo_core.models import (
    DiffusionModel,
    PromptEmbeds,
    encode_captions,
    encode_images,
    image_size,
    jpeg_to_pixels,
    micro_conditions,
    noise_predictor,
)
from smpo_core.store import atomic_path, write_json

CACHE_DTYPE = torch.float16
# Settings a cache must share with the training run that reads it.
COMPATIBILITY_KEYS = ("base_model", "unet", "resolution", "levels")
REFERENCE_ERRORS = "reference_errors.safetensors"


def expected_bytes(pairs: int, latent_shape: Sequence[int], levels: int,
                   text_shape: Sequence[int], stored_levels: int | None = None) -> int:
    """Size of the cache in fp16: x_0 plus K levels for both images, and the caption embedding.
    `stored_levels`: a planned cache's kept (pair, level) count in all, instead of pairs x K."""
    latent = 2 * int(torch.tensor(latent_shape).prod())
    text = 2 * int(torch.tensor(text_shape).prod())
    kept = pairs * levels if stored_levels is None else stored_levels
    return pairs * (2 * latent + text) + 2 * kept * latent


@dataclass
class InvertedBatch:
    z0: torch.Tensor  # (B, 2, C, H, W)
    z: torch.Tensor  # (B, 2, K, C, H, W)
    text: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None = None  # (B, P), SDXL only
    time_ids: torch.Tensor | None = None  # (B, 2, 6), SDXL only: per image size/crop ids

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("z0", "z", "text", "pooled", "time_ids")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def _encode(model: DiffusionModel, rows: list[dict[str, Any]], resolution: int, seed: int
            ) -> tuple[torch.Tensor, PromptEmbeds, torch.Tensor | None]:
    """z0 (2B, C, H, W) pair-major, as the VAE lays it out (its memory format decides the
    UNet's rounding), the captions' embeddings, and SDXL's time ids (2B, 6)."""
    jpegs = [row[f"jpg_{i}"] for row in rows for i in (0, 1)]
    pixels = torch.stack([jpeg_to_pixels(data, resolution) for data in jpegs])
    seeds = [(seed * 1_000_003 + 2 * row["pair_id"] + i) % 2**63 for row in rows for i in (0, 1)]
    z0 = encode_images(model, pixels, seeds)
    prompt = encode_captions(model, [row["caption"] for row in rows])
    time_ids = (micro_conditions([image_size(data) for data in jpegs], resolution)
                if model.is_sdxl else None)
    return z0, prompt, time_ids


def _batch(z0: torch.Tensor, z: torch.Tensor, prompt: PromptEmbeds,
           time_ids: torch.Tensor | None) -> InvertedBatch:
    """z0 (2B, C, H, W) and z (K, 2B, C, H, W) as an InvertedBatch of B pairs."""
    batch = z0.shape[0] // 2
    return InvertedBatch(
        z0.reshape(batch, 2, *z0.shape[1:]),
        z.movedim(0, 1).reshape(batch, 2, z.shape[0], *z0.shape[1:]), prompt.hidden,
        prompt.pooled, time_ids.view(batch, 2, 6) if time_ids is not None else None)


def encode_pair_batch(model: DiffusionModel, rows: list[dict[str, Any]], resolution: int,
                      seed: int = 0) -> InvertedBatch:
    """VAE-encode both images of each pair and encode its caption, with no level (`z` is
    (B, 2, 0, C, H, W)): what the authors' online training computes at every step. The VAE
    posterior sample of image i of a pair is seeded by (seed, pair_id, i)."""
    z0, prompt, time_ids = _encode(model, rows, resolution, seed)
    return _batch(z0, z0.new_empty((0, *z0.shape)), prompt, time_ids)


def invert_pair_batch(
    model: DiffusionModel,
    rows: list[dict[str, Any]],
    levels: Sequence[int],
    resolution: int,
    renoise_steps: int,
    average: str,
    seed: int = 0,
    top: Sequence[int] | None = None,
) -> InvertedBatch:
    """`encode_pair_batch`, then ReNoise-invert both images of each pair with the UNet.

    `top` (one level index per pair, -1 for none): a planned cache's batch. The batch is
    inverted, every pair of it, up to its highest `top` and no further; the levels above are
    NaN. Every pair of it, because a UNet call over fewer rows rounds differently: this way
    each level kept is the full cache's (the same batches, `top` None) bit for bit, so
    training from either is the same run. A batch whose pairs need no level runs no UNet.
    """
    z0, prompt, time_ids = _encode(model, rows, resolution, seed)
    pooled = None if prompt.pooled is None else prompt.pooled.repeat_interleave(2, dim=0)
    alphas = model.alphas_cumprod.to(z0.device)
    eps_fn = noise_predictor(model.unet, prompt.hidden.repeat_interleave(2, dim=0), pooled,
                             time_ids, model.prediction_type, alphas)
    highest = len(levels) - 1 if top is None else max(top)
    z = torch.full((len(levels), *z0.shape), float("nan"), dtype=torch.float32,
                   device=z0.device)  # (K, 2B, C, H, W)
    if highest >= 0:
        with torch.no_grad():
            z[:highest + 1] = renoise_invert(eps_fn, z0, list(levels)[:highest + 1], alphas,
                                             renoise_steps=renoise_steps, average=average)
    return _batch(z0, z, prompt, time_ids)


def complete_shards(folder: Path) -> int:
    return len(list(Path(folder).glob("index-*.parquet")))


def cached_pair_ids(folder: Path) -> list[int]:
    """The pair ids the complete shards hold, in order (their index files, read from disk).

    Shards must be numbered 0, 1, ... without a gap; anything else is not a cache this code
    wrote, and resuming into it could duplicate or lose pairs."""
    files = sorted(Path(folder).glob("index-*.parquet"))
    ids: list[int] = []
    for number, file in enumerate(files):
        if file.name != f"index-{number:05d}.parquet":
            raise SmpoError(f"trajectory cache {str(folder)!r}: {file.name} follows shard "
                            f"{number - 1}; the folder is damaged: remove it (or rerun with "
                            f"--force invert)")
        ids += pq.read_table(file, columns=["pair_id"]).column("pair_id").to_pylist()
    return ids


def check_cache(folder: Path, pairs: int) -> None:
    """What is on disk is what the manifest will say: `pairs` distinct pairs, each shard
    present beside its index."""
    ids = cached_pair_ids(folder)
    missing = [n for n in range(complete_shards(folder))
               if not (Path(folder) / f"shard-{n:05d}.safetensors").is_file()]
    if len(ids) != pairs or len(set(ids)) != len(ids) or missing:
        raise SmpoError(
            f"trajectory cache {str(folder)!r}: {len(ids)} pairs ({len(set(ids))} distinct) "
            f"indexed, shards missing: {missing or 'none'}, but {pairs} pairs were inverted; "
            f"not marking it complete: rerun with --force invert")


def write_shard(folder: Path, shard: int, pair_ids: list[int], batches: list[InvertedBatch],
                keep: list[list[int]] | None = None) -> int:
    """Write one shard and then its index; returns the bytes written. `keep`: per pair, the
    level indices to store (a planned cache); None stores every level."""
    tensors = {
        # Size/crop ids are pixel counts: fp16 would round sizes above 2048.
        name: torch.cat([b.tensors()[name] for b in batches])
        .to(torch.float32 if name == "time_ids" else CACHE_DTYPE).contiguous().cpu()
        for name in batches[0].tensors()
    }
    columns = {
        "pair_id": pa.array(pair_ids, pa.int64()),
        "shard": pa.array([shard] * len(pair_ids), pa.int32()),
        "row": pa.array(range(len(pair_ids)), pa.int32()),
    }
    if keep is not None:
        rows = torch.tensor([row for row, kept in enumerate(keep) for _ in kept], dtype=torch.int32)
        kept_levels = torch.tensor([k for kept in keep for k in kept], dtype=torch.int32)
        tensors["z"] = tensors["z"][rows.long(), :, kept_levels.long()].contiguous()
        if tensors["z"].isnan().any():
            raise SmpoError(f"trajectory cache shard {shard}: a kept level was never inverted "
                            f"(NaN); the inversion's top levels must cover the kept ones")
        tensors |= {"z_row": rows, "z_level": kept_levels}
        columns["levels"] = pa.array(keep, pa.list_(pa.int32()))
    target = folder / f"shard-{shard:05d}.safetensors"
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp))
    index = pa.table(columns)
    with atomic_path(folder / f"index-{shard:05d}.parquet") as tmp:
        pq.write_table(index, tmp)
    return target.stat().st_size


def write_cache_meta(folder: Path, meta: dict[str, Any], empty: PromptEmbeds) -> None:
    """cache.json and the empty caption's condition (for caption dropout in training)."""
    tensors = {"text": empty.hidden}
    if empty.pooled is not None:
        tensors["pooled"] = empty.pooled
    with atomic_path(folder / "empty_text.safetensors") as tmp:
        save_file({k: v.to(CACHE_DTYPE).contiguous().cpu() for k, v in tensors.items()},
                  str(tmp))
    write_json(folder / "cache.json", meta)


def write_reference_errors(folder: Path, errors: dict[str, torch.Tensor]) -> None:
    """reference_errors.safetensors: `error` (N, 2) and the draws (position, t, drop_caption)
    it was computed at (`TrainingPlan.draws`)."""
    with atomic_path(Path(folder) / REFERENCE_ERRORS) as tmp:
        save_file({name: value.contiguous().cpu() for name, value in errors.items()}, str(tmp))


def _every_shard(shard: int) -> bool:
    return True


def build_cache(
    folder: Path,
    pair_rows: Iterator[dict[str, Any]],
    invert: Callable[[list[dict[str, Any]]], InvertedBatch],
    batch_size: int,
    shard_pairs: int,
    on_shard: Callable[[int, int], None] | None = None,
    keep: Callable[[int], list[int]] | None = None,
    owned: Callable[[int], bool] | None = None,
) -> dict[str, int]:
    """Invert pairs shard by shard; shards already complete are skipped (resume after a crash).

    One process (`owned` None): the pairs to skip are those the complete shards' indexes
    hold, not shards x `shard_pairs`: a run resumed with another shard size (a runtime
    setting) continues after exactly the pairs on disk, its new shards `shard_pairs` long.
    Several processes (`owned(shard)` says which shards this one writes): shard s holds the
    pairs at positions [s * shard_pairs, (s + 1) * shard_pairs), inverted in the same batches
    whichever process writes it; a shard whose index exists is skipped once its pair ids are
    those of its positions (a cache written with another shard size is refused).
    `keep(position)`: the level indices to store of the pair at that position (a planned
    cache; `invert` must have inverted it at least that high)."""
    folder = Path(folder)
    numbered = sorted(int(f.stem.split("-")[1]) for f in folder.glob("index-*.parquet"))
    if owned is None and numbered != list(range(len(numbered))):
        # A several-process run left gaps: resume it shard by shard, as those processes would.
        owned = _every_shard
    fixed = owned is not None
    done_ids = [] if fixed else cached_pair_ids(folder)
    skip = len(done_ids)
    shard = resumed = 0 if fixed else len(numbered)
    pairs = written = 0
    on_disk: list[int] = []  # fixed layout: the pair ids of the current shard's index
    ids: list[int] = []
    positions: list[int] = []
    rows: list[dict[str, Any]] = []
    pending: list[InvertedBatch] = []

    def flush_batch() -> None:
        if rows:
            pending.append(invert(rows))
            rows.clear()

    def flush_shard() -> None:
        nonlocal shard, written
        flush_batch()
        kept = [keep(position) for position in positions] if keep else None
        written += write_shard(folder, shard, ids, pending, kept)
        faults.reached("invert.shard")
        if on_shard:
            on_shard(shard, pairs)
        ids.clear()
        positions.clear()
        pending.clear()
        if not fixed:
            shard += 1

    for position, row in enumerate(pair_rows):
        pairs = position + 1
        if fixed:
            shard, offset = divmod(position, shard_pairs)
            if not owned(shard):
                continue
            index = folder / f"index-{shard:05d}.parquet"
            if offset == 0:
                on_disk = (pq.read_table(index, columns=["pair_id"]).column("pair_id")
                           .to_pylist() if index.is_file() else [])
                resumed += bool(on_disk)
            if on_disk:  # complete before a crash: its pairs must be these
                if offset >= len(on_disk) or on_disk[offset] != row["pair_id"] or len(
                        on_disk) > shard_pairs:
                    raise SmpoError(
                        f"trajectory cache {str(folder)!r}: {index.name} holds "
                        f"{len(on_disk)} pairs, not the {shard_pairs} pairs (invert."
                        f"shard_pairs) from position {shard * shard_pairs} of the input; "
                        f"resume with the shard size it was written with, or one process, "
                        f"or rerun with --force invert")
                continue
        elif position < skip:
            if row["pair_id"] != done_ids[position]:
                raise SmpoError(
                    f"trajectory cache {str(folder)!r}: pair {position} on disk is "
                    f"{done_ids[position]} but the input's is {row['pair_id']}; the cache was "
                    f"written from other pairs: rerun with --force invert")
            continue
        ids.append(row["pair_id"])
        positions.append(position)
        rows.append(row)
        if len(rows) == batch_size:
            flush_batch()
        if len(ids) == shard_pairs:
            flush_shard()
    if ids:
        flush_shard()
    shards = -(-pairs // shard_pairs) if fixed else shard
    return {"pairs": pairs, "shards": shards, "resumed_shards": resumed,
            "bytes_written": written}


class TrajectoryCache:
    """Read side: memory-mapped shards, rows fetched by pair position."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        meta_file = self.folder / "cache.json"
        if not meta_file.is_file():
            raise SmpoError(f"trajectory cache {str(self.folder)!r}: cache.json missing; "
                            f"expected a folder written by the invert stage")
        self.meta = json.loads(meta_file.read_text())
        files = sorted(self.folder.glob("index-*.parquet"))
        self.index = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
        self.pair_ids = self.index.column("pair_id").to_pylist() if self.index else []
        self._shards = self.index.column("shard").to_pylist() if self.index else []
        self._rows = self.index.column("row").to_pylist() if self.index else []
        planned = self.index is not None and "levels" in self.index.column_names
        #: Per pair, the level indices stored; None: every level (a full cache).
        self.stored_levels: list[list[int]] | None = (
            self.index.column("levels").to_pylist() if planned else None)
        self._handles: dict[int, Any] = {}
        self._planned_index: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        with safe_open(str(self.folder / "empty_text.safetensors"), "pt") as handle:
            self.empty_text = handle.get_tensor("text")
            stored = set(handle.keys())
            self.empty_pooled = handle.get_tensor("pooled") if "pooled" in stored else None

    def __len__(self) -> int:
        return len(self.pair_ids)

    @property
    def levels(self) -> list[int]:
        return list(self.meta["levels"])

    def check_compatible(self, expected: dict[str, Any]) -> None:
        """Refuse a cache computed with another model, resolution or level set."""
        for key in COMPATIBILITY_KEYS:
            if key in expected and self.meta.get(key) != expected[key]:
                raise SmpoError(
                    f"trajectory cache {str(self.folder)!r} was built with {key}="
                    f"{self.meta.get(key)!r} but training expects {expected[key]!r}; rerun the "
                    f"invert stage with the training settings"
                )

    def missing_levels(self, needed: dict[int, set[int]]) -> list[tuple[int, int]]:
        """The (position, level index) pairs of `needed` (position -> level indices) that
        this cache does not hold; none for a full cache."""
        if self.stored_levels is None:
            return []
        return [(position, k) for position, levels in sorted(needed.items())
                for k in sorted(levels) if k not in self.stored_levels[position]]

    def reference_errors(self, draws: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, 2) the reference's errors at these draws (`TrainingPlan.draws` of the run,
        N of them), computed by the invert stage; refused when the cache has none or they
        were computed at other draws (another seed, batch, step count, timestep sampling or
        caption dropout)."""
        path = self.folder / REFERENCE_ERRORS
        retry = ("rerun invert with this run's train settings and train.reference_errors="
                 "cached, or train with train.reference_errors=compute")
        if not path.is_file():
            raise SmpoError(f"trajectory cache {str(self.folder)!r} holds no reference errors "
                            f"(inverted with train.reference_errors=compute); {retry}")
        stored = load_file(str(path))
        count = len(draws["t"])
        if len(stored["error"]) < count:
            raise SmpoError(f"trajectory cache {str(self.folder)!r} holds reference errors of "
                            f"{len(stored['error'])} draws; this run makes {count}; {retry}")
        for name in ("position", "t", "drop_caption"):
            differ = (stored[name][:count] != draws[name]).nonzero().flatten()
            if len(differ):
                first = int(differ[0])
                raise SmpoError(
                    f"trajectory cache {str(self.folder)!r} holds reference errors for other "
                    f"draws than this run's: {len(differ)} of {count} differ in {name}, e.g. "
                    f"draw {first} (pair {self.pair_ids[int(draws['position'][first])]}): "
                    f"{stored[name][first].item()} there, {draws[name][first].item()} here; "
                    f"{retry}")
        return stored["error"][:count]

    def _shard(self, shard: int) -> Any:
        if shard not in self._handles:
            path = self.folder / f"shard-{shard:05d}.safetensors"
            self._handles[shard] = safe_open(str(path), "pt")
        return self._handles[shard]

    def get(self, positions: Sequence[int], names: Sequence[str] | None = None
            ) -> dict[str, torch.Tensor]:
        """The cached tensors of the pairs at these positions: z0 (B,2,C,H,W),
        z (B,2,K,C,H,W), text (B,L,D), and for SDXL pooled (B,P), time_ids (B,2,6)."""
        out: dict[str, list[torch.Tensor]] = {}
        for position in positions:
            handle = self._shard(self._shards[position])
            row = self._rows[position]
            stored = set(handle.keys()) - {"z_row", "z_level"}
            for name in names or stored:
                if name == "z" and self.stored_levels is not None:
                    out.setdefault(name, []).append(self._planned_levels(handle, row))
                elif name in stored:
                    out.setdefault(name, []).append(handle.get_slice(name)[row:row + 1])
        return {name: torch.cat(parts) for name, parts in out.items()}

    def _planned_levels(self, handle: Any, row: int) -> torch.Tensor:
        """(1, 2, K, C, H, W) of one pair of a planned cache, NaN at the levels not kept
        (training checks before it starts that it reads none of them)."""
        if id(handle) not in self._planned_index:
            self._planned_index[id(handle)] = (handle.get_tensor("z_row"),
                                               handle.get_tensor("z_level"))
        rows, kept = self._planned_index[id(handle)]
        mine = (rows == row).nonzero().squeeze(1)
        first = handle.get_slice("z")[0:1]
        z = torch.full((1, 2, len(self.levels), *first.shape[2:]), float("nan"),
                       dtype=first.dtype)
        for i in mine.tolist():
            z[0, :, int(kept[i])] = handle.get_slice("z")[i:i + 1][0]
        return z
