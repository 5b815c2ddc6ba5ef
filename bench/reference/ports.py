"""Our side of the reward-model check; runs in the project's venv.

    .venv/bin/python bench/reference/ports.py prepare CASE_DIR
    .venv/bin/python bench/reference/ports.py compare CASE_DIR [--tolerance 1e-4]

`prepare` writes the cases: PNG images (sizes chosen to exercise every resize, crop and pad
branch: up- and down-scaling, an odd crop overhang of 3 mod 4, square, grey-scale) with
captions (short, long past 77 tokens, capitals, punctuation, curly quotes, HTML entities),
and a small bert-base-uncased-format vocabulary. `reference.py` then builds and scores the
reference models. `compare` loads the same checkpoint files through `smpo_core.rewards`,
scores the same cases (in batches, so padding is exercised), compares token ids, pixels and
scores, prints a table and exits 1 if any score differs by more than the tolerance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

CAPTIONS = [
    "a red circle on a blue background",
    "A photo of a CAT sitting on a Windowsill, golden hour, 35mm, highly detailed!",
    "an astronaut riding a horse on the moon, digital art, trending on artstation, by greg "
    "rutkowski and alphonse mucha, octane render, 8k, sharp focus, intricate details, "
    "volumetric lighting, cinematic composition, masterpiece, award winning photograph, "
    "ultra realistic, hyperdetailed, concept art, smooth, illustration",
    "\u201cThe Old Man & the Sea\u201d &amp; a lighthouse \u2018at night\u2019",
    "portrait   of a   woman,\toil painting  ",
    "café with naïve décor, 1920s, 3 chairs",
]
# (width, height, mode): up-scaled, overhang 3 (crop rounds 1.5 to 2), down-scaled wide,
# grey-scale tall, already square at 224, down-scaled with antialiasing.
IMAGES = [(64, 48, "RGB"), (227, 224, "RGB"), (320, 200, "RGB"), (100, 150, "L"),
          (224, 224, "RGB"), (500, 375, "RGB")]
BERT_WORDS = ["a", "an", "the", "of", "on", "and", "at", "by", "in", "with", "red", "blue",
              "circle", "photo", "cat", "sitting", "windowsill", "golden", "hour", "highly",
              "detailed", "astronaut", "riding", "horse", "moon", "digital", "art", "trending",
              "old", "man", "sea", "lighthouse", "night", "portrait", "woman", "oil", "painting",
              "cafe", "naive", "decor", "chairs", "render", "sharp", "focus"]


def _image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    """A gradient with shapes and pixel noise: resampling differences show up in it."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = 255 * np.concatenate([x + 0 * y, y + 0 * x, (x + y) / 2], axis=2)
    noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        draw.ellipse((x0, y0, x0 + width // 4, y0 + height // 4),
                     fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image.convert(mode)


def prepare(case_dir: Path) -> None:
    from smpo_core.worlds.checkpoints import write_bert_vocab

    (case_dir / "images").mkdir(parents=True, exist_ok=True)
    cases = []
    for i, ((width, height, mode), caption) in enumerate(zip(IMAGES, CAPTIONS, strict=True)):
        name = f"images/{i}_{width}x{height}_{mode}.png"
        _image(width, height, mode, seed=i).save(case_dir / name)
        cases.append({"image": name, "caption": caption})
    (case_dir / "cases.json").write_text(json.dumps(cases, indent=1))
    write_bert_vocab(case_dir / "bert", BERT_WORDS)
    print(f"{len(cases)} cases written to {case_dir}")


def _ours(case_dir: Path, reference: dict, cases: list[dict],
          clip_tokenizer: str | None) -> dict[str, dict]:
    """Load the reference checkpoint files through our ports and score the cases."""
    from transformers import CLIPImageProcessorPil

    from smpo_core.rewards import load_reward_model
    from smpo_core.rewards.hpsv2 import convert_open_clip
    from smpo_core.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess, hpsv2_preprocess
    from smpo_core.rewards.tokenizers import clip_text_clean

    device = torch.device("cpu")
    images = [Image.open(case_dir / c["image"]) for c in cases]
    captions = [c["caption"] for c in cases]
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        hps = load_reward_model("hpsv2", str(case_dir / reference["hpsv2"]["checkpoint"]), device,
                                processor=clip_tokenizer, cache_dir=Path(scratch) / "cache")
        out["hpsv2"] = {
            "scores": hps.score(images, captions, batch_size=4),
            "tokens": hps.tokenizer([clip_text_clean(c) for c in captions], padding="max_length",
                                    truncation=True, max_length=77)["input_ids"],
            "pixels": hpsv2_preprocess(images), "seconds": time.perf_counter() - started}

        started = time.perf_counter()
        reward = load_reward_model("imagereward",
                                   str(case_dir / reference["imagereward"]["checkpoint"]),
                                   device, processor=str(case_dir / "bert"))
        out["imagereward"] = {
            "scores": reward.score(images, captions, batch_size=4),
            "tokens": reward.tokenizer(captions, padding="max_length", truncation=True,
                                       max_length=35)["input_ids"],
            "pixels": clip_preprocess(images), "seconds": time.perf_counter() - started}

        started = time.perf_counter()
        # The aesthetic port takes a transformers CLIP: convert OpenAI's state dict (QuickGELU)
        # with the same open_clip converter HPSv2 uses.
        clip_dir = Path(scratch) / "clip-vit-l-14-shallow"
        convert_open_clip("aesthetic", case_dir / reference["aesthetic"]["clip"],
                          hidden_act="quick_gelu").save_pretrained(clip_dir)
        CLIPImageProcessorPil(size={"shortest_edge": 224},
                              crop_size={"height": 224, "width": 224},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)
                              ).save_pretrained(clip_dir)
        aesthetic = load_reward_model("aesthetic",
                                      str(case_dir / reference["aesthetic"]["checkpoint"]),
                                      device, processor=str(clip_dir))
        out["aesthetic"] = {"scores": aesthetic.score(images, captions, batch_size=4),
                            "seconds": time.perf_counter() - started}
    return out


def _same_tokens(ours: list[list[int]], theirs: list[list[int]], end: int | None) -> bool:
    """Equal ids; with `end`, up to and including the first `end` token only: open_clip pads
    with 0, transformers with the end-of-text id, and the causal text encoder never sees
    anything after that token."""
    if end is None:
        return ours == theirs
    cut = [(a[:a.index(end) + 1], b[:b.index(end) + 1]) for a, b in zip(ours, theirs, strict=True)]
    return all(a == b for a, b in cut)


def compare(case_dir: Path, tolerance: float, clip_tokenizer: str | None) -> int:
    reference = json.loads((case_dir / "reference_scores.json").read_text())
    cases = json.loads((case_dir / "cases.json").read_text())
    ours = _ours(case_dir, reference, cases, clip_tokenizer)
    reference_pixels = {"hpsv2": torch.load(case_dir / "pixels_hpsv2.pt"),
                        "imagereward": torch.load(case_dir / "pixels_clip.pt")}
    failed = False
    print(f"\n{'model':<12} {'cases':>5} {'max |ours - ref|':>17} {'ref range':>20} "
          f"{'tokens':>7} {'max pixel diff':>15} {'load+score s':>13}  result")
    for model, result in ours.items():
        ref_scores = np.array(reference[model]["scores"])
        diff = float(np.abs(result["scores"] - ref_scores).max())
        tokens = "-"
        if "tokens" in result:
            tokens = "same" if _same_tokens(result["tokens"], reference[model]["tokens"],
                                            end=49407 if model == "hpsv2" else None) else "DIFFER"
        pixels = "-"
        if "pixels" in result:
            pixels = f"{(result['pixels'] - reference_pixels[model]).abs().max().item():.2e}"
        ok = diff <= tolerance and tokens != "DIFFER"
        failed |= not ok
        span = f"[{ref_scores.min():.4f}, {ref_scores.max():.4f}]"
        print(f"{model:<12} {len(ref_scores):>5} {diff:>17.3e} {span:>20} {tokens:>7} "
              f"{pixels:>15} {result['seconds']:>13.1f}  {'ok' if ok else 'MISMATCH'}")
    print("\nper case (ours / reference):")
    for i, case in enumerate(cases):
        cells = "  ".join(f"{m} {ours[m]['scores'][i]:+.6f}/{reference[m]['scores'][i]:+.6f}"
                          for m in ours)
        print(f"  {case['image']:<24} {cells}")
    print(f"\nreference packages: {reference['versions']}")
    print(f"tolerance {tolerance:g}: {'FAILED' if failed else 'all scores agree'}")
    return 1 if failed else 0


def main() -> int:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # per-file weight bars would bury the table
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["prepare", "compare"])
    parser.add_argument("case_dir", type=Path)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--clip-tokenizer", help="CLIP BPE file, open-clip-torch wheel or "
                        "tokenizer folder (default: an installed open-clip-torch's)")
    args = parser.parse_args()
    if args.step == "prepare":
        prepare(args.case_dir)
        return 0
    return compare(args.case_dir, args.tolerance, args.clip_tokenizer)


if __name__ == "__main__":
    sys.exit(main())
