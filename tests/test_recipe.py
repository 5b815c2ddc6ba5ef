"""Training as a library: `smpo_core.recipe` from Python, without Prefect or MLflow; a killed
run resumes from accelerate's checkpoint and ends bit-equal to an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from smpo_core.recipe import CHECKPOINT, HISTORY, TrainJob, run_training
from smpo_core.settings import load_settings
from smpo_core.store import Store

# 5 steps of 8 pairs from a 16-pair cache; checkpoints after steps 2 and 4.
SMALL = ["invert.max_pairs=16", "train.max_steps=5", "train.checkpoint_every=2",
         "train.learning_rate=1e-3", "train.warmup_steps=2"]


def run_task(name: str):
    """A stage task's body with its result unwrapped: a reused stage returns a `Reused` state."""
    from types import SimpleNamespace

    from stages.common import stage_result, stage_task

    task = stage_task(name)
    return SimpleNamespace(fn=lambda *args, **kwargs: stage_result(task.fn(*args, **kwargs)))


class Killed(Exception):
    """Stands for the process dying mid-training."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The tiny profile's base model, trajectory cache and labels, made by the stages."""
    from mlflow.tracking import MlflowClient

    from stages.common import RunContext
    from stages.tracking import experiment_id

    store = tmp_path_factory.mktemp("store").resolve()
    uri = Store(store).tracking_uri
    ctx = RunContext(load_settings("tiny", SMALL), str(store), uri,
                     experiment_id(MlflowClient(uri), uri, store))
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        pairs = {"download": run_task("download").fn(ctx, {})}
        invert = run_task("invert").fn(ctx, pairs)
        score = run_task("score").fn(ctx, pairs)
    return {"base": str(store / "builtin" / "tiny-sd"), "cache": Path(invert.path),
            "labels": Path(score.path) / "labels.parquet", "ctx": ctx, "pairs": pairs,
            "score": score}


def _job(inputs, out_dir: Path, *overrides: str) -> TrainJob:
    settings = load_settings("tiny", [*SMALL, *overrides])
    return TrainJob(settings, inputs["base"], inputs["cache"], inputs["labels"], out_dir)


def _weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "unet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.integration
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_bit_equal(inputs, tmp_path):
    straight = run_training(_job(inputs, tmp_path / "straight"))
    assert straight["steps"] == 5 and straight["pairs_seen"] == 5 * 8

    def dies_at_step_3(step, metrics):
        if step == 3:
            raise Killed
    with pytest.raises(Killed):
        run_training(_job(inputs, tmp_path / "killed"), dies_at_step_3)
    assert (tmp_path / "killed" / CHECKPOINT).is_dir()
    assert not (tmp_path / "killed" / "unet").exists()
    seen = []
    resumed = run_training(_job(inputs, tmp_path / "killed"),
                           lambda step, metrics: seen.append(step))
    assert resumed["resumed_from_step"] == 2
    assert seen == [3, 4, 5]  # real steps after the resume
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "killed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    histories = [json.loads((tmp_path / run / HISTORY).read_text())
                 for run in ("straight", "killed")]
    drop_time = [[{k: v for k, v in h.items() if k != "step_seconds"} for h in history]
                 for history in histories]
    assert drop_time[0] == drop_time[1]
    base = load_file(Path(inputs["base"]) / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it trained


@pytest.mark.integration
def test_the_micro_batch_size_does_not_change_the_run(inputs, tmp_path):
    """Micro-batches are slices of the step's draws: 1 x 8 and 4 x 2 accumulate the same
    pairs, timesteps and caption drops (equal up to float summation order)."""
    run_training(_job(inputs, tmp_path / "one", "train.max_steps=2"))
    run_training(_job(inputs, tmp_path / "four", "train.max_steps=2", "train.batch_size=2"))
    histories = [json.loads((tmp_path / run / HISTORY).read_text()) for run in ("one", "four")]
    # Step 1 starts from the same weights: only the summation order differs. Later steps start
    # from weights that Adam moved by up to the learning rate where a gradient was ~0 (below).
    for step, (a, b) in enumerate(zip(*histories, strict=True)):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6 if step == 0 else 1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4 if step == 0 else 1e-3)
        assert a["implicit_accuracy"] == b["implicit_accuracy"]
    # Adam divides by the gradient's size: where a gradient is ~0, float noise in it moves a
    # weight by up to the learning rate. On the whole the two runs are the same run.
    one, four = _weights(tmp_path / "one"), _weights(tmp_path / "four")
    base = load_file(Path(inputs["base"]) / "unet" / "diffusion_pytorch_model.safetensors")
    apart = sum((one[k] - four[k]).abs().sum().item() for k in one)
    moved = sum((one[k] - base[k]).abs().sum().item() for k in one)
    assert apart < 0.01 * moved


