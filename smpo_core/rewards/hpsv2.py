"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H/14 fine-tuned on human preferences.

The published files (`HPS_v2_compressed.pt`, `HPS_v2.1_compressed.pt`) are open_clip state
dicts wrapped in {"state_dict": ...}; both versions share the architecture, so the file decides
which one scores (and `version`, its hash, records it). The state dict maps one-to-one onto a
`transformers.CLIPModel`; the conversion is done once per checkpoint hash and cached.

Score, as `hpsv2.score` computes it: the cosine of the normalised image and text features
(`image_features @ text_features.T`, no logit scale). Published tables print it times 100.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image
from transformers import CLIPConfig, CLIPModel
from transformers.initialization import no_init_weights

from smpo_core.errors import SmpoError
from smpo_core.rewards.base import RewardModel, checkpoint_hash
from smpo_core.rewards.checkpoints import (
    cached_conversion,
    checkpoint_file,
    count_blocks,
    load_exactly,
    read_state_dict,
)
from smpo_core.rewards.preprocess import hpsv2_preprocess
from smpo_core.rewards.tokenizers import clip_text_clean, load_clip_tokenizer

OPEN_CLIP_FORMAT = ("an open_clip CLIP state dict (visual.conv1.weight, visual.transformer."
                    "resblocks.N.attn.in_proj_weight, token_embedding.weight, text_projection, "
                    "...), as HPS_v2_compressed.pt / HPS_v2.1_compressed.pt publish it")
_REQUIRED = ("visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
             "visual.proj", "token_embedding.weight", "positional_embedding", "text_projection")
# open_clip's vision towers use 64-wide heads except the biggest ones, whose configs say
# head_width 80 (ViT-H/14, so HPSv2), 88 (ViT-g/14) and 104 (ViT-bigG/14). Text heads are 64 wide.
_VISION_HEAD_WIDTH = {1280: 80, 1408: 88, 1664: 104}
_HEAD_WIDTH = 64
# Not weights: the causal mask buffer and OpenAI's jit-era integer fields.
_IGNORED = ("attn_mask", "input_resolution", "context_length", "vocab_size")


def _heads(width: int, head_width: int, tower: str) -> int:
    if width % head_width:
        raise ValueError(f"{tower} width {width} is not a multiple of the {head_width}-wide "
                         f"attention heads open_clip uses")
    return width // head_width


def open_clip_config(state: Mapping[str, torch.Tensor], hidden_act: str = "gelu") -> CLIPConfig:
    """The `CLIPConfig` of an open_clip / OpenAI CLIP state dict, every size read from it.

    `hidden_act`: "gelu" for open_clip models trained without QuickGELU (HPSv2, the LAION
    CLIPs), "quick_gelu" for OpenAI's own CLIPs. The state dict cannot tell them apart.
    """
    patch_weight = state["visual.conv1.weight"]
    vision_width, patch_size = patch_weight.shape[0], patch_weight.shape[-1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    vocab_size, text_width = state["token_embedding.weight"].shape
    vision_layers = count_blocks(state, "visual.transformer.resblocks.")
    text_layers = count_blocks(state, "transformer.resblocks.")
    if not vision_layers or not text_layers:
        raise ValueError("no transformer blocks found")
    text = {
        "vocab_size": vocab_size, "hidden_size": text_width,
        "intermediate_size": state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": text_layers,
        "num_attention_heads": _heads(text_width, _HEAD_WIDTH, "text"),
        "max_position_embeddings": state["positional_embedding"].shape[0],
        "hidden_act": hidden_act, "layer_norm_eps": 1e-5,
        # eos_token_id 2 selects transformers' argmax pooling, which is what open_clip does
        # (the end-of-text token has the highest id), whatever the tokenizer.
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    }
    vision = {
        "hidden_size": vision_width,
        "intermediate_size": state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": vision_layers,
        "num_attention_heads": _heads(
            vision_width, _VISION_HEAD_WIDTH.get(vision_width, _HEAD_WIDTH), "vision"),
        "image_size": grid * patch_size, "patch_size": patch_size,
        "hidden_act": hidden_act, "layer_norm_eps": 1e-5,
    }
    return CLIPConfig(text_config=text, vision_config=vision,
                      projection_dim=state["visual.proj"].shape[1])


def _block(source: str, target: str, state: Mapping[str, torch.Tensor]) -> dict:
    """One residual attention block: open_clip names -> transformers CLIPEncoderLayer names."""
    width = state[f"{source}.attn.in_proj_weight"].shape[1]
    out = {}
    for kind in ("weight", "bias"):
        q, k, v = state[f"{source}.attn.in_proj_{kind}"].split(width)
        out |= {f"{target}.self_attn.q_proj.{kind}": q, f"{target}.self_attn.k_proj.{kind}": k,
                f"{target}.self_attn.v_proj.{kind}": v}
        for ours, theirs in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                             ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                             ("mlp.fc2", "mlp.c_proj")):
            out[f"{target}.{ours}.{kind}"] = state[f"{source}.{theirs}.{kind}"]
    return out


