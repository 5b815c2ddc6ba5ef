"""invert: ReNoise-inverted latent trajectories of every pair, cached for training."""

from __future__ import annotations

from typing import Any

from smpo_core.inversion import inversion_levels
from smpo_core.model_refs import start_unet
from smpo_core.models import (
    encode_captions,
    load_diffusion,
    resolve_device,
    resolve_dtype,
)
from smpo_core.pickapic import count_pairs, read_pairs_at, sample_positions
from smpo_core.trajectories import build_cache, expected_bytes, invert_pair_batch, write_cache_meta
from stages.common import StageRun


def compute(run: StageRun) -> dict[str, Any]:
    cfg, model_cfg = run.settings.invert, run.settings.model
    device = resolve_device(model_cfg.device)
    base = run.ctx.resolve(model_cfg.base)
    # The policy's starting point inverts the images: model.unet when set (e.g. an SFT UNet).
    model = load_diffusion(base, device, resolve_dtype(model_cfg.dtype, device),
                           model_cfg.revision, vae=run.ctx.resolve(model_cfg.vae),
                           unet=start_unet(model_cfg.unet, run.ctx.store.root))
    levels = inversion_levels(cfg.num_levels, model.scheduler.config.num_train_timesteps)
    source_pairs = count_pairs(run.input_dir("download"))
    positions = sample_positions(source_pairs, cfg.max_pairs, cfg.seed)
    pairs = len(positions)
    empty_text = encode_captions(model, [""])
    side = model_cfg.resolution // model.latent_factor
    latent_shape = (model.unet.config.in_channels, side, side)
    size = expected_bytes(pairs, latent_shape, len(levels), empty_text.hidden.shape[1:])
    run.log("caching %d of %d pairs (seeded sample, invert.seed=%d) x %d levels at %s: "
            "%.1f MiB expected (fp16)", pairs, source_pairs, cfg.seed, len(levels),
            "x".join(map(str, latent_shape)), size / 2**20)
    run.tracker.metrics({"expected_bytes": size, "pairs": pairs})
    write_cache_meta(run.out_dir, {
        "base_model": model_cfg.base, "unet": model_cfg.unet, "revision": model_cfg.revision,
        "vae": model_cfg.vae, "prediction_type": model.prediction_type,
        "source_pairs": source_pairs, "sample_seed": cfg.seed,
        "resolution": model_cfg.resolution, "levels": levels,
        "renoise_steps": cfg.renoise_steps, "average": cfg.average,
        "latent_shape": list(latent_shape), "dtype": "float16", "pairs": pairs,
    }, empty_text)

    progress = run.progress(total=pairs, unit="pairs")

    def invert(rows):
        batch = invert_pair_batch(model, rows, levels, model_cfg.resolution, cfg.renoise_steps,
                                  cfg.average, cfg.seed)
        progress.update(len(rows))
        return batch

    rows = read_pairs_at(run.input_dir("download"), positions,
                         columns=["pair_id", "caption", "jpg_0", "jpg_1"])
    stats = build_cache(run.out_dir, rows, invert, cfg.batch_size, cfg.shard_pairs)
    progress.close()
    return {"pairs": stats["pairs"], "source_pairs": source_pairs, "shards": stats["shards"],
            "resumed_shards": stats["resumed_shards"], "levels": levels,
            "expected_bytes": size, "bytes": stats["bytes_written"],
            "unet_forwards_per_image": len(levels) * (1 + cfg.renoise_steps)}
