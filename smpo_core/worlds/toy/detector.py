"""The toy world's analytic detector: what an image shows, measured in pixels.

The background is the median of the border pixels; the object is every pixel that differs
from it by more than half of the largest difference (the edge of a blurred or anti-aliased
shape lies half-way between the two colours). Its colour is the palette colour nearest in
hue. Its shape follows from how much of its bounding box it fills (square ~1, circle ~0.79,
triangle and diamond ~0.5), whether it fills the box's corners (a square) and, for the last
two, where its widest row lies (a triangle's at the bottom, a diamond's in the middle). The
same measurements give the properties the annotators' rewards weigh.
"""

from __future__ import annotations

import colorsys
from typing import NamedTuple

import numpy as np
from PIL import Image

from smpo_core.worlds.toy.scenes import BACKGROUNDS, COLOURS, parse_caption

_MIN_CONTRAST = 20.0  # RGB distance from the background below which nothing is there
_MIN_PIXELS = 6
_HUES = {name: colorsys.rgb_to_hsv(*(np.array(rgb) / 255.0))[0] for name, rgb in COLOURS.items()}
#: The properties an annotator's reward weighs, each in [0, 1].
PROPERTIES = ("fidelity", "size", "centring", "saturation", "contrast")
_FULL_SIZE = 0.30  # object area fraction that counts as size 1


class Detection(NamedTuple):
    """What the detector sees in one image."""

    shape: str | None  # None: no object found
    colour: str | None
    background: str
    area: float  # fraction of the image
    centre: tuple[float, float]  # (x, y) in [0, 1]
    saturation: float  # HSV saturation of the object's mean colour
    contrast: float  # |luminance(object) - luminance(background)| / 255


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=float)


def _luminance(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _shape(mask: np.ndarray) -> str:
    rows, cols = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
    box = mask[top:bottom + 1, left:right + 1]
    fill = box.mean()
    if fill > 0.68:
        # A square fills the corners of its bounding box; a circle leaves them empty.
        k = max(1, min(box.shape) // 5)
        corners = np.mean([box[:k, :k].mean(), box[:k, -k:].mean(), box[-k:, :k].mean(),
                           box[-k:, -k:].mean()])
        return "square" if corners > 0.5 else "circle"
    widths = box.sum(axis=1)
    widest = np.flatnonzero(widths >= widths.max() - 1).mean() / max(len(widths) - 1, 1)
    return "triangle" if widest > 0.72 else "diamond"


def detect(image: Image.Image | np.ndarray) -> Detection:
    """The shape, colour and measurable properties of the one object in `image`."""
    pixels = _pixels(image)
    height, width, _ = pixels.shape
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    background = min(BACKGROUNDS, key=lambda name: np.abs(
        np.array(BACKGROUNDS[name]) - background_rgb).sum())
    distance = np.linalg.norm(pixels - background_rgb, axis=2)
    peak = np.quantile(distance, 0.995)
    mask = distance > 0.5 * peak
    if peak < _MIN_CONTRAST or mask.sum() < _MIN_PIXELS:
        return Detection(None, None, background, 0.0, (0.5, 0.5), 0.0, 0.0)
    # The object's colour from its core, not its edges (blended with the background).
    core = distance >= np.quantile(distance[mask], 0.5)
    rgb = pixels[core].mean(axis=0)
    h, s, _ = colorsys.rgb_to_hsv(*(rgb / 255.0))
    colour = min(_HUES, key=lambda name: min(abs(h - _HUES[name]), 1 - abs(h - _HUES[name])))
    rows, cols = np.nonzero(mask)
    centre = ((cols.mean() + 0.5) / width, (rows.mean() + 0.5) / height)
    contrast = abs(_luminance(rgb) - _luminance(background_rgb)) / 255.0
    return Detection(_shape(mask), colour, background, float(mask.mean()), centre, float(s),
                     contrast)


def fidelity(found: Detection, text: str) -> float:
    """How much of the caption the image shows: 1 = right shape and colour, 0.5 = one of them,
    0 = neither (or no object). A caption outside the world scores 0."""
    wanted = parse_caption(text)
    if wanted is None or found.shape is None:
        return 0.0
    return 0.5 * (found.shape == wanted.shape) + 0.5 * (found.colour == wanted.colour)


def properties(image: Image.Image | np.ndarray, text: str) -> np.ndarray:
    """The annotators' properties of one image for its caption, in PROPERTIES order, each in
    [0, 1]: caption fidelity, object size, centring, colour saturation, contrast."""
    found = detect(image)
    if found.shape is None:
        return np.zeros(len(PROPERTIES))
    offset = np.hypot(found.centre[0] - 0.5, found.centre[1] - 0.5) / np.hypot(0.5, 0.5)
    return np.array([fidelity(found, text), min(1.0, found.area / _FULL_SIZE), 1.0 - offset,
                     found.saturation, min(1.0, found.contrast / 0.8)])
