"""download: Pick-a-Pic pairs from the configured source into normalised Parquet shards."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from smpo_core.pickapic import describe_source, download_pairs, iter_source
from smpo_core.store import folder_size
from stages.common import RunContext, StageResult, StageRun, run_stage

VERSION = "1"


def compute(run: StageRun) -> dict[str, Any]:
    cfg = run.settings.download
    source = run.ctx.resolve(cfg.source)
    kind = describe_source(source)
    run.log("reading %s (%s), split %s", source, kind, cfg.split)
    progress = run.progress(total=cfg.max_pairs or 0, unit="pairs")
    seen = {"pairs": 0}

    def on_shard(state) -> None:
        progress.update(state.pairs - seen["pairs"])
        seen["pairs"] = state.pairs
        run.tracker.metrics({"pairs": state.pairs, "source_rows": state.source_rows},
                            step=state.shards)

    state = download_pairs(iter_source(source, cfg.split, cfg.revision), run.out_dir,
                           cfg.shard_rows, cfg.max_pairs, on_progress=on_shard)
    progress.close()
    dropped = {reason: int(state.dropped.get(reason, 0))
               for reason in ("no_label", "tie", "identical", "corrupt_jpeg", "duplicate_pair")}
    return {"source": cfg.source, "source_kind": kind, "split": cfg.split,
            "source_rows": state.source_rows, "pairs": state.pairs, "shards": state.shards,
            "dropped": dropped, "quarantined_images": _quarantined(run),
            "bytes": folder_size(run.out_dir)}


def _quarantined(run: StageRun) -> int:
    import pyarrow.parquet as pq

    return sum(pq.read_metadata(f).num_rows for f in run.out_dir.glob("quarantine-*.parquet"))


@task(name="download", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10,
      retry_condition_fn=lambda task, run, state: _transient(state))
def download_stage(ctx: RunContext, force: bool = False) -> StageResult:
    return run_stage(ctx, "download", VERSION, {}, compute, force)


def _transient(state) -> bool:
    """Retry network hiccups only; bad input fails at once."""
    try:
        state.result()
    except (ConnectionError, TimeoutError):
        return True
    except Exception:
        return False
    return False
