"""Plots and the HTML report: what people look at instead of numbers alone."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: workers have no display
import matplotlib.pyplot as plt
import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


# --- evaluation ---------------------------------------------------------------------------------

_COLOURS = ("#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3")


def win_rate_bars(target: Path, summary: dict) -> Path:
    """Per metric, each model's win rate against the reference with its 95% interval as an
    error bar; the dashed line is a coin flip."""
    metrics = list(summary["metrics"])
    others = [m for m in summary["models"] if m != summary["reference"]]
    width = 0.8 / max(len(others), 1)
    fig, ax = plt.subplots(figsize=(1.6 * len(metrics) * max(len(others), 1) ** 0.5 + 2.5, 3.4))
    for k, label in enumerate(others):
        rates, low, high = [], [], []
        for metric in metrics:
            paired = summary["metrics"][metric]["groups"]["all"]["vs_reference"][label]
            rates.append(paired["win_rate"])
            low.append(paired["win_rate"] - paired["win_rate_ci"][0])
            high.append(paired["win_rate_ci"][1] - paired["win_rate"])
        x = np.arange(len(metrics)) + (k - (len(others) - 1) / 2) * width
        ax.bar(x, rates, width * 0.9, yerr=[low, high], capsize=4, label=label,
               color=_COLOURS[(k + 1) % len(_COLOURS)], error_kw={"elinewidth": 1.2})
        for xi, rate in zip(x, rates, strict=True):  # beside the error bar, above the bar
            ax.text(xi + 0.02, rate + 0.015, f"{rate:.2f}", ha="left", fontsize=8)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(np.arange(len(metrics)), metrics)
    ax.set_ylim(0, 1.05)  # room for an interval's cap at 1
    ax.set_ylabel(f"win rate vs {summary['reference']}")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("win rate (ties half), 95% bootstrap interval")
    return _save(fig, target)


def score_distributions(target: Path, scores: dict[str, dict[str, np.ndarray]]) -> Path:
    """Per metric, every model's per-image scores side by side (box and points)."""
    labels = list(scores)
    metrics = list(next(iter(scores.values())))
    fig, axes = plt.subplots(1, len(metrics),
                             figsize=(max(2.8, 1.0 * len(labels) + 1.2) * len(metrics), 3.2))
    for ax, metric in zip(np.atleast_1d(axes), metrics, strict=True):
        values = [np.ravel(scores[label][metric]) for label in labels]
        ax.boxplot(values, tick_labels=labels, widths=0.5)
        for x, points in enumerate(values, start=1):
            ax.scatter(np.full(len(points), x) + np.linspace(-0.12, 0.12, len(points)), points,
                       s=8, alpha=0.6, color=_COLOURS[(x - 1) % len(_COLOURS)])
        ax.set_title(metric)
        ax.tick_params(axis="x", labelrotation=20)
    return _save(fig, target)


def _fit(image: Image.Image, cell: int) -> Image.Image:
    # Tiny images are enlarged pixel by pixel (so they stay readable); real ones are reduced.
    resample = Image.Resampling.NEAREST if image.width < cell else Image.Resampling.LANCZOS
    return image.resize((cell, cell), resample)


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line][:6])


def comparison_grid(rows: Sequence[tuple[str, str | None]],
                    columns: dict[str, Sequence[Image.Image]], cell: int = 160) -> Image.Image:
    """Rows of (prompt, style) with one image per model side by side, all drawn from the
    same seed in a row."""
    label_w, pad, header = 250, 6, 28
    grid = Image.new("RGB", (label_w + len(columns) * (cell + pad),
                             header + len(rows) * (cell + pad)), "white")
    draw = ImageDraw.Draw(grid)
    font, small = ImageFont.load_default(size=16), ImageFont.load_default(size=13)
    for c, label in enumerate(columns):
        draw.text((label_w + c * (cell + pad) + 4, 5), label, fill="black", font=font)
    for r, (prompt, style) in enumerate(rows):
        y = header + r * (cell + pad)
        text = _wrap(prompt, 30) + (f"\n[{style}]" if style else "")
        draw.multiline_text((6, y + 4), text, fill="black", font=small)
        for c, images in enumerate(columns.values()):
            grid.paste(_fit(images[r], cell), (label_w + c * (cell + pad), y))
    return grid


