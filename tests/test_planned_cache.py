"""invert.levels=planned: the cache holds only the (pair, level) latents the training run its
train settings describe will read; that run trains exactly as from the full cache, and a run
that needs a level the cache lacks is refused before its first step. train.reference_errors=
cached: the invert stage also stores the reference's errors at that run's draws, and training
from them is the run that computes them, without the reference's forwards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from smpo_core.errors import SmpoError
from smpo_core.recipe import HISTORY, TrainJob, run_training
from smpo_core.settings import load_settings
from smpo_core.store import Store
from smpo_core.training import CachedPairs
from smpo_core.trajectories import TrajectoryCache
from stages.common import stage_key_for

# 3 steps of 4 pairs from an 8-pair cache in two shards: some pairs are read twice (the second
# epoch starts in step 2), some never. Inversion batches of 2 pairs: a planned batch climbs to
# the highest level one of its pairs needs, both pairs, so its kept levels are the full
# cache's bit for bit, and training from either cache is the same run.
SMALL = ["invert.max_pairs=8", "invert.shard_pairs=4", "invert.batch_size=2",
         "train.max_steps=3", "train.effective_batch=4", "train.batch_size=2",
         "train.learning_rate=1e-3", "train.warmup_steps=1", "train.checkpoint_every=100"]
PLANNED = [*SMALL, "invert.levels=planned"]
CACHED_REFERENCE = "train.reference_errors=cached"


def run_task(name: str):
    """A stage task's body with its result unwrapped: a reused stage returns a `Reused` state."""
    from types import SimpleNamespace

    from stages.common import stage_result, stage_task

    task = stage_task(name)
    return SimpleNamespace(fn=lambda *args, **kwargs: stage_result(task.fn(*args, **kwargs)))


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Labels, a full cache and a planned one, made by the stages on the tiny profile."""
    from mlflow.tracking import MlflowClient

    from stages.common import RunContext
    from stages.tracking import experiment_id

    store = tmp_path_factory.mktemp("store").resolve()
    uri = Store(store).tracking_uri
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for name, overrides in (("full", SMALL), ("planned", PLANNED),
                                ("reference", [*PLANNED, CACHED_REFERENCE])):
            ctx = RunContext(load_settings("tiny", overrides), str(store), uri,
                             experiment_id(MlflowClient(uri), uri, store))
            pairs = {"download": run_task("download").fn(ctx, {})}
            out[name] = run_task("invert").fn(ctx, pairs)
        out["labels"] = Path(run_task("score").fn(ctx, pairs).path) / "labels.parquet"
    out["base"] = str(store / "builtin" / "tiny-sd")
    return out


def _train(caches, cache: str, out_dir: Path, *overrides: str) -> dict:
    settings = load_settings("tiny", [*SMALL, *overrides])
    job = TrainJob(settings, caches["base"], Path(caches[cache].path), caches["labels"],
                   out_dir)
    return run_training(job)


@pytest.fixture(scope="module")
def runs(caches, tmp_path_factory):
    """One training run from each cache (each trained once for the tests below): its folder,
    what it asked of the cache per micro-batch (positions, t, k) and its UNet forwards."""
    from diffusers import UNet2DConditionModel

    out: dict[str, dict] = {}
    load, forward = CachedPairs.__call__, UNet2DConditionModel.forward

    def recording(self, plan):  # what training really asks of the cache
        current["asked"].append((plan.positions.tolist(), plan.t.tolist(), plan.k.tolist()))
        return load(self, plan)

    def counting(self, *args, **kwargs):
        current["forwards"] += 1
        return forward(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CachedPairs, "__call__", recording)
        mp.setattr(UNet2DConditionModel, "forward", counting)
        for name, overrides in (("full", ()), ("planned", ()),
                                ("reference", (CACHED_REFERENCE,))):
            current = out[name] = {"dir": tmp_path_factory.mktemp(name), "asked": [],
                                   "forwards": 0}
            _train(caches, name, current["dir"], *overrides)
    return out


def _history(run: dict, name: str) -> list[float]:
    import json

    return [entry[name] for entry in json.loads((run["dir"] / HISTORY).read_text())]


def _weights(run: dict) -> dict[str, torch.Tensor]:
    return load_file(str(next((run["dir"] / "unet").glob("*.safetensors"))))


@pytest.mark.integration
def test_planned_cache_holds_exactly_the_levels_training_reads(caches, runs):
    read: dict[int, set[int]] = {}
    for positions, _, ks in runs["planned"]["asked"]:
        for position, k in zip(positions, ks, strict=True):
            read.setdefault(position, set()).add(k)
    cache = TrajectoryCache(Path(caches["planned"].path))
    assert len(cache) == 8 and sum(map(len, read.values())) >= 4
    assert [set(levels) for levels in cache.stored_levels] == [read.get(p, set())
                                                               for p in range(8)]
    # ...and those latents are the full cache's, bit for bit.
    full = TrajectoryCache(Path(caches["full"].path))
    for position, levels in read.items():
        z_planned, z_full = (c.get([position], ["z"])["z"][0] for c in (cache, full))
        for k in levels:
            assert torch.equal(z_planned[:, k], z_full[:, k]), (position, k)
    # One stored latent pair per (pair, level) read, against K = 5 for every pair.
    assert caches["planned"].summary["pair_levels_stored"] == sum(map(len, read.values()))
    assert caches["full"].summary["pair_levels_stored"] == 5 * 8
    assert caches["planned"].summary["bytes"] < caches["full"].summary["bytes"]
    # The UNet ran, per batch of 2 pairs, up to the highest level one of them is read at.
    highest = [max(read.get(p, {-1}) | read.get(p + 1, {-1})) + 1 for p in range(0, 8, 2)]
    assert caches["planned"].summary["unet_forwards_per_image"] == 2 * 2 * sum(highest) / 8
    assert caches["full"].summary["unet_forwards_per_image"] == 2 * 5


@pytest.mark.integration
def test_training_from_the_planned_cache_follows_training_from_the_full_cache(caches, runs):
    full, planned = runs["full"], runs["planned"]
    assert planned["asked"] == full["asked"] and len(full["asked"]) == 3 * 2
    losses = [_history(run, "loss") for run in (full, planned)]
    assert len(losses[0]) == 3 and losses[1] == losses[0]  # the same floats, step for step
    weights = [_weights(run) for run in (full, planned)]
    moved = load_file(str(next((Path(caches["base"]) / "unet").glob("*.safetensors"))))
    assert weights[0].keys() == weights[1].keys() == moved.keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not all(torch.equal(weights[0][name], moved[name]) for name in moved)  # it trained


@pytest.mark.integration
def test_a_run_that_needs_a_level_the_planned_cache_lacks_is_refused(caches, tmp_path):
    with pytest.raises(SmpoError, match=r"planned for another training run.*lacks \d+ "
                       r"\(pair, level\) latents this run reads, e\.g\. level \d+ of pair"):
        _train(caches, "planned", tmp_path / "other", "train.seed=1")
    assert not (tmp_path / "other" / "unet").exists()


@pytest.mark.integration
def test_training_from_cached_reference_errors_is_the_run_that_computes_them(caches, runs):
    compute, cached = runs["planned"], runs["reference"]
    assert cached["asked"] == compute["asked"]
    # 3 steps x 2 micro-batches: a policy and a reference forward each, against the policy's
    # alone (the latents of both caches are the full cache's, bit for bit).
    assert (compute["forwards"], cached["forwards"]) == (12, 6)
    for name in ("loss", "ref_mse", "model_mse"):
        ours, theirs = _history(cached, name), _history(compute, name)
        # The invert stage ran the reference in training's micro-batches on this device: the
        # same floats (another batch size would agree to rounding only).
        assert len(ours) == 3 and ours == theirs, name
    weights = [_weights(run) for run in (compute, cached)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[1][name], weights[0][name]) for name in weights[0])
    stored = load_file(str(Path(caches["reference"].path) / "reference_errors.safetensors"))
    assert stored["error"].shape == (3 * 4, 2) and stored["error"].isfinite().all()
    assert caches["reference"].summary["reference_draws"] == 12
    assert caches["planned"].summary["reference_draws"] == 0


@pytest.mark.integration
def test_cached_reference_errors_are_refused_when_absent_or_for_other_draws(caches, tmp_path):
    with pytest.raises(SmpoError, match=r"holds no reference errors"):
        _train(caches, "planned", tmp_path / "none", CACHED_REFERENCE)
    # Other caption drops: the levels read are the same, the reference's inputs are not.
    with pytest.raises(SmpoError, match=r"reference errors for other draws than this run's: "
                       r"\d+ of 12 differ in drop_caption"):
        _train(caches, "reference", tmp_path / "other", CACHED_REFERENCE,
               "train.empty_caption_prob=0.9")
    assert not (tmp_path / "none" / "unet").exists() and not (tmp_path / "other").exists()


@pytest.mark.integration
def test_processes_split_the_reference_pass_into_the_errors_one_process_writes(caches):
    from smpo_core.models import load_diffusion
    from stages.invert import cached_reference_errors, merge_reference_errors

    settings = load_settings("tiny", [*PLANNED, CACHED_REFERENCE])
    model = load_diffusion(caches["base"], torch.device("cpu"), torch.float32)
    folder = Path(caches["reference"].path)
    parts = [cached_reference_errors(settings, model, folder, (rank, 2)) for rank in (0, 1)]
    # 3 steps x 2 micro-batches of 2 pairs, dealt alternately: each draw computed once.
    computed = [(~p["error"].isnan()).all(1) for p in parts]
    assert [c.sum().item() for c in computed] == [6, 6] and not (computed[0] & computed[1]).any()
    written = load_file(str(folder / "reference_errors.safetensors"))
    merged = merge_reference_errors(parts)
    for name in ("error", "position", "t", "drop_caption"):
        assert torch.equal(merged[name], written[name]), name
        assert torch.equal(parts[1][name], written[name]) or name == "error"


def test_a_beta_sweep_shares_one_planned_cache_and_another_plan_does_not():
    def key(*overrides: str) -> str:
        return stage_key_for(load_settings("tiny", [*PLANNED, *overrides]), "invert",
                             {"download": "d"})

    assert key() == key("train.beta=5000") == key("train.learning_rate=1e-5")
    for other in ("train.seed=1", "train.max_steps=4", "train.effective_batch=16",
                  "train.timestep_sampling=level"):
        assert key(other) != key(), other
    full = stage_key_for(load_settings("tiny", SMALL), "invert", {"download": "d"})
    assert full == stage_key_for(load_settings("tiny", [*SMALL, "train.seed=1"]), "invert",
                                 {"download": "d"})
    # Cached reference errors: a cache of their own, shared by a beta sweep, not by other
    # caption drops.
    cached = key(CACHED_REFERENCE)
    assert cached not in (key(), full)
    assert cached == key(CACHED_REFERENCE, "train.beta=5000", "train.labels=human")
    assert cached != key(CACHED_REFERENCE, "train.empty_caption_prob=0.5")
    assert key() == key("train.empty_caption_prob=0.5")
    with pytest.raises(SmpoError, match=r"train\.reference_errors=cached.*method=sft"):
        load_settings("tiny", [*PLANNED, CACHED_REFERENCE, "train.method=sft"])


@pytest.mark.integration
def test_prefetching_the_next_micro_batch_trains_the_same_run(caches, runs, tmp_path,
                                                              monkeypatch):
    import json

    from smpo_core.acceleration import Prefetcher

    served: list[bool] = []  # per micro-batch read: was it loaded ahead, in the background?
    get = Prefetcher.get

    def recording(self, key):
        served.append(key in self._pending)
        return get(self, key)

    monkeypatch.setattr(Prefetcher, "get", recording)
    _train(caches, "full", tmp_path / "on", "train.prefetch=true")
    # 3 steps x 2 micro-batches; every one but the first was read while the one before ran.
    assert served == [False] + [True] * 5
    on = [entry["loss"] for entry in json.loads((tmp_path / "on" / HISTORY).read_text())]
    off = _history(runs["full"], "loss")  # prefetch off, the default
    assert len(off) == 3 and on == off


def test_a_planned_batch_is_the_full_batch_up_to_its_highest_level(tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from smpo_core.inversion import inversion_levels
    from smpo_core.models import load_diffusion
    from smpo_core.trajectories import invert_pair_batch
    from smpo_core.worlds.tiny import build_tiny_diffusion, trainable_pairs

    model = load_diffusion(str(build_tiny_diffusion(tmp_path / "sd")), torch.device("cpu"),
                           torch.float32)
    rows = trainable_pairs(tmp_path / "data", 2, seed=1)
    levels = inversion_levels(5, 1000)
    calls = []
    forward = UNet2DConditionModel.forward

    def counting(self, sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return forward(self, sample, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "forward", counting)
    full = invert_pair_batch(model, rows, levels, 32, 1, "mean")
    assert calls == [4] * 5 * 2  # both pairs (4 images), K levels, 1 + R forwards each
    calls.clear()
    planned = invert_pair_batch(model, rows, levels, 32, 1, "mean", top=[1, 3])
    # Both pairs climb to level 3, the batch's highest, and not beyond; bit for bit the same.
    assert calls == [4] * 4 * 2
    assert torch.equal(planned.z[:, :, :4], full.z[:, :, :4])
    assert planned.z[:, :, 4:].isnan().all() and torch.equal(planned.z0, full.z0)
    calls.clear()
    unread = invert_pair_batch(model, rows, levels, 32, 1, "mean", top=[-1, -1])
    assert calls == [] and unread.z.isnan().all() and torch.equal(unread.z0, full.z0)
