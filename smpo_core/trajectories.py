"""The trajectory cache: ReNoise-inverted latents of every pair, written once, read by training.

Layout of a cache folder:
  cache.json               what the latents were computed with (model, resolution, levels, ...)
  shard-NNNNN.safetensors  z0 (N, 2, C, H, W), z (N, 2, K, C, H, W), text (N, L, D); fp16;
                           SDXL adds pooled (N, P) and time_ids (N, 2, 6)
  index-NNNNN.parquet      pair_id, shard, row of each pair in that shard; written after the shard,
                           so a shard counts as complete once its index exists (resume point)
  empty_text.safetensors   the empty caption's embedding (for caption dropout in training)
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
from safetensors.torch import save_file

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
COMPATIBILITY_KEYS = ("base_model", "resolution", "levels")


def expected_bytes(pairs: int, latent_shape: Sequence[int], levels: int,
                   text_shape: Sequence[int]) -> int:
    """Size of the cache in fp16: x_0 plus K levels for both images, and the caption embedding."""
    latent = 2 * int(torch.tensor(latent_shape).prod())
    text = 2 * int(torch.tensor(text_shape).prod())
    return pairs * (2 * (1 + levels) * latent + text)


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


def invert_pair_batch(
    model: DiffusionModel,
    rows: list[dict[str, Any]],
    levels: Sequence[int],
    resolution: int,
    renoise_steps: int,
    average: str,
    seed: int = 0,
) -> InvertedBatch:
    """VAE-encode both images of each pair, encode its caption, ReNoise-invert with the UNet.

    The VAE posterior sample of image i of a pair is seeded by (seed, pair_id, i).
    """
    jpegs = [row[f"jpg_{i}"] for row in rows for i in (0, 1)]
    pixels = torch.stack([jpeg_to_pixels(data, resolution) for data in jpegs])
    seeds = [(seed * 1_000_003 + 2 * row["pair_id"] + i) % 2**63 for row in rows for i in (0, 1)]
    z0 = encode_images(model, pixels, seeds)  # (2B, C, H, W), pair-major
    prompt = encode_captions(model, [row["caption"] for row in rows])
    pooled = time_ids = None
    if model.is_sdxl:
        pooled = prompt.pooled.repeat_interleave(2, dim=0)
        time_ids = micro_conditions([image_size(data) for data in jpegs], resolution)
    eps_fn = noise_predictor(model.unet, prompt.hidden.repeat_interleave(2, dim=0), pooled,
                             time_ids)
    with torch.no_grad():
        z = renoise_invert(eps_fn, z0, list(levels), model.alphas_cumprod.to(z0.device),
                           renoise_steps=renoise_steps, average=average)  # (K, 2B, C, H, W)
    batch = len(rows)
    z = z.movedim(0, 1).reshape(batch, 2, len(levels), *z0.shape[1:])
    return InvertedBatch(
        z0.reshape(batch, 2, *z0.shape[1:]), z, prompt.hidden, prompt.pooled,
        time_ids.view(batch, 2, 6) if time_ids is not None else None,
    )


def write_shard(folder: Path, shard: int, pair_ids: list[int], batches: list[InvertedBatch]) -> int:
    """Write one shard and then its index; returns the bytes written."""
    tensors = {
        # Size/crop ids are pixel counts: fp16 would round sizes above 2048.
        name: torch.cat([b.tensors()[name] for b in batches])
        .to(torch.float32 if name == "time_ids" else CACHE_DTYPE).contiguous().cpu()
        for name in batches[0].tensors()
    }
    target = folder / f"shard-{shard:05d}.safetensors"
    with atomic_path(target) as tmp:
        save_file(tensors, str(tmp))
    index = pa.table({
        "pair_id": pa.array(pair_ids, pa.int64()),
        "shard": pa.array([shard] * len(pair_ids), pa.int32()),
        "row": pa.array(range(len(pair_ids)), pa.int32()),
    })
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


def build_cache(
    folder: Path,
    pair_rows: Iterator[dict[str, Any]],
    invert: Callable[[list[dict[str, Any]]], InvertedBatch],
    batch_size: int,
    shard_pairs: int,
    on_shard: Callable[[int, int], None] | None = None,
    owned: Callable[[int], bool] = lambda shard: True,
) -> dict[str, int]:
    """Invert pairs shard by shard (shard s: pairs s * shard_pairs onwards); shards already
    complete are skipped (resume after a crash).

    With `owned`, only the shards it accepts (by index) are written: several processes each
    write their own shards, and a shard holds the same pairs, inverted in the same batches,
    whichever process writes it.
    """
    folder = Path(folder)
    shard, pairs, written, resumed = 0, 0, 0, 0
    ids: list[int] = []
    rows: list[dict[str, Any]] = []
    pending: list[InvertedBatch] = []

    def flush_batch() -> None:
        if rows:
            pending.append(invert(rows))
            rows.clear()

    def flush_shard() -> None:
        nonlocal written
        flush_batch()
        written += write_shard(folder, shard, ids, pending)
        if on_shard:
            on_shard(shard, pairs)
        ids.clear()
        pending.clear()

    for position, row in enumerate(pair_rows):
        pairs = position + 1
        shard = position // shard_pairs
        if not owned(shard):
            continue
        if (folder / f"index-{shard:05d}.parquet").is_file():  # complete before a crash
            resumed += position % shard_pairs == 0
            continue
        ids.append(row["pair_id"])
        rows.append(row)
        if len(rows) == batch_size:
            flush_batch()
        if len(ids) == shard_pairs:
            flush_shard()
    if ids:
        flush_shard()
    shards = -(-pairs // shard_pairs)
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
        self._handles: dict[int, Any] = {}
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
            stored = set(handle.keys())
            for name in names or stored:
                if name in stored:
                    out.setdefault(name, []).append(handle.get_slice(name)[row:row + 1])
        return {name: torch.cat(parts) for name, parts in out.items()}
