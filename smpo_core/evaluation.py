"""Evaluation (METHOD.md §5): models compared on the same prompts and seeds by every metric.

`compare_models` is the whole of it, for the evaluate stage (base against tuned) and for a
comparison of any number of models alike:

1. check everything that can be wrong before an image is drawn: the prompts, the metric
   kinds, each model's base and whether its tuned weights fit it;
2. draw, model by model (one pipeline in memory at a time), the images not drawn before
   (`generation.ImageFolder` keeps each one; a killed run resumes);
3. score, metric by metric, after every image exists: each metric model is loaded once, scores
   the images it has not scored before, prompt chunk by prompt chunk (kept, so a killed run
   resumes), and is freed before the next one loads;
4. summarise (`statistics`) and write the table, the per-image scores and the summary.

Metrics report on their published scales (`RewardModel.published`), each summary naming the
scale and the metric checkpoint's version.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from smpo_core import faults
from smpo_core.acceleration import FastPaths, prepare_for_inference
from smpo_core.errors import SmpoError
from smpo_core.generation import (
    SEED_STRIDE,
    ImageFolder,
    ImageJob,
    ModelSpec,
    Sampling,
    build_pipeline,
    check_model,
    draw,
    file_identity,
    image_jobs,
    image_seed,
    prompt_chunks,
)
from smpo_core.prompts import PromptSet
from smpo_core.rewards import RewardModel, check_kinds, load_reward_model
from smpo_core.statistics import ALL, CONFIDENCE, summarise_metric
from smpo_core.store import atomic_path, write_json


class ProgressBar(Protocol):
    def update(self, amount: int = 1) -> None: ...

    def close(self) -> None: ...


class _Silent:
    def update(self, amount: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass
class Reporter:
    """How an evaluation tells its caller what it is doing (a stage passes its progress bars
    and logger; the default is silent)."""

    progress: Callable[[str, int], ProgressBar] = lambda what, total: _Silent()
    log: Callable[[str], None] = lambda message: None


@dataclass(frozen=True)
class MetricSpec:
    """A metric: a reward-model kind and the checkpoint (and processor) it loads."""

    kind: str
    checkpoint: str
    processor: str | None = None

    def identity(self) -> str:
        blob = repr((self.kind, file_identity(self.checkpoint), file_identity(self.processor)))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class EvaluationConfig:
    """The settings of an evaluation (`EvaluateSettings`, with the sampling resolved)."""

    sampling: Sampling
    seed: int = 0
    images_per_prompt: int = 1
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0
    batch_size: int = 4  # images per pipeline call
    metric_batch_size: int = 32  # images per metric forward
    chunk_prompts: int = 64  # prompts per resumable chunk
    fast_paths: FastPaths = field(default_factory=FastPaths)  # GPU kernels and layouts


@dataclass
class ScoreFolder:
    """One metric's scores of one model's images, kept beside the images: one Parquet part
    per scored chunk, read back as a whole."""

    images: ImageFolder
    metric: MetricSpec
    folder: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder = self.images.folder / "scores" / f"{self.metric.kind}-{self.metric.identity()}"

    def read(self) -> dict[str, float]:
        scores: dict[str, float] = {}
        for part in sorted(self.folder.glob("part-*.parquet")):
            table = pq.read_table(part)
            scores.update(zip(table.column("image").to_pylist(),
                              table.column("score").to_pylist(), strict=True))
        return scores

    def write(self, jobs: Sequence[ImageJob], scores: np.ndarray) -> None:
        names = [job.name for job in jobs]
        digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
        with atomic_path(self.folder / f"part-{digest}.parquet") as tmp:
            pq.write_table(pa.table({"image": names, "score": np.asarray(scores, float)}), tmp)

    @property
    def info_file(self) -> Path:
        return self.folder / "metric.json"


def free_memory() -> None:
    """Return what dropped models held: Python objects first, then the CUDA cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_evaluation(models: Sequence[ModelSpec], metrics: Sequence[MetricSpec],
                     cfg: EvaluationConfig) -> None:
    """Everything that can be checked without drawing: one clear line for the first problem."""
    if not models:
        raise SmpoError("compare: no models given; name one or more (e.g. base "
                        "tuned=train:latest), the first being the reference")
    labels = [m.label for m in models]
    if len(set(labels)) != len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise SmpoError(f"compare: two models are labelled {twice!r}; give each its own "
                        f"label (LABEL=REF)")
    if not metrics:
        raise SmpoError("evaluate.metrics: empty; name at least one metric kind")
    check_kinds([m.kind for m in metrics], "evaluate.metrics")
    if not 1 <= cfg.images_per_prompt <= SEED_STRIDE:
        raise SmpoError(f"evaluate.images_per_prompt {cfg.images_per_prompt}: expected 1 to "
                        f"{SEED_STRIDE}")
    for model in models:
        check_model(model)


