"""The content-addressed stage store: `<root>/<stage>/<key>/`, complete once `manifest.json` exists.

A key hashes a stage's result settings, its inputs' keys and its code version, so changing a
setting reruns that stage and everything downstream, and nothing upstream. Every file is written
to a temporary name and renamed, so a crash never leaves a file that looks complete.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from smpo_core.errors import SmpoError

MANIFEST = "manifest.json"
PARTIAL = ".partial"  # the name ending of every file or folder still being written
LOCKS = ".locks"  # the store's lock files, one per stage output (and one for MLflow set-up)


def stage_key(
    stage: str, settings: dict[str, Any], input_keys: dict[str, str], version: str
) -> str:
    """A short stable hash of everything that determines a stage's output."""
    payload = {"stage": stage, "settings": settings, "inputs": input_keys, "version": version}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def partial_sibling(target: Path, folder: bool = False) -> Path:
    """A new hidden file (or folder) beside `target` to write into before a rename publishes
    it; its name ends in PARTIAL, so whatever a killed writer leaves is recognisable."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{target.name}."
    if folder:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=PARTIAL, dir=target.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=PARTIAL, dir=target.parent)
    os.close(fd)
    return Path(name)


def is_partial(path: Path) -> bool:
    """Left by a writer that never finished (see `partial_sibling`)."""
    return Path(path).name.endswith(PARTIAL)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `target` only if the block succeeds."""
    tmp = partial_sibling(target)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(target: Path, data: Any) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Build a directory under a temporary sibling name; it replaces `target` on success."""
    target = Path(target)
    tmp = partial_sibling(target, folder=True)
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_manifest(path: Path) -> dict[str, Any] | None:
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    return json.loads(file.read_text())


class Store:
    """The folder that holds every stage's outputs and the built-in tiny data and models."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def builtin_dir(self, name: str) -> Path:
        return self.root / "builtin" / name

    @property
    def tracking_uri(self) -> str:
        """The store's own MLflow tracking database (used when MLFLOW_TRACKING_URI is unset,
        and served by `make serve`)."""
        return f"sqlite:///{self.root / 'mlflow.db'}"

    @property
    def artifacts_uri(self) -> str:
        """Where MLflow keeps the artifacts of runs tracked in the store."""
        return (self.root / "mlflow-artifacts").as_uri()

    @contextmanager
    def lock(self, name: str, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the store-wide lock `name` (e.g. one stage output): an OS file lock (flock),
        so the kernel releases it when its process dies and a kill -9 leaves no stale lock.
        `on_wait` is called once if another process holds it."""
        path = self.root / LOCKS / f"{name}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if on_wait:
                on_wait()
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def is_complete(self, stage: str, key: str) -> bool:
        return (self.stage_dir(stage, key) / MANIFEST).is_file()

    def outputs(self, stage: str) -> list[tuple[Path, dict[str, Any]]]:
        """The stage's complete outputs and their manifests, oldest first."""
        found = [(folder, manifest) for folder in sorted((self.root / stage).glob("*"))
                 if folder.is_dir() and (manifest := read_manifest(folder)) is not None]
        return sorted(found, key=lambda item: (item[1].get("finished_at", ""), str(item[0])))

    def clear(self, stage: str, key: str) -> None:
        """Forget a stage output (for --force): the manifest goes first, so a crash mid-way
        leaves an incomplete folder, never a complete-looking partial one."""
        path = self.stage_dir(stage, key)
        (path / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)

    def complete(self, stage: str, key: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Mark a stage output complete by writing its manifest, last and atomically."""
        write_json(self.stage_dir(stage, key) / MANIFEST, manifest)
        return manifest


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """A folder built once (a tiny model, a converted checkpoint): `build` fills a private
    sibling folder that is then renamed into place (`atomic_dir`), so a crash never leaves a
    half-written folder that looks complete. A folder that already has `marker` is returned
    as it is. Processes (and threads) building the same folder take turns on a file lock
    beside it, and the later ones find it built: a second build renamed over a finished
    folder would pull it from under a run already reading it."""
    target = Path(target)
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(target.parent / f".{target.name}.lock"):  # released if its process dies
        if (target / marker).exists():
            return target
        if target.exists() and any(target.iterdir()):
            raise FileExistsError(f"{target} is not empty but has no {marker}, so it is not a "
                                  "complete build: remove it or choose another folder")
        with atomic_dir(target) as tmp:
            build(tmp)
    return target


# Write errors the user fixes outside smpo (space, permissions), and how.
_DISK_REMEDIES = {
    errno.ENOSPC: "free space there (or point --store / SMPO_STORE at a larger disk)",
    errno.EDQUOT: "free space there or raise the quota",
    errno.EROFS: "the filesystem is read-only: remount it writable or choose another --store",
    errno.EACCES: "make it writable for this user or choose another --store",
    errno.EPERM: "make it writable for this user or choose another --store",
}


def disk_error(exc: BaseException, what: str, path: Path | None = None) -> SmpoError | None:
    """A full disk or an unwritable store as one line naming the path (`path`, else the
    error's file) and the remedy; None for any other error. SQLite reports these in words,
    not errno."""
    message = str(exc).lower()
    code = getattr(exc, "errno", None)
    if code not in _DISK_REMEDIES:
        if "disk is full" in message or "database or disk is full" in message:
            code = errno.ENOSPC
        elif "readonly database" in message or "read-only file system" in message:
            code = errno.EROFS
        else:
            return None
    path = path or getattr(exc, "filename", None) or what
    reason = os.strerror(code)
    return SmpoError(f"{what}: cannot write {path} ({reason}); {_DISK_REMEDIES[code]}, then "
                     f"rerun: completed work is kept and the stage resumes")


def disk_error_within(exc: BaseException, what: str,
                      path: Path | None = None) -> SmpoError | None:
    """`disk_error` of `exc` or of what caused it: SQLite's "database or disk is full"
    reaches a caller wrapped by SQLAlchemy and MLflow (seen: the MLflow database of a fresh
    store created on a full disk)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if error := disk_error(exc, what, path):
            return error
        exc = exc.__cause__ or exc.__context__
    return None


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
