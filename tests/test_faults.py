"""Faults a real run meets: kill -9 inside each stage, concurrent runs on one store, a tracking
server that dies mid-run, runs left RUNNING, a full disk and a read-only store.

Every run here is the real `smpo` command in its own process, on the tiny profile made smaller
(SMALL) so that each fault costs seconds."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from smpo_core.errors import SmpoError
from smpo_core.faults import POINTS
from smpo_core.settings import STAGES
from smpo_core.worlds.tiny import write_synthetic_pickapic

REPO = Path(__file__).resolve().parents[1]
# The smallest run with two units of work in every stage (two download, score and invert shards,
# two train checkpoints, two prompt chunks), so that a kill after the first is inside the stage.
SMALL = ["download.max_pairs=48", "download.shard_rows=24", "invert.max_pairs=4",
         "invert.shard_pairs=2", "invert.batch_size=2", "invert.num_levels=2",
         "train.max_steps=2", "train.checkpoint_every=1", "train.warmup_steps=1",
         "train.effective_batch=2", "train.batch_size=2", "evaluate.num_prompts=2",
         "evaluate.chunk_prompts=1", "evaluate.num_inference_steps=2",
         "evaluate.bootstrap_resamples=10", "evaluate.metrics={clipscore: builtin:tiny-clip}"]
# A run that takes longer is a hang (seen: a killed command's temporary Prefect server held
# its stdout open); it fails the test instead of stalling the suite.
RUN_TIMEOUT = 900


def smpo(store: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True,
         command: str = "run", settings: list[str] = SMALL):
    """`smpo run --store STORE ARGS --set SMALL...` in a fresh process, in a session of its
    own (so that whatever it leaves behind can be found and killed)."""
    argv = [sys.executable, "-m", "flows.cli", command, "--store", str(store), *args]
    if command == "run":
        argv += [arg for setting in settings for arg in ("--set", setting)]
    # Its own temporary Prefect server, as a user's first `smpo run` gets.
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
    full_env |= {"PREFECT_SERVER_ANALYTICS_ENABLED": "false"} | (env or {})
    process = subprocess.Popen(argv, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    return finish(process) if wait else process


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    """Wait for an `smpo` process (RUN_TIMEOUT at most). Fail if its output stays open after
    it exited (something it started outlived it and holds it), or if anything it started is
    still alive then. Its session is killed either way."""
    deadline, exited, failure = time.monotonic() + RUN_TIMEOUT, None, None
    while True:
        try:
            out, err = process.communicate(timeout=2)
            break
        except subprocess.TimeoutExpired:
            if exited is None and process.poll() is not None:
                exited = time.monotonic()
            if exited is not None and time.monotonic() - exited > 30:
                failure = (f"its output stayed open after it exited: "
                           f"{_alive_in_session(process.pid)}")
            elif time.monotonic() > deadline:
                failure = f"no exit in {RUN_TIMEOUT} s"
            if failure:
                _kill_session(process.pid)
                out, err = process.communicate(timeout=60)
                break
    failure = failure or (f"left running: {left}" if (left := _still_alive(process.pid))
                          else None)
    _kill_session(process.pid)
    assert not failure, (" ".join(process.args[3:6]), failure, err[-3000:])
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _still_alive(session: int, grace: float = 10.0) -> list[str]:
    """What the session still runs after `grace` seconds: a child killed with its parent (the
    temporary Prefect server, by its parent-death signal) takes the kernel a moment to tear
    down, and meanwhile shows as a live process with an empty command line."""
    deadline = time.monotonic() + grace
    while (alive := _alive_in_session(session)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _alive_in_session(session: int) -> list[str]:
    alive = []
    for proc in psutil.process_iter(["pid", "status", "cmdline"]):
        with contextlib.suppress(psutil.Error, OSError):
            if (os.getsid(proc.pid) == session and proc.pid != session
                    and proc.info["status"] != psutil.STATUS_ZOMBIE):
                alive.append(" ".join(proc.info["cmdline"] or [])[:200])
    return alive


def _kill_session(session: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(session, signal.SIGKILL)


def _stage_table(stdout: str) -> dict[str, tuple[str, str]]:
    """stage -> (ran | reused, key), from the table `smpo run` prints."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] in STAGES and parts[1] in ("ran", "reused"):
            rows[parts[0]] = (parts[1], parts[2])
    return rows


