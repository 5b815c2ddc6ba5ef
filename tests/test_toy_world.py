"""The toy world's pieces against independent facts: scenes drawn with known attributes,
the detector's verdicts on them, and the annotators' labelling statistics."""

from __future__ import annotations

import random

import numpy as np
import pytest

from smpo_core.worlds.toy import scenes
from smpo_core.worlds.toy.annotators import MEAN_TASTE, Population, population
from smpo_core.worlds.toy.detector import PROPERTIES, detect, fidelity, properties


def test_captions_round_trip_and_name_72_scenes():
    captions = scenes.all_captions()
    assert len(set(captions)) == 6 * 4 * 3 == 72
    assert "an orange diamond on a black background" in captions
    for text in captions:
        assert scenes.caption(scenes.parse_caption(text)) == text
    assert scenes.parse_caption("a red circle above a blue square") is None
    with pytest.raises(ValueError, match="not a toy-world caption"):
        scenes.random_scene(random.Random(0), "a cat")


def test_detector_names_shape_and_colour_of_drawn_scenes():
    rng = random.Random(1)
    drawn = [scenes.random_scene(rng) for _ in range(400)]
    found = [detect(scenes.draw(s)) for s in drawn]
    shape = np.mean([f.shape == s.shape for f, s in zip(found, drawn, strict=True)])
    colour = np.mean([f.colour == s.colour for f, s in zip(found, drawn, strict=True)])
    background = np.mean([f.background == s.background for f, s in zip(found, drawn,
                                                                        strict=True)])
    assert shape >= 0.95 and colour >= 0.98 and background == 1.0, (shape, colour)


def test_detector_measures_size_position_and_saturation():
    big = detect(scenes.draw(scenes.ToyScene("square", "blue", "white", radius=12)))
    small = detect(scenes.draw(scenes.ToyScene("square", "blue", "white", radius=5)))
    # A square of half-side 0.85 r: area (1.7 r)^2 of 32^2 pixels, within edge blur.
    assert big.area == pytest.approx((1.7 * 12) ** 2 / 32**2, rel=0.1)
    assert small.area == pytest.approx((1.7 * 5) ** 2 / 32**2, rel=0.25)
    corner = detect(scenes.draw(scenes.ToyScene("circle", "red", "grey", radius=5, x=7, y=25)))
    assert corner.centre == pytest.approx((7 / 32, 25 / 32), abs=0.02)
    pale = detect(scenes.draw(scenes.ToyScene("circle", "red", "black", saturation=0.4)))
    vivid = detect(scenes.draw(scenes.ToyScene("circle", "red", "black", saturation=1.0)))
    assert pale.colour == vivid.colour == "red"
    assert pale.saturation < vivid.saturation - 0.3


def test_fidelity_and_properties_follow_the_caption():
    image = scenes.draw(scenes.ToyScene("triangle", "green", "white", radius=10))
    assert fidelity(detect(image), "a green triangle on a white background") == 1.0
    assert fidelity(detect(image), "a green circle on a white background") == 0.5
    assert fidelity(detect(image), "a red circle on a white background") == 0.0
    empty = scenes.draw(scenes.ToyScene("circle", "red", "grey", radius=0.5))
    assert detect(empty).shape is None
    assert properties(empty, "a red circle on a grey background").tolist() == [0.0] * 5
    values = properties(image, "a green triangle on a white background")
    assert values.shape == (len(PROPERTIES),) and ((values >= 0) & (values <= 1)).all()


def test_population_tastes_vary_around_the_mean_taste():
    people = population(count=400, seed=0)
    weights = np.asarray(people.weights)
    assert np.allclose(weights.sum(axis=1), 1.0)
    assert people.mean_weights == pytest.approx(MEAN_TASTE, abs=0.03)
    # Varied: the annotator who cares most about each property is someone different.
    assert len(set(weights.argmax(axis=1))) == len(PROPERTIES)


