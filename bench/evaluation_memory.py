"""Peak memory of an evaluation: metric models loaded one at a time after generation (what
`compare_models` does) against every metric model loaded before generation and kept (what
the evaluate stage did before, and the simplest way to write it).

    .venv/bin/python bench/evaluation_memory.py                  # CLIP-B-sized metrics, CPU
    .venv/bin/python bench/evaluation_memory.py --width 1024 --layers 24 --device cuda

Builds the five metric kinds as random checkpoints in their published formats, sized like
CLIP ViT-B (`--width 768 --layers 12`, ~150M parameters each; PickScore and HPSv2 are ViT-H,
~1B, in reality), and the tiny diffusion model; then runs the same comparison (base against a
second model, 4 prompts) in a fresh process per variant, each reporting its own peak RSS
(VmHWM) and, on a GPU, peak allocated GPU memory. Both variants draw, score and summarise
with the same code; only when the metric models are loaded differs. Exits 1 unless loading
one at a time peaks lower.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

KINDS = ("pickscore", "clipscore", "hpsv2", "imagereward", "aesthetic")


def _build(world: Path, width: int, layers: int) -> dict[str, tuple[str, str | None]]:
    """Random metric checkpoints of one size: kind -> (checkpoint, processor)."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from smpo_core.worlds import builtins as builtin
    from smpo_core.worlds import checkpoints
    from smpo_core.worlds.tiny import build_clip_tokenizer, caption_words

    builtin.resolve("builtin:tiny-sd", world)
    tokenizer = build_clip_tokenizer()
    clip = world / "clip"
    if not (clip / "config.json").is_file():
        text = {"vocab_size": len(tokenizer), "hidden_size": width // 2,
                "intermediate_size": 2 * width, "num_hidden_layers": layers,
                "num_attention_heads": width // 128, "max_position_embeddings": 77,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id}
        vision = {"hidden_size": width, "intermediate_size": 4 * width,
                  "num_hidden_layers": layers, "num_attention_heads": width // 64,
                  "image_size": 224, "patch_size": 16}
        CLIPModel(CLIPConfig(text_config=text, vision_config=vision,
                             projection_dim=width // 2)).save_pretrained(clip)
        CLIPProcessor(image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}),
            tokenizer=tokenizer).save_pretrained(clip)
    hpsv2 = world / "HPS_v2.1_compressed.pt"
    if not hpsv2.is_file():
        checkpoints.save_tiny_clip_tokenizer(world / "clip-tokenizer")
        checkpoints.write_tiny_hpsv2_checkpoint(
            hpsv2, image_size=224, patch_size=16, vision_width=width, vision_layers=layers,
            text_width=width // 2, text_layers=layers, embed_dim=width // 2)
    imagereward = world / "ImageReward.pt"
    if not imagereward.is_file():
        vocab = checkpoints.write_bert_vocab(world / "bert", caption_words())
        tokens = len((vocab / "vocab.txt").read_text().split()) + 2
        checkpoints.write_tiny_imagereward_checkpoint(
            imagereward, vocab_size=tokens, image_size=224, patch_size=16,
            vision_width=width, vision_layers=layers, text_width=width, text_layers=layers)
    head = world / "sac+logos+ava1-l14-linearMSE.pth"
    if not head.is_file():
        checkpoints.write_tiny_aesthetic_head(head, in_features=width // 2)
    return {"pickscore": (str(clip), None), "clipscore": (str(clip), None),
            "hpsv2": (str(hpsv2), str(world / "clip-tokenizer")),
            "imagereward": (str(imagereward), str(world / "bert")),
            "aesthetic": (str(head), str(clip))}


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _child(world: Path, variant: str, device: str) -> None:
    """One evaluation in this process; prints its figures as JSON."""
    from smpo_core.evaluation import EvaluationConfig, MetricSpec, compare_models
    from smpo_core.generation import ModelSpec, Sampling
    from smpo_core.prompts import load_prompt_set
    from smpo_core.rewards import load_reward_model
    from smpo_core.worlds import builtins as builtin

    metrics = json.loads((world / "metrics.json").read_text())
    specs = [MetricSpec(kind, checkpoint, processor)
             for kind, (checkpoint, processor) in metrics.items()]
    base = builtin.resolve("builtin:tiny-sd", world)
    models = [ModelSpec("base", base),
              ModelSpec("other", base, weights=str(Path(base) / "unet"), weights_kind="unet")]
    prompts = load_prompt_set(builtin.resolve("builtin:tiny-prompts", world), 4)
    config = EvaluationConfig(Sampling(4, 5.0, 32, "float32"), bootstrap_resamples=200)
    target = torch.device(device)
    load = load_reward_model
    if variant == "all-loaded-first":
        kept = {s.kind: load_reward_model(s.kind, s.checkpoint, target, s.processor)
                for s in specs}

        def load(kind, *args, **kwargs):
            return kept[kind]

    started = time.perf_counter()
    compare_models(models, prompts, specs, config, world / f"generations-{variant}", target,
                   torch.float32, load_metric=load)
    print(json.dumps({
        "variant": variant, "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mib": round(_peak_rss_mib()),
        "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20)
        if target.type == "cuda" else None}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=768, help="metric vision width")
    parser.add_argument("--layers", type=int, default=12, help="metric transformer depth")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", nargs=2, metavar=("WORLD", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(Path(args.child[0]), args.child[1], args.device)
        return 0
    with tempfile.TemporaryDirectory(prefix="smpo-eval-memory-") as tmp:
        world = Path(tmp)
        metrics = _build(world, args.width, args.layers)
        (world / "metrics.json").write_text(json.dumps(metrics))
        rows = []
        for variant in ("one-at-a-time", "all-loaded-first"):
            done = subprocess.run([sys.executable, __file__, "--device", args.device,
                                   "--child", str(world), variant],
                                  capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1])
    ours, theirs = rows
    ratio = theirs["peak_rss_mib"] / ours["peak_rss_mib"]
    print(f"peak RSS: one at a time {ours['peak_rss_mib']} MiB, all loaded first "
          f"{theirs['peak_rss_mib']} MiB ({ratio:.2f}x)")
    if ours["peak_gpu_mib"] is not None:
        print(f"peak GPU memory: {ours['peak_gpu_mib']} MiB against {theirs['peak_gpu_mib']} "
              f"MiB ({theirs['peak_gpu_mib'] / max(ours['peak_gpu_mib'], 1):.2f}x)")
    return 0 if ours["peak_rss_mib"] < theirs["peak_rss_mib"] else 1


if __name__ == "__main__":
    sys.exit(main())
