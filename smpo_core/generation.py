"""Drawing the images an evaluation scores: which model, which seed, where each image is kept.

Seeds: image j of prompt i (i: the prompt's index in its whole set) starts from the noise of
`torch.Generator("cpu").manual_seed(seed + SEED_STRIDE * i + j)`, for every model, so models
are compared on the same initial noise and an image's seed never depends on how many prompts
or images were asked for.

Images are kept once per (model, sampling settings) in `<root>/<model id>/<sampling id>/`,
each under the hash of its prompt and its seed, so an evaluation or comparison that needs an
image another one drew reads it instead of drawing it again. A model's id hashes what it is
made of (base, VAE, tuned weights: names, sizes and modification times of their files, or the
hub id and revision); the sampling id hashes sampler, steps, guidance, resolution and dtype.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from PIL import Image

from smpo_core.building import one_at_a_time
from smpo_core.errors import SmpoError, first_line
from smpo_core.prompts import PromptSet
from smpo_core.store import atomic_path, write_json

SEED_STRIDE = 1000  # image j of prompt i: seed + SEED_STRIDE * i + j
MAX_IMAGES_PER_PROMPT = SEED_STRIDE
SAMPLER = "DDIM (eta 0)"
# UNet config entries that decide whether a state dict fits: the rest (sample size, versions,
# names) may differ between a base and weights tuned from it.
_ARCHITECTURE = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                 "down_block_types", "up_block_types", "mid_block_type", "cross_attention_dim",
                 "attention_head_dim", "transformer_layers_per_block", "addition_embed_type",
                 "projection_class_embeddings_input_dim", "class_embed_type")
_LORA_KEY = re.compile(r"^(?P<component>unet|text_encoder|text_encoder_2)\.(?P<module>.+?)\."
                       r"(?P<part>lora\.down|lora\.up|lora_A|lora_B|lora_linear_layer\.down|"
                       r"lora_linear_layer\.up)\.weight$")


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """The generator seed of image `image_index` of the prompt at `prompt_index` in its set."""
    return seed + SEED_STRIDE * prompt_index + image_index


@dataclass(frozen=True)
class Sampling:
    """What decides an image besides the model, the prompt and the seed."""

    steps: int
    guidance_scale: float
    resolution: int
    dtype: str
    sampler: str = SAMPLER

    def key(self) -> str:
        return _digest(asdict(self))


@dataclass(frozen=True)
class ModelSpec:
    """A text-to-image model to evaluate: a base pipeline (diffusers folder or hub id), with
    an optional VAE and tuned weights (a UNet folder, or LoRA weights) put into it."""

    label: str
    base: str
    revision: str | None = None
    vae: str | None = None
    weights: str | None = None
    weights_kind: str | None = None  # "unet" or "lora"
    ref: str = ""  # what the user wrote, e.g. `train:3f2a` or `lora:/models/x`

    def identity(self) -> str:
        """What this model is made of, hashed: equal ids draw equal images."""
        return _digest({"base": file_identity(self.base), "revision": self.revision,
                        "vae": file_identity(self.vae), "weights_kind": self.weights_kind,
                        "weights": file_identity(self.weights)})

    def describe(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None} | {"id": self.identity()}


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_identity(ref: str | None) -> str | None:
    """A local file or folder as (name, size, modification time) of every file in it; a hub
    id as itself. Cheap for multi-gigabyte models; a rewritten weight file changes it."""
    if ref is None:
        return None
    path = Path(ref).expanduser()
    if not path.exists():
        return ref
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    stats = [(f.relative_to(path).as_posix() if f != path else f.name, f.stat().st_size,
              f.stat().st_mtime_ns) for f in files]
    return f"{path.resolve()}:{_digest(stats)}"


# --- does the model load, and do its weights fit its base? --------------------------------------


def _base_config(spec: ModelSpec, what: str, subfolder: str | None = None) -> dict:
    try:
        if subfolder:
            return UNet2DConditionModel.load_config(spec.base, subfolder=subfolder,
                                                    revision=spec.revision)
        return DiffusionPipeline.load_config(spec.base, revision=spec.revision)
    except (OSError, ValueError) as exc:
        first = first_line(exc)
        raise SmpoError(f"model {spec.label!r}: cannot read the {what} of {spec.base!r} "
                        f"({first}); expected a diffusers folder or a hub id reachable from "
                        f"here") from exc


def _plain(value: object) -> object:
    return list(value) if isinstance(value, list | tuple) else value


def _check_unet(spec: ModelSpec) -> None:
    base = _base_config(spec, "UNet config", subfolder="unet")
    try:
        tuned = UNet2DConditionModel.load_config(spec.weights)
    except (OSError, ValueError) as exc:
        raise SmpoError(f"model {spec.label!r}: {spec.weights} is not a diffusers UNet folder "
                        f"(config.json and diffusion_pytorch_model.safetensors)") from exc
    differ = [k for k in _ARCHITECTURE if _plain(base.get(k)) != _plain(tuned.get(k))]
    if differ:
        key = differ[0]
        raise SmpoError(f"model {spec.label!r}: the UNet in {spec.weights} does not fit base "
                        f"model {spec.base!r} ({key} {tuned.get(key)!r} there, "
                        f"{base.get(key)!r} in the base); tuned weights must come from the "
                        f"same base model (set model.base to it)")


@one_at_a_time
def _meta_modules(spec: ModelSpec, component: str) -> dict[str, torch.nn.Module]:
    """The named modules of one component of the base, built without weights. On the meta
    device by torch's thread-local device context, not accelerate's init_empty_weights: that
    patches nn.Module for every thread, and a sweep variant loading its model in another
    thread meanwhile got meta tensors ("Cannot copy out of meta tensor")."""
    if component == "unet":
        config = _base_config(spec, "UNet config", subfolder="unet")
        with torch.device("meta"):
            model = UNet2DConditionModel.from_config(config)
    else:
        from transformers import CLIPTextConfig, CLIPTextModel

        try:
            config = CLIPTextConfig.from_pretrained(spec.base, subfolder=component,
                                                    revision=spec.revision)
        except (OSError, ValueError) as exc:
            raise SmpoError(f"model {spec.label!r}: the LoRA in {spec.weights} adapts "
                            f"{component}, which base model {spec.base!r} does not have") from exc
        with torch.device("meta"):
            model = CLIPTextModel(config)
    return dict(model.named_modules())


def _lora_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    import diffusers

    pipeline_class = getattr(diffusers, _base_config(spec, "pipeline config")["_class_name"],
                             DiffusionPipeline)
    if not hasattr(pipeline_class, "lora_state_dict"):
        raise SmpoError(f"model {spec.label!r}: base model {spec.base!r} "
                        f"({pipeline_class.__name__}) takes no LoRA weights")
    try:
        loaded = pipeline_class.lora_state_dict(spec.weights)
    except (OSError, ValueError, KeyError) as exc:
        first = first_line(exc)
        raise SmpoError(f"model {spec.label!r}: cannot read LoRA weights from {spec.weights} "
                        f"({first}); expected pytorch_lora_weights.safetensors in diffusers' "
                        f"layout (what `save_lora_weights` writes)") from exc
    return loaded[0] if isinstance(loaded, tuple) else loaded


def _check_lora(spec: ModelSpec) -> None:
    """Every LoRA matrix must name a layer of the base and match its width."""
    state = _lora_state(spec)
    matched = [(m, k) for k in state if (m := _LORA_KEY.match(k))]
    if not matched:
        raise SmpoError(f"model {spec.label!r}: {spec.weights} holds no UNet or text-encoder "
                        f"LoRA weights diffusers can load")
    modules: dict[str, dict[str, torch.nn.Module]] = {}
    for match, key in matched:
        component, name = match["component"], match["module"]
        if component not in modules:
            modules[component] = _meta_modules(spec, component)
        layer = modules[component].get(name)
        if layer is None:
            raise SmpoError(f"model {spec.label!r}: the LoRA in {spec.weights} adapts "
                            f"{component}.{name}, which base model {spec.base!r} does not have; "
                            f"tuned weights must come from the same base model")
        shape = tuple(state[key].shape)
        down = match["part"].endswith(("down", "lora_A"))
        width = getattr(layer, "in_features" if down else "out_features", None) or getattr(
            layer, "in_channels" if down else "out_channels", None)
        found = shape[1] if down else shape[0]
        if width != found:
            raise SmpoError(f"model {spec.label!r}: the LoRA in {spec.weights} does not fit "
                            f"base model {spec.base!r}: {component}.{name} is {width} wide "
                            f"there, {found} in the LoRA; tuned weights must come from the "
                            f"same base model")


def check_model(spec: ModelSpec) -> None:
    """Fail with one line, before anything is drawn, when the model cannot load: a base that
    is not a diffusers model, tuned weights that are missing or do not fit the base."""
    _base_config(spec, "pipeline config")
    if spec.weights is not None and not Path(spec.weights).expanduser().exists():
        raise SmpoError(f"model {spec.label!r}: tuned weights {spec.weights!r} do not exist")
    if spec.weights_kind == "unet":
        _check_unet(spec)
    elif spec.weights_kind == "lora":
        _check_lora(spec)


@one_at_a_time
def build_pipeline(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """The model as a diffusers pipeline (SD or SDXL, as its folder says) with a DDIM sampler:
    the base, its VAE replaced if asked, the tuned UNet swapped in or the LoRA loaded."""
    extra: dict[str, object] = {}
    if spec.vae:
        extra["vae"] = AutoencoderKL.from_pretrained(spec.vae, dtype=dtype)
    if spec.weights_kind == "unet":
        extra["unet"] = UNet2DConditionModel.from_pretrained(spec.weights, dtype=dtype)
    if "safety_checker" in DiffusionPipeline.load_config(spec.base, revision=spec.revision):
        # Scores must see what the model drew (and the checker's weights need not load).
        extra |= {"safety_checker": None, "requires_safety_checker": False}
    pipe = DiffusionPipeline.from_pretrained(spec.base, revision=spec.revision, dtype=dtype,
                                             **extra)
    if spec.weights_kind == "lora":
        pipe.load_lora_weights(str(spec.weights))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# --- which images, and where they are kept -------------------------------------------------------


@dataclass(frozen=True)
class ImageJob:
    """One image to draw: image `image` of prompt number `position` of the evaluated set."""

    position: int
    prompt: str
    image: int
    seed: int

    @property
    def name(self) -> str:
        digest = hashlib.sha256(self.prompt.encode()).hexdigest()[:16]
        return f"{digest}-{self.seed}.png"


def image_jobs(prompts: PromptSet, images_per_prompt: int, seed: int,
               positions: Iterable[int] | None = None) -> list[ImageJob]:
    """The images of the prompts at `positions` (default all), prompt by prompt."""
    if not 1 <= images_per_prompt <= MAX_IMAGES_PER_PROMPT:
        raise SmpoError(f"evaluate.images_per_prompt {images_per_prompt}: expected 1 to "
                        f"{MAX_IMAGES_PER_PROMPT}")
    chosen = range(len(prompts)) if positions is None else positions
    return [ImageJob(k, prompts.prompts[k], j, image_seed(seed, prompts.indices[k], j))
            for k in chosen for j in range(images_per_prompt)]


def prompt_chunks(count: int, chunk_prompts: int) -> list[range]:
    """Consecutive ranges of prompt positions: the unit of resumption (and of sharding)."""
    return [range(start, min(start + chunk_prompts, count))
            for start in range(0, count, chunk_prompts)]


@dataclass
class ImageFolder:
    """Where one model's images under one sampling setting are kept."""

    root: Path
    model: ModelSpec
    sampling: Sampling
    folder: Path = field(init=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.root) / self.model.identity() / self.sampling.key()

    def path(self, job: ImageJob) -> Path:
        return self.folder / "images" / job.name

    def missing(self, jobs: Iterable[ImageJob]) -> list[ImageJob]:
        return [job for job in jobs if not self.path(job).is_file()]

    def record(self) -> None:
        """What drew these images, for whoever opens the folder."""
        info = self.folder / "drawn_by.json"
        if not info.is_file():
            write_json(info, {"model": self.model.describe(), "sampling": asdict(self.sampling)})

    def read(self, job: ImageJob) -> Image.Image:
        with Image.open(self.path(job)) as image:
            return image.convert("RGB")