def _manifest(folder: Path) -> dict:
    data = json.loads((folder / "manifest.json").read_text())
    # Timings, and how the work was split by a kill (resumed shards, the UNet work this run
    # did), are not results; `bytes` counts files that name the store's own path (compared
    # byte for byte, that path replaced, by _files).
    return _without_split(_results({k: v for k, v in data.items()
                                    if k not in ("bytes", "unet_forwards_per_image")
                                    and not k.startswith("resumed")}))


def _results(data):
    """`data` without timings (keys ending in _seconds)."""
    if isinstance(data, dict):
        return {k: _results(v) for k, v in data.items()
                if not (k.endswith("_seconds") or k in ("seconds", "finished_at"))}
    if isinstance(data, list):
        return [_results(v) for v in data]
    return data


def _without_split(data: dict) -> dict:
    """Images drawn or reused: how a kill split the evaluation, not what it found."""
    for section in (data, data.get("generation") or {}):
        if isinstance(section, dict):
            for key in ("drawn", "reused"):
                section.pop(key, None)
    return data


# Accelerate's snapshot of the process-wide RNGs, which Prefect and MLflow advance too (the
# training draws from its own seeded generators: its weights are compared), and the
# checkpoint's copy of history.json, which holds step times.
NOT_RESULTS = ("checkpoint/random_states_", "checkpoint/custom_checkpoint_")


def _files(folder: Path, store: Path) -> dict[str, str]:
    """Every file of a stage output but its manifest: its bytes' hash (the store's own path,
    which text files such as the report may name, replaced; the generations' folder key,
    which holds the path of the store's built-in model, replaced)."""
    out = {}
    for file in sorted(folder.rglob("*")):
        name = file.relative_to(folder).as_posix()
        if not file.is_file() or name == "manifest.json" or name.startswith(NOT_RESULTS):
            continue
        if name == "history.json":
            data = json.dumps(_results(json.loads(file.read_text()))).encode()
        elif name == "scores.parquet":
            table = pq.read_table(file)
            data = table.drop_columns(["image"]).to_pandas().to_json().encode()
        elif name in ("summary.json", "report.html"):
            continue  # the scores they summarise are compared (scores.parquet)
        else:
            data = file.read_bytes().replace(str(store).encode(), b"<store>")
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def assert_same_outputs(store: Path, reference: Path, stages) -> None:
    for stage in stages:
        [ours] = [p for p in (store / stage).iterdir() if p.is_dir()]
        theirs = reference / stage / ours.name
        assert theirs.is_dir(), f"{stage}: key {ours.name} not in the reference store"
        assert _files(ours, store) == _files(theirs, reference), stage
        mine, ref = (json.loads(json.dumps(_manifest(p)).replace(str(s), "<store>"))
                     for p, s in ((ours, store), (theirs, reference)))
        assert mine == ref, stage


def runs_of(store: Path, uri: str | None = None) -> list:
    client = MlflowClient(uri or f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smpo").experiment_id
    return client.search_runs([experiment], max_results=1000)


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory) -> Path:
    """One uninterrupted run of every stage: the reference outputs."""
    store = tmp_path_factory.mktemp("clean") / "store"
    result = smpo(store)
    assert result.returncode == 0, result.stderr[-3000:]
    return store


# --- kill -9 ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_kill_9_inside_each_stage_resumes_to_the_clean_result(clean_store, tmp_path):
    """One store killed (SIGKILL, SMPO_FAULT) after the first unit of work of each stage in
    turn, each rerun resuming the stage the last one died in; then finished. Every output
    equals the uninterrupted run's, and no run is left RUNNING in MLflow."""
    store = tmp_path / "store"
    # The built-in models and data are inputs, not stage outputs: built once, by the clean run.
    shutil.copytree(clean_store / "builtin", store / "builtin")
    for point in POINTS:
        stage = point.split(".")[0]
        result = smpo(store, env={"SMPO_FAULT": f"{point}:1"})
        assert result.returncode == -signal.SIGKILL, (point, result.stderr[-3000:])
        [folder] = [p for p in (store / stage).iterdir() if p.is_dir()]
        assert not (folder / "manifest.json").exists()  # died inside the stage
    result = smpo(store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert {s: status for s, (status, _) in _stage_table(result.stdout).items()} == {
        "download": "reused", "score": "reused", "invert": "reused", "train": "reused",
        "evaluate": "ran"}
    assert_same_outputs(store, clean_store, STAGES)
    runs = runs_of(store)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.info.status == "KILLED"]
    # Each killed process left its parent run and the run of the stage it died in.
    assert len([r for r in killed if "smpo.stage" not in r.data.tags]) == len(POINTS)
    assert {r.data.tags["smpo.stage"] for r in killed if "smpo.stage" in r.data.tags} == set(
        STAGES)
    assert all("closed by a later run" in r.data.tags["smpo.error"] for r in killed)


