"""Reward models by kind. To add one: subclass RewardModel and register its loader here.

| kind | checkpoint | processor |
|---|---|---|
| pickscore, clipscore | CLIP folder or hub id | CLIP processor, if not the checkpoint's |
| hpsv2 | HPS_v2(.1)_compressed.pt | CLIP tokenizer (None: open-clip-torch's BPE) |
| imagereward | ImageReward.pt | bert-base-uncased tokenizer folder |
| aesthetic | sac+logos+ava1-l14-linearMSE.pth | CLIP ViT-L/14 folder or hub id |
| toy-truth, toy-fidelity | the toy world's population.json (its ground truth) | - |
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from smpo_core.building import one_at_a_time
from smpo_core.errors import SmpoError, first_line
from smpo_core.refs import looks_local
from smpo_core.rewards.aesthetic import AESTHETIC_FORMAT, LaionAesthetic
from smpo_core.rewards.base import RewardModel, checkpoint_hash
from smpo_core.rewards.clip import ClipScore, PickScore
from smpo_core.rewards.hpsv2 import OPEN_CLIP_FORMAT, HPSv2
from smpo_core.rewards.imagereward import IMAGEREWARD_FORMAT, ImageReward
from smpo_core.rewards.toy import POPULATION_FORMAT, ToyFidelity, ToyTruth

REWARD_MODELS: dict[str, type[RewardModel]] = {
    "pickscore": PickScore,
    "clipscore": ClipScore,
    "hpsv2": HPSv2,
    "imagereward": ImageReward,
    "aesthetic": LaionAesthetic,
    "toy-truth": ToyTruth,
    "toy-fidelity": ToyFidelity,
}

_EXPECTED = {
    "hpsv2": OPEN_CLIP_FORMAT,
    "imagereward": IMAGEREWARD_FORMAT,
    "aesthetic": AESTHETIC_FORMAT,
    "toy-truth": POPULATION_FORMAT,
}

__all__ = ["REWARD_MODELS", "RewardModel", "check_kinds", "checkpoint_hash",
           "load_reward_model"]


def check_kinds(kinds: Iterable[str], setting: str) -> None:
    """Refuse an unregistered kind by name before anything is loaded or generated."""
    for kind in kinds:
        if kind not in REWARD_MODELS:
            raise SmpoError(f"{setting}: unknown reward model kind {kind!r}; expected one of "
                            f"{', '.join(REWARD_MODELS)}")


@one_at_a_time
def load_reward_model(
    kind: str, checkpoint: str, device: torch.device, processor: str | None = None,
    cache_dir: Path | None = None,
) -> RewardModel:
    """Load a reward model by kind; a missing path or unreachable hub id names both.

    `cache_dir` keeps checkpoint conversions (HPSv2's open_clip -> transformers) between loads;
    None converts in memory on every load.
    """
    check_kinds([kind], "reward model")
    if looks_local(checkpoint) and not Path(checkpoint).expanduser().exists():
        raise SmpoError(f"reward model {kind}: checkpoint {checkpoint!r} does not exist")
    model_class = REWARD_MODELS[kind]
    extra = {"cache_dir": cache_dir} if getattr(model_class, "converts_checkpoint", False) else {}
    try:
        return model_class(checkpoint, device, processor=processor, **extra)
    except (OSError, ValueError) as exc:
        expected = _EXPECTED.get(kind, "a transformers CLIP folder or a hub id reachable from here")
        raise SmpoError(
            f"reward model {kind}: could not load {checkpoint!r} (processor {processor!r}): "
            f"{first_line(exc)}. Expected {expected}"
        ) from exc
