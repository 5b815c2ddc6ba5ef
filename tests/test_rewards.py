"""Reward-model ports (HPSv2, ImageReward, LAION aesthetic) on small random checkpoints written in
the published file layouts; the real CLIP tokenizer when its BPE file is available.

Equivalence with the reference packages themselves is `bench/reference_check.sh`; here the HPSv2
conversion is checked against a plain-torch open_clip forward written from the state dict.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from smpo_core.errors import SmpoError
from smpo_core.rewards import REWARD_MODELS, load_reward_model
from smpo_core.rewards import hpsv2 as hpsv2_module
from smpo_core.rewards.base import checkpoint_hash
from smpo_core.rewards.preprocess import CLIP_MEAN, CLIP_STD, clip_preprocess, hpsv2_preprocess
from smpo_core.rewards.tokenizers import (
    CLIP_BPE_FILE,
    clip_tokenizer_from_bpe,
    find_clip_bpe_vocab,
    load_clip_tokenizer,
)
from smpo_core.store import PARTIAL
from smpo_core.worlds.checkpoints import (
    save_tiny_clip_tokenizer,
    tiny_open_clip_state_dict,
    write_bert_vocab,
    write_tiny_aesthetic_head,
    write_tiny_hpsv2_checkpoint,
    write_tiny_imagereward_checkpoint,
)
from smpo_core.worlds.tiny import build_tiny_clip_reward, caption_words

CPU = torch.device("cpu")
CAPTIONS = ["a red circle on a blue background", "a green square above a white diamond",
            "a purple triangle on a yellow background"]


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(64, 48), (40, 70), (32, 32)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rewards")
    bert = write_bert_vocab(root / "bert", caption_words())
    bert_tokens = len((bert / "vocab.txt").read_text().split()) + 2  # + [DEC] [ENC]
    return {
        "root": root,
        "hpsv2": write_tiny_hpsv2_checkpoint(root / "HPS_v2_tiny.pt", seed=0),
        "hpsv2_other": write_tiny_hpsv2_checkpoint(root / "HPS_v2.1_tiny.pt", seed=1),
        "clip_tokenizer": save_tiny_clip_tokenizer(root / "clip-tokenizer"),
        "imagereward": write_tiny_imagereward_checkpoint(root / "ImageReward_tiny.pt",
                                                         vocab_size=bert_tokens),
        "bert": bert,
        "clip": build_tiny_clip_reward(root / "clip", image_size=32),
        "aesthetic": write_tiny_aesthetic_head(root / "aesthetic_head.pth", in_features=32),
    }


def _load(kind: str, models: dict[str, Path], **kwargs):
    processor = {"hpsv2": models["clip_tokenizer"], "imagereward": models["bert"],
                 "aesthetic": models["clip"]}[kind]
    return load_reward_model(kind, str(models[kind]), CPU, str(processor), **kwargs)


@pytest.mark.parametrize("kind", ["hpsv2", "imagereward", "aesthetic"])
def test_port_scores_batches_deterministically(kind: str, models: dict[str, Path]) -> None:
    model = _load(kind, models)
    images = _images()
    one_by_one = model.score(images, CAPTIONS, batch_size=1)
    batched = model.score(images, CAPTIONS, batch_size=3)
    assert one_by_one.shape == (3,) and one_by_one.dtype == np.float64
    assert np.isfinite(one_by_one).all()
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)
    np.testing.assert_array_equal(model.score(images, CAPTIONS, batch_size=3), batched)
    assert len(set(np.round(batched, 6))) == 3, "a random model should tell the images apart"
    assert model.version.startswith(checkpoint_hash(str(models[kind])))  # aesthetic: + CLIP's


def test_the_offline_profiles_evaluate_every_registered_kind() -> None:
    """A reward model added to REWARD_MODELS without an offline checkpoint would go untested
    by the offline pipeline runs: the tiny profile has every published kind, the toy profile
    its world's own (toy-truth, toy-fidelity)."""
    from smpo_core.settings import load_settings

    offline = {*load_settings("tiny").evaluate.metrics, *load_settings("toy").evaluate.metrics}
    assert offline == set(REWARD_MODELS)