def draw(pipe: DiffusionPipeline, jobs: Sequence[ImageJob], images: ImageFolder,
         batch_size: int, on_batch: Callable[[int], None] | None = None) -> int:
    """Draw the images of `jobs` that are not kept yet; returns how many were drawn.

    Jobs go to the pipeline `batch_size` at a time, in fixed windows of `jobs`, and each image
    is kept (atomically) as soon as its batch is drawn; a window whose images all exist is
    skipped, so a killed run resumes where it stopped, drawing every image in the batch it
    would have had in a clean run.
    """
    drawn = 0
    images.record()
    for start in range(0, len(jobs), batch_size):
        window = list(jobs[start:start + batch_size])
        if images.missing(window):
            generators = [torch.Generator("cpu").manual_seed(job.seed) for job in window]
            results = pipe([job.prompt for job in window], generator=generators,
                           num_inference_steps=images.sampling.steps,
                           guidance_scale=images.sampling.guidance_scale,
                           height=images.sampling.resolution,
                           width=images.sampling.resolution).images
            for job, image in zip(window, results, strict=True):
                if not images.path(job).is_file():
                    with atomic_path(images.path(job)) as tmp:
                        image.save(tmp, format="PNG")
                    drawn += 1
        if on_batch:
            on_batch(len(window))
    return drawn
