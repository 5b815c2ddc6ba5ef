"""The toy world's PickScore: a tiny CLIP fine-tuned on pairs labelled by the annotators, as
PickScore is CLIP-H fine-tuned on Pick-a-Pic, saved in PickScore's format (a `CLIPModel` and
`CLIPProcessor` folder, scored as the cosine of text and image embeddings).

Training pairs: drawn scenes (half of them with an off-caption image, so caption fidelity has
a signal) and, if given, the base model's labelled pairs; the loss is PickScore's: cross
entropy of softmax(logit_scale x cosine) over the two images against the label (ties 0.5).
It is an imperfect estimate of the population's taste: `pair_accuracy` says how imperfect.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from smpo_core.store import atomic_dir
from smpo_core.worlds.toy import scenes
from smpo_core.worlds.toy.annotators import Population
from smpo_core.worlds.toy.detector import properties

OFF_CAPTION_PROB = 0.25


def build_clip(seed: int):
    """A random tiny CLIPModel and its processor, for 32x32 images and the toy vocabulary."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from smpo_core.rewards.preprocess import CLIP_MEAN, CLIP_STD
    from smpo_core.worlds.tiny import _text_config, build_clip_tokenizer

    tokenizer = build_clip_tokenizer(scenes.caption_words())
    size = scenes.IMAGE_SIZE
    vision = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "image_size": size, "patch_size": 8}
    config = CLIPConfig(text_config=_text_config(tokenizer), vision_config=vision,
                        projection_dim=32, logit_scale_init_value=np.log(100.0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)),
        tokenizer=tokenizer)
    return model, processor


def _drawn_pair(rng: random.Random) -> tuple[str, Image.Image, Image.Image]:
    text = rng.choice(scenes.all_captions())

    def one() -> Image.Image:
        other = rng.choice(scenes.all_captions()) if rng.random() < OFF_CAPTION_PROB else text
        # Blurred at random: a generator's samples are softer than the drawings.
        return scenes.draw(scenes.random_scene(rng, other)).filter(
            ImageFilter.GaussianBlur(rng.uniform(0.0, 1.0)))

    return text, one(), one()


def read_pairs(folder: Path) -> list[tuple[str, Image.Image, Image.Image, float]]:
    """(caption, image 0, image 1, label_0) of every labelled pair in a toy Pick-a-Pic folder."""
    rows = []
    for file in sorted(Path(folder).glob("data/*.parquet")):
        for row in pq.read_table(file).to_pylist():
            rows.append((row["caption"], Image.open(io.BytesIO(row["jpg_0"])).convert("RGB"),
                         Image.open(io.BytesIO(row["jpg_1"])).convert("RGB"), row["label_0"]))
    return rows


def cosines(model, processor, texts: list[str], images: list[Image.Image]) -> torch.Tensor:
    inputs = processor(text=texts, images=images, padding="max_length", max_length=77,
                       truncation=True, return_tensors="pt")
    image_emb = model.get_image_features(pixel_values=inputs["pixel_values"])
    text_emb = model.get_text_features(input_ids=inputs["input_ids"],
                                       attention_mask=inputs["attention_mask"])
    image_emb = getattr(image_emb, "pooler_output", image_emb)
    text_emb = getattr(text_emb, "pooler_output", text_emb)
    return F.cosine_similarity(image_emb, text_emb, dim=-1)


def pair_accuracy(model, processor, pairs: list[tuple[str, Image.Image, Image.Image, float]],
                  population: Population | None = None) -> dict:
    """How often the model prefers the labelled winner (ties left out); with the population,
    also how often it prefers the image of higher true reward."""
    model.eval()
    with torch.no_grad():
        texts = [p[0] for p in pairs]
        c0 = cosines(model, processor, texts, [p[1] for p in pairs]).numpy()
        c1 = cosines(model, processor, texts, [p[2] for p in pairs]).numpy()
    labels = np.array([p[3] for p in pairs])
    decided = labels != 0.5
    result = {"pairs": int(decided.sum()),
              "accuracy_vs_labels": float(((c0 > c1) == (labels == 1.0))[decided].mean())}
    if population is not None:
        t0 = population.true_reward(np.stack([properties(p[1], p[0]) for p in pairs]))
        t1 = population.true_reward(np.stack([properties(p[2], p[0]) for p in pairs]))
        differ = t0 != t1
        result["accuracy_vs_truth"] = float(((c0 > c1) == (t0 > t1))[differ].mean())
        result["labels_vs_truth"] = float(((labels == 1.0) == (t0 > t1))[decided & differ]
                                          .mean())
    return result


