"""download: Pick-a-Pic pairs from the configured source into normalised Parquet shards."""

from __future__ import annotations

import json
from typing import Any

import pyarrow.parquet as pq

from smpo_core.errors import SmpoError
from smpo_core.pickapic import (
    DROP_REASONS,
    DownloadProgress,
    ImageLimits,
    PickapicSource,
    download_pairs,
    is_transient,
    open_source,
    pair_shards,
    quarantine_files,
    source_fingerprint,
)
from smpo_core.store import folder_size, write_json
from stages.common import RunContext, StageRun

# Written before the first shard: a resumed run reads the same hub commit as the killed one.
SOURCE = "source.json"


def key_inputs(ctx: RunContext) -> dict[str, str]:
    """A local source's content enters the key: a fixed file is a new input, read afresh."""
    fingerprint = source_fingerprint(ctx.resolve(ctx.settings.download.source))
    return {"source_files": fingerprint} if fingerprint else {}


def _open(run: StageRun) -> PickapicSource:
    cfg = run.settings.download
    location = run.ctx.resolve(cfg.source)
    pinned = run.out_dir / SOURCE
    revision = json.loads(pinned.read_text())["revision"] if pinned.is_file() else None
    source = open_source(location, cfg.split, revision or cfg.revision)
    if not pinned.is_file():
        write_json(pinned, {"kind": source.kind, "location": source.location,
                            "split": source.split, "revision": source.revision,
                            "files": source.files})
    return source


def compute(run: StageRun) -> dict[str, Any]:
    cfg = run.settings.download
    source = _open(run)
    resume = DownloadProgress.load(run.out_dir)
    at = f" at {source.revision}" if source.revision else ""
    run.log("reading %s (%s%s), split %s: %d files", source.location, source.kind, at,
            source.split, len(source.files))
    if resume.shards:
        run.log("resuming after %d complete shards (%d source rows, %d pairs)",
                resume.shards, resume.source_rows, resume.pairs)
    # Progress in pairs when capped, else in source rows (known up front for local sources).
    by_pairs = cfg.max_pairs is not None
    progress = run.progress(total=cfg.max_pairs if by_pairs else source.num_rows or 0,
                            unit="pairs" if by_pairs else "rows")
    shown = {"done": resume.pairs if by_pairs else resume.source_rows}
    progress.update(shown["done"])

    def on_shard(state: DownloadProgress) -> None:
        done = state.pairs if by_pairs else state.source_rows
        progress.update(done - shown["done"])
        shown["done"] = done
        run.tracker.metrics({"pairs": state.pairs, "source_rows": state.source_rows}
                            | {f"dropped.{k}": v for k, v in state.dropped.items()},
                            step=state.shards)

    try:
        state = download_pairs(source.batches(skip_rows=resume.source_rows), run.out_dir,
                               cfg.shard_rows, cfg.max_pairs, on_progress=on_shard,
                               limits=ImageLimits(cfg.min_image_side, cfg.max_image_pixels))
    except SmpoError as exc:
        if not is_transient(exc):  # bad input: a resume would only replay this error
            _forget(run)
        raise
    finally:
        progress.close()
    dropped = {reason: int(state.dropped.get(reason, 0)) for reason in DROP_REASONS}
    if state.pairs == 0:
        _forget(run)
        raise SmpoError(
            f"download.source {cfg.source!r}, split {cfg.split!r}: no usable pairs in "
            f"{state.source_rows} source rows (dropped: {dropped}); check download.split and "
            f"that the source holds labelled Pick-a-Pic pairs"
        )
    on_disk = sum(pq.read_metadata(f).num_rows for f in pair_shards(run.out_dir))
    if on_disk != state.pairs or len(pair_shards(run.out_dir)) != state.shards:
        raise SmpoError(f"download {run.out_dir}: {on_disk} pairs in "
                        f"{len(pair_shards(run.out_dir))} shards on disk, but {state.pairs} in "
                        f"{state.shards} recorded; not marking it complete: rerun with --force "
                        f"download")
    side_files = quarantine_files(run.out_dir)
    return {"source": cfg.source, "source_kind": source.kind, "source_location": source.location,
            "source_revision": source.revision, "source_files": len(source.files),
            "split": cfg.split, "source_rows": state.source_rows, "pairs": state.pairs,
            "shards": state.shards, "dropped": dropped,
            "quarantined_images": sum(pq.read_metadata(f).num_rows for f in side_files),
            "quarantine_files": [f.name for f in side_files],
            "bytes": folder_size(run.out_dir)}


def _forget(run: StageRun) -> None:
    """Remove what a download that failed on its input wrote: nothing is left to resume from
    (the source, once fixed, has another key anyway)."""
    for path in run.out_dir.iterdir():
        path.unlink()


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn`: retry network failures (the rerun resumes after the last
    complete shard); bad input, a gone dataset or offline mode fail at once."""
    error = state.data if isinstance(state.data, BaseException) else None
    if error is None:
        try:
            state.result()
        except Exception as exc:
            error = exc
    return error is not None and is_transient(error)


# Network failures are retried: the rerun resumes after the last complete shard.
TASK_OPTIONS = {"retries": 2, "retry_delay_seconds": 10,
                "retry_condition_fn": retry_if_transient}
