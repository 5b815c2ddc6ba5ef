"""invert: ReNoise-inverted latent trajectories of every pair, cached for training."""

from __future__ import annotations

from typing import Any

from smpo_core.acceleration import FastPaths, prepare_for_inference
from smpo_core.inversion import inversion_levels
from smpo_core.model_refs import start_unet
from smpo_core.models import (
    encode_captions,
    load_diffusion,
    resolve_device,
    resolve_dtype,
)
from smpo_core.pickapic import count_pairs, read_pairs_at, sample_positions
from smpo_core.training import TrainingPlan, levels_read
from smpo_core.trajectories import (
    build_cache,
    check_cache,
    expected_bytes,
    invert_pair_batch,
    write_cache_meta,
)
from stages.common import StageRun


def compute(run: StageRun) -> dict[str, Any]:
    cfg, model_cfg = run.settings.invert, run.settings.model
    device = resolve_device(model_cfg.device)
    base = run.ctx.resolve(model_cfg.base)
    # The policy's starting point inverts the images: model.unet when set (e.g. an SFT UNet).
    model = load_diffusion(base, device, resolve_dtype(model_cfg.dtype, device),
                           model_cfg.revision, vae=run.ctx.resolve(model_cfg.vae),
                           unet=start_unet(model_cfg.unet, run.ctx.store.root))
    model = prepare_for_inference(model, FastPaths.from_settings(model_cfg))
    levels = inversion_levels(cfg.num_levels, model.scheduler.config.num_train_timesteps)
    source_pairs = count_pairs(run.input_dir("download"))
    positions = sample_positions(source_pairs, cfg.max_pairs, cfg.seed)
    pairs = len(positions)
    empty_text = encode_captions(model, [""])
    side = model_cfg.resolution // model.latent_factor
    latent_shape = (model.unet.config.in_channels, side, side)
    keep, plan = None, None
    if cfg.levels == "planned":
        # Only what the training run these settings describe reads: the pairs it draws, each
        # inverted up to the highest level it is read at, and stored at the levels read.
        plan = run.settings.section("invert").borrowed_settings(run.settings)["train.plan"]
        read = levels_read(TrainingPlan.of_run(run.settings.train, levels, pairs,
                                               model.scheduler.config.num_train_timesteps),
                           run.settings.train.max_steps)
        keep = [sorted(read.get(position, ())) for position in range(pairs)]
    stored = None if keep is None else sum(map(len, keep))
    size = expected_bytes(pairs, latent_shape, len(levels), empty_text.hidden.shape[1:], stored)
    run.log("caching %d of %d pairs (seeded sample, invert.seed=%d) x %s levels at %s: "
            "%.1f MiB expected (fp16)", pairs, source_pairs, cfg.seed,
            len(levels) if keep is None else f"{stored / max(pairs, 1):.2f} planned",
            "x".join(map(str, latent_shape)), size / 2**20)
    run.tracker.metrics({"expected_bytes": size, "pairs": pairs})
    write_cache_meta(run.out_dir, {
        "base_model": model_cfg.base, "unet": model_cfg.unet, "revision": model_cfg.revision,
        "vae": model_cfg.vae, "prediction_type": model.prediction_type,
        "source_pairs": source_pairs, "sample_seed": cfg.seed,
        "resolution": model_cfg.resolution, "levels": levels,
        "renoise_steps": cfg.renoise_steps, "average": cfg.average,
        "latent_shape": list(latent_shape), "dtype": "float16", "pairs": pairs,
        "stored_levels": cfg.levels, "plan": plan,
    }, empty_text)

    progress = run.progress(total=pairs, unit="pairs")

    def invert(rows):
        top = None if keep is None else [max(keep[row["position"]], default=-1)
                                         for row in rows]
        batch = invert_pair_batch(model, rows, levels, model_cfg.resolution, cfg.renoise_steps,
                                  cfg.average, cfg.seed, top)
        progress.update(len(rows))
        return batch

    rows = ({**row, "position": position} for position, row in enumerate(read_pairs_at(
        run.input_dir("download"), positions, columns=["pair_id", "caption", "jpg_0", "jpg_1"])))
    stats = build_cache(run.out_dir, rows, invert, cfg.batch_size, cfg.shard_pairs,
                        keep=None if keep is None else keep.__getitem__)
    progress.close()
    check_cache(run.out_dir, stats["pairs"])
    levels_inverted = (len(levels) * pairs if keep is None
                       else sum(max(kept, default=-1) + 1 for kept in keep))
    return {"pairs": stats["pairs"], "source_pairs": source_pairs, "shards": stats["shards"],
            "resumed_shards": stats["resumed_shards"], "levels": levels,
            "stored_levels": cfg.levels, "pair_levels_stored": stored or len(levels) * pairs,
            "expected_bytes": size, "bytes": stats["bytes_written"],
            "unet_forwards_per_image": levels_inverted * (1 + cfg.renoise_steps)
            / max(pairs, 1)}
