"""Every knob of the pipeline, defined once, and the registry of the stages they configure.

A profile (configs/NAME.yaml) states only what differs from the defaults here, which are the
paper's method on its main model, Stable Diffusion 1.5 (METHOD.md). `section.key=value`
overrides (value read as YAML) reach nested keys too: `evaluate.metrics.hpsv2=FILE`.

Each stage has one settings section, named like the stage. Fields marked `result=False`
(batch sizes, devices, shard sizes) cannot change what a stage computes, so they stay out of
its cache key. Where a run keeps things and which servers it talks to are environment
variables (smpo_core/environment.py), not settings.

STAGES is the stage graph: the flow, the `smpo` command, the Prefect deployments and
`smpo settings` all read it. Adding a stage is one entry there and its module.
"""

from __future__ import annotations

import difflib
import functools
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from smpo_core.environment import environment
from smpo_core.errors import SmpoError


def runtime_setting(default: Any, description: str) -> Any:
    """A setting that changes how fast or where a stage runs, never what it computes."""
    return Field(default, description=description, json_schema_extra={"result": False})


class Section(BaseModel):
    """One section of a profile (the model, or one stage's settings)."""

    # inf and nan are no setting's value: `train.beta=.inf` is refused, not trained with.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    def result_settings(self) -> dict[str, Any]:
        """The settings that can change this stage's output: the part hashed into its key."""
        kept = {}
        for name, field in type(self).model_fields.items():
            if not is_result_setting(field):
                continue
            kept[name] = getattr(self, name)
        return _plain(kept)

    def borrowed_settings(self, settings: Settings) -> dict[str, Any]:
        """Settings of other sections that this section's values make part of its stage's
        output (and key), by name; none unless a section says so."""
        return {}


def is_result_setting(field: Any) -> bool:
    """False for a `runtime_setting` field: it cannot change what its stage computes."""
    extra = field.json_schema_extra or {}
    return not (isinstance(extra, dict) and extra.get("result") is False)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _plain(value.model_dump())
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class ModelSettings(Section):
    """The base model and where it runs; shared by invert, train and evaluate."""

    base: str = Field(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        description="Base model (SD 1.x/2.x or SDXL): hub id, diffusers folder, or "
        "builtin:tiny-sd / builtin:tiny-sdxl.",
    )
    revision: str | None = Field(None, description="Hub revision of the base model.")
    vae: str | None = Field(
        None, description="A VAE to use instead of the base model's (e.g. SDXL's fp16-fix VAE)."
    )
    unet: str | None = Field(
        None, description="The UNet training starts from, and the trajectory cache is "
        "inverted with (the policy's starting point): a diffusers UNet or pipeline folder, a "
        "hub id, or train:KEY (the UNet an earlier train run wrote into this store, e.g. with "
        "train.method=sft: SFT, then SmPO, as the paper's SD1.5 run). None: the base's UNet.",
    )
    resolution: int = Field(512, gt=0, multiple_of=8, description="Training and evaluation "
                            "image size, px; a multiple of 8, as diffusers pipelines require.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="Weights dtype of the frozen models (VAE, text encoder, reference)."
    )
    device: str = runtime_setting("auto", "auto | cpu | cuda | cuda:N.")
    # GPU fast paths (smpo_core/acceleration.py): the same computation up to float rounding,
    # so not in any key; each a no-op on the CPU. bench/gpu.sh measures each on and off.
    tf32: bool = runtime_setting(True, "TF32 tensor cores for float32 matmuls on a GPU.")
    attention: Literal["sdpa", "classic"] = runtime_setting(
        "sdpa", "Attention kernel: PyTorch's fused scaled_dot_product_attention or the "
        "explicit softmax(QK^T)V.")
    channels_last: bool = runtime_setting(
        False, "Channels-last memory layout for the UNet and VAE on a GPU.")
    compile: list[Literal["unet", "vae", "text_encoder", "text_encoder_2"]] = runtime_setting(
        [], "Parts to torch.compile where they only run inference (invert, evaluate, the "
        "frozen reference); compiling costs minutes once.")


