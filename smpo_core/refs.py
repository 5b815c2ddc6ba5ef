"""What a model, checkpoint, dataset or prompt-set reference in the settings names: a local
path, a hub id, or a file inside a hub repository. The rules live here once, so the checks
before a run (flows/pipeline.py) and the loaders agree on what a string means."""

from __future__ import annotations

import os
from pathlib import Path

#: How a reference says "this is a path on this machine", never a hub id.
LOCAL_PREFIXES = (".", "/", "~")
#: The file names published reward-model checkpoints have.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def looks_local(ref: str | os.PathLike) -> bool:
    """Written as a path (`./x`, `/x`, `~/x`): meant as a local file or folder."""
    return str(ref).startswith(LOCAL_PREFIXES)


def is_hub_file(ref: str | os.PathLike) -> bool:
    """`owner/repo/path/in/repo`: a file in a hub repository. Three or more parts, not
    written as a path, and no such local file or folder."""
    text = str(ref)
    return (text.count("/") >= 2 and not looks_local(text)
            and not Path(text).expanduser().exists())
