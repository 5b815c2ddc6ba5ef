"""The whole flow on the tiny profile, for real: outputs, reuse, selective reruns, tracking."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPModel

from smpo_core.settings import STAGES
from smpo_core.worlds.builtins import TINY_PAIRS
from smpo_core.worlds.tiny import expected_counts
from tests.conftest import REPO

pytestmark = pytest.mark.integration


KILLED_AT = 15  # a train step after the tiny profile's step-10 checkpoint


class Killed(Exception):
    """Stands for the process dying mid-training."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Flow runs into one store: fresh, unchanged, with train.beta changed, ..., a train stage
    killed at step 15 of 30 and redone, other reward models, LoRA."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import smpo
    from stages.tracking import Tracker

    store = tmp_path_factory.mktemp("store")
    flows = 0

    def run(**kwargs):
        nonlocal flows
        flows += 1
        return _by_stage(smpo(store=str(store), **kwargs))

    log_metrics = Tracker.metrics

    def dies_at_step(self, values, step=0):
        if "train.loss" in values and step == KILLED_AT:
            raise Killed(f"killed at train step {step}")
        log_metrics(self, values, step)

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        with prefect_test_harness(server_startup_timeout=120):
            first = run()
            # What a run leaves in this process's environment for the next one (on any store).
            tracking_after_run = os.environ.get("MLFLOW_TRACKING_URI")
            second = run()
            third = run(overrides=["train.beta=3000"])
            fourth = run(stages=["score"], overrides=["score.batch_size=7"])
            forced = run(stages=["evaluate"], force=["evaluate"])
            # The first run's training again, killed after its step-10 checkpoint, then redone.
            train_dir = Path(first["train"]["path"])
            unet = train_dir / "unet" / "diffusion_pytorch_model.safetensors"
            uninterrupted = {"unet": load_file(unet),
                             "history": json.loads((train_dir / "history.json").read_text())}
            mp.setattr(Tracker, "metrics", dies_at_step)
            with pytest.raises(Killed):
                run(stages=["train"], force=["train"])
            mp.setattr(Tracker, "metrics", log_metrics)
            killed = {"manifest": (train_dir / "manifest.json").exists(),
                      "weights": unet.exists()}
            resumed = run(stages=["train"])
            other_rewards = {
                kind: run(stages=["score"], overrides=[
                    f"score.reward_model={kind}", f"score.checkpoint=builtin:tiny-{kind}",
                    f"score.processor=builtin:{processor}"])
                for kind, processor in (("hpsv2", "tiny-hpsv2-tokenizer"),
                                        ("imagereward", "tiny-imagereward-bert"))}
            lora = run(overrides=["train.lora_rank=4"])
    return {"lora": lora, "other_rewards": other_rewards, "store": store, "first": first,
            "second": second, "third": third, "fourth": fourth, "forced": forced,
            "killed": killed, "resumed": resumed, "uninterrupted": uninterrupted,
            "flows": flows, "tracking_after_run": tracking_after_run}


def _by_stage(rows):
    return {row["stage"]: row for row in rows}


def _manifest(row) -> dict:
    return json.loads((Path(row["path"]) / "manifest.json").read_text())


def test_first_run_runs_every_stage(runs):
    assert list(runs["first"]) == list(STAGES)
    assert not any(row["reused"] for row in runs["first"].values())


def test_a_run_leaves_the_process_tracking_uri_unset(runs):
    # Logging the tuned model sets MLflow's global URI (and MLFLOW_TRACKING_URI with it): left
    # set, the next run or `smpo compare` of this process, on another store, would read and
    # write this store's database (tests/test_compare.py failed after this file so).
    assert runs["tracking_after_run"] is None