def train_reward_model(out_dir: Path, population: Population, pairs_dir: Path | None = None,
                       steps: int = 1500, batch: int = 64, lr: float = 5e-4, seed: int = 0,
                       held_out: float = 0.2, log: Callable[[str], None] = print,
                       check_pairs: int = 512, held_out_dir: Path | None = None,
                       drawn_share: float = 0.5) -> dict:
    """Fine-tune the tiny CLIP and save it to `out_dir` (PickScore's layout, atomically).
    Returns its pairwise accuracy on held-out base-model pairs (if given) and on
    `check_pairs` fresh drawn pairs. The held-out pairs are `held_out_dir`'s (the pairs the
    model will score, sampled with another seed than `pairs_dir`'s), else a `held_out`
    share of `pairs_dir`'s. Each batch is `drawn_share` freshly drawn pairs, the rest
    base-model pairs."""
    rng = random.Random(f"toy-reward-{seed}")
    annotator_rng = np.random.default_rng(seed)
    model, processor = build_clip(seed)
    sampled = read_pairs(pairs_dir) if pairs_dir else []
    rng.shuffle(sampled)
    if held_out_dir is not None:
        test_sampled, train_sampled = read_pairs(held_out_dir), sampled
    else:
        cut = int(len(sampled) * held_out)
        test_sampled, train_sampled = sampled[:cut], sampled[cut:]
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    model.train()
    for step in range(1, steps + 1):
        n_drawn = round(batch * drawn_share) if train_sampled else batch
        drawn = [_drawn_pair(rng) for _ in range(n_drawn)]
        f0 = np.stack([properties(p[1], p[0]) for p in drawn])
        f1 = np.stack([properties(p[2], p[0]) for p in drawn])
        labels = population.label(f0, f1, annotator_rng.integers(0, len(population.weights),
                                                                 n_drawn), annotator_rng)
        rows = [(*p, float(y)) for p, y in zip(drawn, labels, strict=True)]
        rows += rng.sample(train_sampled, min(batch - n_drawn, len(train_sampled)))
        texts = [r[0] for r in rows]
        scale = model.logit_scale.exp()
        logits = scale * torch.stack([cosines(model, processor, texts, [r[1] for r in rows]),
                                      cosines(model, processor, texts, [r[2] for r in rows])], 1)
        target = torch.tensor([[r[3], 1.0 - r[3]] for r in rows])
        loss = -(target * logits.log_softmax(dim=1)).sum(1).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100.0))
        if step % 50 == 0 or step == steps:
            log(f"reward step {step}/{steps} loss {loss.item():.4f}")
    check_rng = random.Random(f"toy-reward-check-{seed}")
    drawn = [_drawn_pair(check_rng) for _ in range(check_pairs)]
    f0 = np.stack([properties(p[1], p[0]) for p in drawn])
    f1 = np.stack([properties(p[2], p[0]) for p in drawn])
    labels = population.label(f0, f1, np.arange(check_pairs) % len(population.weights),
                              np.random.default_rng(seed + 7))
    result = {"drawn": pair_accuracy(model, processor, [(*p, float(y)) for p, y in
                                                        zip(drawn, labels, strict=True)],
                                     population)}
    if test_sampled:
        result["base_samples"] = pair_accuracy(model, processor, test_sampled, population)
    with atomic_dir(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Fine-tune the toy world's reward model (a "
                                     "tiny CLIP in PickScore's format) on annotator labels.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--pairs", type=Path, default=None,
                        help="a toy Pick-a-Pic folder of base-model pairs to train on too")
    parser.add_argument("--held-out", type=Path, default=None,
                        help="a toy Pick-a-Pic folder to measure accuracy on (default: a "
                        "fifth of --pairs)")
    parser.add_argument("--drawn-share", type=float, default=0.5,
                        help="share of each batch that is freshly drawn pairs")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from smpo_core.worlds.toy.annotators import population

    result = train_reward_model(args.out_dir, population(), args.pairs, args.steps, args.batch,
                                seed=args.seed, log=lambda line: print(line, flush=True),
                                held_out_dir=args.held_out, drawn_share=args.drawn_share)
    record = {"command": "python -m smpo_core.worlds.toy.reward " + " ".join(
        sys.argv[1:] if argv is None else argv), "seed": args.seed, "steps": args.steps,
              "batch": args.batch, "accuracy": result,
              "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted(args.out_dir.glob("*.safetensors"))}}
    (args.out_dir / "train.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
