"""The GPU figures of the issue, on random SD1.5- and SDXL-shaped models (no downloads).

    bench/gpu.sh                 # on an NVIDIA machine: < 8 min, writes bench/results/*.json
    bench/gpu.sh --dry-run       # tiny shapes on the CPU: runs every code path in ~1 min

Figures (each comparison alternates its variants call by call; medians):
- the card's dense bf16 matmul rate (8192^3 GEMMs), the peak against which utilisation is read;
- train pairs/s, cached against online (the authors' way: invert each pair with the policy up
  to its sampled level), SD1.5 shape (4x64x64, K = 5) and SDXL shape (4x128x128, K = 10),
  with model-FLOPs utilisation (UNet forward FLOPs counted by torch's FlopCounterMode; a
  train image = policy forward + backward (3 forwards) + reference forward);
- inversion pairs/s against batch size (UNet forwards, bf16, K levels, R = 1) and its MFU;
- scoring images/s of a ViT-H/14-shaped CLIP (PickScore's shape) against batch size;
- peak memory of a train step, full UNet against LoRA (rank 64 on the attention projections);
- each fast path on and off: bf16 autocast, SDPA attention, channels-last, TF32, torch.compile
  (inference), pinned-memory prefetch of cache rows.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cache_vs_online as cvo

from smpo_core.acceleration import Prefetcher, set_attention
from smpo_core.inversion import inversion_levels, renoise_invert
from smpo_core.training import PairBatch

# UNet2DConditionModel arguments of the published models (their config.json files).
SD15 = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
SDXL = {"sample_size": 128, "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "layers_per_block": 2,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
        "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816}
# What --dry-run builds instead: the same code paths, CPU-sized.
TINY = {"sample_size": 8, "cross_attention_dim": 32, "attention_head_dim": 8,
        "block_out_channels": [32, 64], "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}
TINY_XL = TINY | {"addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                  "projection_class_embeddings_input_dim": 6 * 8 + 32,
                  "use_linear_projection": True}
CLIP_H = {"vision": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                     "num_attention_heads": 16, "image_size": 224, "patch_size": 14},
          "text": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                   "num_attention_heads": 16}, "projection_dim": 1024}
CLIP_TINY = {"vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
             "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 4}, "projection_dim": 32}


class Shape:
    """A random UNet of a published shape, with inputs of that shape."""

    def __init__(self, name: str, config: dict, levels: int, pooled: int | None,
                 device: torch.device):
        from diffusers import DDIMScheduler, UNet2DConditionModel

        self.name, self.device, self.pooled = name, device, pooled
        with device:  # initialise on the device: seconds instead of minutes on the CPU
            torch.manual_seed(0)
            self.unet = UNet2DConditionModel(**config)
        self.side, self.text_dim = config["sample_size"], config["cross_attention_dim"]
        self.levels = inversion_levels(levels)
        self.alphas = DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                    beta_schedule="scaled_linear").alphas_cumprod.float()
        self.parameters = sum(p.numel() for p in self.unet.parameters())

    def batch(self, pairs: int, with_levels: bool) -> PairBatch:
        d, s = self.device, self.side
        z0 = torch.randn(pairs, 2, 4, s, s, device=d)
        z = torch.randn(pairs, 2, len(self.levels), 4, s, s, device=d) if with_levels else None
        weight = torch.linspace(-3, 3, pairs, device=d)
        extra = {}
        if self.pooled:
            extra = {"pooled": torch.randn(pairs, self.pooled, device=d),
                     "time_ids": torch.tensor([8 * s, 8 * s, 0, 0, 8 * s, 8 * s], device=d,
                                              dtype=torch.float32).expand(pairs, 2, 6)}
        return PairBatch(z0, z, torch.randn(pairs, 77, self.text_dim, device=d), weight,
                         (weight < 0).long(), **extra)

    def forward_flops(self, images: int) -> float:
        """FLOPs of one UNet forward over `images` images (torch's FlopCounterMode)."""
        from torch.utils.flop_counter import FlopCounterMode

        batch = self.batch((images + 1) // 2, False)
        z = batch.z0.reshape(-1, 4, self.side, self.side)[:images]
        condition = batch.condition(self.unet)
        condition = {k: ({kk: vv[:images] for kk, vv in v.items()} if isinstance(v, dict)
                         else v[:images]) for k, v in condition.items()}
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            self.unet(z.to(self.unet.dtype), torch.full((images,), 500, device=self.device),
                      **condition)
        return float(counter.get_total_flops())


def matmul_rate(device: torch.device, side: int, rounds: int) -> float:
    """Dense bf16 GEMM FLOP/s (on the CPU, float32: what --dry-run can run)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    times = cvo.interleaved({"mm": lambda _: a @ b}, rounds, device)["mm"]
    return 2 * side**3 / statistics.median(times)


def autocast(device: torch.device, enabled: bool = True):
    if device.type != "cuda" or not enabled:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16)


def train_figures(shape: Shape, pairs: int, steps: int, peak: float) -> dict:
    """Cached vs online (to the sampled level) train steps; bf16 autocast, fp32 master
    weights, bf16 reference; pairs/s and MFU. Also train.reference_errors=cached: the cached
    step reading the reference's errors ("cached-ref", no reference forward) and the invert
    stage's reference pass that computes them ("reference pass", one forward an image)."""
    device = shape.device
    reference = copy.deepcopy(shape.unet).to(torch.bfloat16 if device.type == "cuda"
                                              else torch.float32).requires_grad_(False).eval()
    cache = shape.batch(4 * pairs, with_levels=True)
    t, k = cvo.stratified_draws(shape.levels, len(shape.alphas), (steps + 1) * pairs)

    # One policy for both variants: a step costs the same whatever the weights, and two
    # copies of SDXL with AdamW states would not fit beside each other.
    policy = copy.deepcopy(shape.unet).float().train().requires_grad_(True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)

    def batch_of(slots: torch.Tensor) -> PairBatch:
        rows = slots % cache.z0.shape[0]
        return PairBatch(cache.z0[rows], None, cache.text[rows], cache.weight[rows],
                         cache.winner[rows],
                         None if cache.pooled is None else cache.pooled[rows],
                         None if cache.time_ids is None else cache.time_ids[rows])

    def reference_pass(slots: torch.Tensor) -> torch.Tensor:
        with autocast(device):
            return cvo.reference_errors(reference, batch_of(slots),
                                        cache.z[slots % cache.z0.shape[0], :, k[slots]],
                                        k[slots], t[slots], shape.alphas, shape.levels)

    stored = [reference_pass(torch.arange(i * pairs, (i + 1) * pairs))
              for i in range(steps + 1)]

    def variant(source: str):
        def step(i: int) -> None:
            slots = torch.arange(i * pairs, (i + 1) * pairs)
            if source == "reference pass":
                reference_pass(slots)
                return
            batch = batch_of(slots)
            with autocast(device):
                if source.startswith("cached"):
                    z_level = cache.z[slots % cache.z0.shape[0], :, k[slots]]
                else:
                    z_level = cvo.level_latents_online(policy, batch, k[slots], shape.alphas,
                                                       shape.levels, 1)
                cvo.train_step(policy, reference, optimizer, batch, z_level, k[slots],
                               t[slots], shape.alphas, shape.levels,
                               stored[i] if source == "cached-ref" else None)
        return step

    sources = ("cached", "online", "cached-ref", "reference pass")
    times = cvo.interleaved({s: variant(s) for s in sources}, steps, device)
    forward = shape.forward_flops(2) / 2  # per image
    levels_online = float((k[pairs:] + 1).float().mean())
    flops = {"cached": 2 * 4 * forward,  # per pair: 2 images x (3 policy + 1 reference)
             "online": 2 * (4 + 2 * levels_online) * forward,
             "cached-ref": 2 * 3 * forward, "reference pass": 2 * forward}
    out: dict = {"pairs_per_step": pairs, "levels": len(shape.levels),
                 "mean_levels_inverted_online": levels_online,
                 "unet_forward_gflops_per_image": forward / 1e9}
    for source, seconds in times.items():
        rate = pairs / statistics.median(seconds)
        out[source] = {"pairs_per_second": rate, "mfu": rate * flops[source] / peak}
    out["online_over_cached"] = out["cached"]["pairs_per_second"] / \
        out["online"]["pairs_per_second"]
    out["online_over_cached_ref"] = out["cached-ref"]["pairs_per_second"] / \
        out["online"]["pairs_per_second"]
    return out


def inversion_figures(shape: Shape, batches: list[int], rounds: int, peak: float,
                      compiled: bool) -> dict:
    """Inversion pairs/s (UNet only, bf16, K levels, R = 1) per batch size, and MFU;
    with `compiled`, also the largest batch through torch.compile'd UNet."""
    device = shape.device
    unet = copy.deepcopy(shape.unet).to(torch.bfloat16 if device.type == "cuda"
                                         else torch.float32).eval()
    forward = shape.forward_flops(2) / 2
    inputs = {b: shape.batch(b, with_levels=False) for b in batches}

    def call(model, b):
        batch = inputs[b]
        condition = batch.condition(unet)
        z0 = batch.z0.reshape(2 * b, 4, shape.side, shape.side)

        def eps(z, t):
            return model(z.to(unet.dtype), torch.full((z.shape[0],), t, device=device),
                         **condition).sample

        return lambda _: renoise_invert(eps, z0, shape.levels, shape.alphas, 1)

    variants = {f"batch {b}": call(unet, b) for b in batches}
    if compiled:
        variants[f"compiled, batch {batches[-1]}"] = call(compile_module(unet, device),
                                                          batches[-1])
    with torch.no_grad():
        times = cvo.interleaved(variants, rounds, device)
    out: dict = {"levels": len(shape.levels)}
    for name, seconds in times.items():
        b = int(name.rsplit(" ", 1)[1])
        rate = b / statistics.median(seconds)
        out[name] = {"pairs_per_second": rate,
                     "mfu": rate * 2 * len(shape.levels) * 2 * forward / peak}
    return out


def compile_module(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # On the CPU (--dry-run) the eager backend runs the compile path without a C++ toolchain.
    return torch.compile(module, backend="inductor" if device.type == "cuda" else "eager")


def scoring_figures(config: dict, batches: list[int], rounds: int,
                    device: torch.device) -> dict:
    """Images/s of a CLIP of that shape scoring images against captions (bf16 on a GPU)."""
    from transformers import CLIPConfig, CLIPModel

    with device:
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=config["text"], vision_config=config["vision"],
                                     projection_dim=config["projection_dim"])).eval()
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    side = config["vision"]["image_size"]

    def call(b: int):
        pixels = torch.randn(b, 3, side, side, device=device, dtype=model.dtype)
        ids = torch.randint(0, 1000, (b, 77), device=device)

        def run(_: int) -> None:
            image = model.get_image_features(pixel_values=pixels).pooler_output
            text = model.get_text_features(input_ids=ids).pooler_output
            torch.nn.functional.cosine_similarity(image, text)
        return run

    with torch.no_grad():
        times = cvo.interleaved({f"batch {b}": call(b) for b in batches}, rounds, device)
    return {name: {"images_per_second": int(name.split()[1]) / statistics.median(s)}
            for name, s in times.items()}


def memory_figures(shape: Shape, pairs: int, rank: int) -> dict:
    """Peak GPU memory of one cached train step (AdamW), full UNet vs LoRA adapters."""
    from peft import LoraConfig

    device = shape.device
    reference = copy.deepcopy(shape.unet).to(torch.bfloat16 if device.type == "cuda"
                                              else torch.float32).requires_grad_(False).eval()
    cache = shape.batch(pairs, with_levels=True)
    t, k = cvo.stratified_draws(shape.levels, len(shape.alphas), pairs)
    out = {}
    for kind in ("full", "lora"):
        policy = copy.deepcopy(shape.unet).float()
        if kind == "lora":
            policy.requires_grad_(False)
            policy.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                          target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        policy.train()
        params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):  # the second step holds the optimiser state too
            with autocast(device):
                cvo.train_step(policy, reference, optimizer, cache, cache.z[
                    torch.arange(pairs), :, k], k, t, shape.alphas, shape.levels)
        out[kind] = {"trainable_parameters": sum(p.numel() for p in params),
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30
                     if device.type == "cuda" else None}
        del policy, optimizer
    return out


