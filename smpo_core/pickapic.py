"""Pick-a-Pic v2 sources and the download stage's filtering (METHOD.md §1).

A source is read as a stream of Arrow tables in the published column layout, whichever form it
has: a folder of Parquet files (the hub layout `data/<split>-NNNNN-of-NNNNN.parquet`), a
`datasets.save_to_disk` folder, or a hub dataset id (its Parquet files, read over HTTP at one
pinned commit). Memory stays flat in the dataset size: one Parquet row group or one Arrow
record batch is held at a time, and output shards are written row group by row group.

Rows that cannot train are dropped with a reason; pairs whose JPEG bytes do not decode are
quarantined to a side file, not lost. Progress is committed shard by shard, so a killed run
resumes after its last complete shard and ends with exactly the rows a clean run writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from smpo_core import faults
from smpo_core.errors import SmpoError, first_line
from smpo_core.refs import looks_local
from smpo_core.schema import PAIRS_SCHEMA, PICKAPIC_SCHEMA
from smpo_core.store import is_partial, partial_sibling, write_json

# The columns the pair schema is built from; the rest of the published columns are optional.
REQUIRED_COLUMNS = (
    "caption", "image_0_uid", "image_1_uid", "jpg_0", "jpg_1", "label_0", "has_label",
    "ranking_id",
)
OPTIONAL_DEFAULTS = {"model_0": "", "model_1": "", "user_id": -1, "are_different": True}
DROP_REASONS = ("no_label", "tie", "identical", "corrupt_jpeg", "duplicate_pair",
                "bad_caption", "image_size")
QUARANTINE_SCHEMA = pa.schema(
    [("pair_id", pa.int64()), ("image", pa.string()), ("error", pa.string()),
     ("jpg", pa.binary())]
)
PROGRESS = "progress.json"
KNOWN_SPLITS = ("train", "validation", "test", "validation_unique", "test_unique")
CANONICAL_HUB_ID = "yuvalkirstain/pickapic_v2"
# Rows per table handed to the filter. Real pairs are ~0.3 MB, so this is ~20 MB of JPEG bytes.
BATCH_ROWS = 64

# `namespace/name`: what the hub accepts as a dataset id (single-segment ids are gone).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Hub layout file names: `train-00000-of-00645-<hash>.parquet` -> "train".
_SPLIT_FILE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-\d+-of-\d+")
# Columns `classify` looks at; the JPEG bytes are read per row only when they need decoding.
_CLASSIFY_COLUMNS = ("has_label", "label_0", "image_0_uid", "image_1_uid", "are_different",
                     "ranking_id")
# Small repeated strings compress well as dictionaries; JPEG bytes never repeat.
_DICTIONARY_COLUMNS = ["caption", "model_0", "model_1"]


class SourceUnreachable(SmpoError, ConnectionError):
    """The hub did not answer (refused, reset, timed out): worth retrying, unlike other
    SmpoErrors; the message says what to do if it lasts."""


@dataclass
class RowBatch:
    """Source rows, where they came from (for error messages) and the source index of the
    first row (None: the rows follow the previous batch)."""

    table: pa.Table
    origin: str
    start: int | None = None


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
        expected = _expected_type(column)
        if column not in schema.names:
            if column in OPTIONAL_DEFAULTS:
                continue
            raise SmpoError(
                f"{origin}: column {column!r} ({expected}) missing; expected the Pick-a-Pic v2 "
                f"columns {', '.join(REQUIRED_COLUMNS)} (METHOD.md §1)"
            )
        actual = schema.field(column).type
        if not _compatible(actual, expected):
            raise SmpoError(
                f"{origin}: column {column!r} has type {actual}; expected {expected} "
                f"(Pick-a-Pic v2 schema, METHOD.md §1)"
            )


# --- locating a source ----------------------------------------------------------------------


def describe_source(source: str) -> str:
    """`parquet`, `save_to_disk` or `hub`: how `source` will be read."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "save_to_disk"
        return "parquet"
    if path.exists():
        raise SmpoError(
            f"download.source {source!r}: is a file; expected a folder of Parquet files, "
            f"a datasets.save_to_disk folder or a hub dataset id"
        )
    if looks_local(source) or not _HUB_ID.match(source):
        raise SmpoError(
            f"download.source {source!r}: no such folder ({path.resolve()}), and not a hub "
            f"dataset id (namespace/name); give an existing folder of Parquet files, a "
            f"datasets.save_to_disk folder or a hub id such as {CANONICAL_HUB_ID}"
        )
    return "hub"


