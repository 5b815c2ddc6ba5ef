"""The toy world's models at reduced size: pretraining writes a diffusers pipeline the stages
load, with its record; pairs land in Pick-a-Pic's columns; the reward model is a PickScore-
format CLIP that the score stage's loader reads; the committed weights match their record."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from smpo_core.pickapic import open_source
from smpo_core.rewards import load_reward_model
from smpo_core.worlds.toy import WEIGHTS, scenes
from smpo_core.worlds.toy.annotators import population
from smpo_core.worlds.toy.pairs import write_toy_pickapic
from smpo_core.worlds.toy.pretrain import pretrain
from smpo_core.worlds.toy.reward import train_reward_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    record = pretrain(root / "sd", vae_steps=2, unet_steps=2, batch=4, width=16, samples=4,
                      log=lambda line: None)
    people = population(count=4, seed=0)
    counts = write_toy_pickapic(root / "pairs", root / "sd", people, num_pairs=6, steps=2)
    return root, record, people, counts


def test_pretraining_writes_a_loadable_pipeline_and_its_record(small_world):
    from diffusers import StableDiffusionPipeline

    root, record, _, _ = small_world
    saved = json.loads((root / "sd" / "pretrain.json").read_text())
    assert saved == json.loads(json.dumps(record))
    # A 2-step VAE fails the reconstruction gate, so it trains on to its cap of 3 x 2 steps.
    assert saved["vae_steps"] == 6 and saved["unet_steps"] == 2 and saved["seed"] == 0
    assert saved["vae_reconstructions"]["recognisable"] < 0.95
    for name, digest in saved["sha256"].items():
        assert hashlib.sha256((root / "sd" / name).read_bytes()).hexdigest() == digest
    assert 0.0 <= saved["detector"]["recognisable"] <= 1.0 and saved["detector"]["samples"] == 4
    pipe = StableDiffusionPipeline.from_pretrained(root / "sd", dtype=torch.float32,
                                                   local_files_only=True)
    image = pipe("a red circle on a white background", num_inference_steps=2,
                 height=scenes.IMAGE_SIZE, width=scenes.IMAGE_SIZE,
                 output_type="np").images[0]
    assert image.shape == (32, 32, 3)
    assert pipe.vae_scale_factor == 4


def test_pairs_are_pickapic_rows_labelled_by_one_annotator(small_world):
    root, _, people, counts = small_world
    source = open_source(str(root / "pairs"), "train")  # the download stage's reader
    assert source.num_rows == 6 and counts["pairs"] == 6
    table = pq.read_table(source.files[0])
    assert set(table["label_0"].to_pylist()) <= {0.0, 0.5, 1.0}
    assert set(table["caption"].to_pylist()) <= set(scenes.all_captions())
    assert set(table["user_id"].to_pylist()) <= set(range(1, len(people.weights) + 1))
    truth = pq.read_table(root / "pairs" / "truth.parquet")
    assert truth["ranking_id"].to_pylist() == table["ranking_id"].to_pylist()


def test_reward_model_is_pickscore_format(small_world, tmp_path):
    root, _, people, _ = small_world
    accuracy = train_reward_model(tmp_path / "rm", people, root / "pairs", steps=2, batch=4,
                                  check_pairs=8)
    assert 0.0 <= accuracy["drawn"]["accuracy_vs_labels"] <= 1.0
    model = load_reward_model("pickscore", str(tmp_path / "rm"), torch.device("cpu"))
    images = [scenes.draw(scenes.ToyScene("circle", "red", "white"))] * 2
    scores = model.score(images, ["a red circle on a white background",
                                  "a blue square on a black background"])
    assert scores.shape == (2,) and np.all(np.abs(scores) <= 1.0)


@pytest.mark.parametrize(("name", "record_file"), [("toy-sd", "pretrain.json"),
                                                    ("toy-reward", "train.json")])
def test_committed_weights_match_their_record(name, record_file):
    folder = WEIGHTS / name
    record = json.loads((folder / record_file).read_text())
    assert record["command"].startswith("python -m smpo_core.worlds.toy.")
    for file, digest in record["sha256"].items():
        assert hashlib.sha256((folder / file).read_bytes()).hexdigest() == digest


def test_committed_vae_reconstructs_drawn_scenes_recognisably():
    """The committed base model's VAE keeps what the detector needs (the samples cannot be
    better than its decodes), and its posterior is a point: the invert stage's posterior
    samples equal the mean."""
    from diffusers import AutoencoderKL

    from smpo_core.worlds.toy.pretrain import reconstructed, vae_batch

    vae = AutoencoderKL.from_pretrained(WEIGHTS / "toy-sd", subfolder="vae",
                                        torch_dtype=torch.float32).eval()
    verdict = reconstructed(vae, random.Random(11), count=64)
    assert verdict["colour"] >= 0.95 and verdict["recognisable"] >= 0.85, verdict
    images, _, _ = vae_batch(random.Random(12), 4)
    with torch.no_grad():
        posterior = vae.encode(images).latent_dist
    assert float(posterior.std.max()) < 1e-5
