"""Image preprocessing exactly as the reference packages do it (torchvision, without importing it).

Two transforms are in use and they do not give the same pixels:
- `clip_preprocess` (OpenAI CLIP, hence the LAION aesthetic predictor, and ImageReward):
  PIL bicubic resize of the shortest edge, centre crop, RGB, then to a tensor. It crops where
  torchvision does, `round((size - crop) / 2)`; transformers' image processors floor instead,
  which moves the crop by one pixel when the overhang is 3 mod 4.
- `hpsv2_preprocess` (HPSv2's `score`): to a float tensor first, a bicubic antialiased tensor
  resize of the longest edge (torchvision >= 0.17 semantics), then zero padding to a square:
  the whole image is seen, letterboxed, not centre-cropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: OpenAI CLIP's normalisation, used by CLIP, open_clip, HPSv2, ImageReward and BLIP alike.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resized_size(width: int, height: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) with the shortest edge at `shortest_edge`, the other truncated."""
    if width <= height:
        return shortest_edge, int(shortest_edge * height / width)
    return int(shortest_edge * width / height), shortest_edge


def _crop_offset(size: int, crop: int) -> int:
    return round((size - crop) / 2.0)  # Python's round, as torchvision: half to even


def _normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=pixels.dtype).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype).view(-1, 1, 1)
    return (pixels - mean_t) / std_t


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """(C, H, W) float32 in [0, 1], as torchvision's ToTensor."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div(255)


def clip_preprocess(images: Sequence[Image.Image], size: int = 224, crop: int | None = None,
                    mean: Sequence[float] = CLIP_MEAN,
                    std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """OpenAI CLIP's `_transform`: (N, 3, crop, crop) float32."""
    crop = size if crop is None else crop
    batch = []
    for image in images:
        image = image.resize(_resized_size(*image.size, size), Image.Resampling.BICUBIC)
        if min(image.size) < crop:
            raise ValueError(f"image {image.size} is smaller than the {crop}px crop")
        left, top = _crop_offset(image.width, crop), _crop_offset(image.height, crop)
        image = image.crop((left, top, left + crop, top + crop)).convert("RGB")
        batch.append(_normalise(_to_tensor(image), mean, std))
    return torch.stack(batch)


def hpsv2_preprocess(images: Sequence[Image.Image], size: int = 224,
                     mean: Sequence[float] = CLIP_MEAN,
                     std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """HPSv2's `score` transform (open_clip's `ResizeMaxSize`, as `light_augmentation=True`
    selects): the longest edge scaled to `size` by a bicubic antialiased tensor resize, then
    zero-padded to a centred square. (N, 3, size, size) float32.

    Two cases where the reference fails and this does not: an RGBA image (the reference keeps
    the alpha channel) is converted to RGB, and a non-square image whose longest edge already
    is `size` (the reference skips the padding too) is padded.
    """
    batch = []
    for image in images:
        pixels = _to_tensor(image.convert("RGB"))
        height, width = pixels.shape[1:]
        scale = size / float(max(height, width))
        new_height, new_width = round(height * scale), round(width * scale)
        if (new_height, new_width) != (height, width):
            pixels = F.interpolate(pixels[None], size=(new_height, new_width), mode="bicubic",
                                   align_corners=False, antialias=True)[0]
        pad_height, pad_width = size - new_height, size - new_width
        pixels = F.pad(pixels, (pad_width // 2, pad_width - pad_width // 2,
                                pad_height // 2, pad_height - pad_height // 2), value=0.0)
        batch.append(_normalise(pixels, mean, std))
    return torch.stack(batch)
