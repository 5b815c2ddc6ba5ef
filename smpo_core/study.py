"""The paper's claim, measured in a world with known ground truth: the ablation rows of
METHOD.md §4 (SmPO, Diffusion-DPO, human + inversion, smoothed + forward, SFT) trained at
equal steps, seeds and data, each scored against the base model by the population's true
reward.

Given each run's evaluation (`scores.parquet`) and training history, `summarise_study` pools
the seeds of a method: the true-reward gain over the base (tuned minus base, image by image,
the seeds side by side) with a 95% bootstrap interval over prompts, the win rate, caption
fidelity and diversity (how much the images of one prompt differ in the properties the
caption leaves open). Free of Prefect and MLflow: flows/study.py runs the pipeline.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from smpo_core.statistics import paired_comparison
from smpo_core.worlds.toy.detector import detect

#: The paper's ablation rows as settings overrides (METHOD.md §4).
METHODS: dict[str, list[str]] = {
    "smpo": ["train.method=preference", "train.labels=smoothed", "train.trajectory=inversion"],
    "diffusion-dpo": ["train.method=preference", "train.labels=human",
                      "train.trajectory=forward"],
    "human+inversion": ["train.method=preference", "train.labels=human",
                        "train.trajectory=inversion"],
    "smoothed+forward": ["train.method=preference", "train.labels=smoothed",
                         "train.trajectory=forward"],
    "sft": ["train.method=sft"],
}
TRUTH, FIDELITY = "toy-truth", "toy-fidelity"


def _rows(table: pa.Table, model: str) -> pa.Table:
    return table.filter(pc.equal(table["model"], model))


def _grid(table: pa.Table, model: str, column: str) -> np.ndarray:
    """(prompts, images) scores of one model, rows in prompt order."""
    rows = _rows(table, model)
    data = sorted(zip(rows["prompt_index"].to_pylist(), rows["image_index"].to_pylist(),
                      rows[column].to_pylist(), strict=True))
    prompts = sorted({p for p, _, _ in data})
    images = sorted({i for _, i, _ in data})
    return np.array([v for _, _, v in data], dtype=float).reshape(len(prompts), len(images))


def diversity(image_files: Sequence[Sequence[str]]) -> float:
    """Mean distance, within each prompt, between the images' free attributes (object centre
    x and y, size, saturation, all in [0, 1]), averaged over prompts: 0 when a prompt always
    gives the same picture (over-optimised collapse)."""
    per_prompt = []
    for files in image_files:
        found = [detect(Image.open(f)) for f in files]
        points = [np.array([d.centre[0], d.centre[1], np.sqrt(d.area), d.saturation])
                  for d in found]
        pairs = list(itertools.combinations(points, 2))
        if pairs:
            per_prompt.append(np.mean([np.linalg.norm(a - b) for a, b in pairs]))
    return float(np.mean(per_prompt)) if per_prompt else 0.0


def _files(table: pa.Table, model: str) -> list[list[str]]:
    """The image files of one model, grouped by prompt."""
    rows = _rows(table, model)
    grouped: dict[int, list[str]] = {}
    for prompt, image in sorted(zip(rows["prompt_index"].to_pylist(),
                                    rows["image"].to_pylist(), strict=True)):
        grouped.setdefault(prompt, []).append(image)
    return list(grouped.values())


def summarise_method(evaluations: Sequence[Path], resamples: int = 2000,
                     seed: int = 0) -> dict[str, Any]:
    """One method over its seeds: `evaluations` are the evaluate outputs of its runs (base
    against tuned on the same prompts and image seeds)."""
    tables = [pq.read_table(Path(e) / "scores.parquet") for e in evaluations]
    truth_base = np.concatenate([_grid(t, "base", TRUTH) for t in tables], axis=1)
    truth_tuned = np.concatenate([_grid(t, "tuned", TRUTH) for t in tables], axis=1)
    gain = paired_comparison(truth_base, truth_tuned, resamples, seed)
    per_seed = [float((_grid(t, "tuned", TRUTH) - _grid(t, "base", TRUTH)).mean())
                for t in tables]
    return {
        "seeds": len(tables), "true_reward_gain": gain["diff_mean"],
        "true_reward_gain_ci": gain["diff_ci"], "win_rate": gain["win_rate"],
        "win_rate_ci": gain["win_rate_ci"], "gain_per_seed": per_seed,
        "true_reward": float(truth_tuned.mean()), "base_true_reward": float(truth_base.mean()),
        "caption_fidelity": float(np.mean([_grid(t, "tuned", FIDELITY) for t in tables])),
        "base_caption_fidelity": float(_grid(tables[0], "base", FIDELITY).mean()),
        "diversity": float(np.mean([diversity(_files(t, "tuned")) for t in tables])),
        "base_diversity": diversity(_files(tables[0], "base")),
    }


def mean_curves(histories: Sequence[Sequence[Mapping[str, float]]],
                keys: Sequence[str] = ("loss", "implicit_accuracy")) -> dict[str, list[float]]:
    """Per-step training metrics averaged over seeds (runs of equal length)."""
    curves: dict[str, list[float]] = {"step": [h["step"] for h in histories[0]]}
    for key in keys:
        if all(key in h for run in histories for h in run):
            curves[key] = np.mean([[h[key] for h in run] for run in histories],
                                  axis=0).tolist()
    return curves


def table_markdown(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """The study's table: one row per method."""
    lines = ["| method | true-reward gain [95% CI] | win rate [95% CI] | caption fidelity "
             "| diversity |", "|---|---|---|---|---|"]
    for name, m in methods.items():
        low, high = m["true_reward_gain_ci"]
        wl, wh = m["win_rate_ci"]
        lines.append(f"| {name} | {m['true_reward_gain']:+.4f} [{low:+.4f}, {high:+.4f}] | "
                     f"{m['win_rate']:.3f} [{wl:.3f}, {wh:.3f}] | "
                     f"{m['caption_fidelity']:.3f} (base {m['base_caption_fidelity']:.3f}) | "
                     f"{m['diversity']:.3f} (base {m['base_diversity']:.3f}) |")
    return "\n".join(lines) + "\n"


def plot_curves(curves: Mapping[str, Mapping[str, list[float]]], path: Path) -> Path:
    """Training curves per method (loss and implicit accuracy against optimiser steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("loss", "implicit_accuracy") if any(k in c for c in curves.values())]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for name, curve in curves.items():
            if key in curve:
                ax.plot(curve["step"], curve[key], label=name)
        ax.set_xlabel("optimiser step")
        ax.set_title(f"{key} (mean over seeds)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