def _interval(value: float, ci: Sequence[float], null: float) -> str:
    """`value [low, high]`, coloured when the interval excludes `null` (no difference)."""
    css = "up" if ci[0] > null else "down" if ci[1] < null else "same"
    return (f"<span class='{css}'>{value:.4f}</span> "
            f"<span class='ci'>[{ci[0]:.4f}, {ci[1]:.4f}]</span>")


def _results_table(summary: dict, group: str, caption: str, table_id: str) -> str:
    reference = summary["reference"]
    head = ("<tr><th>metric</th><th>model</th><th>mean</th><th>median</th>"
            f"<th>difference vs {html.escape(reference)} [95% CI]</th>"
            f"<th>win rate vs {html.escape(reference)} [95% CI]</th></tr>")
    body = []
    for kind, metric in summary["metrics"].items():
        result = metric["groups"][group]
        labels = list(result["models"])
        for k, label in enumerate(labels):
            stats, paired = result["models"][label], result["vs_reference"].get(label)
            first = (f"<td rowspan='{len(labels)}' class='metric'><b>{html.escape(kind)}</b>"
                     f"<div class='scale'>{html.escape(metric['scale'])}</div>"
                     f"<div class='scale'>version {html.escape(str(metric['version']))}</div>"
                     f"</td>") if k == 0 else ""
            diff = _interval(paired["diff_mean"], paired["diff_ci"], 0.0) if paired else \
                "reference"
            win = _interval(paired["win_rate"], paired["win_rate_ci"], 0.5) if paired else ""
            body.append(f"<tr>{first}<td>{html.escape(label)}</td>"
                        f"<td>{stats['mean']:.4f}</td><td>{stats['median']:.4f}</td>"
                        f"<td>{diff}</td><td>{win}</td></tr>")
    return (f"<table id='{table_id}'><caption>{html.escape(caption)}</caption>{head}"
            f"{''.join(body)}</table>")


def _style_tables(summary: dict) -> str:
    """One table per metric: a row per style and overall, per model its mean, and against the
    reference the difference and win rate with intervals."""
    reference = summary["reference"]
    out = []
    for kind, metric in summary["metrics"].items():
        groups = metric["groups"]
        labels = list(groups["all"]["models"])
        others = [m for m in labels if m != reference]
        head = ("<tr><th>style</th><th>prompts</th>"
                + "".join(f"<th>{html.escape(m)} mean</th>" for m in labels)
                + "".join(f"<th>{html.escape(m)} difference [95% CI]</th>"
                          f"<th>{html.escape(m)} win rate [95% CI]</th>" for m in others)
                + "</tr>")
        rows = []
        for group in [g for g in groups if g != "all"] + ["all"]:
            result = groups[group]
            cells = "".join(f"<td>{result['models'][m]['mean']:.4f}</td>" for m in labels)
            for m in others:
                paired = result["vs_reference"][m]
                cells += (f"<td>{_interval(paired['diff_mean'], paired['diff_ci'], 0.0)}</td>"
                          f"<td>{_interval(paired['win_rate'], paired['win_rate_ci'], 0.5)}"
                          f"</td>")
            name = "overall" if group == "all" else group
            css = " class='overall'" if group == "all" else ""
            rows.append(f"<tr{css}><td>{html.escape(name)}</td><td>{result['n_prompts']}</td>"
                        f"{cells}</tr>")
        out.append(f"<table class='style'><caption>{html.escape(kind)} "
                   f"<span class='scale'>({html.escape(metric['scale'])})</span></caption>"
                   f"{head}{''.join(rows)}</table>")
    return "".join(out)


