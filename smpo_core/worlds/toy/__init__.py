"""The toy world: a preference world with known ground truth, small enough for two CPU cores.

- scenes.py: captioned scenes drawn analytically (one shape of one colour on a background,
  varying in size, position and saturation), the base model's training data.
- detector.py: the world's analytic detector: which shape and colour an image shows, and the
  pixel-measurable properties the annotators care about.
- annotators.py: a population of simulated annotators, each with a hidden weighted reward over
  those properties; Bradley-Terry labels with ties on tiny gaps (the Pick-a-Pic situation). The
  population's mean reward is the ground truth alignment should raise.
- pretrain.py: the command that pretrains the base latent diffusion model on the scenes
  (`python -m smpo_core.worlds.toy.pretrain`); its result is committed in `weights/`.
- pairs.py: Pick-a-Pic-columned pairs sampled from the base model and labelled by annotators.
- reward.py: a tiny CLIP fine-tuned on those labelled pairs, saved in PickScore's format.
"""

from pathlib import Path

#: The committed results of pretraining: the base pipeline and the reward model.
WEIGHTS = Path(__file__).parent / "weights"
