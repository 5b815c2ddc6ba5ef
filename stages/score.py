"""score: every unique image scored by the reward model, pairs turned into soft labels."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq
import torch

from smpo_core.models import resolve_device
from smpo_core.rewards import RewardModel, load_reward_model
from smpo_core.scoring import (
    human_agreement,
    label_metadata,
    pair_rewards,
    read_scores,
    score_shards,
    soft_labels,
)
from smpo_core.settings import Settings, settings_model
from smpo_core.smoothing import resolve_bounds
from smpo_core.store import atomic_path
from smpo_core.worlds import builtins
from stages.launch import PROGRESS_LINE, launch, process_main, say

if TYPE_CHECKING:  # launched processes import neither Prefect nor MLflow (stages/launch.py)
    from stages.common import StageRun

LABELS = "labels.parquet"


@dataclass(frozen=True)
class RewardInfo:
    """What the labels record of the reward model (the launched processes return it)."""

    name: str
    version: str
    suggested_bounds: tuple[float, float] | None

    @classmethod
    def of(cls, model: RewardModel) -> RewardInfo:
        bounds = tuple(model.suggested_bounds) if model.suggested_bounds else None
        return cls(model.name, model.version, bounds)


def _reward_model(settings: Settings, store: Path, device: torch.device) -> RewardModel:
    cfg = settings.score
    return load_reward_model(cfg.reward_model, builtins.resolve(cfg.checkpoint, store), device,
                             builtins.resolve(cfg.processor, store),
                             cache_dir=store / "converted")


def compute(run: StageRun) -> dict[str, Any]:
    from smpo_core.report import histograms

    cfg = run.settings.score
    store = run.ctx.store.root
    pairs_dir = run.input_dir("download")
    pairs = run.inputs["download"].summary["pairs"]
    progress = run.progress(total=2 * pairs, unit="images")
    if cfg.num_processes > 1:
        def on_line(line: str) -> None:
            if done := PROGRESS_LINE.search(line):
                progress.update(int(done[1]))

        reward = RewardInfo(**launch(run, "stages.score", cfg.num_processes, {
            "settings": run.settings.model_dump(mode="json"), "store": str(store),
            "pairs": str(pairs_dir), "out_dir": str(run.out_dir)}, on_line,
            cuda=resolve_device(cfg.device).type == "cuda"))
    else:
        model = _reward_model(run.settings, store, resolve_device(cfg.device))
        score_shards(pairs_dir, model, cfg.batch_size, run.out_dir, on_scored=progress.update)
        reward = RewardInfo.of(model)
    scores = read_scores(pairs_dir, run.out_dir)
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
        "num_processes": cfg.num_processes,
        "reward_model": reward.name, "checkpoint_hash": reward.version,
        "bounds": {"r_min": bounds.r_min, "r_max": bounds.r_max, "source": bounds.source},
        "gamma": cfg.gamma,
        "mean_abs_weight": float(np.abs(weight).mean()) if len(weight) else 0.0,
        "human_agreement": human_agreement(labels),
        "reward_mean": float(all_scores.mean()) if len(all_scores) else 0.0,
    }


def _process(spec: dict[str, Any]) -> dict[str, Any]:
    """One score-stage process under `accelerate launch`: the pair shards i with
    i mod processes = its index, on its own device."""
    from accelerate import PartialState

    settings = settings_model().model_validate(spec["settings"])
    state = PartialState()
    cuda = resolve_device(settings.score.device).type == "cuda"
    reward = _reward_model(settings, Path(spec["store"]), state.device if cuda else
                           torch.device("cpu"))
    done = 0

    def on_scored(count: int) -> None:
        nonlocal done
        done += count
        say("process %d progress %d", state.process_index, count)

    scored = score_shards(Path(spec["pairs"]), reward, settings.score.batch_size,
                          Path(spec["out_dir"]),
                          lambda shard: shard % state.num_processes == state.process_index,
                          on_scored)
    say("process %d: %d pair shards, %d images scored", state.process_index, scored, done)
    return asdict(RewardInfo.of(reward))


def main(argv: list[str] | None = None) -> None:
    """Entry point of each process `accelerate launch` starts for the score stage."""
    process_main(argv, "One score-stage process under `accelerate launch`; started by the "
                 "score stage.", _process)


if __name__ == "__main__":
    main()
