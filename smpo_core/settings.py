"""Every knob of the pipeline, defined once: profiles (YAML) and `section.key=value` overrides.

Each stage has one settings model. Fields marked `result=False` (batch sizes, devices, shard
sizes) cannot change what a stage computes, so they stay out of its cache key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smpo_core.errors import SmpoError

STAGES = ("download", "score", "invert", "train", "evaluate")
CONFIG_DIR = Path(os.environ.get("SMPO_CONFIGS", Path(__file__).resolve().parents[1] / "configs"))


def _runtime(default: Any, description: str) -> Any:
    """A setting that changes how fast or where a stage runs, never what it computes."""
    return Field(default, description=description, json_schema_extra={"result": False})


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def result_settings(self) -> dict[str, Any]:
        """The settings that can change this stage's output: the part hashed into its key."""
        kept = {}
        for name, field in type(self).model_fields.items():
            extra = field.json_schema_extra or {}
            if isinstance(extra, dict) and extra.get("result") is False:
                continue
            kept[name] = getattr(self, name)
        return _plain(kept)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _plain(value.model_dump())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class ModelSettings(Section):
    base: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Base model (SD or SDXL): hub id, diffusers folder, builtin:tiny-sd(xl).",
    )
    revision: str | None = Field(None, description="Hub revision of the base model.")
    vae: str | None = Field(
        None, description="A VAE to use instead of the base model's (e.g. SDXL's fp16-fix VAE)."
    )
    resolution: int = Field(512, gt=0, description="Training and evaluation image size, px.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="Weights dtype of the frozen models (VAE, text encoder, reference)."
    )
    device: str = _runtime("auto", "auto | cpu | cuda | cuda:N.")


class DownloadSettings(Section):
    source: str = Field(
        "yuvalkirstain/pickapic_v2",
        description="Hub dataset id, folder of Parquet files, save_to_disk folder, "
        "or builtin:tiny-pickapic.",
    )
    revision: str | None = Field(None, description="Hub revision of the dataset.")
    split: str = Field("train", description="train, validation, test, validation_unique, ...")
    max_pairs: int | None = Field(None, gt=0, description="Stop after this many usable pairs.")
    shard_rows: int = _runtime(2048, "Rows per output Parquet shard.")


class ScoreSettings(Section):
    reward_model: str = Field(
        "pickscore",
        description="Reward model kind: pickscore | hpsv2 | imagereward | aesthetic | clipscore.",
    )
    checkpoint: str = Field(
        "yuvalkirstain/PickScore_v1", description="Hub id, local folder or checkpoint file."
    )
    processor: str | None = Field(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        description="Processor (tokenizer + image preprocessing); None = the checkpoint's.",
    )
    bounds: Literal["paper", "fitted", "fitted-quantile", "model"] = Field(
        "paper", description="Reward normalisation bounds for smoothing (METHOD.md §2)."
    )
    gamma: float = Field(10.0, gt=0, description="Sensitivity gamma of the smoothed weight.")
    batch_size: int = _runtime(32, "Images per reward-model forward.")
    device: str = _runtime("auto", "auto | cpu | cuda | cuda:N.")


class InvertSettings(Section):
    num_levels: int = Field(5, gt=0, description="K inversion levels, spaced T/K apart.")
    renoise_steps: int = Field(1, ge=0, description="R ReNoise refinements per level; 0 = DDIM.")
    average: Literal["mean", "last"] = Field(
        "mean", description="mean: authors' SmPO code; last: ReNoise fixed-point iteration."
    )
    max_pairs: int | None = Field(
        None, gt=0, description="Cache only the first N pairs (the ones training will consume)."
    )
    seed: int = Field(0, description="Seed of the VAE posterior samples.")
    batch_size: int = _runtime(8, "Pairs per inversion batch.")
    shard_pairs: int = _runtime(256, "Pairs per safetensors shard.")


