"""Model loading and building, one thread at a time.

While diffusers and transformers load a model they patch torch for the whole process, not
the loading thread: accelerate's `init_empty_weights` swaps `nn.Module.register_parameter`
for one that puts parameters on the meta device, `no_init_weights` turns the `torch.nn.init`
functions into no-ops, and a `dtype` argument sets torch's default dtype. A model built in
another thread meanwhile gets meta or uninitialised weights, and two loads at once can
restore each other's patch, leaving every later model in the process on the meta device
("Cannot copy out of meta tensor"). A sweep runs its variants as threads of one process, so
everything in smpo_core that loads or builds modules holds this one lock while it does, and
the random draws that decide a run (noise, caption drops) name float32 instead of relying on
the default dtype, which a load in another thread can change for a moment.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

MODEL_LOCK = threading.RLock()  # reentrant: loaders call each other (load_diffusion -> load_unet)

P = ParamSpec("P")
R = TypeVar("R")


def one_at_a_time(build: Callable[P, R]) -> Callable[P, R]:
    """`build` holds MODEL_LOCK while it runs."""

    @functools.wraps(build)
    def locked(*args: P.args, **kwargs: P.kwargs) -> R:
        with MODEL_LOCK:
            return build(*args, **kwargs)

    return locked
