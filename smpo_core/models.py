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
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from smpo_core.building import one_at_a_time
from smpo_core.errors import SmpoError, first_line
from smpo_core.inversion import check_prediction_type, noise_from_prediction
from smpo_core.refs import looks_local

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
    """The parts of a Stable-Diffusion-style model (SD1.x/2.x, or SDXL with its second text
    encoder) that inversion, training and sampling use."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler
    device: torch.device
    dtype: torch.dtype
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod.to(torch.float32)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type


@dataclass
class PromptEmbeds:
    """The UNet's text condition: cross-attention states, plus SDXL's pooled embedding."""

    hidden: torch.Tensor  # (B, L, D)
    pooled: torch.Tensor | None = None  # (B, P), SDXL only


def uses_micro_conditions(unet: UNet2DConditionModel) -> bool:
    """SDXL-style UNets take the pooled text embedding and size/crop ids as extra inputs."""
    return unet.config.addition_embed_type == "text_time"


def unet_condition(unet: UNet2DConditionModel, hidden: torch.Tensor,
                   pooled: torch.Tensor | None = None,
                   time_ids: torch.Tensor | None = None) -> dict:
    """Keyword arguments of a UNet call for one condition (batched like the latents)."""
    kwargs = {"encoder_hidden_states": hidden.to(unet.device, unet.dtype)}
    if uses_micro_conditions(unet):
        if pooled is None or time_ids is None:
            raise ValueError("an SDXL UNet needs the pooled text embedding and time ids")
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(unet.device, unet.dtype),
                                       "time_ids": time_ids.to(unet.device, unet.dtype)}
    return kwargs


def _check_model_ref(ref: str, what: str) -> None:
    if (looks_local(ref) or Path(ref).exists()) and not Path(ref).is_dir():
        raise SmpoError(f"{what} {ref!r}: no such folder; expected a diffusers model folder "
                        f"(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)")


@one_at_a_time
def load_unet(ref: str, dtype: torch.dtype = torch.float32,
              revision: str | None = None) -> UNet2DConditionModel:
    """A UNet from a diffusers UNet folder, a pipeline folder (its unet/), or a hub id of
    either (`model.unet`, or the base's own)."""
    _check_unet_ref(ref)
    path = Path(ref)
    local = path.is_dir()
    subfolder = "unet" if (path / "unet").is_dir() or not local else None
    try:
        return UNet2DConditionModel.from_pretrained(ref, subfolder=subfolder, dtype=dtype,
                                                    revision=revision)
    except (OSError, ValueError) as exc:
        if local or subfolder is None:
            raise SmpoError(f"UNet {ref!r}: could not load it: {first_line(exc)}; expected a "
                            f"diffusers UNet folder (config.json and weights), a pipeline "
                            f"folder with unet/, or a hub id of either") from exc
    try:  # a hub id without unet/: a UNet repository
        return UNet2DConditionModel.from_pretrained(ref, dtype=dtype, revision=revision)
    except (OSError, ValueError) as exc:
        raise SmpoError(f"UNet {ref!r}: could not load it from the hub: {first_line(exc)}"
                        ) from exc


def _check_unet_ref(ref: str) -> None:
    if (looks_local(ref) or Path(ref).exists()) and not Path(ref).is_dir():
        raise SmpoError(f"UNet {ref!r}: no such folder; expected a diffusers UNet folder "
                        f"(config.json and weights) or a pipeline folder with unet/")


def check_scheduler(scheduler: DDIMScheduler, ref: str) -> None:
    """Refuse a model whose UNet predicts something training and inversion cannot use."""
    try:
        check_prediction_type(scheduler.config.prediction_type, f"model {ref!r}")
    except ValueError as exc:
        raise SmpoError(f"{exc} (training targets and inversion are written for those)"
                        ) from None


@one_at_a_time
def load_diffusion(
    ref: str, device: torch.device, dtype: torch.dtype, revision: str | None = None,
    vae: str | None = None, unet: str | None = None,
) -> DiffusionModel:
    """Load UNet, VAE, text encoder(s), tokenizer(s) and DDIM scheduler from a diffusers
    folder or hub id; `vae` replaces the model's VAE (e.g. SDXL's fp16-fix VAE), `unet` its
    UNet (e.g. an SFT UNet: `load_unet`)."""
    _check_model_ref(ref, "model.base")
    kw = {"revision": revision}
    try:
        # Loading in the target dtype (not .to() afterwards) keeps the modules a model marks
        # as float32-only in float32.
        unet = (load_unet(unet, dtype) if unet else
                UNet2DConditionModel.from_pretrained(ref, subfolder="unet", dtype=dtype, **kw))
        autoencoder = (AutoencoderKL.from_pretrained(vae, dtype=dtype) if vae else
                       AutoencoderKL.from_pretrained(ref, subfolder="vae", dtype=dtype, **kw))
        text_encoder = CLIPTextModel.from_pretrained(ref, subfolder="text_encoder", dtype=dtype,
                                                     **kw)
        tokenizer = CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer", **kw)
        scheduler = DDIMScheduler.from_pretrained(ref, subfolder="scheduler", **kw)
        second = {}
        if uses_micro_conditions(unet):
            second = {
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
                    ref, subfolder="text_encoder_2", dtype=dtype, **kw),
                "tokenizer_2": CLIPTokenizer.from_pretrained(ref, subfolder="tokenizer_2", **kw),
            }
    except (OSError, ValueError) as exc:
        raise SmpoError(f"model.base {ref!r}: could not load the diffusion model: "
                        f"{first_line(exc)}") from exc
    check_scheduler(scheduler, ref)
    model = DiffusionModel(unet, autoencoder, text_encoder, tokenizer, scheduler, device, dtype,
                           **second)
    for module in (unet, autoencoder, text_encoder, model.text_encoder_2):
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    return model


