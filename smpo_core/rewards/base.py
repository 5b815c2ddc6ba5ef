"""What a reward model is to the pipeline: it scores (image, caption) pairs in batches."""

from __future__ import annotations

import functools
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smpo_core.refs import CHECKPOINT_SUFFIXES


class RewardModel(ABC):
    """Scores images against captions. Subclasses load one published checkpoint format."""

    name: str = "reward"
    #: Normalisation bounds (r_min, r_max) the model suggests for smoothing, if any.
    suggested_bounds: tuple[float, float] | None = None
    #: What `published` returns, in words: the scale the model's paper tables print.
    scale: str = "as the reference package returns it"

    def __init__(self, checkpoint: str, device: torch.device):
        self.checkpoint = checkpoint
        self.device = device

    @functools.cached_property
    def version(self) -> str:
        """A short hash that identifies the weights (so labels say what scored them); hashed
        once, since a real checkpoint is gigabytes."""
        return checkpoint_hash(self.checkpoint)

    @abstractmethod
    def score_batch(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        """Rewards, shape (len(images),), float64, for one batch."""

    def published(self, scores: np.ndarray) -> np.ndarray:
        """`score`'s rewards on the scale of the model's published tables (`scale`), the scale
        an evaluation reports; `score` itself keeps the scale the smoothing bounds are in."""
        return np.asarray(scores, dtype=np.float64)

    def score(
        self,
        images: Sequence[Image.Image],
        captions: Sequence[str],
        batch_size: int = 32,
        on_batch: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Rewards for any number of images, `batch_size` at a time."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        out = []
        for start in range(0, len(images), batch_size):
            out.append(self.score_batch(images[start:start + batch_size],
                                        captions[start:start + batch_size]))
            if on_batch:
                on_batch(len(out[-1]))
        return np.concatenate(out) if out else np.zeros(0)


def checkpoint_hash(checkpoint: str) -> str:
    """sha256 (first 16 hex) of a local checkpoint's weight files, or the hub id itself."""
    path = Path(checkpoint)
    if not path.exists():
        return checkpoint
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.suffix in CHECKPOINT_SUFFIXES
    )
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as handle:
            for chunk in iter(lambda h=handle: h.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
