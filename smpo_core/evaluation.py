"""Base against tuned (METHOD.md §5): same prompts, same seeds, every metric, win rates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline
from PIL import Image, ImageDraw

from smpo_core.errors import SmpoError, first_line
from smpo_core.refs import looks_local
from smpo_core.rewards import RewardModel
from smpo_core.store import atomic_path

PROMPT_COLUMNS = ("caption", "prompt", "Prompt", "text")  # Pick-a-Pic, HPDv2, PartiPrompts


def load_prompts(spec: str, num_prompts: int) -> list[str]:
    """The first `num_prompts` distinct prompts of a prompt set.

    A .txt file (one per line; `builtin:tiny-prompts` resolves to one), a Parquet file or
    folder, or `<hub dataset id>@<split>` (e.g. Pick-a-Pic v2's
    `test_unique`, PartiPrompts, HPDv2); tables are read from their first column named in
    PROMPT_COLUMNS.
    """
    path = Path(spec).expanduser()
    if path.suffix == ".txt" and path.is_file():
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif path.exists():
        files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
        prompts = []
        for file in files:
            column = _prompt_column(pq.ParquetFile(file).schema_arrow.names, str(file))
            prompts += pq.read_table(file, columns=[column]).column(column).to_pylist()
    elif "@" in spec and not looks_local(spec):
        prompts = _hub_prompts(spec, num_prompts)
    else:
        raise SmpoError(f"evaluate.prompts {spec!r}: no such file; expected a .txt file, a "
                        f"Parquet file or folder, or <hub dataset id>@<split>")
    unique = list(dict.fromkeys(p for p in prompts if p))[:num_prompts]
    if not unique:
        raise SmpoError(f"evaluate.prompts {spec!r}: no prompts found")
    return unique


def _prompt_column(names: Sequence[str], origin: str) -> str:
    column = next((c for c in PROMPT_COLUMNS if c in names), None)
    if column is None:
        raise SmpoError(f"evaluate.prompts: {origin} has none of the columns "
                        f"{', '.join(PROMPT_COLUMNS)}")
    return column


def _hub_prompts(spec: str, num_prompts: int) -> list[str]:
    import datasets

    dataset_id, split = spec.rsplit("@", 1)
    prompts: list[str] = []
    try:
        stream = datasets.load_dataset(dataset_id, split=split, streaming=True)
        for row in stream:
            text = row[_prompt_column(list(row), f"hub dataset {dataset_id}")]
            if text and text not in prompts:
                prompts.append(text)
            if len(prompts) >= num_prompts:
                break
    except SmpoError:
        raise
    except Exception as exc:  # offline, gone, gated, wrong split: all mean "not readable here"
        raise SmpoError(f"evaluate.prompts {spec!r}: could not read the hub dataset "
                        f"({first_line(exc)}); "
                        f"point evaluate.prompts at a local .txt or Parquet file") from exc
    return prompts


def build_pipeline(base: str, device: torch.device, dtype: torch.dtype, unet=None,
                   revision: str | None = None, vae: str | None = None) -> DiffusionPipeline:
    """The base text-to-image pipeline (SD or SDXL, as the model folder says), or the base with
    a tuned UNet swapped in; DDIM sampler."""
    extra = {"unet": unet} if unet is not None else {}
    if vae:
        extra["vae"] = AutoencoderKL.from_pretrained(vae, dtype=dtype)
    if "safety_checker" in DiffusionPipeline.load_config(base, revision=revision):
        # Scores must see what the model drew (and the checker's weights need not load).
        extra |= {"safety_checker": None, "requires_safety_checker": False}
    pipe = DiffusionPipeline.from_pretrained(base, revision=revision, dtype=dtype, **extra)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(
    pipe: DiffusionPipeline,
    prompts: Sequence[str],
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
    batch_size: int,
    save_to: Path | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Image.Image]:
    """Image i from generator seed `seed + i`: base and tuned see the same initial noise.

    With `save_to`, image i is kept as `save_to/iiii.png` as soon as it is drawn, and a batch
    whose images are all there already is read back instead of drawn again (resume).
    """
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        files = [Path(save_to) / f"{start + i:04d}.png" for i in range(len(chunk))] \
            if save_to else []
        if files and all(f.is_file() for f in files):
            drawn = [_read_png(f) for f in files]
        else:
            generators = [torch.Generator("cpu").manual_seed(seed + start + i)
                          for i in range(len(chunk))]
            drawn = pipe(chunk, generator=generators, num_inference_steps=num_inference_steps,
                         guidance_scale=guidance_scale, height=resolution,
                         width=resolution).images
            for image, file in zip(drawn, files, strict=False):
                with atomic_path(file) as tmp:
                    image.save(tmp, format="PNG")
        images += drawn
        if on_batch:
            on_batch(len(chunk))
    return images


def _read_png(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def score_all(metrics: dict[str, RewardModel], images: Sequence[Image.Image],
              prompts: Sequence[str], batch_size: int) -> dict[str, np.ndarray]:
    return {name: model.score(images, prompts, batch_size=batch_size)
            for name, model in metrics.items()}


def win_rate(tuned: np.ndarray, base: np.ndarray) -> float:
    """Fraction of prompts where tuned beats base; ties count half."""
    if len(tuned) == 0:
        return float("nan")
    return float(np.mean((tuned > base) + 0.5 * (tuned == base)))


def summarise(base: dict[str, np.ndarray], tuned: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per metric: mean and median of both models and the tuned model's win rate."""
    return {
        name: {
            "base_mean": float(np.mean(base[name])),
            "base_median": float(np.median(base[name])),
            "tuned_mean": float(np.mean(tuned[name])),
            "tuned_median": float(np.median(tuned[name])),
            "win_rate": win_rate(tuned[name], base[name]),
        }
        for name in base
    }


def comparison_grid(prompts: Sequence[str], base: Sequence[Image.Image],
                    tuned: Sequence[Image.Image], cell: int = 128,
                    max_rows: int = 16) -> Image.Image:
    """Rows of (prompt, base image, tuned image), images upscaled to `cell` px."""
    rows = min(len(prompts), max_rows)
    label_w, pad, header = 2 * cell, 4, 18
    grid = Image.new("RGB", (label_w + 2 * (cell + pad), header + rows * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label_w, 2), "base", fill="black")
    draw.text((label_w + cell + pad, 2), "tuned", fill="black")
    for i in range(rows):
        y = header + i * (cell + pad)
        draw.multiline_text((4, y + 4), _wrap(prompts[i], 28), fill="black")
        grid.paste(base[i].resize((cell, cell), Image.NEAREST), (label_w, y))
        grid.paste(tuned[i].resize((cell, cell), Image.NEAREST), (label_w + cell + pad, y))
    return grid


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])
