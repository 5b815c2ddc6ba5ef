"""A launched "stage" for tests/test_launch.py: each process says who it is; the main process
returns what every process said (`stages.launch.process_main` around a trivial body)."""

from __future__ import annotations

from typing import Any

from stages.launch import process_main


def _process(spec: dict[str, Any]) -> dict[str, Any]:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    return {"processes": gather_object([[state.process_index, state.num_processes]])}


if __name__ == "__main__":
    process_main(None, "tests/test_launch.py's launched probe", _process)