@pytest.mark.integration
def test_lora_trains_against_its_own_disabled_adapters(inputs, tmp_path):
    """One UNet in memory: step 1's loss is log 2 (policy == reference), then it learns."""
    summary = run_training(_job(inputs, tmp_path / "lora", "train.lora_rank=4",
                                "train.max_steps=3"))
    assert summary["weights"] == "lora"
    history = json.loads((tmp_path / "lora" / HISTORY).read_text())
    assert history[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    assert history[-1]["loss"] != history[0]["loss"]
    assert (tmp_path / "lora" / "lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.integration
def test_sft_then_smpo_inverts_and_trains_from_the_sft_unet(inputs):
    """model.unet=train:KEY: the cache is inverted with that UNet and training starts from it
    (policy == reference == the SFT UNet at step 1, so the first loss is log 2)."""
    from diffusers import UNet2DConditionModel

    from stages.common import RunContext

    ctx = inputs["ctx"]

    def context(*overrides: str) -> RunContext:
        return RunContext(load_settings("tiny", [*SMALL, "train.max_steps=2", *overrides]),
                          ctx.store_root, ctx.tracking_uri, ctx.experiment_id)

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        base_cache = run_task("invert").fn(context(), inputs["pairs"])
        sft = run_task("train").fn(context("train.method=sft", "train.trajectory=forward"),
                                     {"invert": base_cache, "score": inputs["score"]})
        # A tiny learning rate: the result stays next to where it started.
        then = context(f"model.unet=train:{sft.key[:8]}", "train.learning_rate=1e-8")
        cache = run_task("invert").fn(then, inputs["pairs"])
        smpo = run_task("train").fn(then, {"invert": cache, "score": inputs["score"]})
    assert cache.key != base_cache.key
    meta = json.loads((Path(cache.path) / "cache.json").read_text())
    assert meta["unet"] == f"train:{sft.key[:8]}"
    first = load_file(Path(cache.path) / "shard-00000.safetensors")
    assert not torch.equal(first["z"], load_file(Path(base_cache.path)
                                                 / "shard-00000.safetensors")["z"])
    history = json.loads((Path(smpo.path) / HISTORY).read_text())
    assert history[0]["loss"] == pytest.approx(float(np.log(2)), abs=1e-6)
    unet = lambda path: UNet2DConditionModel.from_pretrained(path)  # noqa: E731
    tuned, sft_unet = unet(Path(smpo.path) / "unet"), unet(Path(sft.path) / "unet")
    base = UNet2DConditionModel.from_pretrained(inputs["base"], subfolder="unet")
    distance = lambda a, b: sum((p - q).abs().sum().item()  # noqa: E731
                                for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert distance(tuned, sft_unet) < 0.01 * distance(tuned, base)


def test_the_training_process_imports_neither_prefect_nor_mlflow():
    code = ("import sys, smpo_core.recipe; "
            "print(sorted(m for m in ('prefect', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_model_unet_names_an_earlier_train_run_by_its_key(tmp_path):
    from smpo_core.errors import SmpoError
    from smpo_core.model_refs import start_unet

    for key, weights in (("3f2a9c0000000000", "unet"), ("77aa000000000000", "lora")):
        folder = tmp_path / "train" / key
        folder.mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"weights": weights}))
    assert start_unet(None, tmp_path) is None
    assert start_unet("train:3f2a", tmp_path) == str(tmp_path / "train" / "3f2a9c0000000000"
                                                      / "unet")
    assert start_unet("/models/sft-unet", tmp_path) == "/models/sft-unet"
    with pytest.raises(SmpoError, match="name the train output by its key"):
        start_unet("train:latest", tmp_path)
    with pytest.raises(SmpoError, match="wrote lora weights, not a whole UNet"):
        start_unet("train:77aa", tmp_path)
    with pytest.raises(SmpoError, match="no finished train output"):
        start_unet("train:ffff", tmp_path)
