"""Plots and the HTML report: what people look at instead of numbers alone."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers have no display
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from smpo_core.store import atomic_path


def _save(fig, target: Path) -> Path:
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return target


def histograms(target: Path, series: dict[str, np.ndarray], title: str) -> Path:
    """One histogram panel per named series (e.g. weight w and reward gap)."""
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2))
    for ax, (name, values) in zip(np.atleast_1d(axes), series.items(), strict=True):
        ax.hist(values, bins=40, color="#4C72B0")
        ax.set_title(name)
        ax.set_ylabel("pairs")
    fig.suptitle(title)
    return _save(fig, target)


def training_curves(target: Path, history: dict[str, Sequence[float]]) -> Path:
    """Loss and implicit accuracy (and the MSEs) against the optimiser step."""
    panels = [k for k in ("loss", "implicit_accuracy", "model_mse", "ref_mse") if k in history]
    steps = np.arange(1, len(history[panels[0]]) + 1)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0))
    for ax, name in zip(np.atleast_1d(axes), panels, strict=True):
        ax.plot(steps, history[name], color="#DD8452")
        ax.set_title(name)
        ax.set_xlabel("step")
    return _save(fig, target)


def win_rate_bars(target: Path, summary: dict[str, dict]) -> Path:
    names = list(summary)
    rates = [summary[n]["win_rate"] for n in names]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.0))
    ax.bar(names, rates, color="#55A868")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("tuned win rate")
    for i, rate in enumerate(rates):
        ax.text(i, rate + 0.02, f"{rate:.2f}", ha="center")
    return _save(fig, target)


def score_distributions(target: Path, base: dict[str, np.ndarray],
                        tuned: dict[str, np.ndarray]) -> Path:
    """Per metric, the per-prompt scores of base and tuned side by side (box and points)."""
    names = list(base)
    fig, axes = plt.subplots(1, len(names), figsize=(2.8 * len(names) + 0.5, 3.2))
    for ax, name in zip(np.atleast_1d(axes), names, strict=True):
        ax.boxplot([base[name], tuned[name]], tick_labels=["base", "tuned"], widths=0.5)
        for x, values in ((1, base[name]), (2, tuned[name])):
            ax.scatter(np.full(len(values), x) + np.linspace(-0.12, 0.12, len(values)), values,
                       s=8, alpha=0.6, color="#4C72B0" if x == 1 else "#DD8452")
        ax.set_title(name)
    return _save(fig, target)


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def image_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def evaluation_report(target: Path, summary: dict[str, dict], record: dict[str, object],
                      figures: dict[str, Path]) -> Path:
    """A self-contained HTML page: metric table, win rates, image grid, generation settings."""
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{s[k]:.4f}</td>" for k in
                  ("base_mean", "tuned_mean", "base_median", "tuned_median", "win_rate"))
        + "</tr>"
        for name, s in summary.items()
    )
    settings = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in record.items())
    images = "".join(f"<h2>{html.escape(title)}</h2><img src='{_data_uri(path)}'>"
                     for title, path in figures.items())
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>smpo evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}
td:first-child{{text-align:left}}img{{max-width:100%;border:1px solid #eee}}</style></head>
<body><h1>smpo: base vs tuned</h1>
<table><tr><th>metric</th><th>base mean</th><th>tuned mean</th><th>base median</th>
<th>tuned median</th><th>win rate</th></tr>{rows}</table>
<h2>Generation settings</h2><table>{settings}</table>
{images}
</body></html>
"""
    with atomic_path(target) as tmp:
        tmp.write_text(page)
    return target
