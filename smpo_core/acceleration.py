"""GPU fast paths: settings that change how fast the same computation runs, not what it is.

Each is a `model.*` runtime setting (so not in any stage key) and each is a no-op where it
does not apply (the CPU): TF32 matmuls, the attention kernel (PyTorch's fused SDPA or the
classic three-matmul attention), channels-last memory layout, `torch.compile` of the frozen
parts used for inference only (a compiled module that is trained would recompile on every
shape and graph break of the backward pass; inference shapes are fixed). `Prefetcher` loads
cache rows ahead into pinned host memory, so their copy to the GPU overlaps compute; the
training loop reads the next micro-batch through it (`train.prefetch`, `CachedPairs`).
`bench/gpu.sh` measures each fast path on and off, `make bench` the prefetch on the CPU.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

COMPILABLE = ("unet", "vae", "text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class FastPaths:
    """Which fast paths to use (the `model` section's runtime settings)."""

    tf32: bool = True
    attention: str = "sdpa"  # "sdpa" | "classic"
    channels_last: bool = False
    compile: tuple[str, ...] = field(default_factory=tuple)  # parts, see COMPILABLE

    @classmethod
    def from_settings(cls, model_settings: Any) -> FastPaths:
        return cls(tf32=model_settings.tf32, attention=model_settings.attention,
                   channels_last=model_settings.channels_last,
                   compile=tuple(model_settings.compile))

    def __post_init__(self) -> None:
        if self.attention not in ("sdpa", "classic"):
            raise ValueError(f"attention must be sdpa or classic, got {self.attention!r}")
        if unknown := [p for p in self.compile if p not in COMPILABLE]:
            raise ValueError(f"compile: unknown part {unknown[0]!r}; expected some of "
                             f"{', '.join(COMPILABLE)}")


def set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 tensor-core matmuls and convolutions for float32 work on a CUDA device (Ampere
    and later; 10-bit mantissa products, float32 accumulation)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def set_attention(module: torch.nn.Module, kind: str) -> None:
    """Every diffusers attention layer of `module` on PyTorch's fused scaled-dot-product
    attention (`sdpa`, diffusers' default) or on the explicit softmax(QK^T)V (`classic`)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if hasattr(module, "set_attn_processor"):
        module.set_attn_processor(AttnProcessor2_0() if kind == "sdpa" else AttnProcessor())


def prepare_module(module: torch.nn.Module, paths: FastPaths, device: torch.device,
                   name: str, inference: bool) -> torch.nn.Module:
    """One diffusion part with the fast paths that apply to it: the attention kernel, and on a
    GPU channels-last convolutions and, for inference only, `torch.compile`. Returns the
    module to call (a compiled wrapper shares its parameters)."""
    if name in ("unet", "vae"):
        set_attention(module, paths.attention)
    if device.type != "cuda":
        return module
    if paths.channels_last and name in ("unet", "vae"):
        module.to(memory_format=torch.channels_last)
    if inference and name in paths.compile:
        module = torch.compile(module, mode="max-autotune-no-cudagraphs", fullgraph=False)
    return module


def prepare_for_inference(model: Any, paths: FastPaths) -> Any:
    """A `DiffusionModel` (inversion, generation) with the fast paths on its parts."""
    set_tf32(paths.tf32, model.device)
    for name in COMPILABLE:
        part = getattr(model, name, None)
        if part is not None:
            setattr(model, name, prepare_module(part, paths, model.device, name, inference=True))
    return model


class Prefetcher:
    """Loads the next item in a background thread while the current one is used.

    `load(key)` returns a dict of CPU tensors; `get(key)` returns that dict on `device`,
    waiting for it if it was `ahead`ed, loading it now otherwise. On a GPU the tensors are
    pinned and copied without blocking, so the copy overlaps the step's compute.
    """

    def __init__(self, load: Callable[[Any], dict[str, torch.Tensor]], device: torch.device,
                 pin: bool = True):
        self.load, self.device = load, device
        self.pin = pin and device.type == "cuda"
        self._pending: dict[Any, tuple[threading.Thread, dict]] = {}

    def _fetch(self, key: Any) -> dict[str, torch.Tensor]:
        tensors = self.load(key)
        return {k: v.pin_memory() if self.pin else v for k, v in tensors.items()}

    def ahead(self, key: Any) -> None:
        """Start loading `key` in the background."""
        if key in self._pending:
            return
        box: dict = {}

        def run() -> None:
            try:
                box["value"] = self._fetch(key)
            except BaseException as exc:  # re-raised in get(), in the caller's thread
                box["error"] = exc

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._pending[key] = (thread, box)

    def get(self, key: Any) -> dict[str, torch.Tensor]:
        if key in self._pending:
            thread, box = self._pending.pop(key)
            thread.join()
            if "error" in box:
                raise box["error"]
            tensors = box["value"]
        else:
            tensors = self._fetch(key)
        return {k: v.to(self.device, non_blocking=self.pin) for k, v in tensors.items()}
