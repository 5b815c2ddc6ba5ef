"""`accelerate launch` of a stage's work on several processes, on one machine or several.

A stage whose `<stage>.num_processes` is above 1 writes what its processes need into
`launch.json` in its output folder and launches its own module under `accelerate launch`
(torch.distributed.run: DDP over NCCL on GPUs, gloo on the CPU). Each process calls the
module's `process_main` body with that spec; the main process's return value comes back to the
stage through `launch-result.json`. The launched processes' output is streamed into the stage
log line by line. The stage modules import Prefect and MLflow (stages.common, stages.tracking)
only where the stage's own process needs them: every launched process is spared their seconds.

Several machines: each machine runs the same `smpo run` on a store all of them see, with
accelerate's own multi-machine settings from the environment (SMPO_NUM_MACHINES,
SMPO_MACHINE_RANK, SMPO_MAIN_PROCESS_IP, SMPO_MAIN_PROCESS_PORT, or an accelerate config file in
SMPO_ACCELERATE_CONFIG; smpo_core/environment.py). `num_processes` counts the processes of all
machines together, as accelerate's does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smpo_core.environment import environment
from smpo_core.errors import SmpoError
from smpo_core.store import atomic_path

LAUNCH_SPEC = "launch.json"  # what the launched processes do: settings and folders
LAUNCH_RESULT = "launch-result.json"  # the main process's summary, read back by the stage
ERROR_LINE = "error in stage process"  # a launched process's one-line failure
ROOT = Path(__file__).resolve().parents[1]
PROGRESS_LINE = re.compile(r"progress (\d+)$")  # a process's line "... progress N": N more done

if TYPE_CHECKING:  # the launched processes import neither Prefect nor MLflow
    from stages.common import StageRun


def launch_command(num_processes: int, module: str, spec: Path, cuda: bool,
                   mixed_precision: str = "no") -> list[str]:
    """`accelerate launch` of `module` on `num_processes` processes (of all machines).

    `--multi_gpu` selects torch.distributed.run, which starts the processes, on the CPU too
    (`--cpu` would start a single one); there the processes' default backend is gloo. On one
    machine, port 0: a free port, so two launches on one machine do not collide.
    """
    env = environment()
    command = [sys.executable, "-m", "accelerate.commands.launch"]
    if env.accelerate_config:
        command += ["--config_file", str(env.accelerate_config)]
    if env.num_machines > 1:
        if not env.main_process_ip or not env.main_process_port:
            raise SmpoError(f"SMPO_NUM_MACHINES={env.num_machines}: the machines meet on "
                            f"machine 0; set SMPO_MAIN_PROCESS_IP and SMPO_MAIN_PROCESS_PORT "
                            f"to its address and a free port (the same on every machine)")
        if env.machine_rank >= env.num_machines or num_processes % env.num_machines:
            raise SmpoError(f"SMPO_MACHINE_RANK={env.machine_rank} of SMPO_NUM_MACHINES="
                            f"{env.num_machines} with {num_processes} processes: expected a "
                            f"rank below the machine count and processes a multiple of it")
    port = env.main_process_port or 0
    command += ["--multi_gpu", "--num_processes", str(num_processes),
                "--num_machines", str(env.num_machines), "--machine_rank", str(env.machine_rank),
                "--mixed_precision", mixed_precision if cuda else "no",
                "--dynamo_backend", "no", "--main_process_port", str(port)]
    if env.main_process_ip:
        command += ["--main_process_ip", env.main_process_ip]
    return [*command, "-m", module, "--spec", str(spec)]


def launch(run: StageRun, module: str, num_processes: int, spec: dict[str, Any],
           on_line: Callable[[str], None] | None = None, cuda: bool = False,
           mixed_precision: str = "no") -> dict[str, Any]:
    """Run `module`'s `process_main` on `num_processes` processes; the main process's
    result. Every line they print goes to the stage log (and to `on_line`)."""
    spec_file, result = run.out_dir / LAUNCH_SPEC, run.out_dir / LAUNCH_RESULT
    result.unlink(missing_ok=True)
    with atomic_path(spec_file) as tmp:  # every machine's stage writes it, alike
        tmp.write_text(json.dumps(spec | {"result": str(result), "cpu": not cuda}, indent=1))
    command = launch_command(num_processes, module, spec_file, cuda, mixed_precision)
    run.log("launching %s", " ".join(command))
    env = os.environ | {"PYTHONUNBUFFERED": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                    os.environ.get("PYTHONPATH")]))}
    tail: deque[str] = deque(maxlen=25)
    errors: list[str] = []
    # Same session as this worker: cancelling the flow run must take the processes down too.
    with subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        try:
            for line in process.stdout:
                line = line.rstrip()
                tail.append(line)
                if line.startswith(ERROR_LINE):
                    errors.append(line)
                run.log("%s", line)
                if on_line:
                    on_line(line)
        except BaseException:
            process.terminate()  # torch.distributed.run passes it on to the processes
            raise
    if process.returncode != 0 or not result.is_file():
        raise SmpoError(
            f"{run.stage}: `accelerate launch` of {num_processes} processes failed "
            f"(exit status {process.returncode}): "
            + ("\n".join(errors) if errors else "its last lines:\n" + "\n".join(tail))
            + f"\n(the whole output is in the stage log); fix the cause, or set "
            f"{run.stage}.num_processes=1 to run in the stage's process")
    return json.loads(result.read_text())


def say(message: str, *args: Any) -> None:
    """A line of a launched process, for the stage log."""
    print(message % args if args else message, flush=True)


def process_main(argv: list[str] | None, description: str,
                 body: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The entry point of each launched process: `body(spec)` on every process; the main
    process writes its result for the stage. Every process waits for all before it exits,
    so the result and every process's shards exist when the launch returns, on every machine.
    """
    from accelerate import PartialState

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--spec", type=Path, required=True, help="the stage's launch.json")
    spec = json.loads(parser.parse_args(argv).spec.read_text())
    # Joins the process group before the body asks who it is: without cpu=True, accelerate
    # finds no GPU, ignores torch.distributed.run's ranks, and every process would take
    # itself for process 0 of 1 and do all the work.
    state = PartialState(cpu=spec["cpu"])
    try:
        summary = body(spec)
    except Exception as exc:  # the stage shows this line; the traceback follows in the log
        say("%s %d: %s: %s", ERROR_LINE, state.process_index, type(exc).__name__, exc)
        raise
    if state.is_main_process:
        with atomic_path(Path(spec["result"])) as tmp:
            tmp.write_text(json.dumps(summary))
    state.wait_for_everyone()
