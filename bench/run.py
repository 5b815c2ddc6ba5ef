"""`make bench`: every performance figure of the pipeline, as ratios measured side by side.

    OMP_NUM_THREADS=1 .venv/bin/python bench/run.py --threads 1   # what `make bench` runs
    .venv/bin/python bench/run.py --quick         # every code path on tiny shapes, ~1 CPU min

The full bench costs ~4 CPU minutes at one thread (4.0 measured on 2026-12-02; the JSON
records its CPU seconds, its wall time and the load average at each section); on an idle
core that is ~4 min wall, on a shared, loaded one the wall time grows with the load.
Writes `bench/results/<date>-<device>.json`
(every figure, the machine, the command) and `<date>-<device>.md` (the table the README
shows), and prints the table. Machines here are shared and noisy, so no figure is a time
from another run or another section: each comparison alternates its variants call by call
or in short rounds in this process, and reports medians (with the rounds' min and max).

Sections (the baseline of each first):
- train step and whole cost, side by side (`side_by_side`), K = 5 and 10, tiny and medium
  (~20M-parameter UNet, 32x32 latents): per round, two pairs at mirrored levels, timed one
  after the other: the planned inversion of the two (invert stage, each pair up to the level
  training reads), two cached train steps, two online steps (the authors' code: encode, then
  invert each pair with the policy up to the level its step samples, then step). Ratios per
  round: train online / cached; one run (invert + cached) / online; a 4-run beta sweep on
  one cache (invert + 4 cached) / (4 online). The same with the reference's errors cached
  too (train.reference_errors=cached): the invert stage's reference pass at the two draws
  and two cached steps without a reference forward.
- score: one image per reward-model call, every image of every pair (the authors' scoring)
  against each unique image once, in batches (the score stage).
- inversion: pairs/s against batch size, VAE and text encoding included (the invert stage's
  `invert_pair_batch`), against batch size 1; full and planned.
- prefetch: the training loop over a cache on disk, `train.prefetch` off against on.
- download: peak RSS of the download stage at N and 10N pairs (`download_memory.py`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import cache_vs_online as cvo
import download_memory
import torch

from smpo_core.inversion import inversion_levels
from smpo_core.models import resolve_device
from smpo_core.rewards import load_reward_model
from smpo_core.scoring import decode_image
from smpo_core.training import PairBatch
from smpo_core.trajectories import invert_pair_batch
from smpo_core.worlds.tiny import build_tiny_clip_reward, trainable_pairs

RESULTS = Path(__file__).resolve().parent / "results"
SWEEP = 4


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the download
    section's): what the bench costs on a shared machine, whatever the load."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                         resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def machine(device: torch.device) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device),
            "cpu_cores": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads()}
    with contextlib.suppress(OSError, StopIteration):
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in
                           Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def inversion_section(model, rows: list[dict], levels: list[int], resolution: int,
                      batches: list[int], rounds: int) -> dict:
    """Pairs/s of the invert stage's batch inversion (VAE + text encoding + K levels) per
    batch size, and of the planned inversion (each pair read at one drawn level) at batch 1
    (each pair up to its own level) and at the largest batch (each batch up to its highest);
    every variant inverts the same pairs once per call."""
    _, k = cvo.stratified_draws(levels, len(model.alphas_cumprod), len(rows), seed=1)

    def invert_all(size: int, planned: bool = False):
        def call(_: int) -> None:
            for start in range(0, len(rows), size):
                invert_pair_batch(model, rows[start:start + size], levels, resolution, 1,
                                  "mean", top=k[start:start + size].tolist() if planned
                                  else None)
        return call

    variants = {f"batch {b}": invert_all(b) for b in batches}
    for b in sorted({1, batches[-1]}):
        variants[f"planned, batch {b}"] = invert_all(b, planned=True)
    with torch.no_grad():
        times = cvo.interleaved(variants, rounds, model.device)
    pairs_per_s = {name: len(rows) / statistics.median(s) for name, s in times.items()}
    base = pairs_per_s[f"batch {batches[0]}"]
    return {"pairs": len(rows), "levels": len(levels),
            "pairs_per_second": pairs_per_s,
            f"speedup_over_batch_{batches[0]}": {name: v / base
                                                 for name, v in pairs_per_s.items()},
            "mean_levels_planned": float((k + 1).float().mean())}


def mirrored_draws(levels: list[int], num_train_timesteps: int, rounds: int,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two timesteps per round, t in the round's equal slice of the schedule's lower half and
    its mirror T - 1 - t, and the inversion level index k at or above each: (2 rounds,) each.
    A round's two levels are about k and K - 1 - k, so every round inverts about the
    expected (K + 1) / 2 levels per pair and the rounds' costs are comparable."""
    generator = torch.Generator().manual_seed(seed)
    half = num_train_timesteps / 2
    low = (torch.arange(rounds) * half / rounds
           + torch.rand(rounds, generator=generator) * half / rounds).long()
    low = low[torch.randperm(rounds, generator=generator)]
    t = torch.stack([low, num_train_timesteps - 1 - low], dim=1).reshape(-1)
    return t, torch.searchsorted(torch.tensor(levels), t)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def side_by_side(model, rows: list[dict], levels: list[int], resolution: int, rounds: int,
                 all_k: bool) -> tuple[dict, dict]:
    """Train step and whole cost, timed side by side in alternating rounds.

    Each round takes two pairs at mirrored levels (`mirrored_draws`) and times, one right
    after the other (order reversed every other round): the planned inversion of the two
    pairs (the invert stage at batch 1 with the frozen base: VAE and text encoding, each
    pair up to the level training reads), two cached train steps on them, two online steps
    (the authors' way: encode, invert with the policy up to the level, step), and on the tiny
    model two online steps inverting all K; and for train.reference_errors=cached, the invert
    stage's reference pass at the two pairs' draws (one frozen-base forward an image) and two
    cached steps reading its errors (no reference forward). From one round's seconds I
    (inversion), T (cached steps), O (online steps), R (reference pass), T' (cached steps
    without the reference): train O / T and O / T'; one run (I + T) / O, since a run reads
    each pair once (the paper's 200 steps x 1024 pairs are 0.24 of an epoch), and
    (I + R + T') / O; a sweep of 4 runs on one cache (I + 4 T) / (4 O) and
    (I + R + 4 T') / (4 O). Every ratio is per round; the figure is the median over rounds,
    with the rounds' min and max."""
    alphas = model.alphas_cumprod
    t, k = mirrored_draws(levels, len(alphas), rounds + 1)  # round 0: warm-up
    cache = cvo.invert_cache(model, rows, levels, resolution)
    sources = ["cached", "cached-ref", "online"] + (["online-all-K"] if all_k else [])
    steps = cvo.step_variants(model, cache, levels, 1, k, t, sources, rows=rows,
                              resolution=resolution)
    n = len(rows)

    def invert(i: int) -> None:
        with torch.no_grad():
            invert_pair_batch(model, [rows[i % n]], levels, resolution, 1, "mean",
                              top=[int(k[i])])

    def reference_pass(i: int) -> None:  # what the invert stage adds for step i's pair
        pair = torch.tensor([i % n])
        batch = PairBatch(cache.z0[pair], None, cache.text[pair], cache.weight[pair],
                          cache.winner[pair])
        cvo.reference_errors(model.unet, batch, cache.z[pair, :, k[i:i + 1]], k[i:i + 1],
                             t[i:i + 1], alphas, levels)

    def two(fn):  # the round's two pairs
        return lambda r: [fn(2 * r), fn(2 * r + 1)]

    variants = {"planned inversion": two(invert), "reference pass": two(reference_pass),
                **{s: two(fn) for s, fn in steps.items()}}
    for name in ("planned inversion", "reference pass", "cached", "cached-ref"):
        variants[name](0)  # warm-up (round 0): the optimiser's state, first calls
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(1, rounds + 1):
        order = list(variants) if r % 2 else list(reversed(variants))
        for name in order:
            times[name].append(cvo.timed(lambda name=name, r=r: variants[name](r),
                                         model.device))
    inv, cached, online, ref, cached_ref = (times[s] for s in (
        "planned inversion", "cached", "online", "reference pass", "cached-ref"))
    per_pair = {name: statistics.median(s) / 2 for name, s in times.items()}
    train: dict = {"micro_batch": 1, "rounds": rounds, "steps_per_round": 2,
                   "levels": len(levels), "renoise_steps": 1,
                   "mean_levels_inverted_online": float((k[2:] + 1).float().mean())}
    for source in sources:
        train[source] = {"seconds_per_step": per_pair[source],
                         "pairs_per_second": 1 / per_pair[source]}
    train["online_over_cached"] = spread([o / c for o, c in zip(online, cached, strict=True)])
    train["online_over_cached_ref"] = spread([o / c for o, c in zip(online, cached_ref,
                                                                    strict=True)])
    if all_k:
        train["online_all_K_over_cached"] = spread(
            [a / c for a, c in zip(times["online-all-K"], cached, strict=True)])
    cost = {"rounds": rounds, "seconds_per_pair": per_pair,
            "one_run_over_online": spread(
                [(i + c) / o for i, c, o in zip(inv, cached, online, strict=True)]),
            f"sweep_{SWEEP}_over_{SWEEP}_online": spread(
                [(i + SWEEP * c) / (SWEEP * o) for i, c, o in zip(inv, cached, online,
                                                                  strict=True)]),
            "reference_errors_cached": {
                "one_run_over_online": spread(
                    [(i + r + c) / o for i, r, c, o in zip(inv, ref, cached_ref, online,
                                                           strict=True)]),
                f"sweep_{SWEEP}_over_{SWEEP}_online": spread(
                    [(i + r + SWEEP * c) / (SWEEP * o) for i, r, c, o in zip(
                        inv, ref, cached_ref, online, strict=True)])},
            "seconds_per_round": {name: s for name, s in times.items()}}
    return train, cost