class DownloadSettings(Section):
    """Where the Pick-a-Pic v2 pairs come from (METHOD.md §1)."""

    source: str = Field(
        "yuvalkirstain/pickapic_v2",
        description="Hub dataset id, folder of Parquet files, save_to_disk folder, "
        "or builtin:tiny-pickapic.",
    )
    revision: str | None = Field(None, description="Hub revision of the dataset.")
    split: str = Field("train", description="train, validation, test, validation_unique, ...")
    max_pairs: int | None = Field(None, gt=0, description="Stop after this many usable pairs.")
    min_image_side: int = Field(64, gt=0, description="Pairs with an image whose shorter side "
                                "is below this (px) are dropped as image_size.")
    max_image_pixels: int = Field(89_478_485, gt=0, description="Pairs with an image of more "
                                  "pixels are dropped as image_size, never decoded (PIL's "
                                  "decompression-bomb bound).")
    shard_rows: int = runtime_setting(2048, "Rows per output Parquet shard.")


class ScoreSettings(Section):
    """The reward model that scores every image, and the smoothing of its scores (§2)."""

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
    batch_size: int = runtime_setting(32, "Images per reward-model forward.")
    device: str = runtime_setting("auto", "auto | cpu | cuda | cuda:N.")
    num_processes: Annotated[int, Field(gt=0)] = runtime_setting(
        1, "Processes (GPUs) scoring pair shards side by side under `accelerate launch`; the "
        "labels are the same as one process writes.")


# The train settings that decide which pairs a run draws and at which levels (TrainingPlan).
PLAN_SETTINGS = ("seed", "effective_batch", "max_steps", "timestep_sampling")
# What else the reference's errors at those draws depend on (train.reference_errors=cached):
# the captions dropped, and the autocast precision the reference runs in (as in a train step).
REFERENCE_SETTINGS = ("reference_errors", "empty_caption_prob", "mixed_precision")


class InvertSettings(Section):
    """The ReNoise inversion that caches each pair's latent trajectory (§3)."""

    num_levels: int = Field(5, gt=0, description="K inversion levels, spaced T/K apart.")
    renoise_steps: int = Field(1, ge=0, description="R ReNoise refinements per level; 0 = DDIM.")
    average: Literal["mean", "last"] = Field(
        "mean", description="mean: authors' SmPO code; last: ReNoise fixed-point iteration."
    )
    max_pairs: int | None = Field(
        None, gt=0, description="Cache a random sample of N of all downloaded pairs (what "
        "training consumes: train.max_steps x train.effective_batch); None: every pair."
    )
    seed: int = Field(0, description="Seed of the pair sample and the VAE posterior samples.")
    levels: Literal["all", "planned"] = Field(
        "all", description="all: every pair at all K levels (one cache for any training run, "
        "and for studies); planned: only the (pair, level) latents the training run set by "
        f"train.{', train.'.join(PLAN_SETTINGS)} will read, about (K + 1) / 2 inversion levels "
        "a read pair with invert.batch_size=1 (a batch climbs to the highest level one of its "
        "pairs needs, so that the levels kept are the full cache's bit for bit) and one stored "
        "level per read; training refuses it if it needs more.")
    batch_size: int = runtime_setting(8, "Pairs per inversion batch.")
    shard_pairs: int = runtime_setting(256, "Pairs per safetensors shard.")
    num_processes: Annotated[int, Field(gt=0)] = runtime_setting(
        1, "Processes (GPUs) inverting shards side by side under `accelerate launch`; the "
        "cache is the same as one process writes.")

    def borrowed_settings(self, settings: Settings) -> dict[str, Any]:
        borrowed: dict[str, Any] = {}
        cached_reference = settings.train.reference_errors == "cached"
        if self.levels == "planned" or cached_reference:
            borrowed["train.plan"] = {name: getattr(settings.train, name)
                                      for name in PLAN_SETTINGS}
        if cached_reference:  # the captions dropped are part of the reference's input
            borrowed["train.reference_errors"] = {
                name: getattr(settings.train, name) for name in REFERENCE_SETTINGS}
        return borrowed


