"""SDXL-shaped models: two text encoders, pooled embedding and size/crop ids end to end."""

from __future__ import annotations

import copy

import pytest
import torch

from smpo_core.generation import ImageFolder, ModelSpec, Sampling, build_pipeline, draw
from smpo_core.inversion import inversion_levels
from smpo_core.models import encode_captions, load_diffusion
from smpo_core.training import CachedPairs, PairBatch, StepConfig, TrainingPlan, smpo_loss
from smpo_core.trajectories import TrajectoryCache, build_cache, invert_pair_batch, write_cache_meta
from smpo_core.worlds.tiny import build_tiny_sdxl, trainable_pairs

LEVELS = inversion_levels(3)
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    folder = build_tiny_sdxl(root / "model")
    model = load_diffusion(str(folder), torch.device("cpu"), torch.float32)
    rows = trainable_pairs(root / "data", 4, seed=5)
    return folder, model, rows, root


def test_captions_give_both_encoders_states_and_a_pooled_embedding(sdxl):
    _, model, _, _ = sdxl
    assert model.is_sdxl
    prompt = encode_captions(model, ["a red circle", "a blue square"])
    assert tuple(prompt.hidden.shape) == (2, 77, 64)  # 32 + 32 hidden, side by side
    assert tuple(prompt.pooled.shape) == (2, 32)


def test_cache_keeps_pooled_and_size_ids_and_trains_cached_like_online(sdxl):
    _, model, rows, root = sdxl
    inverted = invert_pair_batch(model, rows, LEVELS, 32, renoise_steps=1, average="mean")
    # 64 px synthetic images, centre-cropped to 32: original (64, 64), crop (0, 0), target 32.
    assert inverted.time_ids[0, 0].tolist() == [64, 64, 0, 0, 32, 32]
    cache_dir = root / "cache"
    write_cache_meta(cache_dir, {"levels": LEVELS}, encode_captions(model, [""]))
    build_cache(cache_dir, iter(rows),
                lambda batch: invert_pair_batch(model, batch, LEVELS, 32, 1, "mean"),
                batch_size=2, shard_pairs=4)
    cache = TrajectoryCache(cache_dir)
    assert cache.empty_pooled is not None
    data = CachedPairs(cache, torch.tensor([2.0, -1.0, 0.5, 3.0]), torch.tensor([0, 1, 0, 0]),
                       load_levels=True, device=torch.device("cpu"))
    plan = TrainingPlan(len(cache), 4, 0, tuple(LEVELS), 1000).step(0)
    batch = data(plan)
    assert tuple(batch.pooled.shape) == (4, 32) and tuple(batch.time_ids.shape) == (4, 2, 6)
    reference = copy.deepcopy(model.unet)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    losses = []
    for source in ("cache", "online"):
        cfg = StepConfig("preference", "inversion", source, 2000.0, LEVELS)
        run = batch if source == "cache" else PairBatch(batch.z0, None, batch.text, batch.weight,
                                                        batch.winner, batch.pooled,
                                                        batch.time_ids)
        loss, _ = smpo_loss(model.unet, reference, run, plan, model.alphas_cumprod, cfg)
        losses.append(loss.item())
    # The cache is fp16: the two agree to its precision.
    assert losses[0] == pytest.approx(losses[1], rel=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))


def test_sdxl_pipeline_generates_from_the_same_seed(sdxl):
    from smpo_core.generation import ImageJob

    folder, _, _, root = sdxl
    spec = ModelSpec("sdxl", str(folder))
    pipe = build_pipeline(spec, torch.device("cpu"), torch.float32)
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    sampling = Sampling(steps=2, guidance_scale=5.0, resolution=32, dtype="float32")
    job = [ImageJob(0, "a red circle", 0, seed=7)]
    first, again = (ImageFolder(root / name, spec, sampling) for name in ("first", "again"))
    assert draw(pipe, job, first, batch_size=2) == draw(pipe, job, again, batch_size=2) == 1
    assert first.read(job[0]).size == (32, 32)
    assert first.read(job[0]).tobytes() == again.read(job[0]).tobytes()
