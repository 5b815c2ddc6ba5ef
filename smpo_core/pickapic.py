"""Pick-a-Pic v2 sources and the download stage's filtering (METHOD.md §1).

A source is read as a stream of Arrow record batches in the published column layout, whichever
form it has: a folder of Parquet files (the hub layout `data/<split>-NNNNN-of-NNNNN.parquet`),
a `datasets.save_to_disk` folder, or a hub dataset id. Rows that cannot train are dropped with
a reason; pairs whose JPEG bytes do not decode are quarantined to a side file, not lost.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from smpo_core.errors import SmpoError
from smpo_core.schema import PAIRS_SCHEMA, PICKAPIC_SCHEMA
from smpo_core.store import atomic_path, write_json

# The columns the pair schema is built from; the rest of the published columns are optional.
REQUIRED_COLUMNS = (
    "caption", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1", "label_0", "has_label",
    "ranking_id",
)
OPTIONAL_DEFAULTS = {"model_0": "", "model_1": "", "user_id": -1, "are_different": True}
DROP_REASONS = ("no_label", "tie", "identical", "corrupt_jpeg", "duplicate_pair")
QUARANTINE_SCHEMA = pa.schema(
    [("pair_id", pa.int64()), ("image", pa.string()), ("error", pa.string()),
     ("jpg", pa.binary())]
)
PROGRESS = "progress.json"


@dataclass
class RowBatch:
    """Source rows with where they came from, for error messages."""

    table: pa.Table
    origin: str


def _expected_type(column: str) -> pa.DataType:
    return PICKAPIC_SCHEMA.field(column).type


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    if actual == expected:
        return True
    if pa.types.is_binary(expected):
        return pa.types.is_binary(actual) or pa.types.is_large_binary(actual)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_timestamp(expected):
        return pa.types.is_timestamp(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual)
    return False


def check_columns(schema: pa.Schema, origin: str) -> None:
    """Raise a SmpoError naming the column, the file and the expected type."""
    for column in REQUIRED_COLUMNS + tuple(OPTIONAL_DEFAULTS):
        if column not in schema.names:
            if column in OPTIONAL_DEFAULTS:
                continue
            raise SmpoError(
                f"{origin}: column {column!r} missing; expected the Pick-a-Pic v2 columns "
                f"{', '.join(REQUIRED_COLUMNS)} (METHOD.md §1)"
            )
        actual, expected = schema.field(column).type, _expected_type(column)
        if not _compatible(actual, expected):
            raise SmpoError(
                f"{origin}: column {column!r} has type {actual}; expected {expected} "
                f"(Pick-a-Pic v2 schema)"
            )


def _split_files(folder: Path, split: str) -> list[Path]:
    files = sorted(folder.rglob("*.parquet"))
    # Hub layout: data/<split>-00000-of-00010-<hash>.parquet; a folder of one split's files has
    # arbitrary names, so fall back to all files when none carries a split prefix.
    chosen = [f for f in files if f.name.startswith(f"{split}-")]
    any_prefixed = any(f.name.split("-")[0] in _KNOWN_SPLITS for f in files)
    return chosen if any_prefixed else files


_KNOWN_SPLITS = {"train", "validation", "test", "validation_unique", "test_unique"}


def describe_source(source: str) -> str:
    """`parquet`, `save_to_disk` or `hub`: how `source` will be read."""
    path = Path(source)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "save_to_disk"
        return "parquet"
    if path.exists() or source.startswith((".", "/", "~")):
        raise SmpoError(
            f"download.source {source!r}: not a folder; expected a folder of Parquet files, "
            f"a datasets.save_to_disk folder or a hub dataset id"
        )
    return "hub"


def iter_source(
    source: str, split: str, revision: str | None = None, batch_rows: int = 256
) -> Iterator[RowBatch]:
    """Stream a Pick-a-Pic source as record batches; memory stays flat in the dataset size."""
    kind = describe_source(source)
    if kind == "parquet":
        yield from _iter_parquet(Path(source), split, batch_rows)
    elif kind == "save_to_disk":
        yield from _iter_saved(Path(source), split, batch_rows)
    else:
        yield from _iter_hub(source, split, revision, batch_rows)


def _iter_parquet(folder: Path, split: str, batch_rows: int) -> Iterator[RowBatch]:
    files = _split_files(folder, split)
    if not files:
        raise SmpoError(
            f"download.source {str(folder)!r}: no Parquet files for split {split!r}; expected "
            f"files named {split}-NNNNN-of-NNNNN.parquet (the hub layout)"
        )
    for file in files:
        parquet = pq.ParquetFile(file)
        check_columns(parquet.schema_arrow, str(file))
        for batch in parquet.iter_batches(batch_size=batch_rows):
            yield RowBatch(pa.Table.from_batches([batch]), str(file))


def _iter_saved(folder: Path, split: str, batch_rows: int) -> Iterator[RowBatch]:
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SmpoError(
                f"download.source {str(folder)!r}: split {split!r} not in the saved dataset; "
                f"it has {', '.join(loaded)}"
            )
        loaded = loaded[split]
    table = loaded.data.table
    check_columns(table.schema, str(folder))
    for batch in table.to_batches(max_chunksize=batch_rows):
        yield RowBatch(pa.Table.from_batches([batch]), str(folder))


def _iter_hub(source: str, split: str, revision: str | None, batch_rows: int) -> Iterator[RowBatch]:
    import datasets

    try:
        stream = datasets.load_dataset(source, split=split, revision=revision, streaming=True)
        for rows in stream.iter(batch_size=batch_rows):
            table = pa.Table.from_pydict(rows)
            check_columns(table.schema, f"hub dataset {source}")
            yield RowBatch(table, f"hub dataset {source}")
    except SmpoError:
        raise
    except (ConnectionError, OSError, FileNotFoundError, ValueError) as exc:
        raise SmpoError(
            f"download.source {source!r}: the hub dataset could not be read "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); the "
            f"canonical Pick-a-Pic v2 repo has been reported unavailable: set download.source "
            f"to a mirror id, a folder of Parquet files or a datasets.save_to_disk folder"
        ) from exc


def jpeg_error(data: bytes | None) -> str | None:
    """None if the bytes decode to an image, else why not."""
    if not data:
        return "empty image bytes"
    try:
        with Image.open(io.BytesIO(data)) as image:
            # Decoding at reduced scale reads the whole stream (so truncation still fails)
            # at a fraction of the cost of a full-size decode.
            image.draft("RGB", (64, 64))
            image.load()
    except Exception as exc:  # PIL raises many types for bad data; all mean "unusable"
        return f"{type(exc).__name__}: {exc}"
    return None


def _pair_row(row: dict) -> dict:
    """A source row in PAIRS_SCHEMA's columns, optional published columns filled."""
    out = {}
    for name in PAIRS_SCHEMA.names:
        source = "ranking_id" if name == "pair_id" else name
        out[name] = row.get(source, OPTIONAL_DEFAULTS.get(source))
    return out