def test_download_drops_what_cannot_train(runs):
    expected = expected_counts(TINY_PAIRS)
    manifest = _manifest(runs["first"]["download"])
    assert manifest["source_rows"] == expected["rows"]
    assert manifest["pairs"] == expected["usable"]
    assert manifest["dropped"]["tie"] == expected["ties"]
    assert manifest["dropped"]["no_label"] == expected["no_label"]
    assert manifest["dropped"]["identical"] == expected["identical"]
    assert manifest["dropped"]["corrupt_jpeg"] == expected["corrupt"]
    folder = Path(runs["first"]["download"]["path"])
    rows = sum(pq.read_metadata(f).num_rows for f in folder.glob("pairs-*.parquet"))
    quarantined = sum(pq.read_metadata(f).num_rows for f in folder.glob("quarantine-*.parquet"))
    assert rows == expected["usable"]
    assert quarantined == expected["corrupt"]


def _clip_cosines(model_dir: Path, images: list[Image.Image], captions: list[str]) -> np.ndarray:
    """PickScore's reward, computed here with transformers alone: the cosine of the normalised
    image and text embeddings of a CLIP folder."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    with torch.no_grad():
        inputs = processor(text=captions, images=images, padding=True, return_tensors="pt")
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=inputs["input_ids"],
                                       attention_mask=inputs["attention_mask"]).pooler_output
    return torch.nn.functional.cosine_similarity(image, text).double().numpy()


def test_score_writes_soft_labels_of_independently_computed_rewards(runs):
    labels = pq.read_table(Path(runs["first"]["score"]["path"]) / "labels.parquet")
    pairs = pq.read_table(sorted(Path(runs["first"]["download"]["path"]).glob("pairs-*.parquet")),
                          columns=["pair_id", "caption", "jpg_0", "jpg_1"]).to_pylist()
    assert labels.column("pair_id").to_pylist() == [row["pair_id"] for row in pairs]
    rewards = {}
    for side in ("0", "1"):
        images = [Image.open(io.BytesIO(row[f"jpg_{side}"])).convert("RGB") for row in pairs]
        rewards[side] = _clip_cosines(runs["store"] / "builtin" / "tiny-clip", images,
                                      [row["caption"] for row in pairs])
        np.testing.assert_allclose(labels.column(f"reward_{side}").to_numpy(), rewards[side],
                                   atol=1e-5)
    # METHOD.md §2 with bounds fitted on every scored image: min-max normalise, p = sigmoid of
    # the normalised difference, w = gamma (2p - 1) with gamma = 10.
    r_min = min(rewards["0"].min(), rewards["1"].min())
    r_max = max(rewards["0"].max(), rewards["1"].max())
    p = 1 / (1 + np.exp(-(rewards["0"] - rewards["1"]) / (r_max - r_min)))
    np.testing.assert_allclose(labels.column("p").to_numpy(), p, atol=1e-4)
    np.testing.assert_allclose(labels.column("weight").to_numpy(), 10 * (2 * p - 1), atol=1e-3)
    meta = {k.decode(): v.decode() for k, v in labels.schema.metadata.items()}
    assert meta["smpo.reward_model"] == "pickscore"
    assert meta["smpo.bounds"] == "fitted-minmax"
    assert (float(meta["smpo.r_min"]), float(meta["smpo.r_max"])) == pytest.approx(
        (r_min, r_max), abs=1e-5)
    assert _manifest(runs["first"]["score"])["unique_images"] == 2 * labels.num_rows


def test_invert_caches_trajectories(runs):
    folder = Path(runs["first"]["invert"]["path"])
    meta = json.loads((folder / "cache.json").read_text())
    assert meta["levels"] == [199, 399, 599, 799, 999]
    index = pq.read_table(sorted(folder.glob("index-*.parquet"))[0])
    cached = pq.read_table(sorted(folder.glob("index-*.parquet")),
                           columns=["pair_id"]).column("pair_id").to_pylist()
    assert len(cached) == 128  # invert.max_pairs of the tiny profile
    downloaded = pq.read_table(sorted(Path(runs["first"]["download"]["path"])
                                      .glob("pairs-*.parquet")), columns=["pair_id"]
                               ).column("pair_id").to_pylist()
    # A random sample of all the downloaded pairs, in their order, not the first 128.
    where = {pair_id: position for position, pair_id in enumerate(downloaded)}
    positions = [where[pair_id] for pair_id in cached]
    assert positions == sorted(set(positions))
    assert positions != list(range(128))
    assert max(positions) >= 0.9 * len(downloaded) and min(positions) < 0.1 * len(downloaded)
    assert meta["source_pairs"] == len(downloaded) and meta["sample_seed"] == 0
    with safe_open(str(folder / "shard-00000.safetensors"), "pt") as shard:
        z, z0 = shard.get_tensor("z"), shard.get_tensor("z0")
    assert z.dtype == torch.float16
    assert tuple(z.shape) == (index.num_rows, 2, 5, 4, 16, 16)
    assert tuple(z0.shape) == (index.num_rows, 2, 4, 16, 16)
    assert torch.isfinite(z.float()).all()
    # Higher levels are noisier: the latents drift away from z0 as t grows.
    drift = [(z[:, :, k].float() - z0.float()).pow(2).mean().item() for k in range(5)]
    assert drift == sorted(drift)


def test_train_writes_a_changed_unet_and_finite_losses(runs):
    from diffusers import UNet2DConditionModel

    folder = Path(runs["first"]["train"]["path"])
    tuned = UNet2DConditionModel.from_pretrained(folder / "unet")
    base = UNet2DConditionModel.from_pretrained(runs["store"] / "builtin" / "tiny-sd",
                                                subfolder="unet")
    moved = sum((a - b).abs().sum().item() for a, b in
                zip(tuned.parameters(), base.parameters(), strict=True))
    assert moved > 0
    history = json.loads((folder / "history.json").read_text())
    assert len(history) == 30
    assert all(np.isfinite(h["loss"]) and 0 <= h["implicit_accuracy"] <= 1 for h in history)
    # Step 1 starts from policy == reference: d = 0, so the loss is exactly log 2.
    assert history[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert (folder / "training.png").stat().st_size > 0


def test_evaluate_reports_win_rates_grid_and_html(runs):
    folder = Path(runs["first"]["evaluate"]["path"])
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["metrics"]) == {"pickscore", "hpsv2", "imagereward", "aesthetic",
                                       "clipscore"}
    generation = summary["generation"]
    assert generation["steps"] == 10
    # --force evaluate (below) rewrote this folder, drawing nothing: every image was kept.
    assert {m: generation["drawn"][m] + generation["reused"][m] for m in ("base", "tuned")} \
        == {"base": 8, "tuned": 8}
    # builtin:tiny-prompts has two styles (one or two shapes): 4 prompts of each.
    assert summary["prompts"]["styles"] == {"one shape": 4, "two shapes": 4}
    scores = pq.read_table(folder / "scores.parquet").to_pandas()
    assert len(scores) == 16 and set(scores["model"]) == {"base", "tuned"}
    # The kept images scored here, independently: PickScore on its published scale is the
    # CLIP's logit scale times the cosine, CLIP score 100 max(cosine, 0); the win rate counts
    # the seeds where tuned beats base, ties half.
    clip_dir = runs["store"] / "builtin" / "tiny-clip"
    scale = CLIPModel.from_pretrained(clip_dir).logit_scale.exp().item()
    cosine = {}
    for model in ("base", "tuned"):
        rows = scores[scores["model"] == model].sort_values("seed")
        kept = Path(summary["models"][model]["images"]) / "images"
        images = [Image.open(kept / f"{hashlib.sha256(p.encode()).hexdigest()[:16]}-{s}.png")
                  .convert("RGB") for p, s in zip(rows["prompt"], rows["seed"], strict=True)]
        cosine[model] = _clip_cosines(clip_dir, images, list(rows["prompt"]))
        np.testing.assert_allclose(rows["pickscore"], scale * cosine[model], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(rows["clipscore"], 100 * np.maximum(cosine[model], 0),
                                   atol=1e-3)
    wins = [1.0 if t > b else 0.5 if t == b else 0.0
            for t, b in zip(cosine["tuned"], cosine["base"], strict=True)]
    pickscore = summary["metrics"]["pickscore"]["groups"]["all"]
    assert pickscore["vs_reference"]["tuned"]["win_rate"] == pytest.approx(sum(wins) / 8)
    assert pickscore["vs_reference"]["tuned"]["diff_mean"] == pytest.approx(
        scale * (cosine["tuned"] - cosine["base"]).mean(), abs=1e-4)
    assert pickscore["models"]["base"]["median"] == pytest.approx(
        scale * np.median(cosine["base"]), abs=1e-4)
    low, high = pickscore["vs_reference"]["tuned"]["diff_ci"]
    assert low <= pickscore["vs_reference"]["tuned"]["diff_mean"] <= high
    with Image.open(folder / "grid.png") as grid:
        assert grid.width > 2 * 160 and grid.height > 8 * 160
    html = (folder / "report.html").read_text()
    assert "win rate" in html and "data:image/png;base64," in html


def test_unchanged_rerun_reuses_every_stage(runs):
    assert all(row["reused"] for row in runs["second"].values())
    assert {s: r["key"] for s, r in runs["second"].items()} == \
        {s: r["key"] for s, r in runs["first"].items()}


def test_changed_beta_reruns_train_and_evaluate_only(runs):
    ran = {stage for stage, row in runs["third"].items() if not row["reused"]}
    assert ran == {"train", "evaluate"}
    assert runs["third"]["train"]["key"] != runs["first"]["train"]["key"]
    assert runs["third"]["invert"]["key"] == runs["first"]["invert"]["key"]


def test_runtime_settings_do_not_change_keys(runs):
    assert list(runs["fourth"]) == ["download", "score"]
    assert runs["fourth"]["score"]["reused"]
    assert runs["fourth"]["score"]["key"] == runs["first"]["score"]["key"]


def test_mlflow_parent_with_nested_stage_runs(runs):
    client = MlflowClient(f"sqlite:///{runs['store'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smpo")
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string="tags.`smpo.profile` = 'tiny'",
                                 order_by=["attributes.start_time ASC"])
    parents = [r for r in parents if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == runs["flows"]
    first, second = parents[0], parents[1]
    assert first.data.tags["prefect.flow_run_id"]
    assert first.data.tags["smpo.code_version"]
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{first.info.run_id}'")
    assert sorted(c.data.tags["smpo.stage"] for c in children) == sorted(STAGES)
    assert all(c.data.tags["smpo.reused"] == "false" for c in children)
    train = next(c for c in children if c.data.tags["smpo.stage"] == "train")
    assert train.data.params["train.beta"] == "2000.0"
    losses = client.get_metric_history(train.info.run_id, "train.loss")
    assert len(losses) == 30 and all(np.isfinite(m.value) for m in losses)
    evaluate = next(c for c in children if c.data.tags["smpo.stage"] == "evaluate")
    artifacts = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
    assert {"grid.png", "report.html", "summary.json", "manifest.json"} <= artifacts
    reused = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{second.info.run_id}'")
    assert len(reused) == 5 and all(c.data.tags["smpo.reused"] == "true" for c in reused)


def test_force_recomputes_one_stage_under_the_same_key(runs):
    ran = {stage for stage, row in runs["forced"].items() if not row["reused"]}
    assert ran == {"evaluate"}
    assert runs["forced"]["evaluate"]["key"] == runs["first"]["evaluate"]["key"]
    # The statistics are computed again from the images and scores the first run kept.
    assert _manifest(runs["forced"]["evaluate"])["generation"]["reused"] == \
        {"base": 8, "tuned": 8}


def test_killed_train_stage_is_redone_from_its_last_checkpoint(runs):
    assert runs["killed"] == {"manifest": False, "weights": False}
    train = runs["resumed"]["train"]
    assert not train["reused"] and train["key"] == runs["first"]["train"]["key"]
    assert _manifest(train)["resumed_from_step"] == 10  # the last checkpoint before the kill
    # Steps 11 to 30 were trained again, exactly as the uninterrupted run trained them.
    history = json.loads((Path(train["path"]) / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 31))
    assert [h["loss"] for h in history] == [h["loss"] for h in runs["uninterrupted"]["history"]]
    weights = load_file(Path(train["path"]) / "unet" / "diffusion_pytorch_model.safetensors")
    before = runs["uninterrupted"]["unet"]
    assert weights.keys() == before.keys()
    assert all(torch.equal(weights[k], before[k]) for k in weights)
    client = MlflowClient(f"sqlite:///{runs['store'] / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("smpo").experiment_id],
                               f"tags.`smpo.key` = '{train['key']}' and "
                               f"attributes.status = 'FINISHED' and tags.`smpo.reused` = 'false'",
                               order_by=["attributes.start_time DESC"], max_results=1)
    logged = client.get_metric_history(run.info.run_id, "train.loss")
    assert sorted(m.step for m in logged) == list(range(11, 31))


@pytest.mark.parametrize("kind", ["hpsv2", "imagereward"])
def test_score_stage_with_official_checkpoint_formats(runs, kind):
    rows = runs["other_rewards"][kind]
    assert rows["download"]["reused"] and not rows["score"]["reused"]
    labels = pq.read_table(Path(rows["score"]["path"]) / "labels.parquet")
    meta = {k.decode(): v.decode() for k, v in labels.schema.metadata.items()}
    assert meta["smpo.reward_model"] == kind
    assert len(meta["smpo.checkpoint_hash"]) == 16
    assert labels.num_rows == _manifest(runs["first"]["download"])["pairs"]
    rewards = labels.column("reward_0").to_numpy()
    assert np.isfinite(rewards).all() and rewards.std() > 0


def test_lora_training_writes_adapters_that_evaluate_loads(runs):
    from safetensors.torch import load_file

    lora = runs["lora"]
    assert {s for s, r in lora.items() if not r["reused"]} == {"train", "evaluate"}
    folder = Path(lora["train"]["path"])
    manifest = _manifest(lora["train"])
    assert manifest["weights"] == "lora" and not (folder / "unet").exists()
    assert 0 < manifest["trainable_parameters"] < 50_000  # adapters only, not the UNet
    adapters = load_file(folder / "lora" / "pytorch_lora_weights.safetensors")
    assert adapters and all(".lora" in key for key in adapters)
    assert any(t.abs().sum() > 0 for k, t in adapters.items() if "lora.up" in k)
    summary = json.loads((Path(lora["evaluate"]["path"]) / "summary.json").read_text())
    assert summary["models"]["tuned"]["weights"].endswith("lora")
    assert summary["models"]["tuned"]["weights_kind"] == "lora"
    # The base drew these prompts with these seeds in the first run: nothing drawn again.
    assert summary["generation"]["drawn"] == {"base": 0, "tuned": 8}


def _parent_runs(runs) -> tuple[MlflowClient, str, list]:
    """The flow runs' MLflow parent runs, in the order the flows ran."""
    client = MlflowClient(f"sqlite:///{runs['store'] / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smpo")
    parents = client.search_runs([experiment.experiment_id],
                                 filter_string="tags.`smpo.profile` = 'tiny'",
                                 order_by=["attributes.start_time ASC"])
    return client, experiment, [r for r in parents if "mlflow.parentRunId" not in r.data.tags]


