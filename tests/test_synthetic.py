"""The tiny offline profile: synthetic Pick-a-Pic shards and small random models, real formats."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from smpo_core.schema import PICKAPIC_SCHEMA
from smpo_core.worlds.tiny import (
    _COLOURS,
    build_clip_tokenizer,
    build_tiny_clip_reward,
    build_tiny_diffusion,
    caption_words,
    expected_counts,
    synthetic_prompts,
    write_synthetic_pickapic,
)


def _decodes(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).convert("RGB")
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    out = tmp_path_factory.mktemp("pickapic")
    write_synthetic_pickapic(out, num_pairs=320, seed=0)
    return out, pq.read_table(out / "data").to_pylist()


def test_shards_use_hub_layout_and_exact_schema(tmp_path: Path) -> None:
    paths = write_synthetic_pickapic(tmp_path, num_pairs=30, seed=1, split="validation",
                                     num_files=3)
    assert [p.name for p in paths] == [f"validation-{i:05d}-of-00003.parquet" for i in range(3)]
    assert sorted((tmp_path / "data").iterdir()) == paths
    for path in paths:
        assert pq.read_schema(path).equals(PICKAPIC_SCHEMA, check_metadata=True)
    assert [pq.read_metadata(p).num_rows for p in paths] == [10, 10, 10]


def test_rewriting_with_fewer_shards_removes_stale_ones(tmp_path: Path) -> None:
    write_synthetic_pickapic(tmp_path, num_pairs=30, num_files=3)
    paths = write_synthetic_pickapic(tmp_path, num_pairs=30, num_files=2)
    assert sorted((tmp_path / "data").iterdir()) == paths
    assert pq.read_table(tmp_path / "data").num_rows == 30


def test_same_seed_same_bytes_other_seed_or_split_differs(tmp_path: Path) -> None:
    def shard_bytes(name: str, seed: int, split: str = "train") -> list[bytes]:
        return [p.read_bytes() for p in
                write_synthetic_pickapic(tmp_path / name, num_pairs=40, seed=seed, split=split)]

    assert shard_bytes("a", 3) == shard_bytes("b", 3)
    def first_shard(path: Path) -> dict[str, list]:
        return pq.read_table(path).to_pydict()

    same_seed = first_shard(tmp_path / "a" / "data" / "train-00000-of-00002.parquet")
    other_seed = first_shard(write_synthetic_pickapic(tmp_path / "c", 40, seed=4)[0])
    validation = first_shard(write_synthetic_pickapic(tmp_path / "d", 40, 3, "validation")[0])
    for other in (other_seed, validation):
        assert not set(other["image_0_uid"]) & set(same_seed["image_0_uid"])
        assert not set(other["jpg_0"]) & set(same_seed["jpg_0"])


def test_expected_counts_match_the_rows(pickapic: tuple[Path, list[dict]]) -> None:
    out, rows = pickapic
    expected = expected_counts(320)
    assert not (out / "expected_counts.json").exists()  # the oracle stays out of the data
    ties = [r for r in rows if r["label_0"] == 0.5]
    unlabelled = [r for r in rows if not r["has_label"]]
    identical = [r for r in rows if not r["are_different"]]
    corrupt = [r for r in rows if not (_decodes(r["jpg_0"]) and _decodes(r["jpg_1"]))]
    assert (len(rows), len(ties), len(unlabelled), len(identical), len(corrupt)) == (
        320, 32, 16, 16, 6)
    assert expected["usable"] == 320 - 32 - 16 - 16 - 6 == 250
    # Each anomaly in its own rows, so downstream drop counts add up exactly.
    anomalous = [r["ranking_id"] for r in ties + unlabelled + identical + corrupt]
    assert len(set(anomalous)) == len(anomalous) == 70
    assert all(r["best_image_uid"] == "" and r["label_1"] == 0.5 for r in ties)
    assert all(r["label_0"] == r["label_1"] == 0.0 for r in unlabelled)
    assert all(r["image_0_uid"] == r["image_1_uid"] and r["jpg_0"] == r["jpg_1"]
               for r in identical)
    for r in corrupt:  # the header still parses: only decoding the pixels fails
        bad = r["jpg_0"] if not _decodes(r["jpg_0"]) else r["jpg_1"]
        assert Image.open(io.BytesIO(bad)).size == (64, 64)


def test_decisive_rows_have_consistent_labels_and_unique_ids(
        pickapic: tuple[Path, list[dict]]) -> None:
    _, rows = pickapic
    decisive = [r for r in rows if r["has_label"] and r["label_0"] != 0.5]
    assert len(decisive) == 320 - 32 - 16
    for r in decisive:
        assert r["label_0"] + r["label_1"] == 1.0
        winner = "image_0_uid" if r["label_0"] == 1.0 else "image_1_uid"
        assert r["best_image_uid"] == r[winner]
    assert 0.3 < sum(r["label_0"] for r in decisive) / len(decisive) < 0.7
    assert len({r["ranking_id"] for r in rows}) == 320
    different = [r for r in rows if r["are_different"]]
    uids = [r[f"image_{j}_uid"] for r in different for j in (0, 1)]
    images = [r[f"jpg_{j}"] for r in different for j in (0, 1)]
    assert len(set(uids)) == len(uids) and len(set(images)) == len(images)
    assert all(r["image_0_url"] == f"https://images.example/{r['image_0_uid']}.png" for r in rows)


def test_images_decode_and_the_faithful_image_mostly_wins(
        pickapic: tuple[Path, list[dict]]) -> None:
    _, rows = pickapic
    agree = total = 0
    for r in rows:
        if not (r["has_label"] and r["are_different"] and r["label_0"] != 0.5):
            continue
        if not (_decodes(r["jpg_0"]) and _decodes(r["jpg_1"])):
            continue
        winner = Image.open(io.BytesIO(r["jpg_0" if r["label_0"] == 1.0 else "jpg_1"]))
        assert (winner.size, winner.mode) == ((64, 64), "RGB")
        words = r["caption"].split()
        if words[-1] != "background":
            continue
        # One-object scene: the named object colour sits at the centre, the background at a corner.
        centre, corner = winner.getpixel((32, 32)), winner.getpixel((1, 1))
        named = _COLOURS[words[1]], _COLOURS[words[-2]]
        total += 1
        agree += all(abs(a - b) < 40 for pixel, colour in zip((centre, corner), named, strict=True)
                     for a, b in zip(pixel, colour, strict=True))
    assert total > 50
    assert agree / total > 0.75  # 10% of rows carry label noise


def test_captions_repeat_and_num_example_per_prompt_counts_them(
        pickapic: tuple[Path, list[dict]]) -> None:
    _, rows = pickapic
    per_caption: dict[str, int] = {}
    for r in rows:
        per_caption[r["caption"]] = per_caption.get(r["caption"], 0) + 1
    assert len(per_caption) == 48
    assert all(r["num_example_per_prompt"] == per_caption[r["caption"]] for r in rows)
    assert min(per_caption.values()) >= 6


def test_evaluation_prompts_are_held_out_and_deterministic(
        pickapic: tuple[Path, list[dict]]) -> None:
    _, rows = pickapic
    prompts = synthetic_prompts(200, seed=0)
    assert prompts == synthetic_prompts(200, seed=0) != synthetic_prompts(200, seed=1)
    assert len(set(prompts)) == 200
    assert not set(prompts) & {r["caption"] for r in rows}
    # A prompt file of many serves every smaller count: the first 8 are the 8 prompts.
    assert synthetic_prompts(8, seed=0) == prompts[:8]
    one_object = [p for p in prompts[:8] if p.endswith("background")]
    assert len(one_object) == 4  # one- and two-object scenes alike
    with pytest.raises(ValueError, match="at most"):
        synthetic_prompts(5000, seed=0)


def test_tokenizer_makes_caption_words_single_tokens_and_round_trips(tmp_path: Path) -> None:
    tokenizer = build_clip_tokenizer()
    # CLIP's layout: 256 byte characters, the same with "</w>", merged words, special tokens.
    assert tokenizer.convert_tokens_to_ids(["!", "!</w>"]) == [0, 256]
    assert min(tokenizer.convert_tokens_to_ids(["red</w>", "triangle</w>"])) >= 512
    assert tokenizer.model_max_length == 77
    caption = "an orange triangle to the left of a white diamond"
    ids = tokenizer(caption).input_ids
    assert ids[0] == tokenizer.bos_token_id == len(tokenizer) - 2
    assert ids[-1] == tokenizer.eos_token_id == len(tokenizer) - 1
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == [w + "</w>" for w in caption.split()]
    for word in caption_words():
        assert len(tokenizer(word).input_ids) == 3, word
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    # Unknown words fall back to byte tokens instead of failing.
    assert len(tokenizer("a zebra").input_ids) == 2 + 1 + len("zebra")
    padded = tokenizer([caption, "a red circle"], padding="max_length", max_length=77,
                       truncation=True).input_ids
    assert [len(p) for p in padded] == [77, 77]

    from transformers import CLIPTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    prompts = [*synthetic_prompts(20, seed=0), "Zebras: 42!"]
    assert reloaded(prompts).input_ids == tokenizer(prompts).input_ids
    assert len(build_clip_tokenizer(["zebra"])("a zebra").input_ids) == 4


@pytest.mark.integration
def test_tiny_diffusion_round_trip_is_deterministic(tmp_path: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    out = build_tiny_diffusion(tmp_path / "sd", seed=0)
    assert (out / "model_index.json").exists() and not list(tmp_path.glob(".*partial*"))
    stamp = (out / "unet" / "config.json").stat().st_mtime_ns
    assert build_tiny_diffusion(out, seed=0) == out  # a complete model is not rebuilt
    assert (out / "unet" / "config.json").stat().st_mtime_ns == stamp

    pipeline = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    assert pipeline.vae_scale_factor == 2 and pipeline.unet.config.sample_size == 16
    assert pipeline.scheduler.config.beta_schedule == "scaled_linear"
    assert pipeline.text_encoder.config.vocab_size == len(pipeline.tokenizer)

    def generate() -> torch.Tensor:
        return pipeline("a red circle on a blue background", num_inference_steps=4,
                        generator=torch.Generator().manual_seed(0), output_type="pt").images

    first, second = generate(), generate()
    assert first.shape == (1, 3, 32, 32)
    assert torch.isfinite(first).all() and torch.equal(first, second)

    twin = build_tiny_diffusion(tmp_path / "sd-again", seed=0)
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert (twin / weights).read_bytes() == (out / weights).read_bytes()


def test_model_builder_refuses_a_foreign_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="not a complete build"):
        build_tiny_clip_reward(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_a_folder_wanted_by_several_runs_at_once_is_built_once(tmp_path: Path) -> None:
    """Runs started together on a fresh store all want builtin:tiny-pickapic: one builds it,
    the others wait and read that build (a second build renamed over the first pulled its
    files from under a run reading them: FileNotFoundError in CI)."""
    import threading
    import time

    from smpo_core.store import build_once

    target, builds = tmp_path / "builtin" / "data", []

    def build(path: Path) -> None:
        builds.append(path)
        time.sleep(0.3)  # long enough for every other caller to arrive meanwhile
        (path / "done").write_text("yes")

    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(build_once(target, "done", build)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1
    assert results == [target] * 3 and (target / "done").read_text() == "yes"
    assert sorted(p.name for p in target.parent.iterdir()) == [".data.lock", "data"]


def test_tiny_clip_reward_loads_like_pickscore(tmp_path: Path) -> None:
    import torch
    from transformers import CLIPModel, CLIPProcessor

    out = build_tiny_clip_reward(tmp_path / "reward", seed=0)
    messages: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = messages.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        processor = CLIPProcessor.from_pretrained(out)
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert [m.getMessage() for m in messages] == []

    image = Image.new("RGB", (64, 64), (220, 40, 40))
    inputs = processor(text=["a red circle on a blue background"], images=[image],
                       return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)

    def embed() -> tuple[torch.Tensor, torch.Tensor]:
        model = CLIPModel.from_pretrained(out).eval()
        with torch.no_grad():
            image_features = model.get_image_features(pixel_values=inputs["pixel_values"])
            text_features = model.get_text_features(input_ids=inputs["input_ids"],
                                                    attention_mask=inputs["attention_mask"])
        return image_features.pooler_output, text_features.pooler_output

    (image_a, text_a), (image_b, text_b) = embed(), embed()
    assert image_a.shape == text_a.shape == (1, 32)
    assert torch.isfinite(image_a).all() and torch.isfinite(text_a).all()
    assert torch.equal(image_a, image_b) and torch.equal(text_a, text_b)