def classify(row: dict, seen_pairs: set[int]) -> tuple[str | None, list[tuple[str, str]]]:
    """Why a source row cannot train (a DROP_REASONS entry) or None, plus JPEG errors found."""
    if not row["has_label"]:
        return "no_label", []
    if row["label_0"] == 0.5:
        return "tie", []
    if (row["image_0_uid"] == row["image_1_uid"] or row["jpg_0"] == row["jpg_1"]
            or row.get("are_different") is False):
        return "identical", []
    if row["ranking_id"] in seen_pairs:
        return "duplicate_pair", []
    errors = [(f"jpg_{i}", err) for i in (0, 1) if (err := jpeg_error(row[f"jpg_{i}"]))]
    return ("corrupt_jpeg", errors) if errors else (None, [])


@dataclass
class DownloadProgress:
    """What is on disk: complete shards, source rows they account for, drop counts so far."""

    shards: int = 0
    source_rows: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)

    @classmethod
    def load(cls, folder: Path) -> DownloadProgress:
        file = folder / PROGRESS
        if not file.is_file():
            return cls()
        data = json.loads(file.read_text())
        return cls(data["shards"], data["source_rows"], data["pairs"], Counter(data["dropped"]))

    def save(self, folder: Path) -> None:
        write_json(folder / PROGRESS, {
            "shards": self.shards, "source_rows": self.source_rows, "pairs": self.pairs,
            "dropped": dict(self.dropped),
        })


