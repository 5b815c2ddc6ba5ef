"""Tracking that a run could not do, done later; runs a dead process left RUNNING, closed.

A stage or flow whose tracking server stopped answering (stages/tracking.py) records what it
would have logged under `<store>/.tracking-pending/`. The next run into the store, or `smpo
sync`, logs it: each flow as a parent run (the one it had opened, if it got that far), each
stage as a nested run tagged `smpo.synced`, with its settings, its manifest's numbers and the
manifest itself, which the stage output still holds.
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from pathlib import Path
from typing import Any

import psutil
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient

from smpo_core.store import MANIFEST, read_manifest, write_json
from stages import tracking

PENDING = ".tracking-pending"


def record(store_root: str | Path, kind: str, flow_id: str, data: dict[str, Any]) -> None:
    """Keep what a `kind` ("flow" or "stage") run of flow `flow_id` could not log."""
    folder = Path(store_root) / PENDING
    write_json(folder / f"{flow_id}-{kind}-{uuid.uuid4().hex[:8]}.json",
               {"kind": kind, "flow_id": flow_id, **data})


def pending(store_root: str | Path) -> list[Path]:
    return sorted((Path(store_root) / PENDING).glob("*.json"))


def sync(client: MlflowClient, experiment: str, store_root: str | Path) -> int:
    """Log every pending record of the store into `experiment`; the number of runs logged.
    A record is removed once logged, so a sync cut short is repeated, not doubled, for the
    records it had not reached."""
    records = [(path, json.loads(path.read_text())) for path in pending(store_root)]
    parents: dict[str, str] = {}
    logged = 0
    for path, data in sorted(records, key=lambda item: item[1]["kind"] != "flow"):
        if data["kind"] == "flow":
            parents[data["flow_id"]] = _sync_flow(client, experiment, data)
        else:
            parent = parents.get(data["flow_id"]) or data.get("parent_run_id")
            _sync_stage(client, experiment, data, parent)
        path.unlink()
        logged += 1
    return logged


def _exists(client: MlflowClient, run_id: str | None) -> bool:
    if not run_id:
        return False
    try:
        client.get_run(run_id)
    except Exception:  # gone, or never created on this server
        return False
    return True


def _sync_flow(client: MlflowClient, experiment: str, data: dict[str, Any]) -> str:
    run_id = data.get("run_id")
    if not _exists(client, run_id):
        run_id = client.create_run(experiment, run_name=data["name"], tags={
            **data["tags"], "mlflow.runName": data["name"], "smpo.synced": "true"}).info.run_id
    client.set_tag(run_id, "smpo.synced", "true")
    client.set_terminated(run_id, data["status"])
    return run_id


def _sync_stage(client: MlflowClient, experiment: str, data: dict[str, Any],
                parent: str | None) -> None:
    tags = {**data["tags"], "mlflow.runName": data["stage"], "smpo.synced": "true"}
    if parent:
        tags["mlflow.parentRunId"] = parent
    created = client.create_run(experiment, run_name=data["stage"], tags=tags)
    tracker = tracking.Tracker(client, created.info.run_id)
    output = Path(data["path"])
    manifest = read_manifest(output) or {}
    tracker.params(manifest.get("settings", {}))
    tracker.metrics({f"manifest.{k}": v for k, v in tracking.flatten(
        {k: v for k, v in manifest.items() if k != "settings"}).items()})
    tracker.artifact(output / MANIFEST)
    client.set_terminated(created.info.run_id, "FINISHED" if manifest else "FAILED")


def close_stale_runs(client: MlflowClient, experiment: str) -> int:
    """Mark KILLED the RUNNING runs whose process (on this machine) is gone; the number
    closed. Runs of other machines are left: their processes cannot be seen from here."""
    host = socket.gethostname()
    closed = 0
    for run in client.search_runs([experiment], "attributes.status = 'RUNNING'",
                                  max_results=1000):
        owner = run.data.tags.get("smpo.process", "")
        name, _, rest = owner.partition(":")
        if name != host or _alive(rest):
            continue
        client.set_tag(run.info.run_id, "smpo.error",
                       f"its process ({owner}) ended without closing it (killed, or the "
                       f"tracking server was lost); closed by a later run")
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
        closed += 1
    return closed


def _alive(pid_and_start: str) -> bool:
    pid, _, started = pid_and_start.partition(":")
    try:
        return abs(psutil.Process(int(pid)).create_time() - float(started)) < 0.05
    except (ValueError, psutil.Error):
        return False


def recover(client: MlflowClient, experiment: str, store_root: str | Path) -> None:
    """At the start of a run: close stale runs, log pending records. Tracking is a side
    channel: if it fails here, the run goes on (the records stay for the next try)."""
    try:
        closed = close_stale_runs(client, experiment)
        synced = sync(client, experiment, store_root)
    except Exception as exc:
        logging.getLogger("smpo").warning("tracking: could not close stale runs or log "
                                          "pending ones (%s)", exc)
        return
    if closed or synced:
        logging.getLogger("smpo").info("tracking: closed %d runs left RUNNING by dead "
                                       "processes, logged %d pending runs", closed, synced)