# --- concurrent runs --------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("betas", [
    # Four covers two: two runs of each key, the keys side by side.
    pytest.param([None, None], id="two", marks=pytest.mark.slow),
    pytest.param([None, None, "3000", "3000"], id="four")])
def test_concurrent_runs_on_one_fresh_store_compute_each_key_once(clean_store, tmp_path,
                                                                   betas):
    store = tmp_path / "store"
    processes = [smpo(store, "train", wait=False, settings=SMALL + (
        [f"train.beta={beta}"] if beta else [])) for beta in betas]
    tables = []
    for process in processes:
        result = finish(process)
        assert result.returncode == 0, result.stderr[-3000:]
        tables.append(_stage_table(result.stdout))
    computed: dict[tuple[str, str], int] = {}
    for table in tables:
        for stage, (status, key) in table.items():
            computed[stage, key] = computed.get((stage, key), 0) + (status == "ran")
    # Every key was computed by exactly one of the runs; the others waited and reused it.
    assert computed and all(count == 1 for count in computed.values()), computed
    assert len({key for (stage, key) in computed if stage == "train"}) == len(set(betas))
    assert_same_outputs(store, clean_store, ["download", "score", "invert"])
    # The default-beta runs trained what the single uninterrupted run trained.
    [reference] = [p for p in (clean_store / "train").iterdir() if p.is_dir()]
    default = store / "train" / tables[0]["train"][1]
    assert default.name == reference.name
    assert _files(default, store) == _files(reference, clean_store)


# --- tracking lost ----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mlflow_server(backend: Path, artifacts: Path, port: int) -> subprocess.Popen:
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{backend}", "--artifacts-destination", str(artifacts), "--host",
         "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return process
        time.sleep(0.5)
    raise RuntimeError("mlflow server did not start")


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


@pytest.mark.integration
def test_a_tracking_server_killed_during_a_stage_costs_the_stage_nothing(tmp_path):
    """A real MLflow server dies while a stage computes (the stage kills it at a fixed point,
    then logs per-step metrics as train does): one warning line, seconds, the stage's output
    and manifest complete. Once the server is back, the next run's recovery logs the missed
    stage under its parent and closes the parent the dead server kept RUNNING."""
    from smpo_core.settings import load_settings
    from stages import resync, tracking
    from stages.common import RunContext, run_stage

    port, backend, artifacts = _free_port(), tmp_path / "mlflow.db", tmp_path / "artifacts"
    uri = f"http://127.0.0.1:{port}"
    server = _mlflow_server(backend, artifacts, port)
    try:
        client = MlflowClient(uri)
        experiment = tracking.experiment_id(client, uri, tmp_path)
        store = tmp_path / "store"

        def compute(run):
            run.tracker.metrics({"loss": 1.0}, step=1)  # tracked while the server lives
            _stop(server)
            started = time.monotonic()
            for step in range(2, 12):
                run.tracker.metrics({"loss": 1.0 / step}, step=step)
            (run.out_dir / "weights.bin").write_bytes(b"trained")
            return {"steps": 11, "tracking_seconds": time.monotonic() - started}

        with smpo_warnings() as warnings, \
                tracking.run(client, experiment, "smpo tiny", {}) as parent:
            ctx = RunContext(load_settings("tiny"), str(store), uri, experiment,
                             parent.run_id, flow_id="flow1")
            result = run_stage(ctx, "train", {}, compute)
    finally:
        _stop(server)
    assert result.summary["steps"] == 11 and not result.reused
    assert (Path(result.path) / "manifest.json").is_file()
    assert result.summary["tracking_seconds"] < 30  # seconds, not MLflow's minutes of retries
    assert [w.getMessage().split(" (")[0] for w in warnings] == [
        f"tracking: MLflow at {uri} failed"]
    assert [p.name.split("-")[1] for p in resync.pending(store)] == ["stage"]

    server = _mlflow_server(backend, artifacts, port)
    try:
        tracking._LOST.clear()  # a new process would start afresh
        resync.recover(client, experiment, store)
        runs = client.search_runs([experiment], max_results=100)
    finally:
        _stop(server)
    assert not resync.pending(store)
    by_status = {(r.data.tags.get("smpo.stage", "parent"), r.info.status) for r in runs}
    synced = [r for r in runs if r.data.tags.get("smpo.synced") == "true"]
    assert len(synced) == 1 and synced[0].info.status == "FINISHED", by_status
    assert synced[0].data.metrics["manifest.steps"] == 11
    assert synced[0].data.tags["mlflow.parentRunId"] == parent.run_id
    assert synced[0].data.tags["smpo.key"] == result.key