def download_pairs(
    batches: Iterator[RowBatch],
    out_dir: Path,
    shard_rows: int,
    max_pairs: int | None = None,
    on_progress: Callable[[DownloadProgress], None] | None = None,
) -> DownloadProgress:
    """Filter source rows into `pairs-NNNNN.parquet` shards of `shard_rows` usable pairs.

    Resumes: shards already written (recorded in progress.json after each shard) are kept and
    the source rows they account for are skipped, so a killed run ends with exactly the rows a
    clean run writes.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    state = DownloadProgress.load(out_dir)
    resume_at = state.source_rows
    seen_pairs = _seen_pair_ids(out_dir, state.shards)
    pending: list[dict] = []
    quarantine: list[dict] = []
    dropped: Counter = Counter()
    position = 0

    def flush() -> None:
        _write_parquet(out_dir / f"pairs-{state.shards:05d}.parquet",
                       pa.Table.from_pylist(pending, PAIRS_SCHEMA))
        _write_parquet(out_dir / f"quarantine-{state.shards:05d}.parquet",
                       pa.Table.from_pylist(quarantine, QUARANTINE_SCHEMA))
        state.shards += 1
        state.pairs += len(pending)
        state.source_rows = position
        state.dropped.update(dropped)
        state.save(out_dir)
        pending.clear()
        quarantine.clear()
        dropped.clear()
        if on_progress:
            on_progress(state)

    def full() -> bool:
        return max_pairs is not None and state.pairs + len(pending) >= max_pairs

    for batch in batches:
        if position + batch.table.num_rows <= resume_at:
            position += batch.table.num_rows
            continue
        for row in batch.table.to_pylist():
            if full():
                break
            position += 1
            if position <= resume_at:
                continue
            reason, errors = classify(row, seen_pairs)
            if reason is None:
                seen_pairs.add(row["ranking_id"])
                pending.append(_pair_row(row))
            else:
                dropped[reason] += 1
                quarantine.extend(
                    {"pair_id": row["ranking_id"], "image": image, "error": err, "jpg": row[image]}
                    for image, err in errors
                )
            if len(pending) == shard_rows:
                flush()
        if full():
            break
    if pending or dropped or state.shards == 0:
        flush()
    return state


def _seen_pair_ids(out_dir: Path, shards: int) -> set[int]:
    seen: set[int] = set()
    for i in range(shards):
        table = pq.read_table(out_dir / f"pairs-{i:05d}.parquet", columns=["pair_id"])
        seen.update(table.column("pair_id").to_pylist())
    return seen


def _write_parquet(target: Path, table: pa.Table) -> None:
    with atomic_path(target) as tmp:
        pq.write_table(table, tmp)


def pair_shards(folder: Path) -> list[Path]:
    """The pair shards a completed download stage wrote, in order."""
    return sorted(Path(folder).glob("pairs-*.parquet"))


def iter_pairs(folder: Path, columns: list[str] | None = None,
               batch_rows: int = 256) -> Iterator[pa.RecordBatch]:
    for shard in pair_shards(folder):
        yield from pq.ParquetFile(shard).iter_batches(batch_size=batch_rows, columns=columns)