def fast_path_figures(shape: Shape, pairs: int, rounds: int) -> dict:
    """Each fast path on against off, the others at their defaults: a cached train step for
    autocast, SDPA, channels-last and TF32 (the last in fp32, where it applies); prefetching
    cache rows into pinned memory against loading them when needed."""
    device = shape.device
    cache = shape.batch(pairs, with_levels=True)
    t, k = cvo.stratified_draws(shape.levels, len(shape.alphas), pairs)
    reference = copy.deepcopy(shape.unet).requires_grad_(False).eval()

    def step(bf16=True, attention="sdpa", channels_last=False, tf32=True):
        policy = copy.deepcopy(shape.unet).float().train().requires_grad_(True)
        ref = copy.deepcopy(reference).to(torch.bfloat16 if bf16 and device.type == "cuda"
                                          else torch.float32)
        for module in (policy, ref):
            set_attention(module, attention)
            if channels_last:
                module.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)

        def run(_: int) -> None:
            if device.type == "cuda":
                torch.backends.cuda.matmul.allow_tf32 = tf32
                torch.backends.cudnn.allow_tf32 = tf32
            with autocast(device, bf16):
                cvo.train_step(policy, ref, optimizer, cache, cache.z[torch.arange(pairs), :, k],
                               k, t, shape.alphas, shape.levels)
        return run

    pairs_of = {
        "bf16 autocast": ({}, {"bf16": False}),
        "sdpa attention": ({}, {"attention": "classic"}),
        "channels-last": ({"channels_last": True}, {}),
        "tf32 (fp32 step)": ({"bf16": False}, {"bf16": False, "tf32": False}),
    }
    out = {}
    for name, (on, off) in pairs_of.items():
        times = cvo.interleaved({"on": step(**on), "off": step(**off)}, rounds, device)
        on_s, off_s = (statistics.median(times[v]) for v in ("on", "off"))
        out[name] = {"on_seconds": on_s, "off_seconds": off_s, "speedup": off_s / on_s}
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out["pinned prefetch"] = prefetch_figure(shape, pairs, rounds)
    return out


