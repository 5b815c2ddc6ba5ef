"""Captioned toy scenes: one shape of one colour on a plain background, drawn analytically.

Captions name the shape, its colour and the background ("a red circle on a white background");
size, position and saturation vary freely: they are what the captions leave open and what
the annotators' tastes disagree about, so the base model learns to vary them.
"""

from __future__ import annotations

import colorsys
import random
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

#: Object colours, fully saturated; a drawing blends them towards grey by its saturation.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "orange": (240, 130, 20),
    "yellow": (235, 215, 25),
    "green": (30, 170, 50),
    "blue": (35, 70, 230),
    "purple": (150, 40, 200),
}
#: Backgrounds: achromatic, so an object's colour never melts into its background.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (240, 240, 240),
    "grey": (128, 128, 128),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "diamond")
IMAGE_SIZE = 32
_SUPERSAMPLE = 4  # drawn 4x larger and downsampled: smooth edges, as a generator draws them
RADIUS = (4.0, 12.0)  # object radius range, px at IMAGE_SIZE
SATURATION = (0.35, 1.0)  # blend of the palette colour with grey
_GREY = np.array((128, 128, 128), dtype=float)


class ToyScene(NamedTuple):
    """A drawable scene: what the caption says (shape, colour, background) and what it leaves
    open (radius, centre, saturation)."""

    shape: str
    colour: str
    background: str
    radius: float = 9.0
    x: float = IMAGE_SIZE / 2
    y: float = IMAGE_SIZE / 2
    saturation: float = 1.0


def caption(scene: ToyScene) -> str:
    article = "an" if scene.colour[0] in "aeiou" else "a"
    return f"{article} {scene.colour} {scene.shape} on a {scene.background} background"


def all_captions() -> list[str]:
    """Every caption of the world (72), in a fixed order."""
    return [caption(ToyScene(s, c, b)) for b in BACKGROUNDS for c in COLOURS for s in SHAPES]


def parse_caption(text: str) -> ToyScene | None:
    """The scene a caption asks for (free attributes at their defaults); None if the caption
    is not one of the world's."""
    words = text.strip().lower().split()
    if len(words) != 7 or words[3:5] != ["on", "a"] or words[6] != "background":
        return None
    colour, shape, background = words[1], words[2], words[5]
    if colour in COLOURS and shape in SHAPES and background in BACKGROUNDS:
        return ToyScene(shape, colour, background)
    return None


def caption_words() -> list[str]:
    """The world's vocabulary: each is one token of the toy tokenizer."""
    return sorted({word for text in all_captions() for word in text.split()})


def random_scene(rng: random.Random, text: str | None = None) -> ToyScene:
    """A scene with every free attribute drawn at random; `text` fixes what the caption says."""
    fixed = parse_caption(text) if text else None
    if text and fixed is None:
        raise ValueError(f"caption {text!r}: not a toy-world caption (expected e.g. "
                         f"{all_captions()[0]!r})")
    shape = fixed.shape if fixed else rng.choice(SHAPES)
    colour = fixed.colour if fixed else rng.choice(list(COLOURS))
    background = fixed.background if fixed else rng.choice(list(BACKGROUNDS))
    radius = rng.uniform(*RADIUS)
    margin = radius + 1
    return ToyScene(shape, colour, background, radius,
                    rng.uniform(margin, IMAGE_SIZE - margin),
                    rng.uniform(margin, IMAGE_SIZE - margin), rng.uniform(*SATURATION))


def object_rgb(colour: str, saturation: float) -> tuple[int, int, int]:
    rgb = _GREY + saturation * (np.array(COLOURS[colour], dtype=float) - _GREY)
    return tuple(round(float(v)) for v in rgb)


def draw(scene: ToyScene) -> Image.Image:
    """The scene as an IMAGE_SIZE x IMAGE_SIZE RGB image."""
    k = _SUPERSAMPLE
    image = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(image)
    fill = object_rgb(scene.colour, scene.saturation)
    x, y, r = scene.x * k, scene.y * k, scene.radius * k
    if scene.shape == "circle":
        pen.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif scene.shape == "square":
        h = 0.85 * r  # a square of the circle's area, near enough
        pen.rectangle((x - h, y - h, x + h, y + h), fill=fill)
    elif scene.shape == "triangle":
        pen.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    else:
        pen.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)


def hue(rgb: np.ndarray) -> float:
    """Hue in [0, 1) of an RGB colour with 0..255 channels."""
    return colorsys.rgb_to_hsv(*(np.asarray(rgb, dtype=float) / 255.0))[0]
