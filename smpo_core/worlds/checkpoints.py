"""The tiny world's reward models: small random checkpoints in the published file layouts.

Each writer produces the same kind of file the authors publish (an open_clip state dict in
{"state_dict": ...} for HPSv2, the `ImageReward` module's state dict, the aesthetic head's
`nn.Sequential` state dict), only small and random, so the loaders in smpo_core.rewards are tested
and the tiny profile can run every metric offline. Sizes are arguments; the loaders read them
back from the tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from smpo_core.store import atomic_path
from smpo_core.worlds.tiny import build_clip_tokenizer

#: The hidden widths of the published aesthetic head (768 -> 1024 -> 128 -> 64 -> 16 -> 1).
AESTHETIC_HIDDEN = (1024, 128, 64, 16)
#: Where the published `nn.Sequential` heads keep their Linear layers (Dropout in between).
HEAD_LAYER_INDICES = (0, 2, 4, 6, 7)
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class _Random:
    """Seeded tensors with the scales of a freshly initialised transformer."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * std + mean

    def norm(self, prefix: str, width: int) -> dict[str, torch.Tensor]:
        """A LayerNorm near identity (not exactly, so a mixed-up norm shows in the output)."""
        return {f"{prefix}.weight": self.normal(width, std=0.1, mean=1.0),
                f"{prefix}.bias": self.normal(width)}

    def linear(self, prefix: str, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": self.normal(out_features, in_features),
                f"{prefix}.bias": self.normal(out_features)}


def _atomic_save(obj: object, path: Path) -> Path:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def _open_clip_block(rng: _Random, prefix: str, width: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.attn.in_proj_weight": rng.normal(3 * width, width),
        f"{prefix}.attn.in_proj_bias": rng.normal(3 * width),
        **rng.linear(f"{prefix}.attn.out_proj", width, width),
        **rng.norm(f"{prefix}.ln_1", width), **rng.norm(f"{prefix}.ln_2", width),
        **rng.linear(f"{prefix}.mlp.c_fc", 4 * width, width),
        **rng.linear(f"{prefix}.mlp.c_proj", width, 4 * width),
    }