def _tokens(tokenizer: CLIPTokenizer, captions: list[str], device: torch.device) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


@torch.no_grad()
def encode_captions(model: DiffusionModel, captions: list[str]) -> PromptEmbeds:
    """The UNet's text condition for each caption.

    SD: the text encoder's last hidden states, (B, 77, D). SDXL: the penultimate hidden states
    of both encoders side by side, (B, 77, D1 + D2), and the second encoder's pooled
    projection, (B, P), as SDXL was trained.
    """
    if not model.is_sdxl:
        hidden = model.text_encoder(_tokens(model.tokenizer, captions, model.device))[0]
        return PromptEmbeds(hidden.to(model.dtype))
    states, pooled = [], None
    for tokenizer, encoder in ((model.tokenizer, model.text_encoder),
                               (model.tokenizer_2, model.text_encoder_2)):
        out = encoder(_tokens(tokenizer, captions, model.device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = getattr(out, "text_embeds", None)
    return PromptEmbeds(torch.cat(states, dim=-1).to(model.dtype), pooled.to(model.dtype))


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) of encoded image bytes, without decoding the pixels."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size


def centre_crop_box(width: int, height: int, resolution: int) -> tuple[tuple[int, int], int, int]:
    """Resized size and the crop's (left, top) when the short side becomes `resolution`."""
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    return size, (size[0] - resolution) // 2, (size[1] - resolution) // 2


def micro_conditions(sizes: Sequence[tuple[int, int]], resolution: int) -> torch.Tensor:
    """SDXL's size/crop ids per image, (B, 6): original (h, w), crop (top, left), target
    (h, w), for the centre crop `jpeg_to_pixels` takes."""
    rows = []
    for width, height in sizes:
        _, left, top = centre_crop_box(width, height, resolution)
        rows.append([height, width, top, left, resolution, resolution])
    return torch.tensor(rows, dtype=torch.float32)


def jpeg_to_pixels(data: bytes, resolution: int) -> torch.Tensor:
    """Decode, resize the short side to `resolution`, centre-crop: (3, R, R) in [-1, 1]."""
    with Image.open(io.BytesIO(data)) as raw:
        image = raw.convert("RGB")
    size, left, top = centre_crop_box(image.width, image.height, resolution)
    image = image.resize(size, Image.BICUBIC).crop((left, top, left + resolution,
                                                    top + resolution))
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
        torch.randn(posterior.mean.shape[1:], generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float32)
        for seed in seeds
    ]).to(posterior.mean.device, torch.float32)
    sample = posterior.mean.float() + posterior.std.float() * noise
    return sample * model.vae.config.scaling_factor


def condition_rows(condition: dict, rows: torch.Tensor | None) -> dict:
    """The UNet keyword arguments of `unet_condition` for a subset of the batch's rows."""
    if rows is None:
        return condition
    rows = rows.to(condition["encoder_hidden_states"].device)
    return {name: {k: v[rows] for k, v in value.items()} if isinstance(value, dict)
            else value[rows] for name, value in condition.items()}


def noise_predictor(unet: UNet2DConditionModel, hidden: torch.Tensor,
                    pooled: torch.Tensor | None = None, time_ids: torch.Tensor | None = None,
                    prediction_type: str = "epsilon",
                    alphas_cumprod: torch.Tensor | None = None):
    """eps(z, t) for one batch of conditions, as the inversion code calls it (conditional
    prediction only, no guidance); eps(z, t, rows) predicts for those rows of the batch only.
    A v-prediction UNet's output is turned into the noise it implies (that needs the
    schedule, `alphas_cumprod`)."""
    condition = unet_condition(unet, hidden, pooled, time_ids)

    def eps(z: torch.Tensor, t: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        timesteps = torch.full((z.shape[0],), t, device=z.device, dtype=torch.long)
        pred = unet(z.to(unet.dtype), timesteps, **condition_rows(condition, rows)).sample
        if prediction_type == "epsilon":
            return pred
        return noise_from_prediction(prediction_type, pred, z, alphas_cumprod[t])

    return eps


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections


@one_at_a_time
def add_lora(unet: UNet2DConditionModel, rank: int) -> int:
    """Freeze the UNet and attach rank-`rank` LoRA adapters; returns the trainable count.

    The adapters start as a zero update (peft's default), so the policy begins exactly at the
    reference, as the SmPO loss assumes.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS)))
    return sum(p.numel() for p in unet.parameters() if p.requires_grad)


class AdaptersDisabled:
    """The reference of LoRA training: the policy's own UNet with its adapters switched off,
    i.e. the frozen starting UNet, without a second copy of it in memory (as the diffusers
    DPO example does). Called like the UNet; used without gradients."""

    def __init__(self, unet: UNet2DConditionModel):
        self.unet = unet

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def config(self):
        return self.unet.config

    def __call__(self, *args, **kwargs):
        self.unet.disable_adapters()
        try:
            return self.unet(*args, **kwargs)
        finally:
            self.unet.enable_adapters()


def save_lora(unet: UNet2DConditionModel, folder: Path) -> None:
    """The UNet's LoRA adapters in diffusers' layout (`pipe.load_lora_weights(folder)`)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipeline = StableDiffusionXLPipeline if uses_micro_conditions(unet) else StableDiffusionPipeline
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline.save_lora_weights(str(folder), unet_lora_layers=layers)
