"""`make serve` / `make stop`: Prefect server, work pool, worker and MLflow server on this machine.

    python -m flows.serve start     start what is not running yet, register the deployments
    python -m flows.serve stop      end exactly what `start` started
    python -m flows.serve status    what runs, and where
    python -m flows.serve deploy    only register the deployments, on $PREFECT_API_URL

Settings come from the environment (smpo_core/environment.py): SMPO_STORE (the stage store,
default ./smpo-store), SMPO_PREFECT_PORT (4200), SMPO_MLFLOW_PORT (5000), SMPO_WORK_POOL
(smpo-local). Everything listens on 127.0.0.1 only.

The deployments are the stage registry's (smpo_core/settings.py STAGES): smpo/full and one per
stage, written with prefect.yaml's shared parts into `<store>/.serve/prefect.yaml`.

The MLflow server serves the store's own tracking database and artifact folder, the ones
`smpo run` writes without a server, so runs logged either way appear side by side in its UI.
The Prefect server keeps its database in the store too (`prefect.db`): one store, one history.
Process ids, logs and the ports in use live in `<store>/.serve/`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import quote

import psutil
import yaml

from smpo_core.environment import Environment, environment
from smpo_core.errors import SmpoError
from smpo_core.settings import STAGES
from smpo_core.store import Store

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's own `prefect` and `mlflow` commands
DEFAULT_POOL = Environment.model_fields["work_pool"].default
ENTRYPOINT = "flows/pipeline.py:smpo"
COMPARE_ENTRYPOINT = "flows/compare.py:compare"
SWEEP_ENTRYPOINT = "flows/sweep.py:sweep"
SERVICES = ("prefect-server", "mlflow-server", "worker")  # start order; stop goes backwards
START_TIMEOUT = 180.0  # seconds; a cold start on 2 busy cores takes ~10-30


@dataclass(frozen=True)
class Config:
    store: Path
    prefect_port: int
    mlflow_port: int
    pool: str

    @classmethod
    def from_env(cls) -> Config:
        env = environment()
        return cls(env.store.expanduser().resolve(), env.prefect_port, env.mlflow_port,
                   env.work_pool)

    @property
    def run_dir(self) -> Path:
        return self.store / ".serve"

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    def env(self) -> dict[str, str]:
        """The environment of every command and service: all talk to this Prefect server."""
        return os.environ | {"PREFECT_API_URL": f"{self.prefect_url}/api",
                             "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def service_command(cfg: Config, name: str) -> tuple[list[str], dict[str, str]]:
    """The command line and extra environment of one service."""
    if name == "prefect-server":
        return ([str(BIN / "prefect"), "server", "start", "--host", HOST,
                 "--port", str(cfg.prefect_port)],
                {"PREFECT_API_DATABASE_CONNECTION_URL":
                 f"sqlite+aiosqlite:///{cfg.store / 'prefect.db'}"})
    if name == "mlflow-server":
        # New experiments get a file:// root in the store, like those `smpo run` creates without
        # a server: the worker on this machine writes there directly, this server reads them
        # for the UI, and the store stays readable without any server. The artifacts
        # destination also resolves proxied (mlflow-artifacts:/) runs into the same folder.
        store = Store(cfg.store)
        return ([str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(cfg.mlflow_port),
                 "--workers", "1", "--backend-store-uri", store.tracking_uri,
                 "--default-artifact-root", store.artifacts_uri,
                 "--artifacts-destination", store.artifacts_uri],
                {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    if name == "worker":
        # The flow runs this worker starts log to the MLflow server above and default to the
        # served store, so the UIs and the store agree.
        return ([str(BIN / "prefect"), "worker", "start", "--pool", cfg.pool,
                 "--name", f"{cfg.pool}-worker"],
                {Environment.variable("tracking_uri"): cfg.mlflow_url,
                 Environment.variable("store"): str(cfg.store)})
    raise ValueError(name)


# -- processes ------------------------------------------------------------------------------

def _pid_file(cfg: Config, name: str) -> Path:
    return cfg.run_dir / f"{name}.pid"


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def running(cfg: Config, name: str) -> psutil.Process | None:
    """The service's process if it still runs (same pid and start time as recorded)."""
    try:
        record = json.loads(_pid_file(cfg, name).read_text())
        proc = psutil.Process(record["pid"])
        if abs(proc.create_time() - record["created"]) < 1.0 and _alive(proc):
            return proc
    except (OSError, ValueError, KeyError, psutil.Error):
        pass
    return None


