"""LAION aesthetic predictor v2 (improved-aesthetic-predictor): an MLP on CLIP ViT-L/14 embeddings.

The published head (`sac+logos+ava1-l14-linearMSE.pth`) is the state dict of an
`nn.Sequential` of Linear(768, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64),
Dropout, Linear(64, 16), Linear(16, 1) under `layers.N.*`, with no activations. Score: the head
applied to the L2-normalised CLIP image embedding, on OpenAI CLIP's preprocessing. Captions are
ignored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPVisionModelWithProjection,
)

from smpo_core.errors import SmpoError, first_line
from smpo_core.rewards.base import RewardModel, checkpoint_hash
from smpo_core.rewards.checkpoints import (
    checkpoint_file,
    mlp_head,
    read_state_dict,
)
from smpo_core.rewards.preprocess import clip_preprocess

AESTHETIC_FORMAT = ("the aesthetic MLP head state dict (layers.0.weight ... layers.7.bias), as "
                    "sac+logos+ava1-l14-linearMSE.pth publishes it")
#: The CLIP the published head was trained on.
AESTHETIC_CLIP = "openai/clip-vit-large-patch14"


class LaionAesthetic(RewardModel):
    """The aesthetic head file as `checkpoint`; `processor`: the CLIP ViT-L/14 it embeds with
    (a transformers CLIP folder or hub id, with its image processor; default the OpenAI one)."""

    name = "aesthetic"
    scale = "as the LAION improved-aesthetic-predictor returns it (about 1 to 10)"

    def __init__(self, checkpoint: str, device: torch.device, processor: str | None = None):
        super().__init__(checkpoint, device)
        path = checkpoint_file(self.name, checkpoint)
        state = read_state_dict(self.name, path, ("layers.0.weight",), AESTHETIC_FORMAT)
        self.head = mlp_head(self.name, path, state, "layers.")
        self.clip_source = processor or AESTHETIC_CLIP
        try:
            whole = isinstance(AutoConfig.from_pretrained(self.clip_source), CLIPConfig)
            self.clip = (CLIPModel if whole else CLIPVisionModelWithProjection).from_pretrained(
                self.clip_source, dtype=torch.float32)
            image_processor = CLIPImageProcessorPil.from_pretrained(self.clip_source)
        except (OSError, ValueError) as exc:
            raise SmpoError(f"reward model {self.name}: cannot load the CLIP {self.clip_source!r}"
                            f" ({first_line(exc)}); give a transformers CLIP "
                            f"ViT-L/14 folder (model and image processor)") from exc
        if self.head.in_features != self.clip.config.projection_dim:
            raise SmpoError(f"reward model {self.name}: the head in {path} takes "
                            f"{self.head.in_features} features but {self.clip_source} embeds "
                            f"in {self.clip.config.projection_dim}; the published head needs "
                            f"CLIP ViT-L/14")
        size = image_processor.size
        self.resize = size.get("shortest_edge") or min(size["height"], size["width"])
        self.crop = image_processor.crop_size["height"]
        self.mean, self.std = image_processor.image_mean, image_processor.image_std
        self.clip.to(device).eval()
        self.head.float().to(device).eval()
        self._digest = f"{checkpoint_hash(str(path))}+{checkpoint_hash(self.clip_source)}"

    @property
    def version(self) -> str:
        """The head's hash, then the CLIP's (a hub id stays as it is)."""
        return self._digest

    @torch.no_grad()
    def score_batch(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        pixels = clip_preprocess(images, self.resize, self.crop, self.mean, self.std)
        pixels = pixels.to(self.device)
        if isinstance(self.clip, CLIPModel):
            embedding = self.clip.get_image_features(pixel_values=pixels).pooler_output
        else:
            embedding = self.clip(pixel_values=pixels).image_embeds
        embedding = embedding / embedding.norm(dim=-1, keepdim=True)
        return self.head(embedding).squeeze(-1).double().cpu().numpy()