def file_split(relative_path: str) -> str | None:
    """The split a source file belongs to, from its name (`train-00000-of-00010.parquet`) or
    its folder (`default/train/0000.parquet`, the hub's converted-Parquet layout)."""
    parts = relative_path.split("/")
    if match := _SPLIT_FILE.match(parts[-1]):
        return match.group("split")
    if len(parts) > 1 and parts[-2] in KNOWN_SPLITS:
        return parts[-2]
    return None


def select_split(relative_paths: Iterable[str], split: str, where: str) -> list[str]:
    """The Parquet files of `split`, in order. Files that name no split are taken as the one
    split of a folder that holds a single split."""
    files = sorted(p for p in relative_paths if p.endswith(".parquet")
                   and not any(part.startswith(".") for part in p.split("/")))
    splits = {file_split(p) for p in files} - {None}
    chosen = [p for p in files if file_split(p) == split] if splits else files
    if not chosen:
        has = f"it has split(s) {', '.join(sorted(splits))}" if splits else "it has none"
        raise SmpoError(
            f"download.source {where}: no Parquet files for split {split!r} ({has}); expected "
            f"files named {split}-NNNNN-of-NNNNN.parquet (the hub layout)"
        )
    return chosen


@dataclass
class PickapicSource:
    """A located source: its kind, the files of one split in order, and for the hub the commit
    they are read at (so a resumed run reads the same snapshot)."""

    kind: str
    location: str
    split: str
    files: list[str]
    revision: str | None = None
    num_rows: int | None = None  # known for local sources

    def batches(self, skip_rows: int = 0, batch_rows: int = BATCH_ROWS) -> Iterator[RowBatch]:
        """The split's rows from row `skip_rows` on, in tables of at most `batch_rows` rows.
        Whole files and row groups before `skip_rows` are skipped without reading their data
        (Parquet), so resuming late in a large source is cheap."""
        if self.kind == "save_to_disk":
            return _arrow_batches(self.files, skip_rows, batch_rows)
        if self.kind == "parquet":
            return _parquet_batches(self.files, _open_local, skip_rows, batch_rows)
        return _hub_batches(self, skip_rows, batch_rows)


def open_source(source: str, split: str, revision: str | None = None) -> PickapicSource:
    """Locate the files of `split` in `source` and check their columns (local sources: all of
    them now, before anything is written; hub: each file as it is reached)."""
    kind = describe_source(source)
    if kind == "hub":
        files, commit = _hub_files(source, split, revision)
        return PickapicSource(kind, source, split, files, commit)
    folder = Path(source).expanduser()
    if kind == "parquet":
        relative = [p.relative_to(folder).as_posix() for p in folder.rglob("*.parquet")]
        files = [str(folder / p) for p in select_split(relative, split, repr(source))]
        rows = 0
        for file in files:
            parquet = _parquet_file(file, file)
            check_columns(parquet.schema_arrow, file)
            rows += parquet.metadata.num_rows
        return PickapicSource(kind, source, split, files, num_rows=rows)
    files = _saved_files(folder, split)
    for file in files:
        with pa.OSFile(file) as handle:
            check_columns(pa.ipc.open_stream(handle).schema, file)
    return PickapicSource(kind, source, split, files)


# Bytes read from the end of each file for its fingerprint: a Parquet footer (schema, row
# group offsets, sizes and statistics) and the last data pages; an Arrow stream's last batch.
_FINGERPRINT_TAIL = 64 * 1024