def _stage_run(client, experiment, parent, stage):
    found = client.search_runs([experiment.experiment_id], filter_string=(
        f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`smpo.stage` = '{stage}'"))
    assert len(found) == 1
    return found[0]


def test_mlflow_runs_say_which_setting_gave_which_result(runs):
    client, experiment, parents = _parent_runs(runs)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    first, third = parents[0], parents[2]
    # Named by what differs; every resolved setting a param, so a diff shows train.beta.
    assert first.info.run_name == "tiny"
    assert third.info.run_name == "tiny train.beta=3000"
    assert parents[4].info.run_name == "tiny evaluate --force evaluate"
    differ = {k for k in first.data.params if first.data.params[k] != third.data.params.get(k)}
    assert differ == {"train.beta"}
    assert first.data.params["evaluate.num_prompts"] == "8"
    # The evaluate runs of two betas differ too: an evaluation's params include the settings
    # of the training it evaluates.
    evaluations = [_stage_run(client, experiment, p, "evaluate") for p in (first, third)]
    assert [e.data.params["train.beta"] for e in evaluations] == ["2000.0", "3000.0"]
    # Headline results on the parent, equal to what the stages wrote into the store.
    folder = Path(runs["first"]["evaluate"]["path"])
    summary = json.loads((folder / "summary.json").read_text())
    history = json.loads((Path(runs["first"]["train"]["path"]) / "history.json").read_text())
    metrics = first.data.metrics
    assert metrics["train.final_loss"] == pytest.approx(history[-1]["loss"])
    assert metrics["train.final_implicit_accuracy"] == pytest.approx(
        history[-1]["implicit_accuracy"])
    for kind, metric in summary["metrics"].items():
        overall = metric["groups"]["all"]
        assert metrics[f"eval.{kind}.tuned.mean"] == pytest.approx(
            overall["models"]["tuned"]["mean"])
        assert metrics[f"eval.{kind}.base.mean"] == pytest.approx(
            overall["models"]["base"]["mean"])
        assert metrics[f"eval.{kind}.tuned.win_rate"] == pytest.approx(
            overall["vs_reference"]["tuned"]["win_rate"])
    # Manifests are artifacts, never metrics; each evaluation score is logged once.
    for parent in (first, third):
        for stage in STAGES:
            run = _stage_run(client, experiment, parent, stage)
            assert not [k for k in run.data.metrics if k.startswith("manifest.")], stage
            assert "manifest.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.parametrize("which", ["first", "lora"])
def test_trained_weights_load_back_from_mlflow_into_a_diffusers_pipeline(runs, which):
    import mlflow
    import pandas as pd
    from diffusers import StableDiffusionPipeline

    from stages.tracking import global_tracking_uri

    client, experiment, parents = _parent_runs(runs)
    parent = parents[0] if which == "first" else parents[-1]
    train = _stage_run(client, experiment, parent, "train")
    uri = train.data.tags["smpo.model_uri"]
    logged = client.get_logged_model(uri.removeprefix("models:/"))
    assert (logged.experiment_id, logged.source_run_id, str(logged.status)) == (
        experiment.experiment_id, train.info.run_id, "READY")
    assert logged.artifact_location.startswith((runs["store"] / "mlflow-artifacts").as_uri())
    with global_tracking_uri(client.tracking_uri):
        model = mlflow.pyfunc.load_model(uri)
    pipe = model.unwrap_python_model().pipeline
    assert isinstance(pipe, StableDiffusionPipeline)
    folder = Path(runs[which]["train"]["path"])
    if which == "first":
        weights = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
        loaded = pipe.unet.state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in weights.items())
    else:  # the adapters are loaded into the UNet, with the trained values
        assert pipe.get_list_adapters()
        adapters = load_file(folder / "lora" / "pytorch_lora_weights.safetensors")
        name = next(k for k in adapters if "lora.up" in k and adapters[k].abs().sum() > 0)
        loaded = {k: v for k, v in pipe.unet.state_dict().items() if "lora_B" in k}
        assert any(torch.equal(v, adapters[name]) for v in loaded.values())
    images = model.predict(pd.DataFrame({"prompt": ["a red square"]}),
                           params={"num_inference_steps": 2, "seed": 3})
    assert len(images) == 1 and images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8


def _smpo(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=REPO)


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


def test_dry_run_says_what_would_run_and_why_and_writes_nothing(runs):
    store = runs["store"]
    before = _snapshot(store)
    done = _smpo("run", "--dry-run", "--store", str(store), "--set", "train.beta=5000",
                 "--set", "train.lora_rank=4")
    assert done.returncode == 0, done.stderr
    assert _snapshot(store) == before
    lines = {line.split()[0]: line for line in done.stdout.splitlines()
             if line.split() and line.split()[0] in STAGES}
    for stage in ("download", "score", "invert"):
        assert lines[stage].split()[1:3] == ["reuse", runs["first"][stage]["key"]]
    # Against the store's latest training (the LoRA run's, beta 2000): only beta differs.
    assert lines["train"].split()[1] == "run"
    assert f"changed since {runs['lora']['train']['key']}: train.beta 2000.0 -> 5000.0" \
        in lines["train"]
    new_train = lines["train"].split()[2]
    assert lines["evaluate"].endswith(f"new train output {new_train}")
    assert not (store / "train" / new_train).exists()


def test_runs_lists_trainings_and_evaluations_with_settings_and_results(runs):
    done = _smpo("runs", "--store", str(runs["store"]))
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line.split()}
    for name, settings in (("first", "train.beta=2000.0 train.lora_rank=0"),
                           ("third", "train.beta=3000.0 train.lora_rank=0"),
                           ("lora", "train.beta=2000.0 train.lora_rank=4")):
        train = _manifest(runs[name]["train"])
        row = rows[runs[name]["train"]["key"]]
        assert f"{train['final_loss']:.4f}" in row and row.endswith(settings)
        evaluate = runs[name]["evaluate"]
        summary = json.loads((Path(evaluate["path"]) / "summary.json").read_text())
        pickscore = summary["metrics"]["pickscore"]["groups"]["all"]
        lines = done.stdout.splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith(evaluate["key"]))
        assert runs[name]["train"]["key"] in lines[at] and lines[at].endswith(settings)
        assert (f"pickscore {pickscore['models']['tuned']['mean']:.4g} vs "
                f"{pickscore['models']['base']['mean']:.4g} "
                f"(win {pickscore['vs_reference']['tuned']['win_rate']:.2f})") in lines[at + 1]