def prefetch_figure(shape: Shape, pairs: int, rounds: int) -> dict:
    """A cached step whose rows come from host memory: loaded ahead into pinned memory while
    the previous step computes, against loaded and copied when the step needs them."""
    device = shape.device
    host = {k: v.cpu() for k, v in (("z0", shape.batch(pairs, True).z0),
                                    ("z", shape.batch(pairs, True).z))}
    policy = copy.deepcopy(shape.unet).float().train().requires_grad_(True)
    reference = copy.deepcopy(shape.unet).requires_grad_(False).eval()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    text = shape.batch(pairs, False)
    t, k = cvo.stratified_draws(shape.levels, len(shape.alphas), pairs)

    def load(_key) -> dict[str, torch.Tensor]:
        return {name: value.clone() for name, value in host.items()}  # a shard read

    def run_with(prefetch: bool):
        loader = Prefetcher(load, device, pin=prefetch)

        def run(i: int) -> None:
            rows = loader.get(i)
            if prefetch:
                loader.ahead(i + 1)
            batch = PairBatch(rows["z0"], None, text.text, text.weight, text.winner,
                              text.pooled, text.time_ids)
            with autocast(device):
                cvo.train_step(policy, reference, optimizer, batch,
                               rows["z"][torch.arange(pairs), :, k], k, t, shape.alphas,
                               shape.levels)
        return run

    times = cvo.interleaved({"on": run_with(True), "off": run_with(False)}, rounds, device)
    on_s, off_s = (statistics.median(times[v]) for v in ("on", "off"))
    return {"on_seconds": on_s, "off_seconds": off_s, "speedup": off_s / on_s}