def source_fingerprint(source: str) -> str | None:
    """A hash of a local source's files (relative names, sizes, last 64 KiB of each), or None
    for a hub source (read at a pinned commit). It enters the download key, so a file fixed or
    replaced in place is read again instead of reusing, or resuming from, what the old file
    gave. Content, not modification times: identical files rewritten keep the key (the builtin
    source, rebuilt in another store, gives the same key)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(f for f in path.rglob("*") if f.is_file()):
        relative = file.relative_to(path).as_posix()
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        size = file.stat().st_size
        digest.update(f"{relative}\0{size}\0".encode())
        with file.open("rb") as handle:
            handle.seek(max(0, size - _FINGERPRINT_TAIL))
            digest.update(handle.read())
    return digest.hexdigest()[:16]


def iter_source(
    source: str, split: str, revision: str | None = None, batch_rows: int = BATCH_ROWS,
    skip_rows: int = 0,
) -> Iterator[RowBatch]:
    """Stream a Pick-a-Pic source as tables; memory stays flat in the dataset size."""
    return open_source(source, split, revision).batches(skip_rows, batch_rows)


# --- reading rows ---------------------------------------------------------------------------


def _slices(tables: Iterable[pa.Table | pa.RecordBatch], origin: str, start: int,
            skip_rows: int, batch_rows: int) -> Iterator[RowBatch]:
    """Cut tables whose first row is source row `start` into RowBatches, dropping rows before
    `skip_rows`. The caller adds the tables' rows to its own count."""
    for table in tables:
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        first = max(0, skip_rows - start)
        for offset in range(first, table.num_rows, batch_rows):
            yield RowBatch(table.slice(offset, batch_rows), origin, start + offset)
        start += table.num_rows