def prefetch_section(model, rows: list[dict], levels: list[int], resolution: int, folder: Path,
                     steps: int, rounds: int) -> dict:
    """Seconds per step of the training loop (`train_loop` over a trajectory cache on disk),
    reading each micro-batch when it is needed against reading the next one in a background
    thread while the current one computes (`train.prefetch`)."""
    from accelerate import Accelerator

    from smpo_core.models import encode_captions
    from smpo_core.training import (
        CachedPairs,
        LoopConfig,
        StepConfig,
        TrainingPlan,
        train_loop,
        warmup_constant,
    )
    from smpo_core.trajectories import TrajectoryCache, build_cache, write_cache_meta

    write_cache_meta(folder, {"levels": levels}, encode_captions(model, [""]))
    build_cache(folder, iter([{**row, "pair_id": i} for i, row in enumerate(rows)]),
                lambda part: invert_pair_batch(model, part, levels, resolution, 1, "mean"),
                batch_size=len(rows), shard_pairs=max(1, len(rows) // 2))
    cache = TrajectoryCache(folder)
    weight = torch.linspace(-3, 3, len(cache))
    plan = TrainingPlan(len(cache), 2, 0, tuple(levels), len(model.alphas_cumprod))
    reference = model.unet.requires_grad_(False).eval()
    accelerator = Accelerator(cpu=model.device.type == "cpu")
    step_cfg = StepConfig("preference", "inversion", "cache", cvo.BETA, levels)

    def variant(prefetch: bool):
        import copy

        policy = copy.deepcopy(reference).train().requires_grad_(True)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_constant(0))
        data = CachedPairs(cache, weight, (weight < 0).long(), True, model.device, prefetch)

        def call(i: int) -> None:
            loop = LoopConfig((i + 1) * steps, 2, 1.0, 10**9, 10**9)
            train_loop(policy, reference, plan, data, model.alphas_cumprod, step_cfg, loop,
                       optimizer, schedule, accelerator, start_step=i * steps)
        return call

    times = cvo.interleaved({"read when needed": variant(False),
                             "prefetch": variant(True)}, rounds, model.device)
    seconds = {name: statistics.median(s) / steps for name, s in times.items()}
    return {"pairs_per_step": 2, "steps_per_call": steps, "seconds_per_step": seconds,
            "off_over_on": seconds["read when needed"] / seconds["prefetch"]}


def score_section(folder: Path, pairs: int, rounds: int) -> dict:
    """Labelling `pairs` pairs in which every image is shared by two pairs (Pick-a-Pic's
    images recur across pairs): one image per call vs each unique image once, batched."""
    reward = load_reward_model("pickscore", str(build_tiny_clip_reward(folder / "reward")),
                               torch.device("cpu"))
    rows = trainable_pairs(folder / "score-data", pairs, seed=2)
    jpegs = [row["jpg_0"] for row in rows]  # image j is in pairs (j, j+1) and (j-1, j)
    captions = [row["caption"] for row in rows]
    pair_images = [(j, (j + 1) % pairs) for j in range(pairs)]

    def per_image(_: int) -> None:
        for a, b in pair_images:
            for image in (a, b):
                reward.score([decode_image(jpegs[image])], [captions[a]], batch_size=1)

    def unique_batched(_: int) -> None:
        reward.score([decode_image(data) for data in jpegs], captions, batch_size=32)

    times = cvo.interleaved({"one image per call": per_image,
                             "unique images, batched": unique_batched}, rounds,
                            torch.device("cpu"))
    seconds = {name: statistics.median(s) for name, s in times.items()}
    return {"pairs": pairs, "image_scorings_per_call_baseline": 2 * pairs,
            "unique_images": pairs, "seconds": seconds,
            "pairs_per_second": {name: pairs / s for name, s in seconds.items()},
            "speedup": seconds["one image per call"] / seconds["unique images, batched"]}


def download_section(folder: Path, pairs: int) -> dict:
    rng = random.Random(0)
    pool = [download_memory._drawing(rng) for _ in range(download_memory.POOL)]
    peaks = {}
    for n in (pairs, 10 * pairs):
        source = folder / f"parquet-{n}"
        download_memory.write_source(source, n, pool)
        out = folder / f"out-{n}"
        peaks[n], _ = download_memory.measure(source, out, 2048)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(source, ignore_errors=True)
    return {"pairs": pairs, "peak_rss_mib": {str(n): p for n, p in peaks.items()},
            "ratio_10N_over_N": peaks[10 * pairs] / peaks[pairs]}


def table(result: dict) -> str:
    lines = ["| figure | baseline | ours | ratio: median (min-max over rounds) |",
             "|---|---|---|---|"]
    def ratio(r: dict) -> str:
        return f"**{r['median']:.2f}x** ({r['min']:.2f}-{r['max']:.2f})"
    for size, by_k in result["train"].items():
        for k, train in by_k.items():
            all_k = (f"; all-K online: {train['online_all_K_over_cached']['median']:.2f}x"
                     if "online_all_K_over_cached" in train else "")
            lines.append(
                f"| train step, {size}, K={k} | online to level k "
                f"{train['online']['pairs_per_second']:.3f} pairs/s | cached "
                f"{train['cached']['pairs_per_second']:.3f} pairs/s | "
                f"{ratio(train['online_over_cached'])} faster{all_k} |")
            lines.append(
                f"| train step, {size}, K={k}, reference errors cached | online to level k | "
                f"cached, no reference forward {train['cached-ref']['pairs_per_second']:.3f} "
                f"pairs/s | {ratio(train['online_over_cached_ref'])} faster |")
            cost = result["whole_cost"][size][k]
            sweep = f"sweep_{SWEEP}_over_{SWEEP}_online"
            lines.append(
                f"| whole cost, {size}, K={k}, planned cache | 1 / {SWEEP} online runs | invert "
                f"+ 1 / {SWEEP} cached runs | {ratio(cost['one_run_over_online'])} / "
                f"{ratio(cost[sweep])} of online |")
            ref = cost["reference_errors_cached"]
            lines.append(
                f"| whole cost, {size}, K={k}, planned cache + reference errors | 1 / {SWEEP} "
                f"online runs | invert and reference pass + 1 / {SWEEP} cached runs | "
                f"{ratio(ref['one_run_over_online'])} / {ratio(ref[sweep])} of online |")
    for size, inv in result["inversion"].items():
        cells = ", ".join(f"{name} {v:.2f}" for name, v in inv["pairs_per_second"].items())
        best = max(v for n, v in inv["speedup_over_batch_1"].items() if n.startswith("batch"))
        planned = max(v for n, v in inv["speedup_over_batch_1"].items()
                      if n.startswith("planned"))
        lines.append(f"| inversion pairs/s, {size}, K={inv['levels']} (VAE incl.) | batch 1 | "
                     f"{cells} | **{best:.2f}x** at best batch (planned: {planned:.2f}x) |")
    if "prefetch" in result:
        p = result["prefetch"]
        sec = p["seconds_per_step"]
        lines.append(f"| train loop, tiny, cache on disk | read when needed "
                     f"{sec['read when needed']:.3f} s/step | prefetch {sec['prefetch']:.3f} "
                     f"s/step | **{p['off_over_on']:.2f}x** |")
    if "score" in result:
        score = result["score"]
        lines.append(f"| score, {score['pairs']} pairs sharing images | one image per call "
                     f"{score['pairs_per_second']['one image per call']:.1f} pairs/s | unique, "
                     f"batched {score['pairs_per_second']['unique images, batched']:.1f} "
                     f"pairs/s | **{score['speedup']:.2f}x** faster |")
    if "download" in result:
        d = result["download"]
        peak = d["peak_rss_mib"]
        lines.append(f"| download peak RSS | N = {d['pairs']}: {peak[str(d['pairs'])]:.0f} MiB "
                     f"| 10N: {peak[str(10 * d['pairs'])]:.0f} MiB | "
                     f"**{d['ratio_10N_over_N']:.2f}x** |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny model only, few steps: checks every code path in ~1 min")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", default="medium,tiny",
                        help="models whose sections to run (comma-separated); the score and "
                        "download sections run with tiny")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice); 1 is faster when "
                        "other jobs share the cores (spinning threads fight for them)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    # A saturated preference loss (beta = 2000) back-propagates gradients small enough to be
    # denormal floats, which a CPU computes ~25x slower: one medium cached step at one draw
    # took 49 s against 1.7 s flushed (2026-12-02), a lottery of the draws, not a cost of
    # either side. GPUs do not slow down on them; here they are flushed to zero.
    torch.set_flush_denormal(True)
    started = time.perf_counter()
    progress: list[dict] = []
    result: dict = {}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.now(UTC):%Y-%m-%d}-{device.type}" + ("-quick" if args.quick else "")
    partial = args.out / f"{stem}.partial.json"

    def say(what: str) -> None:
        mark = {"section": what, "wall_s": round(time.perf_counter() - started, 1),
                "cpu_s": round(cpu_seconds(), 1), "load_1min": os.getloadavg()[0]}
        progress.append(mark)
        # What is measured so far, in case the run is cut short on a busy machine.
        partial.write_text(json.dumps({**result, "progress": progress}, indent=1) + "\n")
        print(f"[{mark['wall_s']:5.0f} s wall, {mark['cpu_s']:5.0f} s CPU, load "
              f"{mark['load_1min']:.1f}] {what}", flush=True)
    # Per model: pairs, side-by-side rounds, inversion batch sizes and rounds, and whether to
    # time the old all-K online baseline too. Sized so that the whole bench takes ~4 CPU
    # minutes at one thread (docstring), most of it the medium rounds (~15-22 CPU s each);
    # the medium model's inversion per batch size is left out (batching gains it nothing on
    # a CPU, and its cost would double the medium share).
    plan = ([("tiny", 4, 2, [1, 4], 1, True)] if args.quick else
            [("medium", 2, 5, [], 0, False), ("tiny", 8, 5, [1, 2, 4, 8], 1, True)])
    plan = [entry for entry in plan if entry[0] in args.sizes.split(",")]
    result.update({"date": datetime.now(UTC).isoformat(timespec="seconds"),
                   "command": " ".join([Path(sys.executable).name, *sys.argv]),
                   "machine": machine(device), "train": {}, "whole_cost": {},
                   "inversion": {}})
    work = Path(tempfile.mkdtemp(prefix="smpo-bench-"))
    try:
        for size, pairs, rounds, batches, inversion_rounds, all_k in plan:
            model, resolution = cvo.build_model(size, work, device)
            rows = trainable_pairs(work / "data", pairs, seed=1)
            result["train"][size], result["whole_cost"][size] = {}, {}
            if batches:
                say(f"{size}, K=5: inversion vs batch size")
                result["inversion"][size] = inversion_section(
                    model, rows, inversion_levels(5, len(model.alphas_cumprod)), resolution,
                    batches, inversion_rounds)
            for k in (5, 10):
                levels = inversion_levels(k, len(model.alphas_cumprod))
                say(f"{size}, K={k}: train step and whole cost, side by side")
                result["train"][size][k], result["whole_cost"][size][k] = side_by_side(
                    model, rows, levels, resolution, 2 if args.quick else rounds, all_k)
            if size == "tiny":
                say("tiny: train loop, prefetch on and off")
                result["prefetch"] = prefetch_section(
                    model, rows, inversion_levels(5, len(model.alphas_cumprod)), resolution,
                    work / "prefetch-cache", 4, 1 if args.quick else 2)
            del model
        if "tiny" in args.sizes.split(","):
            say("score")
            result["score"] = score_section(work, 16 if args.quick else 64,
                                            1 if args.quick else 3)
            say("download")
            result["download"] = download_section(work, 40 if args.quick else 200)
        say("done")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["progress"] = progress
    result["cpu_seconds"] = cpu_seconds()
    result["seconds"] = time.perf_counter() - started
    text = table(result)
    print(text)
    partial.unlink()
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(
        f"`{result['command']}` on {result['machine'].get('cpu', result['machine']['platform'])}"
        f" ({result['machine']['cpu_cores']} cores), {result['date']}, "
        f"{result['seconds'] / 60:.1f} min wall, {result['cpu_seconds'] / 60:.1f} CPU min, load "
        f"average {min(m['load_1min'] for m in progress):.1f}-"
        f"{max(m['load_1min'] for m in progress):.1f}\n\n{text}\n")
    print(f"wrote {args.out / stem}.json and .md ({result['seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