# --- disk faults ------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A size-limited filesystem at `path` (a tmpfs mount), or the test skipped."""
    path.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a size-limited tmpfs here ({mounted.stderr.strip()}): "
                    f"needs root or CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def test_a_read_only_store_is_one_line_before_anything_runs(tmp_path):
    with tmpfs(tmp_path / "mnt", "1m") as mount:
        (mount / "store").mkdir()
        _remount(mount, "ro")
        result = smpo(mount / "store", "download")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("smpo: error:")]
    assert lines == [f"smpo: error: store {mount / 'store'}: cannot write {mount / 'store'} "
                     f"(Read-only file system); the filesystem is read-only: remount it writable "
                     f"or choose another --store, then rerun: completed work is kept and the "
                     f"stage resumes"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_a_full_disk_under_a_fresh_mlflow_database_is_one_line_and_the_rerun_recovers(tmp_path):
    """The database is created by the first run on a store: a disk that fills up inside
    MLflow's table creation, then grows, leaves a database the next run completes."""
    from flows.pipeline import open_tracking

    with tmpfs(tmp_path / "mnt", "256k") as mount:
        store = mount / "store"
        store.mkdir()
        uri = f"sqlite:///{store / 'mlflow.db'}"
        with pytest.raises(SmpoError) as error:
            open_tracking(store, uri)
        assert str(error.value) == (
            f"store {store}: cannot write {store} (No space left on device); free space there "
            f"(or point --store / SMPO_STORE at a larger disk), then rerun: completed work is "
            f"kept and the stage resumes")
        _remount(mount, "size=64m")
        # The next run is a new process (this one's MLflow keeps its failed engine).
        rerun = subprocess.run([sys.executable, "-c", _OPEN_TRACKING, str(store), uri],
                               cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        assert rerun.stdout.strip() == "smpo", rerun.stderr[-3000:]


_OPEN_TRACKING = """
import sys
from pathlib import Path
from flows.pipeline import open_tracking
client, experiment = open_tracking(Path(sys.argv[1]), sys.argv[2])
print(client.get_experiment(experiment).name)
"""


def test_a_full_disk_is_one_line_and_the_stage_resumes_once_there_is_room(tmp_path):
    from test_download import _pairs, run_download_stage

    source = tmp_path / "source"
    write_synthetic_pickapic(source, num_pairs=400, seed=5, num_files=2)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    clean = run_download_stage(str(tmp_path / "clean"), str(source), 32, tracking)
    needed = sum(f.stat().st_size for f in Path(clean.path).iterdir())
    with tmpfs(tmp_path / "mnt", f"{needed // 2 // 1024}k") as mount:
        with pytest.raises(SmpoError) as error:
            run_download_stage(str(mount), str(source), 32, tracking)
        assert str(error.value).startswith(f"download stage, store {mount}: cannot write ")
        assert str(error.value).endswith(
            "(No space left on device); free space there (or point --store / SMPO_STORE at a "
            "larger disk), then rerun: completed work is kept and the stage resumes")
        out = mount / "download" / clean.key
        assert not (out / "manifest.json").exists()
        kept = sorted(p.name for p in out.glob("pairs-*.parquet"))
        assert kept  # shards written before the disk filled are kept ...
        _remount(mount, f"size={needed * 3 // 1024}k")
        resumed = run_download_stage(str(mount), str(source), 32, tracking)
        assert resumed.key == clean.key and not resumed.reused
        assert _pairs(out).equals(_pairs(Path(clean.path)))  # ... and resumed from
        assert not list(out.glob(".*.partial"))


@contextlib.contextmanager
def smpo_warnings():
    """The warnings of the `smpo` logger, whatever handlers Prefect's logging set-up gave it."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("smpo").addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger("smpo").removeHandler(handler)


# --- the pieces, without a pipeline -----------------------------------------------------------


_HOLD_AND_SLEEP = """
import sys, time
from smpo_core.store import Store
with Store(sys.argv[1]).lock("train-abc"):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_stage_lock_dies_with_its_process(tmp_path):
    """A kill -9 of the process computing a stage output never leaves a stale lock: the
    kernel drops its flock and a waiting run goes on at once."""
    from smpo_core.store import Store

    holder = subprocess.Popen([sys.executable, "-c", _HOLD_AND_SLEEP, str(tmp_path)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    waited = []

    def kill_holder():
        waited.append(time.monotonic())
        holder.send_signal(signal.SIGKILL)

    with Store(tmp_path).lock("train-abc", on_wait=kill_holder):
        acquired = time.monotonic()
    assert holder.wait(timeout=30) == -signal.SIGKILL
    assert len(waited) == 1 and acquired - waited[0] < 10
    with Store(tmp_path).lock("train-abc", on_wait=lambda: pytest.fail("stale lock")):
        pass


def test_an_unreachable_tracking_server_costs_one_warning_and_seconds():
    from stages import tracking

    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    client = MlflowClient(uri)
    started = time.monotonic()
    with smpo_warnings() as warnings, \
            tracking.run(client, "0", "train", {"smpo.stage": "train"}) as tracker:
        tracker.params({"train": {"beta": 2000}})
        tracker.metrics({"loss": 0.5}, step=1)
        tracker.artifact(Path(__file__))
    assert tracker.lost and tracker.run_id is None
    assert time.monotonic() - started < 30
    assert [w.getMessage().split(" (")[0] for w in warnings] == [
        f"tracking: MLflow at {uri} failed"]


def test_sync_logs_what_was_missed_and_closes_runs_of_dead_processes(tmp_path):
    from smpo_core.store import write_json
    from stages import resync, tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = tracking.experiment_id(client, uri, tmp_path)
    host = socket.gethostname()
    dead = client.create_run(experiment, tags={"smpo.process": f"{host}:999999999:1.00"})
    alive = client.create_run(experiment, tags={"smpo.process": tracking.process_tag()})
    elsewhere = client.create_run(experiment, tags={"smpo.process": "other-host:1:1.00"})
    assert resync.close_stale_runs(client, experiment) == 1
    status = {run: client.get_run(run.info.run_id).info.status
              for run in (dead, alive, elsewhere)}
    assert list(status.values()) == ["KILLED", "RUNNING", "RUNNING"]

    output = tmp_path / "train" / "k1"
    write_json(output / "manifest.json", {"steps": 12, "settings": {"train": {"beta": 2000.0}}})
    resync.record(tmp_path, "stage", "flow1", {
        "stage": "train", "path": str(output), "tags": {"smpo.stage": "train",
                                                        "smpo.key": "k1"},
        "parent_run_id": None})
    resync.record(tmp_path, "flow", "flow1", {"run_id": None, "name": "smpo tiny",
                                              "tags": {"smpo.profile": "tiny"},
                                              "status": "FINISHED"})
    assert resync.sync(client, experiment, tmp_path) == 2
    assert not resync.pending(tmp_path)
    [train] = client.search_runs([experiment], "tags.`smpo.stage` = 'train'")
    assert train.info.status == "FINISHED" and train.data.tags["smpo.synced"] == "true"
    assert train.data.metrics["manifest.steps"] == 12
    assert train.data.params["train.beta"] == "2000.0"
    parent = client.get_run(train.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FINISHED" and parent.data.tags["smpo.profile"] == "tiny"