def generate(models: Sequence[ModelSpec], folders: dict[str, ImageFolder],
             prompts: PromptSet, cfg: EvaluationConfig, device: torch.device,
             dtype: torch.dtype, reporter: Reporter,
             owned: Callable[[int], bool] = lambda chunk: True) -> dict[str, dict[str, int]]:
    """Draw what is missing of the prompt chunks `owned` says this process draws (default
    all), one model (one pipeline in memory) at a time. Images are seeded one by one and drawn
    in the same batches whichever process owns their chunk, so N processes draw what one
    does."""
    counts = {}
    chunks = [chunk for index, chunk in enumerate(prompt_chunks(len(prompts),
                                                                cfg.chunk_prompts))
              if owned(index)]
    mine = [job for chunk in chunks
            for job in image_jobs(prompts, cfg.images_per_prompt, cfg.seed, chunk)]
    bar = reporter.progress("generate", len(models) * len(mine))
    for model in models:
        folder = folders[model.label]
        missing = len(folder.missing(mine))
        counts[model.label] = {"drawn": 0, "reused": len(mine) - missing}
        if not missing:
            bar.update(len(mine))
            reporter.log(f"{model.label}: all {len(mine)} images reused from {folder.folder}")
            continue
        pipe = prepare_for_inference(build_pipeline(model, device, dtype),
                                     cfg.fast_paths)
        for chunk in chunks:
            chunk_jobs = image_jobs(prompts, cfg.images_per_prompt, cfg.seed, chunk)
            counts[model.label]["drawn"] += draw(pipe, chunk_jobs, folder, cfg.batch_size,
                                                 bar.update)
        del pipe
        free_memory()
        reporter.log(f"{model.label}: {counts[model.label]['drawn']} images drawn, "
                     f"{counts[model.label]['reused']} reused ({folder.folder})")
    bar.close()
    return counts


