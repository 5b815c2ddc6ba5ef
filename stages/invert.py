"""invert: ReNoise-inverted latent trajectories of every pair, cached for training.

With `invert.num_processes` > 1 the stage runs under `accelerate launch`: process r of N
writes the shards s with s mod N = r (stages/launch.py), the same shards one process writes.
With train.reference_errors=cached the stage then computes, from the cache as written, the
reference's errors at every draw of the training run (the base that inverts is the
reference), process r the micro-batches m with m mod N = r.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from smpo_core.acceleration import FastPaths, prepare_for_inference
from smpo_core.inversion import inversion_levels
from smpo_core.model_refs import start_unet
from smpo_core.models import (
    DiffusionModel,
    encode_captions,
    load_diffusion,
    resolve_device,
    resolve_dtype,
)
from smpo_core.pickapic import count_pairs, read_pairs_at, sample_positions
from smpo_core.settings import Settings, settings_model
from smpo_core.training import (
    CachedPairs,
    StepConfig,
    TrainingPlan,
    levels_read,
    reference_errors,
)
from smpo_core.trajectories import (
    REFERENCE_ERRORS,
    TrajectoryCache,
    build_cache,
    check_cache,
    expected_bytes,
    invert_pair_batch,
    write_cache_meta,
    write_reference_errors,
)
from smpo_core.worlds import builtins
from stages.launch import PROGRESS_LINE, launch, process_main, say

if TYPE_CHECKING:  # launched processes import neither Prefect nor MLflow (stages/launch.py)
    from stages.common import StageRun


def sampled_pairs(settings: Settings, pairs_dir: Path) -> tuple[int, list[int]]:
    """The download's pair count and the positions of the pairs the cache holds (a seeded
    sample of invert.max_pairs; every process draws the same)."""
    cfg = settings.invert
    source_pairs = count_pairs(pairs_dir)
    return source_pairs, sample_positions(source_pairs, cfg.max_pairs, cfg.seed)


def cached_reference_errors(settings: Settings, model: DiffusionModel, folder: Path,
                            share: tuple[int, int] = (0, 1)) -> dict[str, torch.Tensor]:
    """The reference's errors at every draw of the training run these settings describe
    (`TrainingPlan.draws`, and `error` (N, 2), NaN outside this process's share), from the
    cache in `folder` read as training reads it, in training's micro-batches of
    train.batch_size pairs (bit for bit the errors a train step computes, where the device
    is deterministic) and its autocast. Process `share[0]` of `share[1]` computes the
    micro-batches m with m mod share[1] = share[0]."""
    train = settings.train
    cache = TrajectoryCache(folder)
    levels = cache.levels
    plan = TrainingPlan.of_run(train, levels, len(cache), len(model.alphas_cumprod))
    draws = plan.draws(train.max_steps)
    zeros = torch.zeros(len(cache))
    data = CachedPairs(cache, zeros, zeros.long(), load_levels=True, device=model.device)
    step_cfg = StepConfig("preference", "inversion", "cache", train.beta, levels,
                          prediction_type=model.prediction_type)
    alphas = model.alphas_cumprod
    errors = torch.full((len(draws["t"]), 2), float("nan"))
    autocast = torch.autocast(model.device.type, dtype=getattr(
        torch, {"fp16": "float16", "bf16": "bfloat16"}.get(train.mixed_precision, "float32")),
        enabled=model.device.type == "cuda" and train.mixed_precision != "no")
    micro_batches = train.effective_batch // train.batch_size
    with torch.no_grad(), autocast:
        for step in range(train.max_steps):
            drawn = plan.step(step)
            for micro in range(micro_batches):
                if (step * micro_batches + micro) % share[1] != share[0]:
                    continue
                part = drawn.slice(micro, train.batch_size)
                errors[part.draw] = reference_errors(model.unet, data(part), part, alphas,
                                                     step_cfg).float().cpu()
    return draws | {"error": errors}


def merge_reference_errors(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The processes' `cached_reference_errors` as one: each draw's error from the one
    process that computed it (the others hold NaN there)."""
    return parts[0] | {"error": torch.stack([part["error"] for part in parts]).nansum(0)}


def invert_shards(settings: Settings, store: Path, pairs_dir: Path, out_dir: Path,
                  device: torch.device, main: bool = True,
                  owned: Callable[[int], bool] | None = None,
                  on_pairs: Callable[[int], None] | None = None,
                  log: Callable[..., None] | None = None,
                  share: tuple[int, int] | None = None,
                  barrier: Callable[[], None] | None = None) -> dict[str, Any]:
    """Write the cache's shards that `owned` accepts (None: every shard, one process; the
    main process also writes cache.json and the empty caption); returns the build
    statistics. With train.reference_errors=cached, then the reference errors: one process
    (`share` None) writes them; process `share[0]` of `share[1]` waits at `barrier` for every
    process's shards and returns its share in the statistics (`reference_errors`)."""
    cfg, model_cfg = settings.invert, settings.model
    # The policy's starting point inverts the images: model.unet when set (e.g. an SFT UNet).
    model = load_diffusion(builtins.resolve(model_cfg.base, store), device,
                           resolve_dtype(model_cfg.dtype, device), model_cfg.revision,
                           vae=builtins.resolve(model_cfg.vae, store),
                           unet=start_unet(model_cfg.unet, store))
    model = prepare_for_inference(model, FastPaths.from_settings(model_cfg))
    levels = inversion_levels(cfg.num_levels, model.scheduler.config.num_train_timesteps)
    source_pairs, positions = sampled_pairs(settings, pairs_dir)
    pairs = len(positions)
    empty_text = encode_captions(model, [""])
    side = model_cfg.resolution // model.latent_factor
    latent_shape = (model.unet.config.in_channels, side, side)
    keep, plan = None, None
    if cfg.levels == "planned":
        # Only what the training run these settings describe reads: the pairs it draws, each
        # batch inverted up to the highest level one of its pairs is read at (invert.batch_size
        # 1: each pair only up to its own), and stored at the levels read.
        plan = settings.section("invert").borrowed_settings(settings)["train.plan"]
        read = levels_read(TrainingPlan.of_run(settings.train, levels, pairs,
                                               model.scheduler.config.num_train_timesteps),
                           settings.train.max_steps)
        keep = [sorted(read.get(position, ())) for position in range(pairs)]
    stored = None if keep is None else sum(map(len, keep))
    size = expected_bytes(pairs, latent_shape, len(levels), empty_text.hidden.shape[1:], stored)
    if main:
        if log:
            log("caching %d of %d pairs (seeded sample, invert.seed=%d) x %s levels at %s: "
                "%.1f MiB expected (fp16)", pairs, source_pairs, cfg.seed,
                len(levels) if keep is None else f"{stored / max(pairs, 1):.2f} planned",
                "x".join(map(str, latent_shape)), size / 2**20)
        write_cache_meta(out_dir, {
            "base_model": model_cfg.base, "unet": model_cfg.unet, "revision": model_cfg.revision,
            "vae": model_cfg.vae, "prediction_type": model.prediction_type,
            "source_pairs": source_pairs, "sample_seed": cfg.seed,
            "resolution": model_cfg.resolution, "levels": levels,
            "renoise_steps": cfg.renoise_steps, "average": cfg.average,
            "latent_shape": list(latent_shape), "dtype": "float16", "pairs": pairs,
            "stored_levels": cfg.levels, "plan": plan,
            "reference_errors": settings.section("invert").borrowed_settings(settings).get(
                "train.reference_errors"),
        }, empty_text)

    inverted = [0]  # pairs x levels the UNet ran (a planned batch climbs to its highest)

    def invert(rows):
        top = None if keep is None else [max(keep[row["position"]], default=-1)
                                         for row in rows]
        batch = invert_pair_batch(model, rows, levels, model_cfg.resolution, cfg.renoise_steps,
                                  cfg.average, cfg.seed, top)
        inverted[0] += len(rows) * (len(levels) if top is None else max(top) + 1)
        if on_pairs:
            on_pairs(len(rows))
        return batch

    rows = ({**row, "position": position} for position, row in enumerate(read_pairs_at(
        pairs_dir, positions, columns=["pair_id", "caption", "jpg_0", "jpg_1"])))
    stats = build_cache(out_dir, rows, invert, cfg.batch_size, cfg.shard_pairs,
                        keep=None if keep is None else keep.__getitem__, owned=owned)
    # Written last and whole: present means complete (a resumed run skips it).
    if settings.train.reference_errors == "cached" and not (
            out_dir / REFERENCE_ERRORS).is_file():
        if barrier is not None:
            barrier()  # every process's shards are on disk
        errors = cached_reference_errors(settings, model, out_dir, share or (0, 1))
        if share is None:
            write_reference_errors(out_dir, errors)
        else:
            stats["reference_errors"] = errors
    return stats | {"levels": levels, "expected_bytes": size, "source_pairs": source_pairs,
                    "pair_levels_stored": stored or len(levels) * pairs,
                    "pair_levels_inverted": inverted[0]}


def compute(run: StageRun) -> dict[str, Any]:
    cfg, model_cfg = run.settings.invert, run.settings.model
    device = resolve_device(model_cfg.device)
    _, positions = sampled_pairs(run.settings, run.input_dir("download"))
    pairs = len(positions)
    run.tracker.metrics({"pairs": pairs})
    progress = run.progress(total=pairs, unit="pairs")
    if cfg.num_processes > 1:
        def on_line(line: str) -> None:
            if done := PROGRESS_LINE.search(line):
                progress.update(int(done[1]))

        stats = launch(run, "stages.invert", cfg.num_processes, {
            "settings": run.settings.model_dump(mode="json"), "store": str(run.ctx.store.root),
            "pairs_dir": str(run.input_dir("download")), "out_dir": str(run.out_dir)},
            on_line, cuda=device.type == "cuda")
    else:
        stats = invert_shards(run.settings, run.ctx.store.root, run.input_dir("download"),
                              run.out_dir, device, on_pairs=progress.update, log=run.log)
    progress.close()
    # Every process is done: what is on disk must be what the manifest will say.
    check_cache(run.out_dir, stats["pairs"])
    run.tracker.metrics({"expected_bytes": stats["expected_bytes"]})
    return {"pairs": stats["pairs"], "source_pairs": stats["source_pairs"],
            "shards": stats["shards"], "resumed_shards": stats["resumed_shards"],
            "levels": stats["levels"], "stored_levels": cfg.levels,
            "pair_levels_stored": stats["pair_levels_stored"],
            "expected_bytes": stats["expected_bytes"], "bytes": stats["bytes_written"],
            # This run's UNet work (shards resumed from a crash not counted).
            "unet_forwards_per_image": stats["pair_levels_inverted"] * (1 + cfg.renoise_steps)
            / max(stats["pairs"], 1),
            # train.reference_errors=cached: the reference forwards the training runs of
            # these draws no longer make, one per image of each draw (pair read).
            "reference_draws": run.settings.train.max_steps * run.settings.train.effective_batch
            if run.settings.train.reference_errors == "cached" else 0,
            "num_processes": cfg.num_processes}


def _process(spec: dict[str, Any]) -> dict[str, Any]:
    """One invert-stage process under `accelerate launch`: shards s with s mod processes =
    its index, on its own device; returns the statistics of all processes together."""
    from accelerate import PartialState
    from accelerate.utils import gather_object

    settings = settings_model().model_validate(spec["settings"])
    state = PartialState()
    requested = resolve_device(settings.model.device)
    stats = invert_shards(
        settings, Path(spec["store"]), Path(spec["pairs_dir"]), Path(spec["out_dir"]),
        state.device if requested.type == "cuda" else requested,
        main=state.is_main_process,
        owned=lambda shard: shard % state.num_processes == state.process_index,
        on_pairs=lambda count: say("process %d progress %d", state.process_index, count),
        log=say, share=(state.process_index, state.num_processes),
        barrier=state.wait_for_everyone)
    every = gather_object([stats])  # alone, `every` may hold `stats` itself, not a copy
    parts = [s.pop("reference_errors") for s in every if "reference_errors" in s]
    stats.pop("reference_errors", None)  # tensors: not part of the stage's JSON result
    if parts and state.is_main_process:
        write_reference_errors(Path(spec["out_dir"]), merge_reference_errors(parts))
    return stats | {key: sum(s[key] for s in every) for key in ("resumed_shards",
                                                                 "bytes_written",
                                                                 "pair_levels_inverted")}


def main(argv: list[str] | None = None) -> None:
    """Entry point of each process `accelerate launch` starts for the invert stage."""
    process_main(argv, "One invert-stage process under `accelerate launch`; started by the "
                 "invert stage.", _process)


if __name__ == "__main__":
    main()
