"""Fixtures for the tests that run smpo the way its users do: `make serve`, a deployment run on
the worker, the MLflow server and its UI. One served stack and one `smpo/full` run per test
session, shared by tests/test_deployments.py and tests/test_mlflow_ui.py."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = REPO / "test-artifacts"
# Every stage runs for real on the tiny profile, on fewer pairs, steps and prompts.
FAST = ["download.max_pairs=16", "train.max_steps=4", "evaluate.num_prompts=4",
        "evaluate.num_inference_steps=4"]
SERVICES = ("prefect-server", "mlflow-server", "worker")
# Tests that run the flow in-process start Prefect's temporary server themselves: as in the CLI
# (flows/cli.py), allow it the minute it takes on 2 busy cores rather than the default 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


# `make test` runs on two pytest-xdist workers (`-n 2`): while one waits on a server or a
# subprocess, the other computes. Each module stays on one worker, so that its module-scoped
# runs are made once, and the modules sharing the served stack (a session fixture) stay
# together for the same reason. The slowest start first, so that no worker is left alone with
# a long one at the end (measured: CPU seconds of each module on 2 cores).
SERVED_MODULES = ("test_deployments", "test_mlflow_ui")
SLOW_FIRST = ("test_faults", "served", "test_pipeline", "test_sharded", "test_compare",
              "test_sweep", "test_planned_cache")


def _work_unit(nodeid: str) -> str:
    module = nodeid.split("::")[0].rsplit("/", 1)[-1].removesuffix(".py")
    return "served" if module in SERVED_MODULES else module


@pytest.hookimpl(optionalhook=True)  # an xdist hook: plain `pytest` runs without it
def pytest_xdist_make_scheduler(config, log):
    """Whole modules as xdist's units of work, in collection order (xdist's own `loadgroup`
    cannot group here: it renames node ids, which pytest 9 no longer reads)."""
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _work_unit(nodeid)

    config.option.loadscopereorder = False  # keep SLOW_FIRST's order, not "most tests first"
    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    for item in items:  # a new module on the served stack must join its unit of work
        if "served" in item.fixturenames and _work_unit(item.nodeid) != "served":
            raise pytest.UsageError(f"{item.nodeid} uses the served stack: add its module to "
                                    f"SERVED_MODULES in tests/conftest.py")

    def rank(item) -> int:
        unit = _work_unit(item.nodeid)
        return SLOW_FIRST.index(unit) if unit in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the order within a module is kept


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on now; held open together so that they differ."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def serve_env(store: Path, prefect_port: int, mlflow_port: int) -> dict[str, str]:
    """The environment of `make serve` / `make stop` for a store and ports of a test's own."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "SMPO_EXPERIMENT", "SMPO_WORK_POOL")}
    return env | {"SMPO_STORE": str(store), "SMPO_PREFECT_PORT": str(prefect_port),
                  "SMPO_MLFLOW_PORT": str(mlflow_port),
                  "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
                  "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def make(target: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`make <target>` in the checkout with this interpreter's environment, which is installed
    already (-o: the install stamp is not remade even when pyproject.toml is newer)."""
    if shutil.which("make") is None:
        pytest.skip("`make` is not installed")
    venv = Path(sys.prefix)
    return subprocess.run(
        ["make", "-C", str(REPO), f"VENV={venv}", "-o", str(venv / ".installed"), target],
        env=env, capture_output=True, text=True, timeout=timeout, check=False)


@dataclass
class DeploymentRun:
    name: str
    flow_run_id: str
    output: str
    returncode: int | None = None  # of `prefect deployment run --watch`; None unwatched
    state: str | None = None  # the terminal state type, once waited for


@dataclass
class Served:
    """A stack started by `make serve` on a temporary store and free ports."""

    store: Path
    prefect_port: int
    mlflow_port: int
    env: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)  # after the first `make serve`
    pids_after_second_serve: dict[str, int] = field(default_factory=dict)
    second_serve_output: str = ""

    @property
    def prefect_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def make(self, target: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return make(target, self.env, timeout)

    def recorded_pids(self) -> dict[str, int]:
        pids = {}
        for name in SERVICES:
            file = self.store / ".serve" / f"{name}.pid"
            if file.is_file():
                pids[name] = json.loads(file.read_text())["pid"]
        return pids

    def prefect(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False,
                              cwd=REPO)

    def run_deployment(self, name: str, overrides: list[str], watch: bool = True,
                       flow: str = "smpo", **params: Any) -> DeploymentRun:
        """`prefect deployment run <flow>/<name> [--watch]` with the tiny profile, this store."""
        params = {"profile": "tiny", "store": str(self.store), "overrides": overrides} | params
        args = [arg for key, value in params.items()
                for arg in ("-p", f"{key}={json.dumps(value)}")]
        if watch:
            args += ["--watch", "--watch-interval", "2", "--watch-timeout", "420"]
        done = self.prefect("deployment", "run", f"{flow}/{name}", *args, timeout=480)
        output = done.stdout + done.stderr
        found = re.search(r"UUID: ([0-9a-f-]{36})", output)
        assert found, f"no flow run created by {flow}/{name}:\n{output[-3000:]}"
        return DeploymentRun(name, found.group(1), output, done.returncode if watch else None)

    def final_state(self, flow_run_id: str, timeout: float = 420) -> str:
        """The flow run's terminal state type (COMPLETED, FAILED, ...), waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.prefect_api(f"/flow_runs/{flow_run_id}")["state"]
            if state["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return state["type"]
            assert time.monotonic() < deadline, f"flow run {flow_run_id}: still {state['type']}"
            time.sleep(2)

    def prefect_api(self, path: str, body: dict | None = None) -> Any:
        return _http_json(f"{self.prefect_url}/api{path}", body)

    def mlflow_api(self, path: str, body: dict | None = None) -> Any:
        return _http_json(f"{self.mlflow_url}/api/2.0/mlflow{path}", body)

    def experiment_id(self) -> str:
        found = self.mlflow_api("/experiments/get-by-name?experiment_name=smpo")
        return found["experiment"]["experiment_id"]

    def search_runs(self, filter_string: str) -> list[dict]:
        found = self.mlflow_api("/runs/search", {"experiment_ids": [self.experiment_id()],
                                                 "filter": filter_string, "max_results": 100})
        return found.get("runs", [])

    def mlflow_runs(self, flow_run_id: str) -> tuple[dict, dict[str, dict]]:
        """The MLflow parent run of a flow run and its nested stage runs, by stage."""
        parents = self.search_runs(f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
        assert len(parents) == 1, f"{len(parents)} MLflow runs for flow run {flow_run_id}"
        parent = parents[0]
        children = self.search_runs(f"tags.`mlflow.parentRunId` = '{parent['info']['run_id']}'")
        return parent, {tags(run)["smpo.stage"]: run for run in children}


def tags(run: dict) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def _http_json(url: str, body: dict | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


@pytest.fixture(scope="session")
def served(request, tmp_path_factory) -> Served:
    """`make serve` twice (the second must start nothing); `make stop` twice at the end, also
    when a test or the start fails, and then nothing it started may be left running."""
    if shutil.which("make") is None:
        pytest.skip("`make` is not installed")
    store = tmp_path_factory.mktemp("served-store")
    prefect_port, mlflow_port = free_ports(2)
    env = serve_env(store, prefect_port, mlflow_port)
    stack = Served(store, prefect_port, mlflow_port, env)
    request.addfinalizer(lambda: _stop(stack))

    first = stack.make("serve")
    assert first.returncode == 0, f"make serve failed:\n{first.stdout}\n{first.stderr}"
    stack.pids = stack.recorded_pids()
    second = stack.make("serve")
    assert second.returncode == 0, f"second make serve failed:\n{second.stdout}{second.stderr}"
    stack.second_serve_output = second.stdout
    stack.pids_after_second_serve = stack.recorded_pids()
    return stack


def _stop(stack: Served) -> None:
    pids = stack.pids or stack.recorded_pids()
    first = stack.make("stop", timeout=120)
    second = stack.make("stop", timeout=120)
    logs = ARTIFACTS / "serve-logs"
    logs.mkdir(parents=True, exist_ok=True)
    for log in (stack.store / ".serve").glob("*.log"):
        shutil.copy(log, logs / log.name)
    left = [pid for pid in pids.values() if _alive(pid)]
    for pid in left:  # never leave a server behind, even when `make stop` is broken
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
    ports = [p for p in (stack.prefect_port, stack.mlflow_port) if port_answers(p)]
    assert first.returncode == 0, f"make stop failed:\n{first.stdout}{first.stderr}"
    assert second.returncode == 0 and "nothing runs" in second.stdout, second.stdout
    assert not left, f"`make stop` left these running: {left}"
    assert not ports, f"still listening after `make stop`: {ports}"


@dataclass
class FullRun:
    run: DeploymentRun
    parent: dict
    stages: dict[str, dict]
    experiment_id: str


@pytest.fixture(scope="session")
def full_run(served: Served) -> FullRun:
    """`prefect deployment run smpo/full --watch` on the served worker, once per session."""
    run = served.run_deployment("full", FAST)
    assert run.returncode == 0, f"smpo/full did not complete:\n{run.output[-4000:]}"
    parent, stages = served.mlflow_runs(run.flow_run_id)
    return FullRun(run, parent, stages, served.experiment_id())


@pytest.fixture(scope="session")
def beta_run(served: Served, full_run: FullRun) -> FullRun:
    """`prefect deployment run smpo/train` with train.beta=5000 after smpo/full: download,
    score and invert reused, train and evaluate run."""
    run = served.run_deployment("train", [*FAST, "train.beta=5000"])
    assert run.returncode == 0, f"smpo/train did not complete:\n{run.output[-4000:]}"
    parent, stages = served.mlflow_runs(run.flow_run_id)
    return FullRun(run, parent, stages, served.experiment_id())
