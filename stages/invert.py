"""invert: ReNoise-inverted latent trajectories of every pair, cached for training.

With `invert.num_processes` > 1 the stage runs under `accelerate launch`: process r of N
writes the shards s with s mod N = r (stages/launch.py), the same shards one process writes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from smpo_core.inversion import inversion_levels
from smpo_core.models import (
    encode_captions,
    load_diffusion,
    resolve_device,
    resolve_dtype,
)
from smpo_core.pickapic import iter_pairs
from smpo_core.settings import Settings, settings_model
from smpo_core.trajectories import build_cache, expected_bytes, invert_pair_batch, write_cache_meta
from smpo_core.worlds import builtins
from stages.common import StageRun
from stages.launch import PROGRESS_LINE, launch, process_main, say


def cached_pairs(run: StageRun) -> int:
    pairs = run.inputs["download"].summary["pairs"]
    cfg = run.settings.invert
    return min(pairs, cfg.max_pairs) if cfg.max_pairs else pairs


def invert_shards(settings: Settings, store: Path, pairs_dir: Path, pairs: int, out_dir: Path,
                  device: torch.device, main: bool = True,
                  owned: Callable[[int], bool] = lambda shard: True,
                  on_pairs: Callable[[int], None] | None = None,
                  log: Callable[..., None] | None = None) -> dict[str, Any]:
    """Write the cache's shards that `owned` accepts (the main process also cache.json and
    the empty caption); returns the build statistics."""
    cfg, model_cfg = settings.invert, settings.model
    model = load_diffusion(builtins.resolve(model_cfg.base, store), device,
                           resolve_dtype(model_cfg.dtype, device), model_cfg.revision,
                           vae=builtins.resolve(model_cfg.vae, store))
    levels = inversion_levels(cfg.num_levels, model.scheduler.config.num_train_timesteps)
    empty_text = encode_captions(model, [""])
    side = model_cfg.resolution // model.latent_factor
    latent_shape = (model.unet.config.in_channels, side, side)
    size = expected_bytes(pairs, latent_shape, len(levels), empty_text.hidden.shape[1:])
    if main:
        if log:
            log("caching %d pairs x %d levels at %s: %.1f MiB expected (fp16)", pairs,
                len(levels), "x".join(map(str, latent_shape)), size / 2**20)
        write_cache_meta(out_dir, {
            "base_model": model_cfg.base, "revision": model_cfg.revision, "vae": model_cfg.vae,
            "resolution": model_cfg.resolution, "levels": levels,
            "renoise_steps": cfg.renoise_steps, "average": cfg.average,
            "latent_shape": list(latent_shape), "dtype": "float16", "pairs": pairs,
        }, empty_text)

    def invert(rows):
        batch = invert_pair_batch(model, rows, levels, model_cfg.resolution, cfg.renoise_steps,
                                  cfg.average, cfg.seed)
        if on_pairs:
            on_pairs(len(rows))
        return batch

    rows = itertools.islice((row for batch in iter_pairs(pairs_dir, columns=[
        "pair_id", "caption", "jpg_0", "jpg_1"]) for row in batch.to_pylist()), pairs)
    stats = build_cache(out_dir, rows, invert, cfg.batch_size, cfg.shard_pairs, owned=owned)
    return stats | {"levels": levels, "expected_bytes": size}


def compute(run: StageRun) -> dict[str, Any]:
    cfg, model_cfg = run.settings.invert, run.settings.model
    device = resolve_device(model_cfg.device)
    pairs = cached_pairs(run)
    run.tracker.metrics({"pairs": pairs})
    progress = run.progress(total=pairs, unit="pairs")
    if cfg.num_processes > 1:
        def on_line(line: str) -> None:
            if done := PROGRESS_LINE.search(line):
                progress.update(int(done[1]))

        stats = launch(run, "stages.invert", cfg.num_processes, {
            "settings": run.settings.model_dump(mode="json"), "store": str(run.ctx.store.root),
            "pairs_dir": str(run.input_dir("download")), "pairs": pairs,
            "out_dir": str(run.out_dir)}, on_line, cuda=device.type == "cuda")
    else:
        stats = invert_shards(run.settings, run.ctx.store.root, run.input_dir("download"),
                              pairs, run.out_dir, device, on_pairs=progress.update, log=run.log)
    progress.close()
    run.tracker.metrics({"expected_bytes": stats["expected_bytes"]})
    return {"pairs": stats["pairs"], "shards": stats["shards"],
            "resumed_shards": stats["resumed_shards"], "levels": stats["levels"],
            "expected_bytes": stats["expected_bytes"], "bytes": stats["bytes_written"],
            "unet_forwards_per_image": len(stats["levels"]) * (1 + cfg.renoise_steps),
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
        settings, Path(spec["store"]), Path(spec["pairs_dir"]), spec["pairs"],
        Path(spec["out_dir"]), state.device if requested.type == "cuda" else requested,
        main=state.is_main_process,
        owned=lambda shard: shard % state.num_processes == state.process_index,
        on_pairs=lambda count: say("process %d progress %d", state.process_index, count),
        log=say)
    every = gather_object([stats])
    return stats | {key: sum(s[key] for s in every) for key in ("resumed_shards",
                                                                   "bytes_written")}


def main(argv: list[str] | None = None) -> None:
    """Entry point of each process `accelerate launch` starts for the invert stage."""
    process_main(argv, "One invert-stage process under `accelerate launch`; started by the "
                 "invert stage.", _process)


if __name__ == "__main__":
    main()