def _key_values(rows: dict) -> str:
    return "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in rows.items())


def evaluation_report(target: Path, summary: dict, figures: dict[str, Path],
                      title: str = "smpo evaluation") -> Path:
    """A self-contained HTML page: results with intervals, per-style tables, win-rate bars,
    the side-by-side grid, score distributions, how the images were drawn, the models."""
    reference = summary["reference"]
    prompts, generation = summary["prompts"], summary["generation"]
    others = [m for m in summary["models"] if m != reference]
    complete = "" if prompts["published_size"] in (None, prompts["count"]) else (
        f" <b class='down'>(a subset: the published set has {prompts['published_size']}; "
        f"numbers are not comparable with its tables)</b>")
    lead = (f"{', '.join(map(html.escape, others))} against <b>{html.escape(reference)}</b> on "
            f"{prompts['count']} prompts of <code>{html.escape(prompts['set'])}</code>"
            f"{complete}, {generation['images_per_prompt']} image(s) per prompt, the same seed "
            f"for every model; {generation['sampler']}, {generation['steps']} steps, guidance "
            f"{generation['guidance_scale']}, {generation['resolution']} px.")
    styled = bool(prompts.get("styles"))
    style_section = (f"<h2 id='per-style'>Per style</h2>{_style_tables(summary)}"
                     if styled else "")
    images = "".join(f"<h2 id='{html.escape(key)}'>{html.escape(caption)}</h2>"
                     f"<img alt='{html.escape(caption)}' src='{_data_uri(path)}'>"
                     for key, (caption, path) in _figure_keys(figures).items())
    models = "".join(
        f"<tr><td>{html.escape(label)}</td><td><code>{html.escape(str(m.get('ref', '')))}</code>"
        f"</td><td><code>{html.escape(str(m.get('base')))}</code></td>"
        f"<td><code>{html.escape(str(m.get('weights', '–')))}</code></td>"
        f"<td><code>{html.escape(m['id'])}</code></td></tr>"
        for label, m in summary["models"].items())
    stats = summary["statistics"]
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0 1.5em}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}}
td:first-child,th:first-child{{text-align:left}}caption{{text-align:left;font-weight:bold;
padding:4px 0}}.metric{{text-align:left}}.scale{{font-size:80%;color:#666;font-weight:normal}}
.ci{{color:#666;font-size:90%}}.up{{color:#1a7f37;font-weight:bold}}
.down{{color:#b42318;font-weight:bold}}tr.overall td{{border-top:2px solid #888;
font-weight:bold}}img{{max-width:100%;border:1px solid #eee}}code{{font-size:90%}}</style>
</head><body><h1>{html.escape(title)}</h1>
<p>{lead}</p>
<h2 id='results'>Results</h2>
{_results_table(summary, "all", "every prompt", "results-table")}
<p class='scale'>Differences and win rates pair each image with the reference's image of the
same prompt and seed; intervals are {stats['confidence']:.0%} {stats['interval']} intervals
over prompts ({stats['resamples']} resamples, seed {stats['seed']}); green or red: the interval
excludes no difference (0, or a win rate of 0.5).</p>
{style_section}
{images}
<h2 id='generation'>How the images were drawn</h2><table>{_key_values(
        {k: v for k, v in generation.items() if not isinstance(v, dict)}
        | {"prompt source": prompts["source"], "prompts in the set": prompts["set_size"]})}</table>
<h2 id='models'>Models</h2><table><tr><th>label</th><th>reference</th><th>base</th>
<th>tuned weights</th><th>id</th></tr>{models}</table>
</body></html>
"""
    with atomic_path(target) as tmp:
        tmp.write_text(page)
    return target


def _figure_keys(figures: dict[str, Path]) -> dict[str, tuple[str, Path]]:
    """Anchors for the figures (`win-rates`, `grid`, ...), from their file names."""
    return {Path(path).stem.replace("_", "-"): (title, path) for title, path in figures.items()}