def open_clip_to_transformers(state: Mapping[str, torch.Tensor],
                              config: CLIPConfig) -> dict[str, torch.Tensor]:
    """The state dict renamed (in_proj split, projections transposed) for `CLIPModel`.
    A tensor with no place in a plain CLIP raises ValueError (an unsupported variant)."""
    out = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "visual_projection.weight": state["visual.proj"].T,
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_projection.weight": state["text_projection"].T,
        "logit_scale": state["logit_scale"],
    }
    for kind in ("weight", "bias"):
        out[f"vision_model.pre_layrnorm.{kind}"] = state[f"visual.ln_pre.{kind}"]
        out[f"vision_model.post_layernorm.{kind}"] = state[f"visual.ln_post.{kind}"]
        out[f"text_model.final_layer_norm.{kind}"] = state[f"ln_final.{kind}"]
    for i in range(config.vision_config.num_hidden_layers):
        out |= _block(f"visual.transformer.resblocks.{i}",
                      f"vision_model.encoder.layers.{i}", state)
    for i in range(config.text_config.num_hidden_layers):
        out |= _block(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}", state)
    known = {"visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding",
             "visual.proj", "token_embedding.weight", "positional_embedding", "text_projection",
             "logit_scale", *(f"{n}.{kind}" for n in ("visual.ln_pre", "visual.ln_post",
                                                       "ln_final") for kind in ("weight", "bias"))}
    block = re.compile(r"(visual\.)?transformer\.resblocks\.\d+\.(attn\.in_proj_(weight|bias)|"
                       r"(attn\.out_proj|ln_1|ln_2|mlp\.c_fc|mlp\.c_proj)\.(weight|bias))")
    unknown = sorted(k for k in state if k not in known and not block.fullmatch(k)
                     and k.split(".")[-1] not in _IGNORED)
    if unknown:
        raise ValueError(f"tensors {', '.join(unknown[:3])} have no place in a plain CLIP "
                         f"(layer scale, attention pooling or another open_clip variant)")
    return {k: v.contiguous() for k, v in out.items()}


def convert_open_clip(model: str, path: Path, hidden_act: str = "gelu") -> CLIPModel:
    """A `CLIPModel` holding the open_clip checkpoint file at `path` (fp32, eval mode)."""
    state = read_state_dict(model, path, _REQUIRED, OPEN_CLIP_FORMAT)
    try:
        config = open_clip_config(state, hidden_act)
        converted = open_clip_to_transformers(state, config)
    except (KeyError, ValueError) as exc:
        raise SmpoError(f"reward model {model}: {path} is not a plain open_clip ViT CLIP "
                        f"({exc}); expected {OPEN_CLIP_FORMAT}") from exc
    with no_init_weights():  # every weight is loaded next (or the load fails): skip ~20 s
        clip = CLIPModel(config)
    load_exactly(clip, converted, model, path)
    return clip.float().eval()


class HPSv2(RewardModel):
    """HPSv2 / HPSv2.1 from the published checkpoint file.

    `processor` is the CLIP tokenizer: None for the real one read from an installed
    open-clip-torch, or a BPE `.txt.gz`, an open-clip-torch wheel or a tokenizer folder.
    With `cache_dir`, the converted `CLIPModel` is saved there once per checkpoint hash.
    """

    name = "hpsv2"
    converts_checkpoint: ClassVar[bool] = True
    scale = "100 x cosine (HPSv2's benchmark tables)"

    def __init__(self, checkpoint: str, device: torch.device, processor: str | None = None,
                 cache_dir: Path | None = None):
        super().__init__(checkpoint, device)
        path = checkpoint_file(self.name, checkpoint)
        self._digest = checkpoint_hash(str(path))
        self.tokenizer = load_clip_tokenizer(processor)
        folder = cached_conversion(cache_dir, f"hpsv2-{self._digest}", "model.safetensors",
                                   lambda tmp: convert_open_clip(self.name, path)
                                   .save_pretrained(tmp))
        clip = (CLIPModel.from_pretrained(folder, dtype=torch.float32) if folder
                else convert_open_clip(self.name, path))
        vocab = clip.config.text_config.vocab_size
        if len(self.tokenizer) != vocab:
            raise SmpoError(f"reward model {self.name}: the tokenizer ({processor or 'CLIP BPE'}"
                            f") has {len(self.tokenizer)} tokens but {checkpoint} expects "
                            f"{vocab}; give the tokenizer the checkpoint was trained with")
        self.model = clip.to(device).eval()
        self.image_size = clip.config.vision_config.image_size
        self.context_length = clip.config.text_config.max_position_embeddings

    @property
    def version(self) -> str:
        return self._digest

    def published(self, scores: np.ndarray) -> np.ndarray:
        return 100.0 * np.asarray(scores, dtype=np.float64)

    @torch.no_grad()
    def score_batch(self, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
        pixels = hpsv2_preprocess(images, self.image_size).to(self.device)
        tokens = self.tokenizer([clip_text_clean(c) for c in captions], padding="max_length",
                                truncation=True, max_length=self.context_length,
                                return_tensors="pt")
        image = self.model.get_image_features(pixel_values=pixels).pooler_output
        text = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device)).pooler_output
        image = image / image.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return (image * text).sum(-1).double().cpu().numpy()