class TrainSettings(Section):
    """The SmPO fine-tuning (§4); defaults are the paper's SD1.5 run."""

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
    timestep_sampling: Literal["uniform", "level"] = Field(
        "uniform", description="uniform: t uniform over the whole schedule, one per pair, the "
        "latent taken from the inversion level at or above t (the paper); level: t only on the "
        "K inversion levels (an ablation)."
    )
    lora_rank: int = Field(
        0, ge=0, description="0: fine-tune the whole UNet; r > 0: train rank-r LoRA adapters "
        "on the attention projections only.",
    )
    beta: float = Field(2000.0, gt=0, description="KL strength beta (2000 for SD1.5, 5000 "
                        "for SDXL in the paper).")
    learning_rate: float = Field(1.024e-5, gt=0, description="Peak learning rate (the paper: "
                                 "1e-8 x the effective batch of 1024 pairs).")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up steps, then constant.")
    max_steps: int = Field(200, gt=0, description="Optimiser steps.")
    effective_batch: int = Field(
        1024, gt=0, description="Pairs per optimiser step, over all processes and "
        "accumulated micro-batches (the paper: 1024 = 8 GPUs x 1 x 128).")
    batch_size: Annotated[int, Field(gt=0)] = runtime_setting(
        1, "Pairs per micro-batch on one process; the gradient accumulation is "
        "effective_batch / (batch_size x num_processes), which must be a whole number.")
    weight_decay: float = Field(1e-2, ge=0, description="Decoupled weight decay of the "
                                "optimiser.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradients are clipped to this norm.")
    empty_caption_prob: float = Field(0.2, ge=0, le=1, description="Fraction of pairs "
                                      "trained with the empty caption.")
    optimizer: Literal["adamw", "adafactor"] = Field(
        "adamw", description="adamw (SD1.5 in the paper) or adafactor (SDXL).")
    mixed_precision: Literal["no", "fp16", "bf16"] = Field(
        "fp16", description="Autocast precision on a GPU (always no on the CPU).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute UNet activations in the backward pass to save memory.")
    seed: int = Field(0, description="Seed of the pair order, timesteps, noise and caption "
                      "dropout.")
    reference_errors: Literal["compute", "cached"] = Field(
        "compute", description="compute: the reference UNet's errors r_j in every train step "
        "(one forward per image); cached: the invert stage computes them once, with the "
        "base that inverts (the reference), at every draw of the run set by train."
        f"{', train.'.join(PLAN_SETTINGS + REFERENCE_SETTINGS[1:])}, and training reads "
        "them: one run of a sweep over beta, learning rate or labels no longer runs the "
        "reference, and full fine-tuning holds no frozen copy. Needs method=preference, "
        "trajectory=inversion, trajectory_source=cache; training refuses a cache without "
        "them or made for other draws. Equal to compute up to float rounding (bit for bit "
        "where the device is deterministic: both use train.batch_size batches).")
    checkpoint_every: int = runtime_setting(50, "Save resumable training state every N steps.")
    log_every: int = runtime_setting(1, "Log metrics every N optimiser steps.")
    prefetch: bool = runtime_setting(
        False, "Read the next micro-batch from the trajectory cache in a background thread "
        "while the current one computes (into pinned memory on a GPU). Off by default: on "
        "the CPU it measured 0.91x (make bench); bench/gpu.sh measures the pinned copy.")
    num_processes: Annotated[int, Field(gt=0)] = runtime_setting(
        1, "Processes (GPUs) for training, on all machines together; > 1 runs the training "
        "under `accelerate launch`.")

    @model_validator(mode="after")
    def _whole_accumulation(self) -> TrainSettings:
        per_micro_step = self.batch_size * self.num_processes
        if self.effective_batch % per_micro_step:
            raise ValueError(
                f"train.effective_batch={self.effective_batch} is not a multiple of "
                f"train.batch_size x train.num_processes = {self.batch_size} x "
                f"{self.num_processes} = {per_micro_step}; choose a batch_size that divides "
                f"effective_batch / num_processes")
        return self

    @model_validator(mode="after")
    def _reference_errors_need_a_cached_trajectory(self) -> TrainSettings:
        if self.reference_errors == "cached" and (
                self.method, self.trajectory, self.trajectory_source) != (
                "preference", "inversion", "cache"):
            raise ValueError(
                f"train.reference_errors=cached: the invert stage computes the reference's "
                f"errors on the cached trajectory, for the preference loss; this run has "
                f"method={self.method}, trajectory={self.trajectory}, trajectory_source="
                f"{self.trajectory_source}: use train.reference_errors=compute")
        return self

    @property
    def grad_accum(self) -> int:
        """Micro-batches each process accumulates per optimiser step."""
        return self.effective_batch // (self.batch_size * self.num_processes)


