"""Metrics of the toy world, which knows its ground truth: an image is scored by the simulated
population's true mean reward, or by the detector's caption fidelity. The checkpoint is the
population file (`builtin:toy-population`): the hidden annotator weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from smpo_core.rewards.base import RewardModel
from smpo_core.worlds.toy.annotators import Population
from smpo_core.worlds.toy.detector import detect, fidelity, properties

POPULATION_FORMAT = "a toy-world population file (population.json, builtin:toy-population)"


class ToyTruth(RewardModel):
    """The population's mean reward (mean over annotators of w_a . f(x, c)), in [0, 1]."""

    name = "toy-truth"
    scale = "population mean reward in [0, 1] (toy world ground truth)"

    def __init__(self, checkpoint: str, device: torch.device, processor: str | None = None):
        super().__init__(checkpoint, device)
        self.population = Population.load(Path(checkpoint))

    def score_batch(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        features = np.stack([properties(im, c) for im, c in zip(images, captions, strict=True)])
        return self.population.true_reward(features).astype(np.float64)


class ToyFidelity(RewardModel):
    """The detector's caption fidelity: 1 = prompted shape and colour, 0.5 = one, 0 = none."""

    name = "toy-fidelity"
    scale = "fraction of the caption's shape and colour shown (toy detector)"

    def __init__(self, checkpoint: str, device: torch.device, processor: str | None = None):
        super().__init__(checkpoint, device)

    def score_batch(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        return np.array([fidelity(detect(im), c) for im, c in zip(images, captions,
                                                                   strict=True)])
