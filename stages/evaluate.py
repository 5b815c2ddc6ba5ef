"""evaluate: base and tuned model generate from the same prompts and seeds; every metric scores
both; per-prompt scores, summary with win rates, image grid and an HTML report."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from diffusers import UNet2DConditionModel

from smpo_core.evaluation import (
    build_pipeline,
    comparison_grid,
    generate,
    load_prompts,
    score_all,
    summarise,
)
from smpo_core.models import resolve_device, resolve_dtype
from smpo_core.report import evaluation_report, score_distributions, win_rate_bars
from smpo_core.rewards import load_reward_model
from smpo_core.store import atomic_path, write_json
from stages.common import StageRun


def compute(run: StageRun) -> dict[str, Any]:
    cfg, model_cfg = run.settings.evaluate, run.settings.model
    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    metrics = {
        kind: load_reward_model(kind, run.ctx.resolve(ckpt), device,
                                run.ctx.resolve(cfg.metric_processors.get(kind)),
                                cache_dir=run.ctx.store.root / "converted")
        for kind, ckpt in cfg.metrics.items()
    }
    prompts = load_prompts(run.ctx.resolve(cfg.prompts), cfg.num_prompts)
    base_ref = run.ctx.resolve(model_cfg.base)
    pipe = build_pipeline(base_ref, device, dtype, revision=model_cfg.revision,
                          vae=run.ctx.resolve(model_cfg.vae))
    progress = run.progress(total=2 * len(prompts), unit="images")
    sample = dict(seed=cfg.seed, num_inference_steps=cfg.num_inference_steps,
                  guidance_scale=cfg.guidance_scale, resolution=model_cfg.resolution,
                  batch_size=cfg.batch_size, on_batch=progress.update)
    images = {"base": generate(pipe, prompts, save_to=run.out_dir / "images" / "base",
                               **sample)}
    tuned = run.input_dir("train")
    if (tuned / "lora").is_dir():
        pipe.load_lora_weights(str(tuned / "lora"))
    else:
        pipe.unet = UNet2DConditionModel.from_pretrained(tuned / "unet", dtype=dtype).to(device)
    images["tuned"] = generate(pipe, prompts, save_to=run.out_dir / "images" / "tuned",
                               **sample)
    progress.close()
    scores = {name: score_all(metrics, images[name], prompts, batch_size=cfg.batch_size)
              for name in images}
    summary = summarise(scores["base"], scores["tuned"])
    record = {"sampler": "DDIM (eta 0)", "steps": cfg.num_inference_steps,
              "guidance_scale": cfg.guidance_scale, "resolution": model_cfg.resolution,
              "seeds": f"{cfg.seed}..{cfg.seed + len(prompts) - 1}", "prompts": cfg.prompts,
              "num_prompts": len(prompts), "base_model": model_cfg.base,
              "tuned_weights": run.inputs["train"].summary.get("weights_path")}
    _write_outputs(run, prompts, images, scores, summary, record)
    run.tracker.metrics({f"eval.{metric}.{k}": v for metric, s in summary.items()
                         for k, v in s.items()})
    return {"prompts": len(prompts), "summary": summary, "generation": record}


def _write_outputs(run: StageRun, prompts: list[str], images: dict, scores: dict,
                   summary: dict, record: dict) -> None:
    out = run.out_dir
    columns: dict[str, Any] = {"prompt_index": list(range(len(prompts))), "prompt": prompts,
                               "seed": [run.settings.evaluate.seed + i
                                        for i in range(len(prompts))]}
    for metric in summary:
        columns[f"{metric}_base"] = scores["base"][metric]
        columns[f"{metric}_tuned"] = scores["tuned"][metric]
    with atomic_path(out / "scores.parquet") as tmp:
        pq.write_table(pa.table(columns), tmp)
    write_json(out / "summary.json", {"metrics": summary, "generation": record})
    grid = comparison_grid(prompts, images["base"], images["tuned"])
    with atomic_path(out / "grid.png") as tmp:
        grid.save(tmp, format="PNG")
    bars = win_rate_bars(out / "win_rates.png", summary)
    spread = score_distributions(out / "scores.png", scores["base"], scores["tuned"])
    figures = {"Win rates": bars, "Per-prompt scores": spread,
               "Base vs tuned (same seed per row)": out / "grid.png"}
    curves = run.input_dir("train") / "training.png"
    if curves.is_file():
        figures["Training (loss, implicit accuracy, MSEs per step)"] = curves
    evaluation_report(out / "report.html", summary, record, figures)
    run.artifacts += [out / "summary.json", out / "scores.parquet", out / "grid.png", bars,
                      spread, out / "report.html"]