# The paper's recipe: 200 steps x 1024 pairs; its reported GPU-hours and Diffusion-DPO's.
RECIPE_PAIRS = 200 * 1024
PAPER_GPU_HOURS = {"sd15": {"smpo": 41.3, "diffusion_dpo": 205},
                   "sdxl": {"smpo": 151, "diffusion_dpo": 976}}


def levels_read(num_levels: int, num_train_timesteps: int = 1000) -> float:
    """Mean of k + 1 over t uniform on the schedule, k the level at or above t: the levels a
    pair is inverted through to be read once ((K + 1) / 2 for evenly spaced levels)."""
    levels = torch.tensor(inversion_levels(num_levels, num_train_timesteps))
    k = torch.searchsorted(levels, torch.arange(num_train_timesteps))
    return float((k + 1).float().mean())


def gpu_hours(result: dict, sweep: int = 4) -> dict:
    """GPU-hours of the paper's recipe (204,800 pair-uses, each pair read once) from the
    measured rates of one card: online training; full cache (every pair at all K levels, at
    the best measured inversion batch) + cached training; planned cache (each pair up to the
    level it is read at: the full inversion's cost x mean levels / K) + cached training; and
    a `sweep`-run beta sweep sharing one planned cache; each planned figure also with the
    reference's errors cached (train.reference_errors=cached: the invert stage's reference
    pass once, training without the reference forward)."""
    out = {}
    for name in ("sd15", "sdxl"):
        if name not in result:
            continue
        train, inversion = result[name]["train"], result[name]["inversion"]
        full = max(v["pairs_per_second"] for n, v in inversion.items()
                   if n.startswith("batch"))
        planned = full * train["levels"] / levels_read(train["levels"])
        hours = {
            "online": RECIPE_PAIRS / train["online"]["pairs_per_second"] / 3600,
            "invert_full": RECIPE_PAIRS / full / 3600,
            "invert_planned": RECIPE_PAIRS / planned / 3600,
            "train_cached": RECIPE_PAIRS / train["cached"]["pairs_per_second"] / 3600,
            "reference_pass": RECIPE_PAIRS / train["reference pass"]["pairs_per_second"] / 3600,
            "train_cached_ref": RECIPE_PAIRS / train["cached-ref"]["pairs_per_second"] / 3600,
        }
        with_errors = hours["invert_planned"] + hours["reference_pass"]
        out[name] = hours | {
            "one_run_full_cache": hours["invert_full"] + hours["train_cached"],
            "one_run_planned_cache": hours["invert_planned"] + hours["train_cached"],
            f"sweep_{sweep}_planned_cache": hours["invert_planned"]
            + sweep * hours["train_cached"],
            "one_run_planned_cache_reference_errors": with_errors + hours["train_cached_ref"],
            f"sweep_{sweep}_planned_cache_reference_errors": with_errors
            + sweep * hours["train_cached_ref"],
            f"sweep_{sweep}_online": sweep * hours["online"],
            "paper": PAPER_GPU_HOURS[name],
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU: check every code path, no GPU figures")
    parser.add_argument("--out", type=Path, required=True, help="the JSON to write")
    args = parser.parse_args()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device visible; use --dry-run to check the script on a CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        torch.set_num_threads(1)  # a shared CPU: spinning worker threads only fight for it
    started = time.perf_counter()

    def say(what: str) -> None:
        print(f"[{time.perf_counter() - started:5.0f} s] {what}", flush=True)

    result: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"),
                    "dry_run": dry, "torch": torch.__version__,
                    "device": "cpu (dry run)" if dry else torch.cuda.get_device_name()}
    say("matmul rate")
    peak = matmul_rate(device, 256 if dry else 8192, 3 if dry else 20)
    result["matmul_tflops"] = peak / 1e12
    shapes = [("sd15", TINY if dry else SD15, 5, None),
              ("sdxl", TINY_XL if dry else SDXL, 10, 32 if dry else 1280)]
    rounds = 2 if dry else 5
    for name, config, levels, pooled in shapes:
        say(f"{name}: build")
        shape = Shape(name, config, levels, pooled, device)
        figures: dict = {"unet_parameters": shape.parameters}
        say(f"{name}: train cached vs online")
        figures["train"] = train_figures(shape, 1 if name == "sdxl" else 2, rounds, peak)
        say(f"{name}: inversion")
        batches = [1, 4] if dry else ([1, 4, 16] if name == "sdxl" else [1, 8, 32])
        figures["inversion"] = inversion_figures(shape, batches, rounds, peak,
                                                 compiled=name == "sd15")
        say(f"{name}: memory, full vs LoRA")
        figures["memory"] = memory_figures(shape, 1, 4 if dry else 64)
        if name == "sd15":
            say(f"{name}: fast paths on/off")
            figures["fast_paths"] = fast_path_figures(shape, 2, rounds)
        result[name] = figures
        del shape
        if device.type == "cuda":
            torch.cuda.empty_cache()
    say("scoring, ViT-H/14-shaped CLIP")
    result["scoring"] = scoring_figures(CLIP_TINY if dry else CLIP_H,
                                        [1, 4] if dry else [1, 16, 64], rounds, device)
    result["gpu_hours"] = gpu_hours(result)
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
