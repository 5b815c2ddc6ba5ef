"""A launched "stage" for tests/test_launch.py: each process says who it is and which of
Prefect and MLflow the stage modules brought in (none: they cost seconds in every process);
the main process returns what every process said (`stages.launch.process_main`)."""

from __future__ import annotations

import sys
from typing import Any

from stages.launch import process_main


def _process(spec: dict[str, Any]) -> dict[str, Any]:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    import stages.evaluate
    import stages.invert
    import stages.score
    import stages.train  # noqa: F401  (what a launched stage process imports)

    state = PartialState()
    return {"processes": gather_object([[state.process_index, state.num_processes]]),
            "imported": sorted(name for name in ("prefect", "mlflow") if name in sys.modules)}


if __name__ == "__main__":
    process_main(None, "tests/test_launch.py's launched probe", _process)