def test_hpsv2_conversion_is_cached_by_checkpoint_hash(models: dict[str, Path],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cache = models["root"] / "conversions"
    first = _load("hpsv2", models, cache_dir=cache)
    digest = checkpoint_hash(str(models["hpsv2"]))
    assert first.version == digest
    # the conversion, and the file lock its builders take turns on
    assert sorted(p.name for p in cache.iterdir()) == [f".hpsv2-{digest}.lock",
                                                        f"hpsv2-{digest}"]
    assert (cache / f"hpsv2-{digest}" / "model.safetensors").is_file()

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache holds this checkpoint")

    monkeypatch.setattr(hpsv2_module, "convert_open_clip", no_conversion)
    second = _load("hpsv2", models, cache_dir=cache)
    np.testing.assert_array_equal(second.score(_images(), CAPTIONS),
                                  first.score(_images(), CAPTIONS))
    monkeypatch.undo()
    load_reward_model("hpsv2", str(models["hpsv2_other"]), CPU, str(models["clip_tokenizer"]),
                      cache_dir=cache)
    # another checkpoint, another conversion; no partial folders left behind
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 2
    assert not list(cache.glob(f"*{PARTIAL}"))


def _open_clip_forward(state: dict, pixels: torch.Tensor, ids: torch.Tensor,
                       vision_heads: int, text_heads: int) -> torch.Tensor:
    """open_clip's CLIP forward written from the state dict alone: the HPSv2 score (cosine)."""

    def block(x: torch.Tensor, prefix: str, heads: int, causal: bool) -> torch.Tensor:
        width = x.shape[-1]

        def norm(name: str, t: torch.Tensor) -> torch.Tensor:
            return F.layer_norm(t, (width,), state[f"{prefix}.{name}.weight"],
                                state[f"{prefix}.{name}.bias"])

        q, k, v = F.linear(norm("ln_1", x), state[f"{prefix}.attn.in_proj_weight"],
                           state[f"{prefix}.attn.in_proj_bias"]).chunk(3, dim=-1)
        batch, length = x.shape[:2]
        q, k, v = (t.reshape(batch, length, heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        attended = attended.transpose(1, 2).reshape(batch, length, width)
        x = x + F.linear(attended, state[f"{prefix}.attn.out_proj.weight"],
                         state[f"{prefix}.attn.out_proj.bias"])
        hidden = F.gelu(F.linear(norm("ln_2", x), state[f"{prefix}.mlp.c_fc.weight"],
                                 state[f"{prefix}.mlp.c_fc.bias"]))
        return x + F.linear(hidden, state[f"{prefix}.mlp.c_proj.weight"],
                            state[f"{prefix}.mlp.c_proj.bias"])

    def layer_norm(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (t.shape[-1],), state[f"{name}.weight"], state[f"{name}.bias"])

    patch = state["visual.conv1.weight"].shape[-1]
    x = F.conv2d(pixels, state["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = state["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = layer_norm(torch.cat([cls, x], 1) + state["visual.positional_embedding"], "visual.ln_pre")
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in state:
        x = block(x, f"visual.transformer.resblocks.{i}", vision_heads, causal=False)
        i += 1
    image = layer_norm(x[:, 0], "visual.ln_post") @ state["visual.proj"]

    t = state["token_embedding.weight"][ids] + state["positional_embedding"]
    i = 0
    while f"transformer.resblocks.{i}.ln_1.weight" in state:
        t = block(t, f"transformer.resblocks.{i}", text_heads, causal=True)
        i += 1
    t = layer_norm(t, "ln_final")
    text = t[torch.arange(len(ids)), ids.argmax(-1)] @ state["text_projection"]
    return F.cosine_similarity(image, text, dim=-1)


def test_hpsv2_matches_a_plain_open_clip_forward(models: dict[str, Path]) -> None:
    model = _load("hpsv2", models)
    state = tiny_open_clip_state_dict(seed=0)
    ids = model.tokenizer(CAPTIONS, padding="max_length", max_length=77,
                          return_tensors="pt")["input_ids"]
    end = ids.argmax(-1)
    ids[torch.arange(77)[None] > end[:, None]] = 0  # open_clip pads with 0
    expected = _open_clip_forward(state, hpsv2_preprocess(_images(), 32), ids,
                                  vision_heads=2, text_heads=1)
    np.testing.assert_allclose(model.score(_images(), CAPTIONS), expected.numpy(), atol=1e-5)


def test_imagereward_reads_caption_and_image(models: dict[str, Path]) -> None:
    model = _load("imagereward", models)
    image = _images()[0]
    by_caption = model.score([image] * 3, CAPTIONS)
    assert len(set(np.round(by_caption, 6))) == 3


def test_aesthetic_ignores_captions_and_equals_head_on_unit_embedding(
        models: dict[str, Path]) -> None:
    from transformers import CLIPModel

    model = _load("aesthetic", models)
    images = _images()
    scores = model.score(images, CAPTIONS)
    np.testing.assert_array_equal(model.score(images, ["", "anything", "x" * 500]), scores)
    clip = CLIPModel.from_pretrained(models["clip"])
    with torch.no_grad():
        embedding = clip.get_image_features(pixel_values=clip_preprocess(images, 32)).pooler_output
        x = F.normalize(embedding, dim=-1)
        head = torch.load(models["aesthetic"], weights_only=True)
        for i in (0, 2, 4, 6, 7):  # the published nn.Sequential: Linear layers, no activation
            x = F.linear(x, head[f"layers.{i}.weight"], head[f"layers.{i}.bias"])
    np.testing.assert_allclose(scores, x[:, 0].numpy(), atol=1e-6)


@pytest.mark.parametrize("kind", ["hpsv2", "imagereward", "aesthetic"])
def test_missing_checkpoint_names_model_and_path(kind: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / f"{kind}.pt"
    with pytest.raises(SmpoError, match=rf"{kind}.*{re.escape(str(missing))}"):
        load_reward_model(kind, str(missing), CPU)
    with pytest.raises(SmpoError, match=rf"{kind}.*HPS_v2_compressed\.pt"):
        load_reward_model(kind, "HPS_v2_compressed.pt", CPU)  # a bare relative name


@pytest.mark.parametrize("kind", ["hpsv2", "imagereward", "aesthetic"])
def test_wrong_format_names_model_and_path(kind: str, models: dict[str, Path],
                                           tmp_path: Path) -> None:
    as_json = tmp_path / "config.json"
    as_json.write_text(json.dumps({"not": "weights"}))
    processor = {"hpsv2": models["clip_tokenizer"], "imagereward": models["bert"],
                 "aesthetic": models["clip"]}[kind]
    with pytest.raises(SmpoError, match=rf"reward model {kind}: {re.escape(str(as_json))} is "
                                        "not a readable"):
        load_reward_model(kind, str(as_json), CPU, str(processor))
    other = {"hpsv2": "imagereward", "imagereward": "aesthetic", "aesthetic": "hpsv2"}[kind]
    with pytest.raises(SmpoError, match=rf"reward model {kind}: {re.escape(str(models[other]))} "
                                        "lacks"):
        load_reward_model(kind, str(models[other]), CPU, str(processor))


def test_truncated_state_dict_is_a_format_error(models: dict[str, Path], tmp_path: Path) -> None:
    state = torch.load(models["imagereward"], weights_only=True)
    del state["blip.text_encoder.encoder.layer.1.output.dense.weight"]
    broken = tmp_path / "ImageReward.pt"
    torch.save(state, broken)
    with pytest.raises(SmpoError, match=rf"imagereward: {re.escape(str(broken))} .*output\.dense"):
        load_reward_model("imagereward", str(broken), CPU, str(models["bert"]))


def test_tokenizer_of_another_vocabulary_is_refused(models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    other = save_tiny_clip_tokenizer(tmp_path / "tok", words=["cat", "dog"])
    with pytest.raises(SmpoError, match=r"hpsv2: the tokenizer .* tokens but .* expects"):
        load_reward_model("hpsv2", str(models["hpsv2"]), CPU, str(other))


def test_cache_dir_is_accepted_by_every_kind(models: dict[str, Path]) -> None:
    model = load_reward_model("clipscore", str(models["clip"]), CPU, cache_dir=models["root"])
    assert model.score(_images()[:1], CAPTIONS[:1]).shape == (1,)


def test_hpsv2_preprocess_letterboxes_the_whole_image() -> None:
    image = Image.new("RGB", (64, 32), (255, 255, 255))
    pixels = hpsv2_preprocess([image], size=32)[0]
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    black = -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)
    assert pixels.shape == (3, 32, 32)
    torch.testing.assert_close(pixels[:, :8], black[:, None, None].expand(3, 8, 32))
    torch.testing.assert_close(pixels[:, 24:], black[:, None, None].expand(3, 8, 32))
    torch.testing.assert_close(pixels[:, 9:23], white[:, None, None].expand(3, 14, 32),
                               atol=1e-5, rtol=0)


def test_clip_preprocess_crops_where_torchvision_does() -> None:
    # 35 x 32: resize keeps it, the crop overhang is 3, torchvision starts at round(1.5) = 2.
    columns = np.tile(np.arange(35, dtype=np.uint8)[None, :, None] * 7, (32, 1, 3))
    pixels = clip_preprocess([Image.fromarray(columns)], size=32)[0]
    first = pixels[0, 0, 0] * CLIP_STD[0] + CLIP_MEAN[0]
    assert round(float(first) * 255) == 2 * 7


def _real_bpe_source() -> Path:
    given = os.environ.get("SMPO_CLIP_BPE")
    source = Path(given) if given else find_clip_bpe_vocab()
    if source is None or not source.is_file():
        pytest.skip(f"CLIP's {CLIP_BPE_FILE} is not available: `pip install --no-deps "
                    f"open-clip-torch==3.3.0`, or set SMPO_CLIP_BPE to the file or the wheel")
    return source


def test_real_clip_tokenizer() -> None:
    tokenizer = clip_tokenizer_from_bpe(_real_bpe_source())
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_clip_bpe_is_read_from_a_wheel_and_found_without_import(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _real_bpe_source()
    data = (zipfile.ZipFile(source).read(f"open_clip/{CLIP_BPE_FILE}")
            if zipfile.is_zipfile(source) else source.read_bytes())
    wheel = tmp_path / "open_clip_torch-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"open_clip/{CLIP_BPE_FILE}", data)
    assert len(load_clip_tokenizer(wheel)) == 49408
    package = tmp_path / "site" / "open_clip"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / CLIP_BPE_FILE).write_bytes(data)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert find_clip_bpe_vocab() == package / CLIP_BPE_FILE
    assert "open_clip" not in sys.modules


def test_bad_bpe_file_is_an_smpo_error(tmp_path: Path) -> None:
    not_gzip = tmp_path / CLIP_BPE_FILE
    not_gzip.write_text("hello")
    with pytest.raises(SmpoError, match="not a gzip'd BPE merge list"):
        load_clip_tokenizer(not_gzip)
    too_short = tmp_path / "short.txt.gz"
    too_short.write_bytes(gzip.compress(b"#version\na b\n"))
    with pytest.raises(SmpoError, match="does not hold CLIP's 48894 merges"):
        load_clip_tokenizer(too_short)
    with pytest.raises(SmpoError, match="does not exist"):
        load_clip_tokenizer(tmp_path / "absent.txt.gz")


def test_hub_checkpoint_offline_names_model_and_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SmpoError, match=r"reward model imagereward: could not fetch "
                                        r"'THUDM/ImageReward/ImageReward\.pt' from the hub"):
        load_reward_model("imagereward", "THUDM/ImageReward/ImageReward.pt", CPU)
