"""Loading the diffusion model's parts and the small encoders every stage shares."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextModel, CLIPTokenizer

from smpo_core.errors import SmpoError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` is the first GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SmpoError(f"device {name!r}: no CUDA GPU is visible here; use device=auto or cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Half precision only where it is fast and supported; the CPU computes in float32."""
    return DTYPES[name] if device.type == "cuda" else torch.float32


@dataclass
class DiffusionModel:
    """The parts of a Stable-Diffusion-style model that inversion, training and sampling use."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    device: torch.device
    dtype: torch.dtype

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(torch.float32)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def _check_model_ref(ref: str, what: str) -> None:
    if (ref.startswith((".", "/", "~")) or Path(ref).exists()) and not Path(ref).is_dir():
        raise SmpoError(f"{what} {ref!r}: no such folder; expected a diffusers model folder "
                        f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")


def load_diffusion(
    ref: str, device: torch.device, dtype: torch.dtype, revision: str | None = None
) -> DiffusionModel:
    """Load UNet, VAE, text encoder, tokenizer and DDIM scheduler from a diffusers folder/id."""
    _check_model_ref(ref, "model.base")
    kw = {"revision": revision}
    try:
        # Loading in the target dtype (not .to() afterwards) keeps the modules a model marks
        # as float32-only in float32.
        unet = UNet2DConditionModel.from_pretrained(ref, subfolder="unet", dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(ref, subfolder="vae", dtype=dtype, **kw)
        text_encoder = CLIPTextModel.from_pretrained(ref, subfolder="text_encoder", dtype=dtype,
                                                     **kw)
        tokenizer = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", **kw)
        scheduler = DDIMScheduler.from_pretrained(ref, subfolder="scheduler", **kw)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SmpoError(f"model.base {ref!r}: could not load the diffusion model: {first}") from exc
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval().to(device)
    return DiffusionModel(unet, vae, text_encoder, tokenizer, scheduler, device, dtype)


@torch.no_grad()
def encode_captions(model: DiffusionModel, captions: list[str]) -> torch.Tensor:
    """Text-encoder hidden states, (B, 77, D), the UNet's cross-attention condition."""
    tokens = model.tokenizer(
        captions, padding="max_length", max_length=model.tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    )
    hidden = model.text_encoder(tokens.input_ids.to(model.device))[0]
    return hidden.to(model.dtype)


def jpeg_to_pixels(data: bytes, resolution: int) -> torch.Tensor:
    """Decode, resize the short side to `resolution`, centre-crop: (3, R, R) in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as raw:
        image = raw.convert("RGB")
    scale = resolution / min(image.size)
    size = tuple(max(resolution, round(side * scale)) for side in image.size)
    image = image.resize(size, Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@torch.no_grad()
def encode_images(
    model: DiffusionModel, pixels: torch.Tensor, seeds: Sequence[int]
) -> torch.Tensor:
    """z_0 = vae.encode(x).sample() * scaling_factor (METHOD.md §3), float32.

    The posterior sample of image i uses its own seed, so a latent does not depend on which
    batch the image happened to share (batch size is a speed setting, not a result setting).
    """
    posterior = model.vae.encode(pixels.to(model.device, model.dtype)).latent_dist
    noise = torch.stack([
        torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(seed))
        for seed in seeds
    ]).to(posterior.mean.device, torch.float32)
    sample = posterior.mean.float() + posterior.std.float() * noise
    return sample * model.vae.config.scaling_factor


def noise_predictor(model: DiffusionModel, unet: UNet2DConditionModel, text: torch.Tensor):
    """eps(z, t) for one text condition, as the inversion code calls it (conditional only)."""

    def eps(z: torch.Tensor, t: int) -> torch.Tensor:
        timesteps = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        return unet(z.to(unet.dtype), timesteps, encoder_hidden_states=text).sample

    return eps