def _score(metric: MetricSpec, folders: dict[str, ImageFolder], prompts: PromptSet,
           cfg: EvaluationConfig, device: torch.device, reporter: Reporter,
           load_metric: Callable[..., RewardModel],
           cache_dir: Path | None) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    """One metric's scores of every model's images; the metric model is loaded only if some
    image has no kept score, and dropped before returning."""
    stores = {label: ScoreFolder(folder, metric) for label, folder in folders.items()}
    kept = {label: store.read() for label, store in stores.items()}
    jobs = image_jobs(prompts, cfg.images_per_prompt, cfg.seed)
    missing = {label: [j for j in jobs if j.name not in kept[label]] for label in stores}
    todo = sum(len(m) for m in missing.values())
    info_file = next(iter(stores.values())).info_file
    if not todo and info_file.is_file():
        reporter.log(f"{metric.kind}: every score reused")
        return kept, json.loads(info_file.read_text())
    model = load_metric(metric.kind, metric.checkpoint, device, metric.processor,
                        cache_dir=cache_dir)
    info = {"kind": metric.kind, "checkpoint": metric.checkpoint,
            "processor": metric.processor, "version": model.version, "scale": model.scale}
    bar = reporter.progress(f"score {metric.kind}", todo)
    for label, store in stores.items():
        write_json(store.info_file, info)
        for chunk in prompt_chunks(len(prompts), cfg.chunk_prompts):
            positions = set(chunk)
            chunk_jobs = [j for j in missing[label] if j.position in positions]
            if not chunk_jobs:
                continue
            images = [folders[label].read(j) for j in chunk_jobs]
            raw = model.score(images, [j.prompt for j in chunk_jobs],
                              batch_size=cfg.metric_batch_size)
            scores = model.published(raw)
            store.write(chunk_jobs, scores)
            faults.reached("evaluate.chunk")
            kept[label].update(zip((j.name for j in chunk_jobs), scores.tolist(), strict=True))
            bar.update(len(chunk_jobs))
    bar.close()
    del model
    free_memory()
    reporter.log(f"{metric.kind}: {todo} images scored")
    return kept, info


@dataclass
class Comparison:
    """What `compare_models` found: scores (model -> metric -> (P, K) array) and their
    provenance; `summary()` adds the statistics."""

    models: list[ModelSpec]
    prompts: PromptSet
    cfg: EvaluationConfig
    jobs: list[ImageJob]
    folders: dict[str, ImageFolder]
    scores: dict[str, dict[str, np.ndarray]]
    metrics: dict[str, dict[str, Any]]
    counts: dict[str, dict[str, int]]

    @property
    def reference(self) -> str:
        return self.models[0].label

    def generation(self) -> dict[str, Any]:
        """How the images were drawn: what published numbers move with (METHOD.md §5)."""
        sampling, cfg = self.cfg.sampling, self.cfg
        return {"sampler": sampling.sampler, "steps": sampling.steps,
                "guidance_scale": sampling.guidance_scale, "resolution": sampling.resolution,
                "dtype": sampling.dtype, "seed": cfg.seed,
                "seed_rule": f"image j of prompt i (its index in the whole set) uses "
                             f"torch.Generator('cpu').manual_seed(seed + {SEED_STRIDE} i + j)",
                "seeds": image_seed_range(self.prompts, cfg),
                "images_per_prompt": cfg.images_per_prompt,
                "images_per_model": len(self.jobs), "prompts": len(self.prompts),
                "drawn": {k: v["drawn"] for k, v in self.counts.items()},
                "reused": {k: v["reused"] for k, v in self.counts.items()}}

    def summary(self) -> dict[str, Any]:
        cfg = self.cfg
        metrics = {}
        for kind, info in self.metrics.items():
            groups = summarise_metric({label: s[kind] for label, s in self.scores.items()},
                                      self.reference, self.prompts.styles,
                                      cfg.bootstrap_resamples, cfg.bootstrap_seed)
            metrics[kind] = {"scale": info["scale"], "version": info["version"],
                             "checkpoint": info["checkpoint"], "groups": groups}
        return {
            "reference": self.reference,
            "models": {m.label: m.describe() | {"images": str(self.folders[m.label].folder)}
                       for m in self.models},
            "prompts": self.prompts.describe(),
            "generation": self.generation(),
            "statistics": {"interval": "percentile bootstrap", "confidence": CONFIDENCE,
                           "resamples": cfg.bootstrap_resamples, "seed": cfg.bootstrap_seed,
                           "resampling_unit": "prompt",
                           "difference": "mean over images of (model - reference), paired by "
                                         "seed",
                           "win_rate": "fraction of paired images where the model scores "
                                       "higher; ties count half"},
            "metrics": metrics,
        }

    def score_table(self) -> pa.Table:
        """One row per model and image: prompt, style, seed, image file and every score."""
        rows: dict[str, list] = {"model": [], "prompt_index": [], "prompt": [], "style": [],
                                 "image_index": [], "seed": [], "image": []}
        per_metric: dict[str, list] = {kind: [] for kind in self.metrics}
        styles = self.prompts.styles
        for label, folder in self.folders.items():
            flat = {k: v.ravel() for k, v in self.scores[label].items()}
            for n, job in enumerate(self.jobs):
                rows["model"].append(label)
                rows["prompt_index"].append(self.prompts.indices[job.position])
                rows["prompt"].append(job.prompt)
                rows["style"].append(styles[job.position] if styles else None)
                rows["image_index"].append(job.image)
                rows["seed"].append(job.seed)
                rows["image"].append(str(folder.path(job)))
                for kind in per_metric:
                    per_metric[kind].append(float(flat[kind][n]))
        return pa.table(rows | per_metric)


