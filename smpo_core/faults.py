"""A test hook: kill -9 at a deterministic point of a stage, as a crash or an OOM kill would.

`SMPO_FAULT=<point>:<n>` (smpo_core/environment.py) makes the process SIGKILL itself the n-th
time it passes `<point>`, right after that unit of work is safely on disk. Points: each stage's
unit of resumption (`POINTS`). Unset, `reached` costs one environment read.
"""

from __future__ import annotations

import os
import signal

POINTS = {
    "download.shard": "a pair shard committed (progress.json updated)",
    "score.shard": "the scores of one pair shard written",
    "invert.shard": "a trajectory shard and its index written",
    "train.checkpoint": "a training checkpoint saved",
    "evaluate.chunk": "one metric's scores of a prompt chunk written",
}
_PASSED: dict[str, int] = {}


def reached(point: str) -> None:
    """Count a pass of `point`; SIGKILL this process on the n-th if SMPO_FAULT asks for it."""
    from smpo_core.environment import environment

    fault = environment().fault
    if not fault:
        return
    name, _, count = fault.rpartition(":")
    if name != point:
        return
    _PASSED[point] = _PASSED.get(point, 0) + 1
    if _PASSED[point] == int(count):
        os.kill(os.getpid(), signal.SIGKILL)
