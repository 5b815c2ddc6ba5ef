"""CLIP-architecture rewards: PickScore and CLIP score, both a `transformers` CLIPModel."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from smpo_core.rewards.base import RewardModel
from smpo_core.smoothing import PICKSCORE_BOUNDS


class ClipSimilarityReward(RewardModel):
    """Cosine similarity of normalised text and image embeddings (no logit scale)."""

    name = "clip-similarity"

    def __init__(self, checkpoint: str, device: torch.device, processor: str | None = None):
        super().__init__(checkpoint, device)
        self.model = CLIPModel.from_pretrained(checkpoint).to(device).eval()
        self.processor = CLIPProcessor.from_pretrained(processor or checkpoint)

    @torch.no_grad()
    def cosine(self, images: Sequence[Image.Image], captions: Sequence[str]) -> torch.Tensor:
        inputs = self.processor(
            text=list(captions), images=[im.convert("RGB") for im in images],
            padding="max_length", truncation=True, max_length=77, return_tensors="pt",
        ).to(self.device)
        image_emb = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        text_emb = self.model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        )
        image_emb = getattr(image_emb, "pooler_output", image_emb)
        text_emb = getattr(text_emb, "pooler_output", text_emb)
        image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
        text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
        return (image_emb * text_emb).sum(-1).float()

    def score_batch(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        return self.cosine(images, captions).cpu().double().numpy()


class PickScore(ClipSimilarityReward):
    """PickScore (CLIP-H/14 fine-tuned on Pick-a-Pic): `score` is the raw cosine, as METHOD.md
    §2 smooths it; `published` is the model's own logit_scale.exp() times the cosine, the
    number PickScore's inference code and the preference-tuning tables print (about 100 x
    cosine, e.g. 22.08)."""

    name = "pickscore"
    suggested_bounds = PICKSCORE_BOUNDS

    @property
    def logit_scale(self) -> float:
        """exp(logit_scale) of the checkpoint: 100.0 for PickScore_v1."""
        return float(self.model.logit_scale.detach().exp())

    @property
    def scale(self) -> str:
        return f"logit_scale.exp() x cosine, logit_scale.exp() = {self.logit_scale:.6g}"

    def published(self, scores: np.ndarray) -> np.ndarray:
        return self.logit_scale * np.asarray(scores, dtype=np.float64)


class ClipScore(ClipSimilarityReward):
    """CLIP score as torchmetrics' `CLIPScore` defines it and text-to-image tables report it:
    100 x max(cosine, 0). Hessel et al. (2021) define CLIP-S = w max(cosine, 0) with w = 2.5,
    i.e. 0.025 x this number."""

    name = "clipscore"
    scale = "100 x max(cosine, 0) (torchmetrics CLIPScore; Hessel et al.'s CLIP-S = 0.025 x it)"

    def score_batch(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        return (100.0 * self.cosine(images, captions).clamp(min=0)).cpu().double().numpy()