class EvaluateSettings(Section):
    """Base against tuned model on a prompt set, every metric (§5)."""

    prompts: str = Field(
        "pickapic-test-unique", description="Prompt set: pickapic-test-unique | partiprompts | "
        "hpdv2-test (from the hub, or NAME:PATH for a local copy in the published format), "
        "builtin:tiny-prompts, a .txt/.tsv/.csv/.json/Parquet file or folder, or "
        "<hub id>@<split>.",
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
    batch_size: Annotated[int, Field(gt=0)] = runtime_setting(4, "Images per generation batch.")
    metric_batch_size: Annotated[int, Field(gt=0)] = runtime_setting(
        32, "Images per metric-model forward.")
    chunk_prompts: Annotated[int, Field(gt=0)] = runtime_setting(
        64, "Prompts per chunk: scores are kept chunk by chunk (the unit of resumption).")
    num_processes: Annotated[int, Field(gt=0)] = runtime_setting(
        1, "Processes (GPUs) drawing prompt chunks side by side under `accelerate launch`; "
        "the images are the same as one process draws.")


# -- the stage registry -------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: all that the flow, the CLI, the deployments and `smpo
    settings` know of it. Its computation is `compute(run)` in `module` (default
    `stages.<name>`), which may also define TASK_OPTIONS (Prefect task options, e.g. retries).
    """

    name: str
    summary: str  # one line: what it does and writes (CLI help, deployments, `smpo settings`)
    settings: type[Section]  # its section of a profile, under its name
    upstream: tuple[str, ...] = ()  # the stages whose outputs it reads
    shares: tuple[str, ...] = ()  # other sections its output depends on (in its key)
    # Bump when the stage writes something else for the same settings and inputs: old
    # outputs are then recomputed rather than reused.
    version: str = "1"
    module: str | None = None
    deploy_with: tuple[str, ...] = ()  # its deployment smpo/<name> runs these after it

    @property
    def implementation(self) -> str:
        return self.module or f"stages.{self.name}"


def _registry(*stages: Stage) -> dict[str, Stage]:
    return {stage.name: stage for stage in stages}


#: Every stage, in an order where each comes after its upstream stages.
STAGES: dict[str, Stage] = _registry(
    Stage("download", "Pick-a-Pic pairs from the source into normalised Parquet shards; ties, "
          "unlabelled, identical and corrupt pairs dropped.", DownloadSettings, version="3"),
    Stage("score", "Every unique image scored by the reward model; pairs into soft labels p "
          "and w.", ScoreSettings, upstream=("download",)),
    Stage("invert", "ReNoise-inverted latent trajectories of the pairs, cached for training.",
          InvertSettings, upstream=("download",), shares=("model",), version="2"),
    Stage("train", "SmPO fine-tuning of the UNet (or LoRA adapters) against the frozen "
          "reference.", TrainSettings, upstream=("invert", "score"), shares=("model",),
          deploy_with=("evaluate",), version="2"),
    Stage("evaluate", "Base and tuned model generate from the same prompts and seeds; every "
          "metric scores both.", EvaluateSettings, upstream=("train",), shares=("model",),
          version="2"),
)


def check_registry() -> None:
    """The registry is a graph the flow can run: names unique to sections, upstream stages
    registered before their dependants, shared sections that exist."""
    seen: list[str] = []
    for name, stage in STAGES.items():
        if name != stage.name or name in ("profile", "model"):
            raise SmpoError(f"stage registry: entry {name!r} holds stage {stage.name!r}; names "
                            f"must match and differ from 'profile' and 'model'")
        for parent in (*stage.upstream, *stage.deploy_with):
            if parent not in STAGES:
                raise SmpoError(f"stage {name!r}: unknown stage {parent!r} in its registry entry")
        if late := [parent for parent in stage.upstream if parent not in seen]:
            raise SmpoError(f"stage {name!r}: its upstream {late[0]!r} must be registered "
                            f"before it")
        if missing := [s for s in stage.shares if s != "model" and s not in STAGES]:
            raise SmpoError(f"stage {name!r}: shares unknown section {missing[0]!r}")
        seen.append(name)


def check_stages(names: Sequence[str], what: str = "stage") -> list[str]:
    """The names, each a registered stage, or an SmpoError naming the first that is not."""
    for name in names:
        if name not in STAGES:
            raise SmpoError(f"{what} {name!r}: unknown{did_you_mean(name, STAGES)}; expected "
                            f"some of {', '.join(STAGES)}")
    return list(names)


def did_you_mean(given: str, known: Sequence[str]) -> str:
    """`' (did you mean 'train.beta'?)'` for the known name closest to a mistyped one, or ''."""
    close = difflib.get_close_matches(given, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def with_upstream(stages: Sequence[str] | None) -> list[str]:
    """The requested stages (default: all) and every stage they need, in registry order."""
    check_registry()
    needed: set[str] = set()

    def add(stage: str) -> None:
        if stage not in needed:
            needed.add(stage)
            for parent in STAGES[stage].upstream:
                add(parent)

    for stage in check_stages(list(stages or STAGES)):
        add(stage)
    return [s for s in STAGES if s in needed]


# -- a whole profile ----------------------------------------------------------------------


class Settings(BaseModel):
    """A whole profile: the model section and one section per registered stage (the class
    `settings_model()` builds from STAGES; this base holds what every profile has)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    profile: str = Field("custom", description="The profile's name: its file name, recorded "
                         "with every run.")
    model: ModelSettings = Field(default_factory=ModelSettings,
                                 description=ModelSettings.__doc__)

    def __reduce__(self):
        # The composed class is built at run time: pickle the values, rebuild on load.
        return _settings_from_dump, (self.model_dump(),)

    def section(self, name: str) -> Section:
        """A section by name: `model` or a stage's."""
        return getattr(self, name)


def _settings_from_dump(data: dict[str, Any]) -> Settings:
    return settings_model().model_validate(data)


@functools.cache
def _compose(sections: tuple[tuple[str, type[Section], str], ...]) -> type[Settings]:
    fields: dict[str, Any] = {
        name: (cls, Field(default_factory=cls, description=summary))
        for name, cls, summary in sections}
    return create_model("Settings", __base__=Settings, __module__=__name__, **fields)


def settings_model() -> type[Settings]:
    """The profile model of the registered stages: `profile`, `model`, then one section per
    stage, in registry order."""
    return _compose(tuple((s.name, s.settings, s.summary) for s in STAGES.values()))


def section_names() -> list[str]:
    """`model` and the stages' sections, in order."""
    return [name for name, field in settings_model().model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, Section)]


def setting_keys() -> list[str]:
    """Every `section.key` a user may override."""
    return [f"{section}.{name}" for section in section_names()
            for name in settings_model().model_fields[section].annotation.model_fields]


def available_profiles() -> list[str]:
    return sorted(p.stem for p in environment().configs.glob("*.yaml"))


def profile_path(profile: str) -> Path:
    """A profile name in the configs folder ($SMPO_CONFIGS), or a path to a YAML file."""
    path = Path(profile)
    if not path.suffix:
        path = environment().configs / f"{profile}.yaml"
    if not path.is_file():
        raise SmpoError(
            f"profile {profile!r}: no such profile{did_you_mean(profile, available_profiles())};"
            f" expected one of "
            f"{', '.join(available_profiles())} or a path to a YAML file"
        )
    return path


def read_profile(profile: str) -> dict[str, Any]:
    """A profile's own values (what it changes from the defaults), as written."""
    path = profile_path(profile)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SmpoError(f"profile {path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise SmpoError(f"profile {path}: expected a mapping of sections, got "
                        f"{type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.beta=5000` -> (["train", "beta"], 5000); `evaluate.metrics.hpsv2=x` reaches into a
    mapping setting. The value is read as YAML."""
    if "=" not in text:
        raise SmpoError(f"override {text!r}: expected SECTION.KEY=VALUE, e.g. train.beta=5000")
    key, raw = (part.strip() for part in text.split("=", 1))
    path = key.split(".")
    if ".".join(path[:2]) not in setting_keys() or "" in path:
        raise SmpoError(
            f"override {text!r}: unknown setting {'.'.join(path[:2])!r}"
            f"{did_you_mean('.'.join(path[:2]), setting_keys())}; "
            f"run `smpo settings` to list them (e.g. {', '.join(setting_keys()[:4])}, ...)"
        )
    if len(path) > 2 and not _is_mapping(path[0], path[1]):
        raise SmpoError(f"override {text!r}: {path[0]}.{path[1]} is not a mapping, so it has "
                        f"no key {'.'.join(path[2:])!r}")
    if len(path) > 3:
        raise SmpoError(f"override {text!r}: expected SECTION.KEY.NAME=VALUE for one entry of "
                        f"the mapping {path[0]}.{path[1]}")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise SmpoError(f"override {text!r}: value is not valid YAML ({exc})") from None
    return path, value


def _field(section: str, key: str) -> Any:
    return settings_model().model_fields[section].annotation.model_fields[key]


def _is_mapping(section: str, key: str) -> bool:
    return typing.get_origin(_field(section, key).annotation) is dict


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `section.key` in profile data; `section.key.name` changes one entry of the mapping
    the profile (or else the default) holds and keeps its other entries."""
    section, key, *name = path
    values = data.setdefault(section, {})
    if not isinstance(values, dict):
        raise SmpoError(f"profile section {section!r}: expected a mapping of settings, got "
                        f"{values!r}")
    if name:
        current = values.get(key)
        if current is None:
            current = _field(section, key).get_default(call_default_factory=True)
        value = {**current, name[0]: value}
    values[key] = value


def load_settings(profile: str = "tiny", overrides: Sequence[str] = ()) -> Settings:
    """Read a profile (a name in the configs folder or a YAML path), apply overrides."""
    path = profile_path(profile)
    data = read_profile(profile)
    data.setdefault("profile", path.stem)
    for text in overrides:
        apply_override(data, *parse_override(text))
    try:
        return settings_model().model_validate(data)
    except ValidationError as exc:
        raise SmpoError(_one_line(exc, source=str(path), overrides=overrides)) from None


def _one_line(exc: ValidationError, source: str, overrides: Sequence[str]) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if isinstance(err.get("input"), dict):  # a rule across a section's settings
        touched = [o for o in overrides if o.split("=", 1)[0].strip().startswith(f"{key}.")]
        where = f"override {touched[-1]!r}" if touched else f"profile {source}"
        return f"{where}: section {key}: {err['msg'].removeprefix('Value error, ')}"
    given = next((o for o in overrides if o.split("=", 1)[0].strip() == key), None)
    where = f"override {given!r}" if given else f"profile {source}"
    return f"{where}: setting {key}: {err['msg']} (got {err.get('input')!r})"


def describe(settings: Settings) -> list[tuple[str, Any, str]]:
    """(`section.key`, value, description) for every setting, in section order."""
    rows = []
    for section in section_names():
        values = settings.section(section)
        for name, field in type(values).model_fields.items():
            rows.append((f"{section}.{name}", getattr(values, name), field.description or ""))
    return rows


def shared_sections(stage: str) -> tuple[str, ...]:
    """The sections whose result settings go into a stage's key: its own and those it shares."""
    return (stage, *STAGES[stage].shares)
