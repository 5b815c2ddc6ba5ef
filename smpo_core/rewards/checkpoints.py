"""Reading published reward-model checkpoint files, and caching what they convert into.

The official HPSv2, ImageReward and LAION-aesthetic weights are plain `torch.save` files in
their authors' own layouts. Everything here fails at load time with a message that names the
model and the file, before any image is read.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from smpo_core.errors import SmpoError, first_line
from smpo_core.refs import is_hub_file
from smpo_core.store import build_once


def checkpoint_file(model: str, checkpoint: str | os.PathLike) -> Path:
    """The checkpoint as an existing local file, or an SmpoError naming model and path.

    `owner/repo/path/in/repo` (three or more parts, not a local path) names a file on the
    hub: it is fetched into the hub cache once.
    """
    path = Path(checkpoint).expanduser()
    text = str(checkpoint)
    if is_hub_file(text):
        return _hub_file(model, text)
    if not path.exists():
        raise SmpoError(f"reward model {model}: checkpoint file {text!r} does not exist; "
                        f"give the published file's path or owner/repo/file on the hub")
    if not path.is_file():
        raise SmpoError(f"reward model {model}: checkpoint {str(checkpoint)!r} is a folder; "
                        f"expected the published checkpoint file itself")
    return path


def _hub_file(model: str, ref: str) -> Path:
    from huggingface_hub import hf_hub_download

    owner, repo, filename = ref.split("/", 2)
    try:
        return Path(hf_hub_download(repo_id=f"{owner}/{repo}", filename=filename))
    except Exception as exc:  # offline, gone, gated: all mean "not here"
        raise SmpoError(f"reward model {model}: could not fetch {ref!r} from the hub "
                        f"({first_line(exc)}); download the published file and give its "
                        f"local path") from exc


def read_state_dict(model: str, path: Path, required: Iterable[str],
                    expected: str) -> dict[str, torch.Tensor]:
    """The tensors of a `torch.save` file, unwrapped from {"state_dict": ...} and from a
    DataParallel "module." prefix. `required` keys must all be present; `expected` describes
    the format for the error message."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors alike for bad files
        raise SmpoError(f"reward model {model}: {path} is not a readable torch checkpoint "
                        f"({first_line(exc)}); expected {expected}") from exc
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise SmpoError(f"reward model {model}: {path} holds a {type(loaded).__name__}, not a "
                        f"state dict; expected {expected}")
    state = {k.removeprefix("module."): v for k, v in loaded.items()
             if isinstance(v, torch.Tensor)}
    missing = sorted(set(required) - set(state))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3
                                          else "")
        raise SmpoError(f"reward model {model}: {path} lacks {shown}; expected {expected}")
    return state


def count_blocks(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many numbered blocks `prefix{i}.` the state dict holds (0, 1, ... without gaps)."""
    indices = {int(k[len(prefix):].split(".", 1)[0]) for k in state
               if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    if indices != set(range(len(indices))):
        raise ValueError(f"blocks {prefix}N are not numbered 0..N-1: {sorted(indices)}")
    return len(indices)


def load_exactly(module: nn.Module, state: Mapping[str, torch.Tensor], model: str,
                 path: Path) -> None:
    """Load converted weights; any missing, unexpected or misshapen tensor is a format error."""
    try:
        result = module.load_state_dict(dict(state), strict=False)
    except RuntimeError as exc:  # a size mismatch
        first = str(exc).strip().splitlines()[-1].strip()
        raise SmpoError(f"reward model {model}: {path} does not fit the architecture read "
                        f"from it: {first}") from exc
    problems = [f"missing {k}" for k in result.missing_keys]
    problems += [f"unexpected {k}" for k in result.unexpected_keys]
    if problems:
        raise SmpoError(f"reward model {model}: {path} is not in the expected layout: "
                        f"{', '.join(problems[:3])}" + (" ..." if len(problems) > 3 else ""))


class LinearStack(nn.Module):
    """The MLP head that ImageReward and the LAION aesthetic predictor publish: Linear layers
    (with Dropout between them, hence gaps in the numbering) and no activation at all, exactly
    as in the authors' `nn.Sequential`. Built from the state dict's `layers.N.*` shapes."""

    def __init__(self, state: Mapping[str, torch.Tensor], prefix: str = "layers."):
        super().__init__()
        indices = sorted({int(k[len(prefix):].split(".")[0]) for k in state
                          if k.startswith(prefix) and k.endswith(".weight")})
        if not indices:
            raise ValueError(f"no {prefix}N.weight tensors")
        self.layers = nn.ModuleDict()
        for i in indices:
            weight = state[f"{prefix}{i}.weight"]
            if weight.ndim != 2:
                raise ValueError(f"{prefix}{i}.weight is {tuple(weight.shape)}, not a matrix")
            self.layers[str(i)] = nn.Linear(weight.shape[1], weight.shape[0])
        linears = list(self.layers.values())
        widths = [linear.in_features for linear in linears] + [linears[-1].out_features]
        if any(a.out_features != b.in_features for a, b in itertools.pairwise(linears)):
            raise ValueError(f"layer widths do not chain: {widths}")
        self.in_features, self.out_features = widths[0], widths[-1]
        self.load_state_dict({f"layers.{k[len(prefix):]}": v for k, v in state.items()
                              if k.startswith(prefix)})

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        for layer in self.layers.values():
            features = layer(features)
        return features


def mlp_head(model: str, path: Path, state: Mapping[str, torch.Tensor],
               prefix: str) -> LinearStack:
    """The published MLP head under `prefix`, or an SmpoError naming model and path."""
    try:
        head = LinearStack(state, prefix)
    except (ValueError, RuntimeError) as exc:
        raise SmpoError(f"reward model {model}: the MLP head in {path} is malformed ({exc})"
                        ) from exc
    if head.out_features != 1:
        raise SmpoError(f"reward model {model}: the MLP head in {path} has "
                        f"{head.out_features} outputs; expected one score")
    return head


def cached_conversion(cache_dir: Path | None, folder_name: str, marker: str,
                      build: Callable[[Path], None]) -> Path | None:
    """`cache_dir/folder_name`, built once (see `store.build_once`). None when there is no
    cache."""
    if cache_dir is None:
        return None
    return build_once(Path(cache_dir) / folder_name, marker, build)