def compare_models(
    models: Sequence[ModelSpec],
    prompts: PromptSet,
    metrics: Sequence[MetricSpec],
    cfg: EvaluationConfig,
    image_root: Path,
    device: torch.device,
    dtype: torch.dtype,
    reporter: Reporter | None = None,
    load_metric: Callable[..., RewardModel] = load_reward_model,
    metric_cache_dir: Path | None = None,
) -> Comparison:
    """Draw, score and summarise `models` (the first is the reference) on `prompts`."""
    reporter = reporter or Reporter()
    check_evaluation(models, metrics, cfg)
    folders = {m.label: ImageFolder(image_root, m, cfg.sampling) for m in models}
    counts = generate(models, folders, prompts, cfg, device, dtype, reporter)
    jobs = image_jobs(prompts, cfg.images_per_prompt, cfg.seed)
    shape = (len(prompts), cfg.images_per_prompt)
    scores: dict[str, dict[str, np.ndarray]] = {m.label: {} for m in models}
    infos = {}
    for metric in metrics:
        kept, infos[metric.kind] = _score(metric, folders, prompts, cfg, device, reporter,
                                          load_metric, metric_cache_dir)
        for label in scores:
            scores[label][metric.kind] = np.array([kept[label][j.name] for j in jobs],
                                                  dtype=float).reshape(shape)
    return Comparison(list(models), prompts, cfg, jobs, folders, scores, infos, counts)


def image_seed_range(prompts: PromptSet, cfg: EvaluationConfig) -> str:
    first = image_seed(cfg.seed, prompts.indices[0], 0)
    last = image_seed(cfg.seed, prompts.indices[-1], cfg.images_per_prompt - 1)
    return f"{first}..{last}"


def table_rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """The comparison as flat rows (metric, group, model): what table.csv holds."""
    rows = []
    reference = summary["reference"]
    for kind, metric in summary["metrics"].items():
        for group, result in metric["groups"].items():
            for label, stats in result["models"].items():
                paired = result["vs_reference"].get(label, {})
                rows.append({
                    "metric": kind, "group": group, "model": label,
                    "reference": reference, "mean": stats["mean"], "median": stats["median"],
                    "diff_mean": paired.get("diff_mean"),
                    "diff_ci_low": (paired.get("diff_ci") or [None, None])[0],
                    "diff_ci_high": (paired.get("diff_ci") or [None, None])[1],
                    "win_rate": paired.get("win_rate"),
                    "win_rate_ci_low": (paired.get("win_rate_ci") or [None, None])[0],
                    "win_rate_ci_high": (paired.get("win_rate_ci") or [None, None])[1],
                    "n_prompts": result["n_prompts"], "n_images": stats["n_images"],
                    "scale": metric["scale"], "version": metric["version"]})
    return rows


def write_outputs(comparison: Comparison, out_dir: Path) -> dict[str, Any]:
    """`summary.json`, `scores.parquet` (per image) and `table.csv` (per metric, group and
    model) into `out_dir`; returns the summary."""
    summary = comparison.summary()
    write_json(out_dir / "summary.json", summary)
    with atomic_path(out_dir / "scores.parquet") as tmp:
        pq.write_table(comparison.score_table(), tmp)
    rows = table_rows(summary)
    with atomic_path(out_dir / "table.csv") as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return summary


