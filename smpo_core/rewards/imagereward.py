"""ImageReward (Xu et al. 2023): a BLIP image-grounded text encoder with an MLP head.

The published `ImageReward.pt` is the state dict of the authors' `ImageReward` module:
`blip.visual_encoder.*` (a timm-style ViT), `blip.text_encoder.*` (BLIP's BERT with
cross-attention to the image tokens), `mlp.layers.*` (Linear layers, no activations), plus
BLIP pre-training leftovers (`blip.vision_proj`, `blip.text_proj`) that scoring does not use.
They map onto `transformers` `BlipVisionModel` and `BlipTextModel` name for name, apart from the
ViT's timm names. Score, as `ImageReward.score`: the head applied to the text encoder's first
token, then standardised with the constants in the authors' code (not in the file).

Its tokenizer is bert-base-uncased plus BLIP's `[DEC]` (as bos) and `[ENC]` tokens, 30,524 in
all; `processor` names where to read bert-base-uncased from (a folder holding its vocab.txt,
or the hub id where the hub is reachable).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import (
    BertTokenizer,
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
)
from transformers.initialization import no_init_weights

from smpo_core.errors import SmpoError, first_line
from smpo_core.rewards.base import RewardModel, checkpoint_hash
from smpo_core.rewards.checkpoints import (
    checkpoint_file,
    count_blocks,
    load_exactly,
    mlp_head,
    read_state_dict,
)
from smpo_core.rewards.preprocess import clip_preprocess

IMAGEREWARD_FORMAT = ("the ImageReward state dict (blip.visual_encoder.*, blip.text_encoder.*, "
                      "mlp.layers.*), as ImageReward.pt publishes it")
#: The reward standardisation in the authors' `ImageReward.__init__` (not stored in the file).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
#: `ImageReward.score` tokenizes to 35 tokens, padded and truncated.
IMAGEREWARD_MAX_LENGTH = 35
_VISION = "blip.visual_encoder."
_TEXT = "blip.text_encoder."
_REQUIRED = (f"{_VISION}cls_token", f"{_VISION}pos_embed", f"{_VISION}patch_embed.proj.weight",
             f"{_TEXT}embeddings.word_embeddings.weight",
             f"{_TEXT}embeddings.position_embeddings.weight",
             f"{_TEXT}encoder.layer.0.crossattention.self.key.weight", "mlp.layers.0.weight")
_HEAD_WIDTH = 64  # BLIP's ViT-B/L (12/16 heads) and BERT-base (12 heads) all use 64-wide heads
# BLIP's timm ViT names -> transformers BlipEncoderLayer names, per block.
_VIT_BLOCK = (("norm1", "layer_norm1"), ("attn.qkv", "self_attn.qkv"),
              ("attn.proj", "self_attn.projection"), ("norm2", "layer_norm2"),
              ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))


def _vision(state: dict[str, torch.Tensor]) -> tuple[BlipVisionConfig, dict[str, torch.Tensor]]:
    """BLIP's ViT (`blip.visual_encoder.*`) as a `BlipVisionModel` config and state dict."""
    vit = {k[len(_VISION):]: v for k, v in state.items() if k.startswith(_VISION)}
    width, patch = vit["patch_embed.proj.weight"].shape[0], vit["patch_embed.proj.weight"].shape[-1]
    layers = count_blocks(vit, "blocks.")
    config = BlipVisionConfig(
        hidden_size=width, intermediate_size=vit["blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=layers, num_attention_heads=width // _HEAD_WIDTH,
        image_size=math.isqrt(vit["pos_embed"].shape[1] - 1) * patch, patch_size=patch,
        hidden_act="gelu", layer_norm_eps=1e-6)  # timm's ViT in BLIP: LayerNorm(eps=1e-6)
    out = {"embeddings.class_embedding": vit.pop("cls_token"),
           "embeddings.position_embedding": vit.pop("pos_embed")}
    for kind in ("weight", "bias"):
        out[f"embeddings.patch_embedding.{kind}"] = vit.pop(f"patch_embed.proj.{kind}")
        out[f"post_layernorm.{kind}"] = vit.pop(f"norm.{kind}")
        for i in range(layers):
            for theirs, ours in _VIT_BLOCK:
                out[f"encoder.layers.{i}.{ours}.{kind}"] = vit.pop(f"blocks.{i}.{theirs}.{kind}")
    if vit:
        raise ValueError(f"unexpected vision tensors {', '.join(sorted(vit)[:3])}")
    return config, out


def _text(state: dict[str, torch.Tensor],
          tokenizer: BertTokenizer) -> tuple[BlipTextConfig, dict[str, torch.Tensor]]:
    """BLIP's BERT (`blip.text_encoder.*`): the names already are `BlipTextModel`'s."""
    bert = {k[len(_TEXT):]: v for k, v in state.items()
            if k.startswith(_TEXT) and not k.endswith("position_ids")}
    vocab_size, width = bert["embeddings.word_embeddings.weight"].shape
    config = BlipTextConfig(
        vocab_size=vocab_size, hidden_size=width,
        encoder_hidden_size=bert["encoder.layer.0.crossattention.self.key.weight"].shape[1],
        intermediate_size=bert["encoder.layer.0.intermediate.dense.weight"].shape[0],
        num_hidden_layers=count_blocks(bert, "encoder.layer."),
        num_attention_heads=width // _HEAD_WIDTH,
        max_position_embeddings=bert["embeddings.position_embeddings.weight"].shape[0],
        hidden_act="gelu", layer_norm_eps=1e-12,  # BLIP's med_config.json
        is_decoder=True,  # builds the cross-attention layers; called with is_decoder=False
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.sep_token_id, sep_token_id=tokenizer.sep_token_id)
    return config, bert


def load_blip_tokenizer(model: str, source: str | None) -> BertTokenizer:
    """bert-base-uncased from `source` with BLIP's `[DEC]` and `[ENC]` added, as BLIP's
    `init_tokenizer` does (a folder that already has them gets no duplicates)."""
    source = source or "bert-base-uncased"
    try:
        tokenizer = BertTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise SmpoError(f"reward model {model}: cannot load the BERT tokenizer {source!r} "
                        f"({first_line(exc)}); give a folder holding "
                        f"bert-base-uncased's vocab.txt") from exc
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


class ImageReward(RewardModel):
    """ImageReward v1.0 from the published `ImageReward.pt`; `processor`: the BERT tokenizer."""

    name = "imagereward"
    scale = "as ImageReward.score returns it (standardised reward)"

    def __init__(self, checkpoint: str, device: torch.device, processor: str | None = None):
        super().__init__(checkpoint, device)
        path = checkpoint_file(self.name, checkpoint)
        state = read_state_dict(self.name, path, _REQUIRED, IMAGEREWARD_FORMAT)
        self.tokenizer = load_blip_tokenizer(self.name, processor)
        try:
            vision_config, vision_state = _vision(state)
            text_config, text_state = _text(state, self.tokenizer)
        except (KeyError, ValueError) as exc:
            raise SmpoError(f"reward model {self.name}: {path} is not in the ImageReward "
                            f"layout ({exc}); expected {IMAGEREWARD_FORMAT}") from exc
        if len(self.tokenizer) != text_config.vocab_size:
            raise SmpoError(f"reward model {self.name}: the tokenizer {processor!r} has "
                            f"{len(self.tokenizer)} tokens with [DEC] and [ENC] but {path} "
                            f"expects {text_config.vocab_size}; give bert-base-uncased's vocab")
        with no_init_weights():  # every weight is loaded next, or the load fails
            self.vision = BlipVisionModel(vision_config)
            self.text = BlipTextModel(text_config, add_pooling_layer=False)
        load_exactly(self.vision, vision_state, self.name, path)
        load_exactly(self.text, text_state, self.name, path)
        self.head = mlp_head(self.name, path, state, "mlp.layers.")
        if self.head.in_features != text_config.hidden_size:
            raise SmpoError(f"reward model {self.name}: the MLP head in {path} takes "
                            f"{self.head.in_features} features but the text encoder gives "
                            f"{text_config.hidden_size}")
        for module in (self.vision, self.text, self.head):
            module.float().to(device).eval()
        self.image_size = vision_config.image_size
        self._digest = checkpoint_hash(str(path))

    @property
    def version(self) -> str:
        return self._digest

    @torch.no_grad()
    def score_batch(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        pixels = clip_preprocess(images, self.image_size).to(self.device)
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True,
                                max_length=IMAGEREWARD_MAX_LENGTH, return_tensors="pt")
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        text = self.text(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long,
                                              device=self.device),
        ).last_hidden_state
        reward = self.head(text[:, 0, :]).squeeze(-1)
        return ((reward - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).double().cpu().numpy()