def _parquet_file(handle: Any, origin: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(handle)
    except pa.ArrowInvalid as exc:
        raise SmpoError(f"{origin}: not a readable Parquet file ({exc}); replace or remove "
                        f"it") from exc


def _open_local(file: str) -> Any:
    return contextlib.nullcontext(file)  # a path: pyarrow reads local files natively


def _parquet_batches(files: list[str], open_file: Callable[[str], Any], skip_rows: int,
                     batch_rows: int, origin: Callable[[str], str] = str,
                     damaged_error: type[BaseException] | tuple = (OSError, pa.ArrowException)
                     ) -> Iterator[RowBatch]:
    """`damaged_error`: the read errors that mean a damaged file (over HTTP an OSError may be
    the network instead, which the caller reports)."""
    start = 0
    for file in files:
        with open_file(file) as handle:
            parquet = _parquet_file(handle, origin(file))
            meta = parquet.metadata
            if start + meta.num_rows <= skip_rows:
                start += meta.num_rows
                continue
            check_columns(parquet.schema_arrow, origin(file))
            groups = []
            for group in range(meta.num_row_groups):
                rows = meta.row_group(group).num_rows
                if start + rows <= skip_rows:
                    start += rows
                else:
                    groups.append(group)
            # The reader holds one row group at a time: memory is bounded by the largest row
            # group, not by the file or the dataset.
            for group in groups:
                tables = _row_group(parquet, group, batch_rows, origin(file), damaged_error)
                yield from _slices(tables, origin(file), start, skip_rows, batch_rows)
                start += meta.row_group(group).num_rows


def _row_group(parquet: pq.ParquetFile, group: int, batch_rows: int, origin: str,
               damaged_error: type[BaseException]) -> Iterator[pa.RecordBatch]:
    """One row group's record batches; a read error (a corrupt page, bad compression, a
    truncated column) anywhere in it is one line naming the file and the row group."""
    try:
        yield from parquet.iter_batches(batch_size=batch_rows, row_groups=[group],
                                        use_threads=False)
    except damaged_error as exc:
        first = sum(parquet.metadata.row_group(g).num_rows for g in range(group))
        rows = parquet.metadata.row_group(group).num_rows
        raise SmpoError(
            f"{origin}: row group {group} of {parquet.metadata.num_row_groups} (rows {first} to "
            f"{first + rows - 1} of the file) cannot be read ({type(exc).__name__}: "
            f"{first_line(exc)}); the file is damaged: replace it with a good copy or remove it "
            f"from the source") from exc


def _saved_files(folder: Path, split: str) -> list[str]:
    """The Arrow files of `split` in a save_to_disk folder (a DatasetDict or one Dataset)."""
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
        raise SmpoError(
            f"download.source {str(folder)!r}: not a readable datasets.save_to_disk folder "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SmpoError(
                f"download.source {str(folder)!r}: split {split!r} not in the saved dataset; "
                f"it has {', '.join(loaded)}"
            )
        loaded = loaded[split]
    elif loaded.split is not None and str(loaded.split) != split:
        raise SmpoError(
            f"download.source {str(folder)!r}: the saved dataset holds split "
            f"{str(loaded.split)!r}, not {split!r}; set download.split={loaded.split} or save "
            f"the split you want"
        )
    return [entry["filename"] for entry in loaded.cache_files]


def _arrow_batches(files: list[str], skip_rows: int, batch_rows: int) -> Iterator[RowBatch]:
    start = 0
    for file in files:
        # Read as a stream, not memory-mapped as `datasets` does: mapped pages stay resident
        # once touched, so RSS would grow with the dataset.
        with pa.OSFile(file) as handle:
            reader = pa.ipc.open_stream(handle)
            number = 0
            while True:
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                except (OSError, pa.ArrowException) as exc:
                    raise SmpoError(
                        f"{file}: record batch {number} (from row {start}) cannot be read "
                        f"({type(exc).__name__}: {first_line(exc)}); the file is damaged: "
                        f"save the dataset again (datasets.save_to_disk)") from exc
                yield from _slices([batch], file, start, skip_rows, batch_rows)
                start += batch.num_rows
                number += 1


# --- the hub --------------------------------------------------------------------------------


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def is_transient(exc: BaseException) -> bool:
    """Whether retrying could help: the network or the hub failed, not the input."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OfflineModeIsEnabled):
            return False
        if isinstance(exc, SourceUnreachable):
            return True
        if isinstance(exc, SmpoError):
            return False
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            return status in (408, 429) or (status is not None and status >= 500)
        if isinstance(exc, ConnectionError | TimeoutError):
            return True
        # huggingface_hub talks through httpx (httpx2 in hub 2.x): its transport errors are
        # not OSErrors, so they are recognised by class name.
        if any(cls.__module__.split(".")[0].startswith("httpx")
               and cls.__name__ in ("TransportError", "TimeoutException")
               for cls in type(exc).__mro__):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _hub_advice(source: str, mirror: bool = True) -> str:
    local = (f"a local folder of Pick-a-Pic Parquet files in the published layout "
             f"(data/<split>-NNNNN-of-NNNNN.parquet) or a datasets.save_to_disk folder "
             f"(there is no local folder {Path(source).resolve()})")
    if not mirror:
        return f"point download.source at {local}"
    return (f"point download.source at a mirror dataset id (or set HF_ENDPOINT to a hub "
            f"mirror), or at {local}")


def _hub_error(source: str, revision: str | None, exc: BaseException) -> SmpoError:
    """What a hub failure means for the user: gone, gated, no such revision, or unreachable."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        DisabledRepoError,
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"download.source {source!r}"
    why = type(exc).__name__ + (f": {first_line(exc)}" if str(exc).strip() else "")
    if isinstance(exc, OfflineModeIsEnabled):
        return SmpoError(f"{what}: offline mode is on (HF_HUB_OFFLINE), so the hub cannot be "
                         f"read; unset it, or {_hub_advice(source, mirror=False)}")
    if isinstance(exc, GatedRepoError):
        return SmpoError(f"{what}: the hub dataset is gated ({why}); accept its terms on the "
                         f"hub and set HF_TOKEN, or {_hub_advice(source)}")
    if isinstance(exc, RevisionNotFoundError):
        return SmpoError(f"{what}: revision {revision!r} not found on the hub ({why}); set "
                         f"download.revision to an existing branch, tag or commit")
    if isinstance(exc, RepositoryNotFoundError | DisabledRepoError):
        canonical = (" (the canonical Pick-a-Pic v2 repo has been reported unavailable)"
                     if source == CANONICAL_HUB_ID else "")
        return SmpoError(f"{what}: the hub at {constants.ENDPOINT} answers that this dataset "
                         f"is gone or not accessible{canonical} ({why}); {_hub_advice(source)}")
    if is_transient(exc):
        return SourceUnreachable(
            f"{what}: the hub at {constants.ENDPOINT} is unreachable or failing ({why}); a "
            f"retry may help if the network is flaky, else {_hub_advice(source)}")
    return SmpoError(f"{what}: the hub dataset could not be read ({why}); "
                     f"{_hub_advice(source)}")


def _hub_files(source: str, split: str, revision: str | None) -> tuple[list[str], str]:
    """The split's Parquet files in hub dataset `source` and the commit `revision` is at.

    One API call, with huggingface_hub's metadata timeout (HF_HUB_ETAG_TIMEOUT, 10 s) and no
    retries, so an unreachable or offline hub fails in seconds, not minutes.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    try:
        if constants.HF_HUB_OFFLINE or _env_flag("HF_DATASETS_OFFLINE"):
            raise OfflineModeIsEnabled("HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set")
        info = HfApi().dataset_info(source, revision=revision,
                                    timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as exc:
        raise _hub_error(source, revision, exc) from exc
    names = [sibling.rfilename for sibling in info.siblings or []]
    where = f"{source!r} (hub, commit {info.sha})"
    return select_split(names, split, where), info.sha


def _hub_batches(source: PickapicSource, skip_rows: int, batch_rows: int) -> Iterator[RowBatch]:
    """The hub files, streamed by HTTP range reads of the row groups still needed."""
    from huggingface_hub import HfFileSystem

    filesystem = HfFileSystem()
    root = f"datasets/{source.location}@{source.revision}"

    def open_file(name: str) -> Any:
        return filesystem.open(f"{root}/{name}", "rb")

    def origin(name: str) -> str:
        return f"hf://{root}/{name}"

    try:
        yield from _parquet_batches(source.files, open_file, skip_rows, batch_rows, origin,
                                    damaged_error=pa.ArrowInvalid)
    except SmpoError:
        raise
    except Exception as exc:
        if is_transient(exc) or isinstance(exc, OSError):
            raise _hub_error(source.location, source.revision, exc) from exc
        raise


# --- filtering and writing shards -----------------------------------------------------------


@dataclass(frozen=True)
class ImageLimits:
    """Image sizes a pair may have: a shorter side of at least `min_side` pixels (a 1x1 image
    cannot train at any resolution) and at most `max_pixels` pixels (PIL's own bound against
    decompression bombs: larger images are dropped from their header, never decoded)."""

    min_side: int = 64
    max_pixels: int = 89_478_485


def jpeg_error(data: bytes | None, limits: ImageLimits | None = None) -> tuple[str, str] | None:
    """None if the bytes decode to an image within `limits`, else (drop reason, why)."""
    if not data:
        return "corrupt_jpeg", "empty image bytes"
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size  # from the header, before any pixel is decoded
            if limits and min(width, height) < limits.min_side:
                return "image_size", f"{width}x{height}: shorter side below {limits.min_side} px"
            if limits and width * height > limits.max_pixels:
                return "image_size", f"{width}x{height}: above {limits.max_pixels} pixels"
            # Decoding at reduced scale reads the whole stream (so truncation still fails)
            # at a fraction of the cost of a full-size decode.
            image.draft("RGB", (64, 64))
            image.load()
    except Image.DecompressionBombError as exc:  # over twice PIL's bound: refused by Image.open
        return "image_size", str(exc)
    except Exception as exc:  # PIL raises many types for bad data; all mean "unusable"
        return "corrupt_jpeg", f"{type(exc).__name__}: {exc}"
    return None


def classify(row: dict, seen_pairs: set[int], limits: ImageLimits | None = None
             ) -> tuple[str | None, list[tuple[str, str]]]:
    """Why a source row cannot train (a DROP_REASONS entry) or None, plus JPEG errors found
    (the images to quarantine).

    `row` holds the `_CLASSIFY_COLUMNS` present in the source, `jpg_0`, `jpg_1` and, when
    checked, `caption` as bytes; `seen_pairs` the ids of the pairs kept so far.
    """
    label = row["label_0"]
    if not row["has_label"] or label is None or math.isnan(label):
        return "no_label", []
    if label == 0.5:
        return "tie", []
    if row["image_0_uid"] == row["image_1_uid"] or row.get("are_different") is False:
        return "identical", []
    if row["jpg_0"] == row["jpg_1"]:
        return "identical", []
    if row["ranking_id"] in seen_pairs:
        return "duplicate_pair", []
    if not _decodes_as_text(row.get("caption", b"")):
        return "bad_caption", []
    problems = {f"jpg_{i}": problem for i in (0, 1)
                if (problem := jpeg_error(row[f"jpg_{i}"], limits))}
    errors = [(image, why) for image, (reason, why) in problems.items()
              if reason == "corrupt_jpeg"]
    if errors:
        return "corrupt_jpeg", errors
    return ("image_size", []) if problems else (None, [])


def _decodes_as_text(caption: bytes | str | None) -> bool:
    """Invalid UTF-8 in a string column: Parquet and Arrow store it unchecked, and only a
    later read (tokenising a caption) would fail on it. A caption already decoded (rows
    built in Python) is checked for lone surrogates, which no UTF-8 file can hold."""
    try:
        if isinstance(caption, str):
            caption.encode("utf-8")
        else:
            (caption or b"").decode("utf-8")
    except UnicodeError:
        return False
    return True


def _to_pairs(table: pa.Table) -> pa.Table:
    """Source rows in PAIRS_SCHEMA, optional published columns filled with their defaults."""
    columns = []
    for target in PAIRS_SCHEMA:
        name = "ranking_id" if target.name == "pair_id" else target.name
        if name in table.column_names:
            columns.append(table.column(name).cast(target.type))
        else:
            columns.append(pa.array([OPTIONAL_DEFAULTS[name]] * table.num_rows, target.type))
    return pa.Table.from_arrays(columns, schema=PAIRS_SCHEMA)


@dataclass
class DownloadProgress:
    """What is on disk: complete shards, source rows they account for, drop counts so far."""

    shards: int = 0
    source_rows: int = 0
    pairs: int = 0
    dropped: Counter = field(default_factory=Counter)

    @classmethod
    def load(cls, folder: Path) -> DownloadProgress:
        file = Path(folder) / PROGRESS
        if not file.is_file():
            return cls()
        data = json.loads(file.read_text())
        return cls(data["shards"], data["source_rows"], data["pairs"], Counter(data["dropped"]))

    def save(self, folder: Path) -> None:
        write_json(Path(folder) / PROGRESS, {
            "shards": self.shards, "source_rows": self.source_rows, "pairs": self.pairs,
            "dropped": dict(self.dropped),
        })


def _shard_name(kind: str, index: int) -> str:
    return f"{kind}-{index:05d}.parquet"


class _ShardWriter:
    """One shard's pairs and quarantine files, written row group by row group under partial
    names and renamed into place only when the shard is complete."""

    def __init__(self, out_dir: Path, index: int):
        self.out_dir, self.index = out_dir, index
        self._partials: dict[str, Path] = {}
        self.pairs = self._writer("pairs", PAIRS_SCHEMA, _DICTIONARY_COLUMNS)
        self.quarantine: pq.ParquetWriter | None = None
        self.rows = 0
        self.dropped: Counter = Counter()

    def _writer(self, kind: str, schema: pa.Schema, dictionary: list[str]) -> pq.ParquetWriter:
        self._partials[kind] = partial_sibling(self.out_dir / _shard_name(kind, self.index))
        return pq.ParquetWriter(self._partials[kind], schema, use_dictionary=dictionary)

    def write(self, pairs: pa.Table, quarantine: list[dict]) -> None:
        """Append source rows that passed (as one row group) and quarantined images."""
        if pairs.num_rows:
            self.pairs.write_table(_to_pairs(pairs))
            self.rows += pairs.num_rows
        if quarantine:
            if self.quarantine is None:
                self.quarantine = self._writer("quarantine", QUARANTINE_SCHEMA, ["image"])
            self.quarantine.write_table(pa.Table.from_pylist(quarantine, QUARANTINE_SCHEMA))

    def commit(self) -> None:
        self.pairs.close()
        kinds = ["pairs"]
        if self.quarantine is not None:
            self.quarantine.close()
            kinds.insert(0, "quarantine")
        for kind in kinds:
            os.replace(self._partials[kind], self.out_dir / _shard_name(kind, self.index))


def _forget_incomplete(out_dir: Path, shards: int) -> None:
    """Remove what a killed run left beyond its last complete shard: partial files, and a
    shard renamed into place whose progress.json update never happened."""
    for file in out_dir.iterdir():
        shard = re.fullmatch(r"(pairs|quarantine)-(\d+)\.parquet", file.name)
        if is_partial(file) or (shard and int(shard.group(2)) >= shards):
            file.unlink()


def download_pairs(
    batches: Iterable[RowBatch],
    out_dir: Path,
    shard_rows: int,
    max_pairs: int | None = None,
    on_progress: Callable[[DownloadProgress], None] | None = None,
    limits: ImageLimits | None = None,
) -> DownloadProgress:
    """Filter source rows into `pairs-NNNNN.parquet` shards of `shard_rows` usable pairs.

    Rows dropped while a shard fills are counted with it; their undecodable JPEGs go to
    `quarantine-NNNNN.parquet` beside it. Resumes: shards already committed (recorded in
    progress.json after each) are kept and the source rows they account for are skipped, so a
    killed run ends with exactly the rows a clean run writes. `batches` may start anywhere up
    to the first row not yet accounted for (`RowBatch.start`), e.g. from
    `PickapicSource.batches(skip_rows=DownloadProgress.load(out_dir).source_rows)`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = DownloadProgress.load(out_dir)
    _forget_incomplete(out_dir, state.shards)
    seen_pairs = _seen_pair_ids(out_dir, state.shards)
    shard: _ShardWriter | None = None  # the shard being filled
    next_row = 0  # source index of the row after the last one read

    def commit(position: int) -> None:
        nonlocal shard
        assert shard is not None
        shard.commit()
        state.shards += 1
        state.pairs += shard.rows
        state.source_rows = position
        state.dropped.update(shard.dropped)
        state.save(out_dir)
        faults.reached("download.shard")
        shard = None
        if on_progress:
            on_progress(state)

    done = max_pairs is not None and state.pairs >= max_pairs
    for batch in ([] if done else batches):
        start = next_row if batch.start is None else batch.start
        if start > max(next_row, state.source_rows):
            raise ValueError(f"{batch.origin}: rows {max(next_row, state.source_rows)} to "
                             f"{start - 1} of the source are missing from the batches")
        skip = max(0, state.source_rows - start)
        table, start = batch.table.slice(skip), start + skip
        next_row = start + table.num_rows
        # Read per row as needed. The caption as bytes: a string column holding invalid UTF-8
        # would raise when read as str.
        per_row = {name: table.column(name) for name in ("jpg_0", "jpg_1")}
        per_row["caption"] = table.column("caption").cast(pa.large_binary())
        columns = [c for c in _CLASSIFY_COLUMNS if c in table.column_names]
        kept: list[int] = []  # rows of `table` for the shard, not yet written to it
        quarantine: list[dict] = []
        for i, row in enumerate(table.select(columns).to_pylist()):
            shard = shard or _ShardWriter(out_dir, state.shards)
            row |= {name: column[i].as_py() for name, column in per_row.items()}
            reason, errors = classify(row, seen_pairs, limits)
            if reason is None:
                seen_pairs.add(row["ranking_id"])
                kept.append(i)
            else:
                shard.dropped[reason] += 1
                quarantine += [{"pair_id": row["ranking_id"], "image": image, "error": error,
                                "jpg": row[image]} for image, error in errors]
            done = max_pairs is not None and state.pairs + shard.rows + len(kept) >= max_pairs
            if done or shard.rows + len(kept) == shard_rows:
                shard.write(table.take(pa.array(kept, pa.int64())), quarantine)
                kept, quarantine = [], []
                commit(start + i + 1)
                if done:
                    break
        if shard is not None:
            shard.write(table.take(pa.array(kept, pa.int64())), quarantine)
        if done:
            break
    if shard is not None or state.shards == 0:
        # The rows after the last full shard; or, for an empty source, one empty shard.
        shard = shard or _ShardWriter(out_dir, state.shards)
        commit(next_row)
    return state


def _seen_pair_ids(out_dir: Path, shards: int) -> set[int]:
    seen: set[int] = set()
    for i in range(shards):
        table = pq.read_table(out_dir / _shard_name("pairs", i), columns=["pair_id"])
        seen.update(table.column("pair_id").to_pylist())
    return seen


def pair_shards(folder: Path) -> list[Path]:
    """The pair shards a completed download stage wrote, in order."""
    return sorted(Path(folder).glob("pairs-*.parquet"))


def quarantine_files(folder: Path) -> list[Path]:
    """The side files of undecodable JPEGs a download stage wrote, in order."""
    return sorted(Path(folder).glob("quarantine-*.parquet"))


def iter_pairs(folder: Path, columns: list[str] | None = None,
               batch_rows: int = 256) -> Iterator[pa.RecordBatch]:
    """The pairs a completed download stage wrote, in order, as record batches."""
    for shard in pair_shards(folder):
        yield from pq.ParquetFile(shard).iter_batches(batch_size=batch_rows, columns=columns)


def count_pairs(folder: Path) -> int:
    """How many pairs a completed download stage wrote, from the Parquet footers alone."""
    return sum(pq.read_metadata(shard).num_rows for shard in pair_shards(folder))


def sample_positions(total: int, count: int | None, seed: int) -> list[int]:
    """Increasing positions of a uniform random sample of `count` of `total` pairs, without
    replacement, the same for the same seed; every position when count is None or >= total.
    File order is not random (captions, users and dates cluster), so the first N would not do.
    """
    if count is None or count >= total:
        return list(range(total))
    import numpy as np  # only here: the download side of this module needs no numpy

    rng = np.random.default_rng(seed % 2**63)
    return sorted(rng.choice(total, size=count, replace=False).tolist())


def read_pairs_at(folder: Path, positions: list[int], columns: list[str] | None = None
                  ) -> Iterator[dict[str, Any]]:
    """The pairs at these increasing positions (over all shards, in order), one row at a
    time; only the Parquet row groups that hold one are read, one row group at a time."""
    chosen = iter(positions)
    wanted = next(chosen, None)
    start = 0
    for shard in pair_shards(folder):
        file = pq.ParquetFile(shard)
        for group in range(file.num_row_groups):
            rows = file.metadata.row_group(group).num_rows
            local = []
            while wanted is not None and wanted < start + rows:
                local.append(wanted - start)
                wanted = next(chosen, None)
            if local:
                yield from file.read_row_group(group, columns=columns).take(local).to_pylist()
            start += rows
    if wanted is not None:
        raise SmpoError(f"pairs folder {str(folder)!r}: position {wanted} is past its "
                        f"{start} pairs")
