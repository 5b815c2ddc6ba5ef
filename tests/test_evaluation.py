"""Evaluation: metric scales against hand-computed numbers, seeds, resumable generation, memory
order (metrics after generation, one at a time), reuse by later comparisons, model references
and the errors a user gets before any image is drawn."""

from __future__ import annotations

import gc
import json
import math
import weakref
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from smpo_core.errors import SmpoError
from smpo_core.evaluation import (
    EvaluationConfig,
    MetricSpec,
    Reporter,
    compare_models,
    table_rows,
    write_outputs,
)
from smpo_core.generation import (
    ImageFolder,
    ModelSpec,
    Sampling,
    build_pipeline,
    draw,
    image_jobs,
)
from smpo_core.model_refs import resolve_model
from smpo_core.prompts import load_prompt_set
from smpo_core.rewards import load_reward_model
from smpo_core.settings import load_settings
from smpo_core.worlds import builtins as builtin

CPU = torch.device("cpu")
SAMPLING = Sampling(steps=2, guidance_scale=5.0, resolution=32, dtype="float32")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with the tiny base model, a tuned UNet and LoRA weights trained from it (here:
    perturbed), weights of another architecture, and the tiny CLIP metric."""
    from diffusers import UNet2DConditionModel

    from smpo_core.models import add_lora, save_lora

    root = tmp_path_factory.mktemp("evaluation")
    base = Path(builtin.resolve("builtin:tiny-sd", root))
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    with torch.no_grad():
        for param in unet.parameters():
            param.add_(0.05 * torch.randn_like(param, generator=None))
    unet.save_pretrained(root / "tuned-unet")
    add_lora(unet, rank=2)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    (root / "lora").mkdir()
    save_lora(unet, root / "lora")
    other = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8)
    other.save_pretrained(root / "other-unet")
    add_lora(other, rank=2)
    (root / "other-lora").mkdir()
    save_lora(other, root / "other-lora")
    clip = builtin.resolve("builtin:tiny-clip", root)
    return {"root": root, "base": str(base), "clip": clip}


def _config(**changes) -> EvaluationConfig:
    return EvaluationConfig(SAMPLING, bootstrap_resamples=200, batch_size=2, chunk_prompts=2,
                            **changes)


def _prompts(tmp_path, count=3):
    text = tmp_path / "prompts.txt"
    text.write_text("\n".join(["a red circle on a blue background", "a blue square",
                               "a green diamond above a red circle", "a white triangle"][:count]))
    return load_prompt_set(str(text))


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.png")) if folder.exists() else []


# --- metric scales ------------------------------------------------------------------------------


def _clip_by_hand(folder: str, images, captions):
    """Cosines of CLIP embeddings, computed by hand from the model's forward outputs."""
    model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(
        folder)
    inputs = processor(text=captions, images=images, padding="max_length", truncation=True,
                       max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    image = out.image_embeds.double().numpy()
    text = out.text_embeds.double().numpy()
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return (image * text).sum(1), np.diag(out.logits_per_image.double().numpy())


def _images(count: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            for _ in range(count)]


def test_pickscore_is_reported_as_logit_scale_exp_times_cosine(world, tmp_path):
    folder = tmp_path / "clip-50"
    model = CLIPModel.from_pretrained(world["clip"])
    with torch.no_grad():
        model.logit_scale.fill_(math.log(50.0))  # a known scale: exp() = 50
    model.save_pretrained(folder)
    CLIPProcessor.from_pretrained(world["clip"]).save_pretrained(folder)
    images, captions = _images(3), ["a red circle", "a blue square", "a green diamond"]
    cosine, logits = _clip_by_hand(str(folder), images, captions)

    pickscore = load_reward_model("pickscore", str(folder), CPU)
    raw = pickscore.score(images, captions)
    np.testing.assert_allclose(raw, cosine, atol=1e-5)  # the smoothing keeps raw cosines
    np.testing.assert_allclose(pickscore.published(raw), 50.0 * cosine, atol=1e-4)
    np.testing.assert_allclose(pickscore.published(raw), logits, atol=1e-4)
    assert pickscore.scale == "logit_scale.exp() x cosine, logit_scale.exp() = 50"


def test_clip_score_hpsv2_imagereward_and_aesthetic_scales(world):
    images, captions = _images(4), ["a red circle", "a blue square", "a cat", "a dog"]
    cosine, _ = _clip_by_hand(world["clip"], images, captions)
    clipscore = load_reward_model("clipscore", world["clip"], CPU)
    # torchmetrics' CLIPScore: max(100 cos, 0).
    np.testing.assert_allclose(clipscore.published(clipscore.score(images, captions)),
                               np.maximum(100.0 * cosine, 0.0), atol=1e-3)
    assert clipscore.scale.startswith("100 x max(cosine, 0)")

    root = world["root"]
    hpsv2 = load_reward_model("hpsv2", builtin.resolve("builtin:tiny-hpsv2", root), CPU,
                              builtin.resolve("builtin:tiny-hpsv2-tokenizer", root))
    raw = hpsv2.score(images, captions)  # HPSv2's cosine (checked against open_clip elsewhere)
    assert np.all(np.abs(raw) <= 1.0)
    np.testing.assert_allclose(hpsv2.published(raw), 100.0 * raw)
    assert hpsv2.scale.startswith("100 x cosine")
    for kind, processor in (("imagereward", "tiny-imagereward-bert"),
                            ("aesthetic", "tiny-clip")):
        model = load_reward_model(kind, builtin.resolve(f"builtin:tiny-{kind}", root), CPU,
                                  builtin.resolve(f"builtin:{processor}", root))
        raw = model.score(images, captions)
        np.testing.assert_array_equal(model.published(raw), raw)  # as the package returns it


# --- seeds and resumable generation -------------------------------------------------------------


def test_image_j_of_prompt_i_comes_from_seed_plus_1000_i_plus_j(world, tmp_path):
    hpd = tmp_path / "benchmark"
    hpd.mkdir()
    for style in ("anime", "concept-art", "paintings", "photo"):
        (hpd / f"{style}.json").write_text(json.dumps([f"{style} a", f"{style} b"]))
    prompts = load_prompt_set(f"hpdv2-test:{hpd}", num_prompts=4)  # b-prompts left out
    jobs = image_jobs(prompts, images_per_prompt=2, seed=7)
    assert [(j.prompt, j.seed) for j in jobs[2:4]] == [("concept-art a", 2007),
                                                       ("concept-art a", 2008)]
    spec = ModelSpec("base", world["base"])
    folder = ImageFolder(tmp_path / "generations", spec, SAMPLING)
    pipe = build_pipeline(spec, CPU, torch.float32)
    assert draw(pipe, jobs, folder, batch_size=1) == 8
    # Drawn again by hand, straight from the pipeline, with the documented seed.
    by_hand = pipe(["concept-art a"], generator=[torch.Generator("cpu").manual_seed(2008)],
                   num_inference_steps=2, guidance_scale=5.0, height=32, width=32).images[0]
    np.testing.assert_array_equal(np.asarray(folder.read(jobs[3])), np.asarray(by_hand))


def test_killed_generation_resumes_drawing_only_what_is_missing(world, tmp_path):
    spec = ModelSpec("base", world["base"])
    folder = ImageFolder(tmp_path / "generations", spec, SAMPLING)
    jobs = image_jobs(_prompts(tmp_path), images_per_prompt=1, seed=3)
    pipe = build_pipeline(spec, CPU, torch.float32)
    assert draw(pipe, jobs, folder, batch_size=2) == 3
    first = [np.asarray(folder.read(j)) for j in jobs]
    folder.path(jobs[2]).unlink()  # killed while drawing the last batch

    calls = []
    original = type(pipe).__call__

    def counting(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("prompt"))
        return original(self, *args, **kwargs)

    type(pipe).__call__ = counting
    try:
        assert draw(pipe, jobs, folder, batch_size=2) == 1
    finally:
        type(pipe).__call__ = original
    assert calls == [["a green diamond above a red circle"]]
    assert all(np.array_equal(np.asarray(folder.read(j)), image)
               for j, image in zip(jobs, first, strict=True))


# --- comparisons: memory order, reuse, outputs -------------------------------------------------


class RecordingLoader:
    """Loads metric models for real, noting the state of the world at each load."""

    def __init__(self, image_root: Path):
        self.image_root, self.loads, self.alive_at_load = image_root, [], []
        self.pngs_at_load, self.models = [], []

    def __call__(self, kind, checkpoint, device, processor=None, cache_dir=None):
        gc.collect()
        self.alive_at_load.append([ref() is not None for ref in self.models])
        self.pngs_at_load.append(len(_pngs(self.image_root)))
        model = load_reward_model(kind, checkpoint, device, processor, cache_dir=cache_dir)
        self.loads.append(kind)
        self.models.append(weakref.ref(model))
        return model


def _metrics(world) -> list[MetricSpec]:
    return [MetricSpec("pickscore", world["clip"]), MetricSpec("clipscore", world["clip"])]


def _models(world, *names, labels: dict[str, str] | None = None) -> list[ModelSpec]:
    """Models by name; `labels` renames some (a label must not matter for reuse)."""
    root = world["root"]
    known = {"base": ModelSpec("base", world["base"]),
             "tuned": ModelSpec("tuned", world["base"], weights=str(root / "tuned-unet"),
                                weights_kind="unet"),
             "lora": ModelSpec("lora", world["base"], weights=str(root / "lora"),
                               weights_kind="lora")}
    return [replace(known[name], label=(labels or {}).get(name, name)) for name in names]


def test_metrics_load_after_generation_one_at_a_time(world, tmp_path, monkeypatch):
    import smpo_core.evaluation as evaluation

    pipelines = []

    def tracked_pipeline(*args, **kwargs):
        pipe = build_pipeline(*args, **kwargs)
        pipelines.append(weakref.ref(pipe))
        return pipe

    monkeypatch.setattr(evaluation, "build_pipeline", tracked_pipeline)
    loader = RecordingLoader(tmp_path / "generations")
    compare_models(_models(world, "base", "tuned"), _prompts(tmp_path), _metrics(world),
                   _config(), tmp_path / "generations", CPU, torch.float32,
                   load_metric=loader)
    assert loader.loads == ["pickscore", "clipscore"]
    assert loader.pngs_at_load == [6, 6]  # 3 prompts x 2 models, all drawn before any load
    assert loader.alive_at_load == [[], [False]]  # the first metric model was freed
    gc.collect()
    assert len(pipelines) == 2 and not any(ref() for ref in pipelines)


def test_a_second_comparison_reuses_drawn_images_and_scores(world, tmp_path):
    root, prompts = tmp_path / "generations", _prompts(tmp_path)
    first = compare_models(_models(world, "base", "tuned"), prompts, _metrics(world), _config(),
                           root, CPU, torch.float32)
    assert first.counts == {"base": {"drawn": 3, "reused": 0},
                            "tuned": {"drawn": 3, "reused": 0}}
    kept = {p: p.stat().st_mtime_ns for p in _pngs(root)}
    parts = {p: p.stat().st_mtime_ns for p in root.rglob("part-*.parquet")}

    scored = []
    reporter = Reporter(progress=lambda what, total: scored.append((what, total)) or _Bar())
    loader = RecordingLoader(root)
    second = compare_models(_models(world, "base", "tuned", "lora", labels={"tuned": "smpo"}),
                            prompts, _metrics(world), _config(), root, CPU, torch.float32,
                            reporter, load_metric=loader)
    assert second.counts == {"base": {"drawn": 0, "reused": 3},
                             "smpo": {"drawn": 0, "reused": 3},
                             "lora": {"drawn": 3, "reused": 0}}
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # not drawn again
    assert {p: p.stat().st_mtime_ns for p in parts} == parts  # not scored again
    assert ("score pickscore", 3) in scored and ("score clipscore", 3) in scored  # lora only
    for kind in ("pickscore", "clipscore"):
        np.testing.assert_array_equal(second.scores["base"][kind], first.scores["base"][kind])
        np.testing.assert_array_equal(second.scores["smpo"][kind], first.scores["tuned"][kind])
    # The LoRA and the tuned UNet change what the base draws.
    assert not np.array_equal(second.scores["lora"]["pickscore"],
                              second.scores["base"]["pickscore"])

    third_loader = RecordingLoader(root)
    compare_models(_models(world, "base", "lora"), prompts, _metrics(world), _config(), root,
                   CPU, torch.float32, load_metric=third_loader)
    assert third_loader.loads == []  # every score kept: no metric model loaded at all


class _Bar:
    def update(self, amount: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def test_comparison_outputs_name_scales_versions_seeds_and_styles(world, tmp_path):
    hpd = tmp_path / "benchmark"
    hpd.mkdir()
    for style in ("anime", "concept-art", "paintings", "photo"):
        (hpd / f"{style}.json").write_text(json.dumps([f"a {style} circle", f"a {style} cat"]))
    prompts = load_prompt_set(f"hpdv2-test:{hpd}")
    comparison = compare_models(_models(world, "base", "tuned"), prompts, _metrics(world),
                                _config(images_per_prompt=2, seed=5), tmp_path / "generations",
                                CPU, torch.float32)
    summary = write_outputs(comparison, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "summary.json").read_text()) == summary
    pickscore = summary["metrics"]["pickscore"]
    assert pickscore["scale"].startswith("logit_scale.exp() x cosine")
    assert len(pickscore["version"]) == 16
    assert list(pickscore["groups"]) == ["all", "anime", "concept-art", "paintings", "photo"]
    assert pickscore["groups"]["photo"]["n_images"] == 4  # 2 prompts x 2 images
    generation = summary["generation"]
    assert (generation["images_per_prompt"], generation["images_per_model"]) == (2, 16)
    assert generation["seeds"] == "5..7006"  # prompt 0 image 0 .. prompt 7 image 1
    assert summary["prompts"]["published_size"] == 3200 and summary["prompts"]["count"] == 8
    assert summary["statistics"]["resampling_unit"] == "prompt"
    # Each style's numbers are those of its own images.
    scores = comparison.scores
    photo = np.array([s == "photo" for s in prompts.styles])
    assert pickscore["groups"]["photo"]["models"]["tuned"]["mean"] == pytest.approx(
        scores["tuned"]["pickscore"][photo].mean())
    rows = table_rows(summary)
    assert len(rows) == 2 * 5 * 2  # metrics x groups (all + 4 styles) x models
    assert (tmp_path / "out" / "table.csv").read_text().count("\n") == len(rows) + 1
    import pyarrow.parquet as pq

    per_image = pq.read_table(tmp_path / "out" / "scores.parquet")
    assert per_image.num_rows == 2 * 16
    assert set(per_image.column("seed").to_pylist()) == {5 + 1000 * i + j for i in range(8)
                                                         for j in range(2)}


# --- errors before any image is drawn -----------------------------------------------------------


@pytest.mark.parametrize("case", ["unknown metric", "unet of another base",
                                  "lora of another base", "missing weights"])
def test_bad_input_is_one_line_before_any_image_is_drawn(world, tmp_path, case):
    root, metrics = world["root"], _metrics(world)
    models = _models(world, "base", "tuned")
    expected = {
        "unknown metric": "evaluate.metrics: unknown reward model kind 'pickscor'; expected one "
                          "of pickscore, clipscore, hpsv2, imagereward, aesthetic",
        "unet of another base": "model 'tuned': the UNet in",
        "lora of another base": "model 'tuned': the LoRA in",
        "missing weights": "model 'tuned': tuned weights",
    }[case]
    if case == "unknown metric":
        metrics = [MetricSpec("pickscor", world["clip"])]
    elif case == "unet of another base":
        models[1] = ModelSpec("tuned", world["base"], weights=str(root / "other-unet"),
                              weights_kind="unet")
    elif case == "lora of another base":
        models[1] = ModelSpec("tuned", world["base"], weights=str(root / "other-lora"),
                              weights_kind="lora")
    else:
        models[1] = ModelSpec("tuned", world["base"], weights=str(root / "gone"),
                              weights_kind="unet")
    with pytest.raises(SmpoError) as error:
        compare_models(models, _prompts(tmp_path), metrics, _config(), tmp_path / "generations",
                       CPU, torch.float32)
    assert str(error.value).startswith(expected), str(error.value)
    assert "\n" not in str(error.value)
    assert _pngs(tmp_path / "generations") == []
    if "another base" in case:
        assert "does not fit base model" in str(error.value)


# --- model references ---------------------------------------------------------------------------


def _train_output(store: Path, key: str, weights: str, source: Path) -> Path:
    import shutil

    folder = store / "train" / key
    shutil.copytree(source, folder / weights)
    (folder / "manifest.json").write_text(json.dumps(
        {"weights": weights, "settings": {"model": {"base": "builtin:tiny-sd"}}}))
    return folder


def test_model_references(world, tmp_path):
    root, store = world["root"], tmp_path / "store"
    settings = load_settings("tiny")
    base = builtin.resolve("builtin:tiny-sd", store)
    _train_output(store, "aaaa1111", "unet", root / "tuned-unet")
    latest = _train_output(store, "bbbb2222", "lora", root / "lora")

    assert resolve_model("base", settings, store) == ModelSpec("base", base, ref="base")
    tuned = resolve_model("tuned=train:aaaa", settings, store)
    assert (tuned.label, tuned.weights_kind, tuned.base) == ("tuned", "unet", base)
    assert tuned.weights == str(store / "train" / "aaaa1111" / "unet")
    newest = resolve_model("train:latest", settings, store)
    assert (newest.label, newest.weights) == ("train-bbbb2222", str(latest / "lora"))
    lora = resolve_model(str(root / "lora"), settings, store)  # recognised by its file
    assert (lora.weights_kind, lora.weights) == (
        "lora", str(root / "lora" / "pytorch_lora_weights.safetensors"))
    assert resolve_model(f"unet:{root / 'tuned-unet'}", settings, store).weights_kind == "unet"
    assert resolve_model(world["base"], settings, store) == ModelSpec(
        "tiny-sd", world["base"], ref=world["base"])
    hub = resolve_model("sdxl=stabilityai/stable-diffusion-xl-base-1.0", settings, store)
    assert (hub.label, hub.base, hub.weights) == ("sdxl", "stabilityai/stable-diffusion-xl-"
                                                  "base-1.0", None)
    assert tuned.identity() != resolve_model("train:latest", settings, store).identity()

    for text, message in (("train:cccc", "no finished train output in"),
                          ("train:", "2 train outputs"),
                          ("lora:/nowhere/x", "no such file or folder"),
                          ("./nowhere", "no such folder, and not a hub id")):
        with pytest.raises(SmpoError, match=message):
            resolve_model(text, settings, store)
