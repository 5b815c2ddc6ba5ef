"""Simulated annotators with varied, hidden preferences, and the Pick-a-Pic labels they give.

Annotator a's reward of image x for caption c is r_a = w_a . f(x, c), f the detector's
properties (detector.PROPERTIES, each in [0, 1]) and w_a a weight vector on the simplex,
drawn per annotator from a Dirichlet around the population's mean taste: some care mostly
about the caption, others about size or colour. One annotator labels a pair: image 0 wins
with the Bradley-Terry probability sigmoid((r_a(x0) - r_a(x1)) / temperature), and the pair
is a tie when the gap is below `tie_gap` (people cannot tell). The ground truth alignment
should raise is the population's mean reward, mean_a r_a = (mean_a w_a) . f.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from smpo_core.worlds.toy.detector import PROPERTIES

#: The population's mean taste, in PROPERTIES order: the caption matters most, then size.
MEAN_TASTE = (0.35, 0.25, 0.15, 0.15, 0.10)


@dataclass(frozen=True)
class Population:
    """The annotators' hidden weights and how they label."""

    weights: tuple[tuple[float, ...], ...]  # one row per annotator, PROPERTIES order
    temperature: float = 0.03
    tie_gap: float = 0.01

    @property
    def mean_weights(self) -> np.ndarray:
        return np.asarray(self.weights).mean(axis=0)

    def rewards(self, features: np.ndarray) -> np.ndarray:
        """Every annotator's reward of every image: (images, annotators)."""
        return np.asarray(features) @ np.asarray(self.weights).T

    def true_reward(self, features: np.ndarray) -> np.ndarray:
        """The population's mean reward of each image: the ground truth."""
        return np.asarray(features) @ self.mean_weights

    def label(self, features_0: np.ndarray, features_1: np.ndarray, annotators: np.ndarray,
              rng: np.random.Generator) -> np.ndarray:
        """label_0 per pair (1, 0 or 0.5 for a tie), pair i judged by annotators[i]."""
        w = np.asarray(self.weights)[annotators]
        gap = ((np.asarray(features_0) - np.asarray(features_1)) * w).sum(axis=1)
        win = rng.random(len(gap)) < 1.0 / (1.0 + np.exp(-gap / self.temperature))
        return np.where(np.abs(gap) < self.tie_gap, 0.5, win.astype(float))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"properties": list(PROPERTIES)} | asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> Population:
        data = json.loads(Path(path).read_text())
        if data.get("properties") != list(PROPERTIES):
            raise ValueError(f"{path}: not a toy-world population file (expected properties "
                             f"{list(PROPERTIES)})")
        return cls(tuple(tuple(row) for row in data["weights"]), data["temperature"],
                   data["tie_gap"])


def population(count: int = 16, concentration: float = 5.0, seed: int = 0,
               temperature: float = 0.03, tie_gap: float = 0.01) -> Population:
    """`count` annotators with Dirichlet(concentration x MEAN_TASTE) weights: the smaller the
    concentration, the more their tastes differ."""
    rng = np.random.default_rng(seed)
    weights = rng.dirichlet(concentration * np.asarray(MEAN_TASTE), size=count)
    return Population(tuple(tuple(float(v) for v in row) for row in weights), temperature,
                      tie_gap)
