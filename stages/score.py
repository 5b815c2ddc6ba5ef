"""score: every unique image scored by the reward model, pairs turned into soft labels."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.parquet as pq

from smpo_core.models import resolve_device
from smpo_core.report import histograms
from smpo_core.rewards import load_reward_model
from smpo_core.scoring import (
    human_agreement,
    label_metadata,
    pair_rewards,
    score_unique_images,
    soft_labels,
)
from smpo_core.smoothing import resolve_bounds
from smpo_core.store import atomic_path
from stages.common import StageRun

LABELS = "labels.parquet"


def compute(run: StageRun) -> dict[str, Any]:
    cfg = run.settings.score
    reward = load_reward_model(cfg.reward_model, run.ctx.resolve(cfg.checkpoint),
                               resolve_device(cfg.device), run.ctx.resolve(cfg.processor),
                               cache_dir=run.ctx.store.root / "converted")
    pairs_dir = run.input_dir("download")
    pairs = run.inputs["download"].summary["pairs"]
    progress = run.progress(total=2 * pairs, unit="images")
    scores = score_unique_images(pairs_dir, reward, cfg.batch_size, run.out_dir,
                                 on_scored=progress.update)
    progress.close()
    rewards = pair_rewards(pairs_dir, scores)
    all_scores = np.array(list(scores.values()))
    bounds = resolve_bounds(cfg.bounds, scores=all_scores, suggested=reward.suggested_bounds)
    labels = soft_labels(rewards, bounds, cfg.gamma)
    labels = label_metadata(labels, {
        "reward_model": reward.name, "checkpoint": cfg.checkpoint,
        "checkpoint_hash": reward.version, "r_min": bounds.r_min, "r_max": bounds.r_max,
        "bounds": bounds.source, "gamma": cfg.gamma,
    })
    with atomic_path(run.out_dir / LABELS) as tmp:
        pq.write_table(labels, tmp)
    weight = labels.column("weight").to_numpy()
    gap = labels.column("reward_0").to_numpy() - labels.column("reward_1").to_numpy()
    run.artifacts.append(histograms(run.out_dir / "weights.png",
                                    {"weight w": weight, "reward gap r0 - r1": gap},
                                    f"{reward.name} soft labels ({bounds.source} bounds)"))
    return {
        "pairs": labels.num_rows, "unique_images": len(scores),
        "reward_model": reward.name, "checkpoint_hash": reward.version,
        "bounds": {"r_min": bounds.r_min, "r_max": bounds.r_max, "source": bounds.source},
        "gamma": cfg.gamma,
        "mean_abs_weight": float(np.abs(weight).mean()) if len(weight) else 0.0,
        "human_agreement": human_agreement(labels),
        "reward_mean": float(all_scores.mean()) if len(all_scores) else 0.0,
    }