def headline(summary: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per metric and model, the overall numbers a tracker plots (mean, median, and against
    the reference the difference and win rate with their interval ends)."""
    out: dict[str, dict[str, float]] = {}
    for kind, metric in summary["metrics"].items():
        result = metric["groups"][ALL]
        for label, stats in result["models"].items():
            values = {"mean": stats["mean"], "median": stats["median"]}
            paired = result["vs_reference"].get(label)
            if paired:
                values |= {"diff_mean": paired["diff_mean"],
                           "diff_ci_low": paired["diff_ci"][0],
                           "diff_ci_high": paired["diff_ci"][1],
                           "win_rate": paired["win_rate"],
                           "win_rate_ci_low": paired["win_rate_ci"][0],
                           "win_rate_ci_high": paired["win_rate_ci"][1]}
            out[f"{kind}.{label}"] = values
    return out


def result_rows(results: dict[str, dict[str, float]], reference: str = "base",
                model: str = "tuned") -> list[dict[str, Any]]:
    """Per metric of `headline`'s numbers: the reference's and the model's mean, the mean
    paired difference and the model's win rate, each with its 95% interval: the rows of the
    results table a run ends with."""
    rows = []
    for name, values in results.items():
        kind, label = name.rsplit(".", 1)
        if label != model or f"{kind}.{reference}" not in results:
            continue
        rows.append({"metric": kind, reference: results[f"{kind}.{reference}"]["mean"],
                     model: values["mean"], "difference": values["diff_mean"],
                     "difference_ci": (values["diff_ci_low"], values["diff_ci_high"]),
                     "win_rate": values["win_rate"],
                     "win_rate_ci": (values["win_rate_ci_low"], values["win_rate_ci_high"])})
    return rows



GRID_ROWS = 12


def grid_positions(prompts: PromptSet, rows: int = GRID_ROWS) -> list[int]:
    """Prompts for the side-by-side grid: evenly spaced through the set, so every style of a
    styled set (kept style after style) shows."""
    count = len(prompts)
    if count <= rows:
        return list(range(count))
    return sorted({round(k * (count - 1) / (rows - 1)) for k in range(rows)})


def write_report(comparison: Comparison, summary: dict[str, Any], out_dir: Path,
                 extra_figures: dict[str, Path] | None = None,
                 title: str = "smpo evaluation") -> list[Path]:
    """The grid, the plots and the HTML report into `out_dir`; returns every file an
    evaluation writes (for a tracker to keep)."""
    from smpo_core.report import (
        comparison_grid,
        evaluation_report,
        score_distributions,
        win_rate_bars,
    )

    out_dir = Path(out_dir)
    positions = grid_positions(comparison.prompts)
    first = [job for job in comparison.jobs if job.image == 0 and job.position in positions]
    styles = comparison.prompts.styles
    rows = [(job.prompt, styles[job.position] if styles else None) for job in first]
    columns = {label: [folder.read(job) for job in first]
               for label, folder in comparison.folders.items()}
    with atomic_path(out_dir / "grid.png") as tmp:
        comparison_grid(rows, columns).save(tmp, format="PNG")
    figures = {}
    if len(comparison.models) > 1:
        figures["Win rates against the reference (error bars: 95% interval)"] = win_rate_bars(
            out_dir / "win_rates.png", summary)
    figures["Side by side (one prompt and seed per row)"] = out_dir / "grid.png"
    figures["Per-image scores"] = score_distributions(out_dir / "scores.png", comparison.scores)
    evaluation_report(out_dir / "report.html", summary, figures | (extra_figures or {}), title)
    return [out_dir / name for name in ("summary.json", "table.csv", "scores.parquet",
                                        "report.html")] + list(figures.values())