def tiny_open_clip_state_dict(seed: int = 0, vocab_size: int | None = None,
                              image_size: int = 32, patch_size: int = 8,
                              vision_width: int = 128, vision_layers: int = 2,
                              text_width: int = 64, text_layers: int = 2,
                              embed_dim: int = 32,
                              context_length: int = 77) -> dict[str, torch.Tensor]:
    """A random open_clip ViT CLIP state dict (the layout HPSv2 publishes); widths must be
    multiples of 64, open_clip's head width. `vocab_size` defaults to the tiny CLIP tokenizer's
    (`tiny.build_clip_tokenizer`)."""
    rng = _Random(seed)
    vocab_size = vocab_size or len(build_clip_tokenizer())
    grid = image_size // patch_size
    state = {
        "visual.conv1.weight": rng.normal(vision_width, 3, patch_size, patch_size),
        "visual.class_embedding": rng.normal(vision_width),
        "visual.positional_embedding": rng.normal(grid * grid + 1, vision_width),
        **rng.norm("visual.ln_pre", vision_width), **rng.norm("visual.ln_post", vision_width),
        "visual.proj": rng.normal(vision_width, embed_dim, std=vision_width ** -0.5),
        "token_embedding.weight": rng.normal(vocab_size, text_width),
        "positional_embedding": rng.normal(context_length, text_width, std=0.01),
        **rng.norm("ln_final", text_width),
        "text_projection": rng.normal(text_width, embed_dim, std=text_width ** -0.5),
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(vision_layers):
        state |= _open_clip_block(rng, f"visual.transformer.resblocks.{i}", vision_width)
    for i in range(text_layers):
        state |= _open_clip_block(rng, f"transformer.resblocks.{i}", text_width)
    return state


def write_tiny_hpsv2_checkpoint(path: Path, seed: int = 0, **sizes: int) -> Path:
    """A small random HPSv2-format file: {"state_dict": open_clip state dict}. `sizes` go to
    `tiny_open_clip_state_dict`."""
    return _atomic_save({"state_dict": tiny_open_clip_state_dict(seed, **sizes)}, path)


def save_tiny_clip_tokenizer(folder: Path, words: Iterable[str] | None = None) -> Path:
    """The tiny CLIP tokenizer (`tiny.build_clip_tokenizer`) saved as a folder, the
    `processor` of a tiny HPSv2 checkpoint."""
    build_clip_tokenizer(words).save_pretrained(folder)
    return Path(folder)


def write_bert_vocab(folder: Path, words: Iterable[str]) -> Path:
    """A WordPiece vocabulary folder (`vocab.txt`) in bert-base-uncased's format: the special
    tokens, the given words lower-cased, single characters and their `##` continuations. It
    loads with `BertTokenizer.from_pretrained(folder)` under transformers 4 and 5 alike."""
    characters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    characters += [chr(c) for c in range(ord("0"), ord("9") + 1)] + list(".,!?'-\"():;&/")
    tokens = list(BERT_SPECIALS)
    for token in [*characters, *(f"##{c}" for c in characters),
                  *sorted({w.lower() for w in words})]:
        if token not in tokens:
            tokens.append(token)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return folder


def tiny_imagereward_state_dict(vocab_size: int, seed: int = 0, image_size: int = 32,
                                patch_size: int = 16, vision_width: int = 64,
                                vision_layers: int = 2, text_width: int = 64,
                                text_layers: int = 2, max_positions: int = 40,
                                head_hidden: Sequence[int] = (64, 32, 16, 8)
                                ) -> dict[str, torch.Tensor]:
    """A random `ImageReward` module state dict (the layout of ImageReward.pt): BLIP's ViT,
    its BERT with cross-attention, BLIP's projection leftovers and the MLP head. `vocab_size`:
    the BERT tokenizer's length with `[DEC]` and `[ENC]` added."""
    rng = _Random(seed)
    grid = image_size // patch_size
    vit, bert = "blip.visual_encoder", "blip.text_encoder"
    state = {
        f"{vit}.cls_token": rng.normal(1, 1, vision_width),
        f"{vit}.pos_embed": rng.normal(1, grid * grid + 1, vision_width),
        f"{vit}.patch_embed.proj.weight": rng.normal(vision_width, 3, patch_size, patch_size),
        f"{vit}.patch_embed.proj.bias": rng.normal(vision_width),
        **rng.norm(f"{vit}.norm", vision_width),
        f"{bert}.embeddings.word_embeddings.weight": rng.normal(vocab_size, text_width),
        f"{bert}.embeddings.position_embeddings.weight": rng.normal(max_positions, text_width),
        f"{bert}.embeddings.position_ids": torch.arange(max_positions)[None],
        **rng.norm(f"{bert}.embeddings.LayerNorm", text_width),
        **rng.linear("blip.vision_proj", 256, vision_width),
        **rng.linear("blip.text_proj", 256, text_width),
    }
    for i in range(vision_layers):
        block = f"{vit}.blocks.{i}"
        state |= {**rng.norm(f"{block}.norm1", vision_width),
                  **rng.linear(f"{block}.attn.qkv", 3 * vision_width, vision_width),
                  **rng.linear(f"{block}.attn.proj", vision_width, vision_width),
                  **rng.norm(f"{block}.norm2", vision_width),
                  **rng.linear(f"{block}.mlp.fc1", 4 * vision_width, vision_width),
                  **rng.linear(f"{block}.mlp.fc2", vision_width, 4 * vision_width)}
    for i in range(text_layers):
        layer = f"{bert}.encoder.layer.{i}"
        for attention, source_width in (("attention", text_width),
                                        ("crossattention", vision_width)):
            state |= {**rng.linear(f"{layer}.{attention}.self.query", text_width, text_width),
                      **rng.linear(f"{layer}.{attention}.self.key", text_width, source_width),
                      **rng.linear(f"{layer}.{attention}.self.value", text_width, source_width),
                      **rng.linear(f"{layer}.{attention}.output.dense", text_width, text_width),
                      **rng.norm(f"{layer}.{attention}.output.LayerNorm", text_width)}
        state |= {**rng.linear(f"{layer}.intermediate.dense", 4 * text_width, text_width),
                  **rng.linear(f"{layer}.output.dense", text_width, 4 * text_width),
                  **rng.norm(f"{layer}.output.LayerNorm", text_width)}
    return state | mlp_head_state_dict(text_width, head_hidden, seed + 1, prefix="mlp.layers")


def write_tiny_imagereward_checkpoint(path: Path, vocab_size: int, seed: int = 0,
                                      **sizes: int) -> Path:
    """A small random ImageReward.pt-format file; `sizes` go to `tiny_imagereward_state_dict`."""
    return _atomic_save(tiny_imagereward_state_dict(vocab_size, seed, **sizes), path)


def mlp_head_state_dict(in_features: int, hidden: Sequence[int] = AESTHETIC_HIDDEN,
                        seed: int = 0, prefix: str = "layers") -> dict[str, torch.Tensor]:
    """The published heads' `nn.Sequential` state dict: Linear layers at indices 0, 2, 4, 6, 7
    (Dropout between the first four), widths in_features -> hidden... -> 1."""
    if len(hidden) != len(HEAD_LAYER_INDICES) - 1:
        raise ValueError(f"the published head has {len(HEAD_LAYER_INDICES) - 1} hidden widths; "
                         f"got {list(hidden)}")
    rng = _Random(seed)
    widths = [in_features, *hidden, 1]
    state: dict[str, torch.Tensor] = {}
    for index, (n_in, n_out) in zip(HEAD_LAYER_INDICES, itertools.pairwise(widths),
                                    strict=True):
        state |= {f"{prefix}.{index}.weight": rng.normal(n_out, n_in, std=n_in ** -0.5),
                  f"{prefix}.{index}.bias": rng.normal(n_out, std=0.1)}
    return state


def write_tiny_aesthetic_head(path: Path, in_features: int, seed: int = 0,
                              hidden: Sequence[int] = AESTHETIC_HIDDEN) -> Path:
    """A random aesthetic head in the published `.pth` layout, for a CLIP of `in_features`."""
    return _atomic_save(mlp_head_state_dict(in_features, hidden, seed), path)