def launch(cfg: Config, name: str) -> psutil.Process:
    """Start a service in its own session (its own process group, which `stop` ends whole;
    a job started with `&` from a non-interactive shell would ignore SIGTERM instead)."""
    command, extra_env = service_command(cfg, name)
    log = cfg.run_dir / f"{name}.log"
    with log.open("a") as out:
        out.write(f"\n--- {datetime.now():%Y-%m-%d %H:%M:%S} {' '.join(command)}\n")
        out.flush()
        popen = subprocess.Popen(command, cwd=REPO, env=cfg.env() | extra_env,
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    proc = psutil.Process(popen.pid)
    _pid_file(cfg, name).write_text(json.dumps({"pid": proc.pid,
                                                "created": proc.create_time(),
                                                "command": command}))
    return proc


def terminate(proc: psutil.Process, timeout: float = 20.0) -> None:
    """SIGTERM the process, its process group and every descendant (flow runs the worker
    started in sessions of their own included); SIGKILL what is left after `timeout`."""
    try:
        family = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        family = [proc]
    _signal_group(proc.pid, signal.SIGTERM)
    for member in family:
        _send(member, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in family) and time.monotonic() < deadline:
        time.sleep(0.2)
    for member in family:
        if _alive(member):
            _send(member, signal.SIGKILL)
    _signal_group(proc.pid, signal.SIGKILL)


def _send(proc: psutil.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(psutil.Error):
        proc.send_signal(sig)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# -- readiness ------------------------------------------------------------------------------

def _get(url: str, timeout: float = 2.0) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode()
    except (urllib.error.URLError, OSError):
        return None


def _port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


def wait_until(cfg: Config, name: str, proc: psutil.Process, ready: Callable[[], bool],
               what: str) -> None:
    """Poll `ready()` until it holds; fail with the service's log tail if it exits first."""
    deadline = time.monotonic() + START_TIMEOUT
    while not ready():
        if not _alive(proc) or time.monotonic() > deadline:
            reason = "exited" if not _alive(proc) else f"not {what} after {START_TIMEOUT:.0f} s"
            raise SmpoError(f"{name} {reason}; the end of {cfg.run_dir / (name + '.log')}:\n"
                            + _tail(cfg.run_dir / f"{name}.log"))
        time.sleep(0.5)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _worker_polling(cfg: Config, since: float) -> bool:
    """A worker of the pool has sent a heartbeat since `since` (epoch seconds)."""
    request = urllib.request.Request(
        f"{cfg.prefect_url}/api/work_pools/{quote(cfg.pool)}/workers/filter", data=b"{}",
        headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            workers = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False
    for worker in workers:
        beat = worker.get("last_heartbeat_time")
        if beat and datetime.fromisoformat(beat.replace("Z", "+00:00")).timestamp() >= since - 1:
            return True
    return False


# -- commands -------------------------------------------------------------------------------

def prefect_cli(cfg: Config, *args: str) -> None:
    """Run a `prefect` command against the served API; its output goes to the run folder."""
    log = cfg.run_dir / "commands.log"
    with log.open("a") as out:
        out.write(f"\n--- {datetime.now():%Y-%m-%d %H:%M:%S} prefect {' '.join(args)}\n")
        out.flush()
        done = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=REPO,
                              env=cfg.env(), stdin=subprocess.DEVNULL, stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise SmpoError(f"`prefect {' '.join(args)}` failed (exit {done.returncode}); "
                        f"the end of {log}:\n{_tail(log)}")


def deployments() -> list[dict]:
    """smpo/full, one deployment per registered stage: that stage (its upstream stages
    reused or built) and the stages it is deployed with. Each is a preset of the flow's
    `stages` parameter; the other parameters keep the flow's defaults. Then
    smpo-compare/compare, the comparison flow (flows/compare.py), and smpo-sweep/sweep
    (flows/sweep.py)."""
    def preset(name: str, description: str, parameters: dict,
               entrypoint: str = ENTRYPOINT) -> dict:
        return {"name": name, "description": description, "entrypoint": entrypoint,
                "parameters": parameters}

    presets = [preset("full", "Every stage, download to evaluate; outputs that exist are "
                      "reused.", {})]
    for name, stage in STAGES.items():
        also = f"; then {', '.join(stage.deploy_with)}" if stage.deploy_with else ""
        presets.append(preset(name, f"{stage.summary} (Upstream stages reused or built{also}.)",
                              {"stages": [name, *stage.deploy_with]}))
    # The `smpo-compare` flow: smpo-compare/compare, several models on the same prompts and seeds.
    presets.append(preset("compare", "Several models on the same prompts and seeds (the first "
                          "is the reference); one table, grid and HTML report, one MLflow run. "
                          "Drawn images and scores are reused.",
                          {"models": ["base", "tuned=train:latest"]}, COMPARE_ENTRYPOINT))
    # The `smpo-sweep` flow: smpo-sweep/sweep, a grid of train and evaluate settings on one cache.
    presets.append(preset("sweep", "A grid of train and evaluate settings (parameter `grid`) "
                          "on one download, score and cache; `concurrency` variants at once "
                          "(on `devices`, one each), one MLflow run per variant under the "
                          "sweep's, one comparison of all.", {"concurrency": 1},
                          SWEEP_ENTRYPOINT))
    return presets


def deployments_file(cfg: Config) -> Path:
    """prefect.yaml's shared parts with the registry's deployments on this work pool, in the
    run folder (`prefect deploy --all` applies no `--pool` option to a file's deployments)."""
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    pool = spec.pop("definitions", {}).get("work_pool", {}) | {"name": cfg.pool}
    spec["deployments"] = [deployment | {"work_pool": dict(pool)} for deployment in deployments()]
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    generated = cfg.run_dir / "prefect.yaml"
    generated.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return generated


def _state(cfg: Config) -> dict:
    """What the last successful `start` served (serve.json), or {}."""
    try:
        return json.loads((cfg.run_dir / "serve.json").read_text())
    except (OSError, ValueError):
        return {}


def _check_ports_agree(cfg: Config) -> None:
    old = _state(cfg)
    if not old or not any(running(cfg, name) for name in SERVICES):
        return
    if (old["prefect_port"], old["mlflow_port"], old["pool"]) != (
            cfg.prefect_port, cfg.mlflow_port, cfg.pool):
        raise SmpoError(
            f"store {cfg.store} is already served (Prefect port {old['prefect_port']}, "
            f"MLflow port {old['mlflow_port']}, pool {old['pool']}); "
            f"run `make stop` first to change them")


def _check_ports_free(cfg: Config) -> None:
    """Before starting anything: the ports of the servers still to start are free."""
    for name, port, field in (("prefect-server", cfg.prefect_port, "prefect_port"),
                              ("mlflow-server", cfg.mlflow_port, "mlflow_port")):
        variable = Environment.variable(field)
        if not running(cfg, name) and _port_answers(port):
            raise SmpoError(f"{name}: port {port} on {HOST} is taken by another program; stop "
                            f"it or choose a free port ({variable}=...)")


def _ensure(cfg: Config, name: str, started: list[str]) -> psutil.Process:
    """The running service, else a newly launched one (its name appended to `started`)."""
    proc = running(cfg, name)
    if proc:
        return proc
    started.append(name)
    return launch(cfg, name)


def start(cfg: Config) -> None:
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    _check_ports_agree(cfg)
    _check_ports_free(cfg)
    spec = deployments_file(cfg)
    digest = hashlib.sha256(spec.read_bytes()).hexdigest()
    # Everything up and these deployments registered by the last start: nothing to do.
    registered = (all(running(cfg, name) for name in SERVICES)
                  and _state(cfg).get("prefect_yaml_sha256") == digest)
    started: list[str] = []
    try:
        server = _ensure(cfg, "prefect-server", started)
        wait_until(cfg, "prefect-server", server,
                   lambda: _get(f"{cfg.prefect_url}/api/health") == "true", "healthy")
        # MLflow and the worker come up while the deployments register.
        mlflow = _ensure(cfg, "mlflow-server", started)
        if not registered:
            prefect_cli(cfg, "work-pool", "create", cfg.pool, "--type", "process",
                        "--overwrite")
        worker_since = time.time()
        worker = _ensure(cfg, "worker", started)
        if not registered:
            prefect_cli(cfg, "deploy", "--all", "--prefect-file", str(spec))
        wait_until(cfg, "mlflow-server", mlflow,
                   lambda: _get(f"{cfg.mlflow_url}/health") == "OK", "healthy")
        if "worker" in started:
            wait_until(cfg, "worker", worker, lambda: _worker_polling(cfg, worker_since),
                       "polling")
        runs_table = _runs_table(cfg)
    except BaseException:
        for name in reversed(started):
            if proc := running(cfg, name):
                terminate(proc)
            _pid_file(cfg, name).unlink(missing_ok=True)
        raise
    (cfg.run_dir / "serve.json").write_text(json.dumps(
        {"store": str(cfg.store), "prefect_port": cfg.prefect_port,
         "mlflow_port": cfg.mlflow_port, "pool": cfg.pool, "prefect_yaml_sha256": digest},
        indent=1))
    for name in SERVICES:
        print(f"{name:<15} {'started' if name in started else 'already running'} "
              f"(pid {running(cfg, name).pid})")
    print(f"{'deployments':<15} {'already registered' if registered else 'registered'} "
          f"from {_shown(spec)}")
    _print_next_steps(cfg, runs_table)


def _runs_table(cfg: Config) -> str:
    """The experiment's runs table on the served MLflow (the experiment is made here if it
    is new, as the pipeline would make it, so that the link works before the first run)."""
    from mlflow.tracking import MlflowClient

    from stages.tracking import experiment_id, runs_table_url

    try:
        experiment = experiment_id(MlflowClient(cfg.mlflow_url), cfg.mlflow_url, cfg.store)
    except Exception as exc:  # a link is no reason to stop what runs
        print(f"(no link to the runs table: {exc})", file=sys.stderr)
        return cfg.mlflow_url
    return runs_table_url(cfg.mlflow_url, experiment)


def _print_next_steps(cfg: Config, runs_table: str) -> None:
    prefect = _shown(BIN / "prefect")
    print(f"""
Store         {cfg.store}
Prefect UI    {cfg.prefect_url}
MLflow UI     {cfg.mlflow_url}  (runs: {runs_table})
Worker        pool {cfg.pool}; pids and logs in {cfg.run_dir}

Run the pipeline on it:
  export PREFECT_API_URL={cfg.prefect_url}/api
  {prefect} deployment run smpo/full --watch
  {prefect} deployment run smpo/train -p 'overrides=["train.beta=5000"]' --watch
  {prefect} deployment run smpo-compare/compare -p 'models=["base", "train:latest"]' --watch
Stop it all:  make stop""")


def _shown(path: Path) -> str:
    """A path as the user would type it from the checkout."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def served(store: Path) -> dict | None:
    """What `make serve` serves for this store (ports, pool) while its Prefect server runs,
    else None: `smpo run` then sends its flow runs there."""
    state = _state(Config(Path(store).expanduser().resolve(), 0, 0, DEFAULT_POOL))
    if not state:
        return None
    cfg = Config(Path(state["store"]), state["prefect_port"], state["mlflow_port"], state["pool"])
    return state if running(cfg, "prefect-server") else None


def deploy(cfg: Config) -> None:
    """Register the deployments on the Prefect server PREFECT_API_URL names (a server this
    module did not start, e.g. docker/compose.yaml's)."""
    spec = deployments_file(cfg)
    done = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all",
                           "--prefect-file", str(spec)], cwd=REPO, check=False)
    if done.returncode != 0:
        raise SmpoError(f"`prefect deploy --all --prefect-file {spec}` failed "
                        f"(exit {done.returncode})")


def stop(cfg: Config) -> None:
    stopped = 0
    for name in reversed(SERVICES):
        proc = running(cfg, name)
        if proc:
            terminate(proc)
            print(f"{name:<15} stopped (pid {proc.pid})")
            stopped += 1
        _pid_file(cfg, name).unlink(missing_ok=True)
    if not stopped:
        print(f"nothing runs for store {cfg.store}")


def status(cfg: Config) -> int:
    """Exit status 0 when every service runs, 3 otherwise."""
    states = {name: running(cfg, name) for name in SERVICES}
    for name, proc in states.items():
        print(f"{name:<15} {f'running (pid {proc.pid})' if proc else 'not running'}")
    if all(states.values()):
        state = _state(cfg)
        print(f"Prefect UI      http://{HOST}:{state['prefect_port']}\n"
              f"MLflow UI       http://{HOST}:{state['mlflow_port']}")
        return 0
    return 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("start", "stop", "status", "deploy"))
    args = parser.parse_args(argv)
    try:
        cfg = Config.from_env()
        if args.command == "start":
            start(cfg)
        elif args.command == "stop":
            stop(cfg)
        elif args.command == "deploy":
            deploy(cfg)
        else:
            return status(cfg)
    except SmpoError as exc:
        print(f"serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
