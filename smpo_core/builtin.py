"""`builtin:` references: the tiny profile's data and models, built into the store on first use.

They are then read through the same paths as real ones (a Parquet folder, `from_pretrained`
folders), so the tiny profile exercises the real loading code.
"""

from __future__ import annotations

from pathlib import Path

from smpo_core import synthetic
from smpo_core.errors import SmpoError

PREFIX = "builtin:"
TINY_PAIRS = 320


def _tiny_pickapic(folder: Path) -> Path:
    if not (folder / "expected_counts.json").is_file():
        synthetic.write_synthetic_pickapic(folder, num_pairs=TINY_PAIRS, seed=0)
    return folder


BUILDERS = {
    "tiny-pickapic": _tiny_pickapic,
    "tiny-sd": lambda folder: synthetic.build_tiny_diffusion(folder, seed=0),
    "tiny-sdxl": lambda folder: synthetic.build_tiny_sdxl(folder, seed=0),
    "tiny-clip": lambda folder: synthetic.build_tiny_clip_reward(folder, seed=0),
}


def resolve(ref: str | None, store_root: Path) -> str | None:
    """A builtin reference becomes its folder in the store (built if missing); others pass."""
    if ref is None or not ref.startswith(PREFIX):
        return ref
    name = ref[len(PREFIX):]
    if name not in BUILDERS:
        raise SmpoError(f"{ref!r}: unknown builtin; expected one of "
                        f"{', '.join(PREFIX + n for n in BUILDERS)}")
    return str(BUILDERS[name](Path(store_root) / "builtin" / name))
