"""`builtin:` references: the tiny profile's data and models, built into the store on first use.

They are then read through the same paths as real ones (a Parquet folder, `from_pretrained`
folders), so the tiny profile exercises the real loading code.
"""

from __future__ import annotations

from pathlib import Path

from smpo_core import synthetic
from smpo_core.errors import SmpoError

PREFIX = "builtin:"
TINY_PAIRS = 320


def _tiny_pickapic(folder: Path) -> Path:
    if not (folder / "expected_counts.json").is_file():
        synthetic.write_synthetic_pickapic(folder, num_pairs=TINY_PAIRS, seed=0)
    return folder


def _tiny_hpsv2(folder: Path) -> Path:
    """An HPSv2-format checkpoint file and the CLIP tokenizer folder it pairs with."""
    from smpo_core.rewards import testing

    checkpoint = folder / "HPS_v2.1_compressed.pt"
    if not checkpoint.is_file():
        testing.save_tiny_clip_tokenizer(folder / "tokenizer")
        testing.write_tiny_hpsv2_checkpoint(checkpoint, seed=0)
    return folder


def _tiny_imagereward(folder: Path) -> Path:
    """An ImageReward.pt-format file and the BERT WordPiece vocabulary folder it pairs with."""
    from smpo_core.rewards import testing

    checkpoint = folder / "ImageReward.pt"
    if not checkpoint.is_file():
        vocab = testing.write_bert_vocab(folder / "bert", synthetic.caption_words())
        tokens = len((vocab / "vocab.txt").read_text().split()) + 2  # + [DEC], [ENC]
        testing.write_tiny_imagereward_checkpoint(checkpoint, vocab_size=tokens)
    return folder


def _tiny_aesthetic(folder: Path) -> Path:
    """A LAION-aesthetic-format MLP head for the tiny CLIP's 32-wide image embedding."""
    from smpo_core.rewards import testing

    head = folder / "sac+logos+ava1-l14-linearMSE.pth"
    if not head.is_file():
        testing.write_tiny_aesthetic_head(head, in_features=32)
    return head


BUILDERS = {
    "tiny-pickapic": _tiny_pickapic,
    "tiny-sd": lambda folder: synthetic.build_tiny_diffusion(folder, seed=0),
    "tiny-sdxl": lambda folder: synthetic.build_tiny_sdxl(folder, seed=0),
    "tiny-clip": lambda folder: synthetic.build_tiny_clip_reward(folder, seed=0),
    "tiny-hpsv2": lambda folder: _tiny_hpsv2(folder) / "HPS_v2.1_compressed.pt",
    "tiny-hpsv2-tokenizer": lambda folder: _tiny_hpsv2(folder.parent / "tiny-hpsv2") / "tokenizer",
    "tiny-imagereward": lambda folder: _tiny_imagereward(folder) / "ImageReward.pt",
    "tiny-imagereward-bert": lambda folder: _tiny_imagereward(folder.parent / "tiny-imagereward")
    / "bert",
    "tiny-aesthetic": _tiny_aesthetic,
}


def resolve(ref: str | None, store_root: Path) -> str | None:
    """A builtin reference becomes its folder in the store (built if missing); others pass."""
    if ref is None or not ref.startswith(PREFIX):
        return ref
    name = ref[len(PREFIX):]
    if name not in BUILDERS:
        raise SmpoError(f"{ref!r}: unknown builtin; expected one of "
                        f"{', '.join(PREFIX + n for n in BUILDERS)}")
    return str(BUILDERS[name](Path(store_root) / "builtin" / name))