class TrainSettings(Section):
    method: Literal["preference", "sft"] = Field(
        "preference", description="preference: SmPO / Diffusion-DPO loss; sft: winner denoising."
    )
    labels: Literal["smoothed", "human"] = Field(
        "smoothed", description="smoothed: reward-model weight w; human: w = ±1 (Diffusion-DPO)."
    )
    trajectory: Literal["inversion", "forward"] = Field(
        "inversion", description="inversion: ReNoise latents; forward: q(x_t|x_0) noise (DPO)."
    )
    trajectory_source: Literal["cache", "online"] = Field(
        "cache", description="cache: the invert stage's latents; online: invert with the policy."
    )
    timestep_sampling: Literal["level", "uniform"] = Field(
        "level", description="level: t on the inversion grid; uniform: t in the interval below."
    )
    lora_rank: int = Field(
        0, ge=0, description="0: fine-tune the whole UNet; r > 0: train rank-r LoRA adapters "
        "on the attention projections only.",
    )
    beta: float = Field(2000.0, gt=0, description="KL strength beta.")
    learning_rate: float = Field(1.024e-5, gt=0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(200, gt=0, description="Optimiser steps.")
    batch_size: int = Field(1, gt=0, description="Pairs per micro-batch.")
    grad_accum: int = Field(128, gt=0, description="Micro-batches per optimiser step.")
    weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    empty_caption_prob: float = Field(0.2, ge=0, le=1)
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    mixed_precision: Literal["no", "fp16", "bf16"] = "fp16"
    gradient_checkpointing: bool = False
    seed: int = 0
    checkpoint_every: int = _runtime(50, "Save resumable training state every N steps.")
    log_every: int = _runtime(1, "Log metrics every N optimiser steps.")
    num_processes: Annotated[int, Field(gt=0)] = _runtime(
        1, "Processes (GPUs) for training; > 1 runs the training under `accelerate launch`.")


class EvaluateSettings(Section):
    prompts: str = Field(
        "builtin:tiny", description="Prompt set: pickapic-test-unique | partiprompts | "
        "hpdv2-test (from the hub, or NAME:PATH for a local copy in the published format), "
        "builtin:tiny, a .txt/.tsv/.csv/.json/Parquet file or folder, or <hub id>@<split>.",
    )
    num_prompts: int | None = Field(
        None, gt=0, description="Evaluate the first N prompts (a styled set: the first of each "
        "style in turn); None: the whole set, as the papers do.",
    )
    images_per_prompt: int = Field(
        1, gt=0, le=1000, description="Images drawn per prompt and model (paired by seed).")
    seed: int = Field(
        0, description="Image j of prompt i (its index in the set) is drawn from generator "
        "seed seed + 1000 i + j, for every model.",
    )
    num_inference_steps: int = Field(50, gt=0, description="DDIM sampling steps.")
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale.")
    metrics: dict[str, str] = Field(
        default_factory=lambda: {
            "pickscore": "yuvalkirstain/PickScore_v1",
            "hpsv2": "xswu/HPSv2/HPS_v2.1_compressed.pt",
            "imagereward": "THUDM/ImageReward/ImageReward.pt",
            "aesthetic": "sac+logos+ava1-l14-linearMSE.pth",
            "clipscore": "openai/clip-vit-large-patch14",
        },
        description="Metric kind -> checkpoint (hub id, local folder or file); each reported "
        "on its published scale.",
    )
    metric_processors: dict[str, str] = Field(
        default_factory=lambda: {
            "pickscore": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            "imagereward": "bert-base-uncased",
            "aesthetic": "openai/clip-vit-large-patch14",
        },
        description="Metric kind -> processor, where it differs from the checkpoint.",
    )
    bootstrap_resamples: int = Field(
        2000, gt=0, description="Bootstrap resamples (over prompts) for the 95% intervals.")
    bootstrap_seed: int = Field(0, description="Seed of the bootstrap resampling.")
    batch_size: Annotated[int, Field(gt=0)] = _runtime(4, "Images per generation batch.")
    metric_batch_size: Annotated[int, Field(gt=0)] = _runtime(
        32, "Images per metric-model forward.")
    chunk_prompts: Annotated[int, Field(gt=0)] = _runtime(
        64, "Prompts per chunk: scores are kept chunk by chunk (the unit of resumption).")


class Settings(BaseModel):
    """A whole profile: the model and one section per stage."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    profile: str = "custom"
    model: ModelSettings = Field(default_factory=ModelSettings)
    download: DownloadSettings = Field(default_factory=DownloadSettings)
    score: ScoreSettings = Field(default_factory=ScoreSettings)
    invert: InvertSettings = Field(default_factory=InvertSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    evaluate: EvaluateSettings = Field(default_factory=EvaluateSettings)


def available_profiles() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def setting_keys() -> list[str]:
    """Every `section.key` a user may override."""
    keys = []
    for section, field in Settings.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += [f"{section}.{name}" for name in field.annotation.model_fields]
    return keys


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.beta=5000` -> (["train", "beta"], 5000); the value is read as YAML."""
    if "=" not in text:
        raise SmpoError(f"override {text!r}: expected SECTION.KEY=VALUE, e.g. train.beta=5000")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if key.strip() not in setting_keys():
        raise SmpoError(
            f"override {text!r}: unknown setting {key.strip()!r}; "
            f"run `smpo settings` to list them (e.g. {', '.join(setting_keys()[:4])}, ...)"
        )
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SmpoError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return path, value


def load_settings(profile: str = "tiny", overrides: list[str] | tuple[str, ...] = ()) -> Settings:
    """Read a profile (a name in configs/ or a YAML path), apply `section.key=value` overrides."""
    path = Path(profile)
    if not path.suffix:
        path = CONFIG_DIR / f"{profile}.yaml"
    if not path.is_file():
        raise SmpoError(
            f"profile {profile!r}: no such profile; expected one of "
            f"{', '.join(available_profiles())} or a path to a YAML file"
        )
    data = yaml.safe_load(path.read_text()) or {}
    data.setdefault("profile", path.stem)
    for text in overrides:
        keys, value = parse_override(text)
        data.setdefault(keys[0], {})[keys[1]] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise SmpoError(_one_line(exc, source=str(path), overrides=overrides)) from None


def _one_line(exc: ValidationError, source: str, overrides: list[str] | tuple[str, ...]) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    given = next((o for o in overrides if o.split("=", 1)[0].strip() == key), None)
    where = f"override {given!r}" if given else f"profile {source}"
    return f"{where}: setting {key}: {err['msg']} (got {err.get('input')!r})"