def test_a_run_ends_with_its_results_and_where_its_outputs_are(runs):
    store = runs["store"]
    done = _smpo("run", "--store", str(store))
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    evaluate = Path(runs["first"]["evaluate"]["path"])
    summary = json.loads((evaluate / "summary.json").read_text())
    table = out[out.index("metric "):].splitlines()
    for kind, metric in summary["metrics"].items():
        overall = metric["groups"]["all"]
        paired = overall["vs_reference"]["tuned"]
        row = next(line for line in table if line.startswith(f"{kind} ")).split()
        # metric, base, tuned, difference [low, high], win rate [low, high]
        (diff_low, diff_high), (win_low, win_high) = paired["diff_ci"], paired["win_rate_ci"]
        assert row[1:] == [f"{overall['models']['base']['mean']:.4f}",
                           f"{overall['models']['tuned']['mean']:.4f}",
                           f"{paired['diff_mean']:+.4f}", f"[{diff_low:+.4f},",
                           f"{diff_high:+.4f}]", f"{paired['win_rate']:.3f}",
                           f"[{win_low:.3f},", f"{win_high:.3f}]"]
    paths = {line.split(":", 1)[0]: line.split(":", 1)[1].split()[0]
             for line in out.splitlines()
             if line.startswith(("weights:", "report:", "image grid:"))}
    assert paths == {"weights": str(Path(runs["first"]["train"]["path"]) / "unet"),
                     "report": str(evaluate / "report.html"),
                     "image grid": str(evaluate / "grid.png")}
    assert f"--backend-store-uri sqlite:///{store / 'mlflow.db'}" in out
    # One progress channel: nothing loaded here, and no library bar or notice reached stderr.
    for noise in ("Loading pipeline components", "Loading weights", "requires torchvision"):
        assert noise not in done.stderr
