"""Pick-a-Pic-columned pairs of the toy world: two samples of the base model for one caption,
labelled by one simulated annotator each (ties on tiny gaps), in the hub layout the download
stage reads (`data/train-XXXXX-of-NNNNN.parquet`). Beside them, `truth.parquet` keeps what
Pick-a-Pic cannot know: the population's true reward of both images of every pair."""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from smpo_core.schema import PICKAPIC_SCHEMA
from smpo_core.store import atomic_path
from smpo_core.worlds.toy import scenes
from smpo_core.worlds.toy.annotators import Population
from smpo_core.worlds.toy.detector import properties

_CREATED_AT = datetime(2023, 4, 1, 12, 0, 0)
MODEL_NAME = "toy-base"


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def sample_images(pipeline, captions: list[str], seeds: list[int], steps: int,
                  guidance_scale: float, batch: int = 64) -> list[Image.Image]:
    """One sample per (caption, seed), each from its own seeded generator."""
    images = []
    for start in range(0, len(captions), batch):
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + batch]]
        with torch.no_grad():
            images += pipeline(captions[start:start + batch], num_inference_steps=steps,
                               guidance_scale=guidance_scale, generator=generators,
                               height=scenes.IMAGE_SIZE, width=scenes.IMAGE_SIZE).images
    return images


def write_toy_pickapic(out_dir: Path, base: Path, population: Population, num_pairs: int,
                       seed: int = 0, steps: int = 20, guidance_scale: float = 3.0) -> dict:
    """Sample `num_pairs` pairs from the base pipeline folder `base`, label them, write them.
    Returns counts (pairs, ties, agreement of labels with the true reward)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(base, dtype=torch.float32,
                                                       local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    rng = random.Random(f"toy-pairs-{seed}")
    captions = [rng.choice(scenes.all_captions()) for _ in range(num_pairs)]
    image_seeds = rng.sample(range(10**8), 2 * num_pairs)
    images = sample_images(pipeline, captions * 2, image_seeds, steps, guidance_scale)
    first, second = images[:num_pairs], images[num_pairs:]
    f0 = np.stack([properties(im, c) for im, c in zip(first, captions, strict=True)])
    f1 = np.stack([properties(im, c) for im, c in zip(second, captions, strict=True)])
    annotators = np.random.default_rng(seed).integers(0, len(population.weights), num_pairs)
    labels = population.label(f0, f1, annotators, np.random.default_rng(seed + 1))
    per_prompt = {c: captions.count(c) for c in set(captions)}
    rows = []
    for i in range(num_pairs):
        uids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(2)]
        label = float(labels[i])
        rows.append({
            "are_different": True, "caption": captions[i],
            "best_image_uid": "" if label == 0.5 else uids[0 if label == 1.0 else 1],
            "created_at": _CREATED_AT + timedelta(seconds=17 * i), "has_label": True,
            "image_0_uid": uids[0], "image_0_url": f"https://toy.example/{uids[0]}.jpg",
            "image_1_uid": uids[1], "image_1_url": f"https://toy.example/{uids[1]}.jpg",
            "jpg_0": jpeg(first[i]), "jpg_1": jpeg(second[i]),
            "label_0": label, "label_1": 1.0 - label if label != 0.5 else 0.5,
            "model_0": MODEL_NAME, "model_1": MODEL_NAME, "ranking_id": 10**6 + i,
            "user_id": int(annotators[i]) + 1, "num_example_per_prompt": per_prompt[captions[i]]})
    out_dir = Path(out_dir)
    (out_dir / "data").mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / "data" / "train-00000-of-00001.parquet") as tmp:
        pq.write_table(pa.Table.from_pylist(rows, schema=PICKAPIC_SCHEMA), tmp)
    true_0, true_1 = population.true_reward(f0), population.true_reward(f1)
    with atomic_path(out_dir / "truth.parquet") as tmp:
        pq.write_table(pa.table({"ranking_id": [r["ranking_id"] for r in rows],
                                 "true_reward_0": true_0, "true_reward_1": true_1,
                                 "annotator": annotators}), tmp)
    decided = labels != 0.5
    agree = (labels[decided] == 1.0) == (true_0[decided] > true_1[decided])
    fidelity = np.concatenate([f0[:, 0], f1[:, 0]])
    return {"pairs": num_pairs, "ties": int((~decided).sum()),
            "label_agrees_with_truth": float(agree.mean()) if decided.any() else 0.0,
            "mean_true_reward": float(np.mean(np.concatenate([true_0, true_1]))),
            "recognisable": float(np.mean(fidelity == 1.0))}


def main(argv: list[str] | None = None) -> None:
    """Build a toy Pick-a-Pic folder from a base model and write `pairs.json` beside it (the
    command, the counts and the minutes it took)."""
    from smpo_core.worlds.builtins import TOY_ANNOTATORS, TOY_PAIR_STEPS, TOY_PAIRS
    from smpo_core.worlds.toy import WEIGHTS
    from smpo_core.worlds.toy.annotators import population

    parser = argparse.ArgumentParser(description="Sample and label toy Pick-a-Pic pairs.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--base", type=Path, default=WEIGHTS / "toy-sd")
    parser.add_argument("--pairs", type=int, default=TOY_PAIRS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=TOY_PAIR_STEPS, help="DDIM steps")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.time()
    counts = write_toy_pickapic(args.out_dir, args.base, population(count=TOY_ANNOTATORS,
                                                                    seed=0),
                                args.pairs, seed=args.seed, steps=args.steps)
    record = {"command": "python -m smpo_core.worlds.toy.pairs " + " ".join(
        sys.argv[1:] if argv is None else argv), "seed": args.seed, "steps": args.steps,
              "guidance_scale": 3.0} | counts | {
        "minutes": round((time.time() - started) / 60, 1)}
    (args.out_dir / "pairs.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
