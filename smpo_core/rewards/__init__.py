"""Reward models by kind. To add one: subclass RewardModel and register its loader here."""

from __future__ import annotations

from pathlib import Path

import torch

from smpo_core.errors import SmpoError
from smpo_core.rewards.base import RewardModel, checkpoint_hash
from smpo_core.rewards.clip import ClipScore, PickScore

REWARD_MODELS: dict[str, type[RewardModel]] = {
    "pickscore": PickScore,
    "clipscore": ClipScore,
}

__all__ = ["REWARD_MODELS", "RewardModel", "checkpoint_hash", "load_reward_model"]


def load_reward_model(
    kind: str, checkpoint: str, device: torch.device, processor: str | None = None
) -> RewardModel:
    """Load a reward model by kind; a missing path or unreachable hub id names both."""
    if kind not in REWARD_MODELS:
        raise SmpoError(
            f"reward model {kind!r}: unknown kind; expected one of {', '.join(REWARD_MODELS)}"
        )
    looks_local = checkpoint.startswith((".", "/", "~")) or Path(checkpoint).exists()
    if looks_local and not Path(checkpoint).exists():
        raise SmpoError(f"reward model {kind}: checkpoint {checkpoint!r} does not exist")
    try:
        return REWARD_MODELS[kind](checkpoint, device, processor=processor)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SmpoError(
            f"reward model {kind}: could not load {checkpoint!r} (processor {processor!r}): "
            f"{first}. Expected a transformers CLIP folder or a hub id reachable from here"
        ) from exc
