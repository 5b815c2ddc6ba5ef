"""What a user may name as a model to evaluate, and the `ModelSpec` each name stands for.

    [LABEL=]REF, REF one of:
    base                    the profile's base model (model.base, model.vae, model.revision)
    train:KEY | train:latest
                            an output of this pipeline's train stage in the store (a key or
                            a unique prefix of one; `latest`: the last one finished), on the
                            base it was trained from
    run:RUN_ID              the train stage of an MLflow run (a train run or its parent)
    unet:PATH               a diffusers UNet folder, on the profile's base
    lora:PATH               LoRA weights (pytorch_lora_weights.safetensors or its folder), on
                            the profile's base
    pipeline:PATH_OR_ID     any diffusers pipeline folder or hub id, as it is
    PATH | HUB_ID           the same, told apart by what the folder holds

The first model of a comparison is its reference (the base, usually).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from smpo_core.errors import SmpoError
from smpo_core.generation import ModelSpec
from smpo_core.refs import looks_local
from smpo_core.settings import Settings
from smpo_core.store import MANIFEST
from smpo_core.worlds import builtins

LORA_FILE = "pytorch_lora_weights.safetensors"
USAGE = ("expected base, train:KEY, train:latest, run:RUN_ID, unet:PATH, lora:PATH, "
         "pipeline:PATH_OR_ID, a diffusers folder or a hub id, optionally as LABEL=REF")


def split_label(text: str) -> tuple[str | None, str]:
    """`tuned=train:ab12` -> ("tuned", "train:ab12"); `base` -> (None, "base")."""
    label, sep, ref = text.partition("=")
    if sep and label and "/" not in label and ":" not in label:
        return label.strip(), ref.strip()
    return None, text.strip()


def base_spec(settings: Settings, store_root: Path, label: str = "base") -> ModelSpec:
    model = settings.model
    return ModelSpec(label, builtins.resolve(model.base, store_root), model.revision,
                     builtins.resolve(model.vae, store_root), ref="base")


def find_train_output(store_root: Path, key: str) -> Path:
    """The complete train output `key` (or a unique prefix, or `latest`) in the store."""
    outputs = sorted((p for p in (Path(store_root) / "train").glob("*")
                      if (p / MANIFEST).is_file()), key=lambda p: (p / MANIFEST).stat().st_mtime)
    if not outputs:
        raise SmpoError(f"model train:{key}: the store {store_root} holds no finished train "
                        f"output; run `smpo run train` first")
    if key == "latest":
        return outputs[-1]
    found = [p for p in outputs if p.name.startswith(key)]
    if len(found) != 1:
        known = ", ".join(p.name for p in outputs[-5:])
        why = "no finished train output" if not found else f"{len(found)} train outputs"
        raise SmpoError(f"model train:{key}: {why} in {store_root} with that key; known: "
                        f"{known}")
    return found[0]


def train_output_spec(folder: Path, store_root: Path, label: str, ref: str) -> ModelSpec:
    """A train stage's output on the base model it was trained from (its manifest says)."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    model = manifest.get("settings", {}).get("model", {})
    weights = manifest.get("weights", "unet")
    if not model.get("base"):
        raise SmpoError(f"model {ref}: {folder} is not a train stage output (its manifest "
                        f"names no base model)")
    return ModelSpec(label, builtins.resolve(model["base"], store_root), model.get("revision"),
                     builtins.resolve(model.get("vae"), store_root),
                     str(Path(folder) / weights), weights, ref)


def _default_label(kind: str, value: str) -> str:
    if kind in ("train", "run"):
        return f"{kind}-{value[:8]}"
    path = Path(value)
    name = path.parent.name if path.name == LORA_FILE else path.name
    return name or value


def _lora_path(path: Path) -> Path:
    return path / LORA_FILE if path.is_dir() else path


def _by_content(path: Path) -> str:
    """What a local folder or file is: a pipeline, a UNet or LoRA weights."""
    if path.is_dir() and (path / "model_index.json").is_file():
        return "pipeline"
    if (path.is_dir() and (path / LORA_FILE).is_file()) or path.suffix == ".safetensors":
        return "lora"
    if path.is_dir() and (path / "config.json").is_file():
        return "unet"
    raise SmpoError(f"model {str(path)!r}: neither a diffusers pipeline folder "
                    f"(model_index.json), a UNet folder (config.json) nor LoRA weights "
                    f"({LORA_FILE})")


def resolve_model(text: str, settings: Settings, store_root: Path,
                  run_output: Callable[[str], Path] | None = None) -> ModelSpec:
    """The `ModelSpec` of one model argument. `run_output(run_id)` finds the train output of
    an MLflow run (the tracking layer passes it; without it `run:` is refused)."""
    label, ref = split_label(text)
    kind, sep, value = ref.partition(":")
    if not sep or kind not in ("train", "run", "unet", "lora", "pipeline", "builtin"):
        kind, value = "", ref
    if ref == "base":
        return base_spec(settings, store_root, label or "base")
    if kind == "train":
        folder = find_train_output(store_root, value)
        return train_output_spec(folder, store_root, label or _default_label(kind, folder.name),
                                 ref)
    if kind == "run":
        if run_output is None:
            raise SmpoError(f"model {ref}: MLflow runs cannot be looked up here")
        return train_output_spec(run_output(value), store_root,
                                 label or _default_label(kind, value), ref)
    if kind == "builtin":
        kind, value = "pipeline", builtins.resolve(ref, store_root)
    base = base_spec(settings, store_root)
    path = Path(value).expanduser()
    if not kind:
        if not value:
            raise SmpoError(f"model {text!r}: empty; {USAGE}")
        if path.exists():
            kind = _by_content(path)
        elif looks_local(value) or value.count("/") != 1:
            raise SmpoError(f"model {value!r}: no such folder, and not a hub id "
                            f"(owner/name); {USAGE}")
        else:
            kind = "pipeline"
    if kind in ("unet", "lora") and not path.exists():
        raise SmpoError(f"model {ref}: no such file or folder {path}")
    label = label or _default_label(kind, value)
    if kind == "pipeline":
        return ModelSpec(label, str(path) if path.exists() else value, ref=ref)
    weights = str(_lora_path(path)) if kind == "lora" else str(path)
    return ModelSpec(label, base.base, base.revision, base.vae, weights, kind, ref)


def start_unet(ref: str | None, store_root: Path) -> str | None:
    """`model.unet` as a loadable folder or hub id: `train:KEY` is the UNet that train run
    wrote into this store (a key or unique prefix: `latest` would change what a stage key
    stands for as runs finish); `builtin:` refs resolve; others pass through."""
    if ref is None:
        return None
    kind, sep, value = ref.partition(":")
    if not (sep and kind == "train"):
        return builtins.resolve(ref, store_root)
    if value == "latest" or not value:
        raise SmpoError(f"model.unet={ref!r}: name the train output by its key (or a unique "
                        f"prefix), e.g. train:3f2a9c; `latest` would change with every run")
    folder = find_train_output(store_root, value)
    weights = json.loads((folder / MANIFEST).read_text()).get("weights", "unet")
    if weights != "unet":
        raise SmpoError(f"model.unet={ref!r}: that train run wrote {weights} weights, not a "
                        f"whole UNet; start from a run with train.lora_rank=0")
    return str(folder / "unet")