def test_labels_are_bradley_terry_with_ties_on_tiny_gaps():
    people = Population(weights=((1.0, 0, 0, 0, 0), (0, 1.0, 0, 0, 0)), temperature=0.05,
                        tie_gap=0.01)
    n = 20000
    f0 = np.zeros((n, 5))
    f1 = np.zeros((n, 5))
    f0[:, 0] = 0.05  # annotator 0 sees a gap of 0.05 for image 0; annotator 1 sees none
    f0[: n // 2, 1] = 0.005
    annotators = np.repeat([0, 1], n // 2)
    labels = people.label(f0, f1, annotators, np.random.default_rng(0))
    first, second = labels[annotators == 0], labels[annotators == 1]
    # Annotator 0: P(image 0 wins) = sigmoid(0.05 / 0.05) = 0.731; never a tie.
    assert set(np.unique(first)) == {0.0, 1.0}
    assert first.mean() == pytest.approx(1 / (1 + np.exp(-1)), abs=0.015)
    # Annotator 1 sees no gap above the tie threshold: every pair a tie.
    assert (second == 0.5).all()


def test_population_file_round_trip(tmp_path):
    people = population(count=5, seed=3)
    people.save(tmp_path / "population.json")
    assert Population.load(tmp_path / "population.json") == people
    (tmp_path / "other.json").write_text('{"weights": []}')
    with pytest.raises(ValueError, match="not a toy-world population file"):
        Population.load(tmp_path / "other.json")


def test_toy_metric_kinds_score_the_ground_truth(tmp_path):
    import torch

    from smpo_core.errors import SmpoError
    from smpo_core.rewards import load_reward_model
    from smpo_core.worlds import builtins

    population_file = builtins.resolve("builtin:toy-population", tmp_path)
    people = Population.load(population_file)
    assert len(people.weights) == builtins.TOY_ANNOTATORS
    truth = load_reward_model("toy-truth", population_file, torch.device("cpu"))
    fidelity_metric = load_reward_model("toy-fidelity", population_file, torch.device("cpu"))
    text = "a blue square on a white background"
    right = scenes.draw(scenes.ToyScene("square", "blue", "white", radius=11))
    wrong = scenes.draw(scenes.ToyScene("circle", "red", "white", radius=11))
    scores = truth.score([right, wrong], [text, text])
    # Same size, place and saturation: the gap is the caption term alone, weighted by the
    # population's mean weight of fidelity.
    assert scores[0] - scores[1] == pytest.approx(people.mean_weights[0], abs=0.02)
    assert fidelity_metric.score([right, wrong], [text, text]).tolist() == [1.0, 0.0]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SmpoError, match=r"toy-truth.*population"):
        load_reward_model("toy-truth", str(tmp_path / "bad.json"), torch.device("cpu"))


def test_toy_prompts_are_every_caption_once_styled_by_background(tmp_path):
    from smpo_core.prompts import load_prompt_set
    from smpo_core.worlds import builtins

    prompts = load_prompt_set(builtins.resolve("builtin:toy-prompts", tmp_path))
    assert sorted(prompts.prompts) == sorted(scenes.all_captions())
    assert set(prompts.styles) == {"white background", "grey background", "black background"}


class _StubVae:
    """A VAE stand-in whose round trip is known: the identity, or one that keeps luminance
    and drops colour (what an undertrained VAE did to the first toy base model)."""

    def __init__(self, grey: bool):
        self.grey = grey

    def encode(self, images):
        from types import SimpleNamespace

        return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: images))

    def decode(self, latents):
        from types import SimpleNamespace

        if self.grey:
            latents = latents.mean(dim=1, keepdim=True).expand_as(latents)
        return SimpleNamespace(sample=latents)


def test_reconstruction_check_counts_what_the_detector_still_sees():
    from smpo_core.worlds.toy.pretrain import MIN_RECONSTRUCTED, reconstructed

    perfect = reconstructed(_StubVae(grey=False), random.Random(3), count=64)
    assert perfect["scenes"] == 64
    assert perfect["recognisable"] >= MIN_RECONSTRUCTED and perfect["colour"] == 1.0
    greyed = reconstructed(_StubVae(grey=True), random.Random(3), count=64)
    assert greyed["colour"] <= 0.3 and greyed["recognisable"] <= 0.3
    assert greyed["shape"] >= 0.8  # the shape survives in luminance


def test_vae_targets_mark_the_drawn_object_and_its_colour():
    import torch

    from smpo_core.worlds.toy.pretrain import vae_batch, vae_loss

    images, mask, colour = vae_batch(random.Random(5), 8)
    again = random.Random(5)
    drawn = [scenes.random_scene(again) for _ in range(8)]  # the same scenes
    assert images.shape == (8, 3, 32, 32) and mask.shape == (8, 1, 32, 32)
    for i, scene in enumerate(drawn):
        x, y = int(scene.x), int(scene.y)
        assert mask[i, 0, y, x] > 0.95  # the centre is inside every shape (Lanczos ringing)
        assert mask[i, 0, 0, 0] == 0.0 and mask[i, 0, -1, -1] == 0.0  # corners: background
        rgb = np.array(scenes.object_rgb(scene.colour, scene.saturation)) / 127.5 - 1.0
        assert np.allclose(colour[i].numpy(), rgb, atol=1e-6)
        assert np.allclose(images[i, :, y, x].numpy(), rgb, atol=0.05)
    # The drawn scene itself: only the core's edge pixels (anti-aliased towards the
    # background) keep its mean a little off the drawn colour.
    assert vae_loss(images, images, mask, colour).item() < 1e-3
    # A reconstruction that moves only the object's colour pays the L1 of the object's
    # pixels at OBJECT_WEIGHT's share plus the squared colour error, far more than the
    # same shift spread evenly over the image.
    shift = torch.tensor([0.2, -0.2, 0.0]).view(1, 3, 1, 1)
    on_object = vae_loss(images + shift * (mask > 0.9), images, mask, colour).item()
    everywhere = vae_loss(images + shift * mask.mean((2, 3), keepdim=True), images, mask,
                          colour).item()
    assert on_object > 3 * everywhere


def test_toy_profile_keeps_the_toy_worlds_image_size():
    """The download stage drops pairs with images under `min_image_side`: the toy profile
    must let the world's 32x32 images through (the 64 px default dropped all 232 pairs)."""
    from smpo_core.settings import load_settings

    assert load_settings("toy").download.min_image_side <= scenes.IMAGE_SIZE
    assert load_settings("toy").model.resolution == scenes.IMAGE_SIZE
