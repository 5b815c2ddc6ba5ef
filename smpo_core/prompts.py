"""Prompt sets for evaluation (METHOD.md §5), by name or from any file.

    hpdv2-test                  the HPS v2 benchmark, from the hub
    hpdv2-test:/data/benchmark  the same set from a local copy in its published format
    builtin:tiny-prompts        a set the project builds (offline profiles), resolved to its
                                file by the `builtin:` resolver (smpo_core/worlds/builtins.py)
    prompts.txt | x.parquet     any file: one prompt per line, or a table with a prompt column
    owner/dataset@split         a split of any hub dataset stored as Parquet

Named sets are read in full and in their published order (no prompt dropped, duplicates
kept), so a table over them sits beside the papers'; other sources keep distinct prompts only.
A prompt's index is its position in the whole set, which is what its seed derives from, so
asking for fewer prompts never changes the images of the ones kept. To add a published set: one
entry in `PROMPT_SETS`; a set the project builds is a `builtin:` entry that writes a file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from smpo_core.errors import SmpoError, first_line
from smpo_core.pickapic import file_split
from smpo_core.refs import looks_local

SETTING = "evaluate.prompts"
#: Where a table keeps its prompts: Pick-a-Pic, HPDv2 / generic, PartiPrompts, generic.
PROMPT_COLUMNS = ("caption", "prompt", "Prompt", "text")
STYLE_COLUMNS = ("style", "Style")
HPDV2_STYLES = ("anime", "concept-art", "paintings", "photo")

Rows = list[tuple[str, str | None]]  # (prompt, style or None), in the set's order


@dataclass(frozen=True)
class PromptSet:
    """The prompts an evaluation generates from, with where they came from.

    `indices[k]` is prompt k's position in the whole set (its seed derives from it); `styles`
    is None for a set without styles (HPDv2 has four)."""

    spec: str
    source: str
    prompts: tuple[str, ...]
    indices: tuple[int, ...]
    styles: tuple[str, ...] | None = None
    published_size: int | None = None  # a named set's size as published
    total: int = 0  # prompts in the whole set as read

    def __len__(self) -> int:
        return len(self.prompts)

    def style_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for style in self.styles or ():
            counts[style] = counts.get(style, 0) + 1
        return counts

    def describe(self) -> dict:
        """What a summary records about the prompts."""
        return {"set": self.spec, "source": self.source, "count": len(self),
                "set_size": self.total, "published_size": self.published_size,
                "styles": self.style_counts() or None}


@dataclass(frozen=True)
class NamedSet:
    """A prompt set of the literature: where the hub keeps it and how its files read."""

    title: str
    size: int
    hub: str
    local_format: str
    read_hub: Callable[[], tuple[Rows, str]]
    read_local: Callable[[Path], Rows]


# --- readers ----------------------------------------------------------------------------------


def _column(names: Sequence[str], candidates: Sequence[str], origin: str,
            required: bool = True) -> str | None:
    column = next((c for c in candidates if c in names), None)
    if column is None and required:
        raise SmpoError(f"{SETTING}: {origin} has none of the columns {', '.join(candidates)}")
    return column


def _parquet_rows(handle, origin: str, prompt_columns: Sequence[str] = PROMPT_COLUMNS) -> Rows:
    """(prompt, style) rows of one Parquet file (a path or an open file); only those two
    columns are read, so a Pick-a-Pic shard's image bytes are never fetched."""
    try:
        parquet = pq.ParquetFile(handle)
    except Exception as exc:  # ArrowInvalid, OSError: not a Parquet file
        raise SmpoError(f"{SETTING}: {origin} is not a readable Parquet file ({exc})") from exc
    names = parquet.schema_arrow.names
    prompt = _column(names, prompt_columns, origin)
    style = _column(names, STYLE_COLUMNS, origin, required=False)
    table = parquet.read(columns=[c for c in (prompt, style) if c])
    prompts = table.column(prompt).to_pylist()
    styles = table.column(style).to_pylist() if style else [None] * len(prompts)
    return list(zip(prompts, styles, strict=True))


def _delimited_rows(path: Path, delimiter: str) -> Rows:
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        prompt = _column(reader.fieldnames or [], PROMPT_COLUMNS, str(path))
        style = _column(reader.fieldnames or [], STYLE_COLUMNS, str(path), required=False)
        return [(row[prompt], row[style] if style else None) for row in reader]


def _json_rows(path: Path) -> Rows:
    """A JSON list of prompts (the HPS v2 benchmark files) or of objects with a prompt key."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SmpoError(f"{SETTING}: {path} is not readable JSON ({exc})") from exc
    if not isinstance(data, list):
        raise SmpoError(f"{SETTING}: {path} holds a JSON {type(data).__name__}; expected a "
                        f"list of prompts")
    rows: Rows = []
    for item in data:
        if isinstance(item, str):
            rows.append((item, None))
        elif isinstance(item, dict):
            prompt = _column(list(item), PROMPT_COLUMNS, str(path))
            style = _column(list(item), STYLE_COLUMNS, str(path), required=False)
            rows.append((item[prompt], item[style] if style else None))
        else:
            raise SmpoError(f"{SETTING}: {path} lists a {type(item).__name__}; expected "
                            f"prompts (strings) or objects with a prompt key")
    return rows


def _file_rows(path: Path) -> Rows:
    """Any local prompt file, by its suffix; a folder is read as its Parquet files."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.parquet")
                       if not any(part.startswith(".") for part in p.parts))
        if not files:
            raise SmpoError(f"{SETTING}: folder {path} holds no Parquet files")
        return [row for file in files for row in _parquet_rows(file, str(file))]
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return [(line.strip(), None) for line in path.read_text(encoding="utf-8").splitlines()]
    if suffix in (".tsv", ".csv"):
        return _delimited_rows(path, "\t" if suffix == ".tsv" else ",")
    if suffix == ".json":
        return _json_rows(path)
    if suffix == ".parquet":
        return _parquet_rows(path, str(path))
    raise SmpoError(f"{SETTING}: {path} has an unknown suffix {suffix!r}; expected .txt, .tsv, "
                    f".csv, .json or .parquet (or a folder of Parquet files)")


def _hub_error(what: str, exc: BaseException, local: str) -> SmpoError:
    first = first_line(exc)
    return SmpoError(f"{SETTING}: could not read {what} from the hub ({type(exc).__name__}: "
                     f"{first}); give a local copy instead: {local}")


def _hub_parquet(dataset: str, split: str,
                 prompt_columns: Sequence[str] = PROMPT_COLUMNS) -> tuple[Rows, str]:
    """The rows of one split of a hub dataset stored as Parquet, read at one commit; only the
    prompt (and style) columns are fetched (HTTP range reads)."""
    from huggingface_hub import HfApi, HfFileSystem, constants

    info = HfApi().dataset_info(dataset, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    names = sorted(s.rfilename for s in info.siblings or [] if s.rfilename.endswith(".parquet"))
    files = [n for n in names if file_split(n) == split]
    if not files:
        raise FileNotFoundError(f"no Parquet files of split {split!r} in {dataset}")
    filesystem = HfFileSystem()
    rows: Rows = []
    for name in files:
        with filesystem.open(f"datasets/{dataset}@{info.sha}/{name}", "rb") as handle:
            rows += _parquet_rows(handle, f"hf://datasets/{dataset}/{name}", prompt_columns)
    return rows, f"hub {dataset}@{info.sha} ({split})"


# --- the named sets of the literature ----------------------------------------------------------


def _pickapic_local(path: Path) -> Rows:
    """A Pick-a-Pic v2 copy in the hub layout (`data/test_unique-NNNNN-of-NNNNN.parquet`), or
    one of its Parquet files."""
    if path.is_file():
        return _parquet_rows(path, str(path))
    files = sorted(p for p in path.rglob("*.parquet")
                   if file_split(p.relative_to(path).as_posix()) == "test_unique")
    if not files:
        raise SmpoError(f"{SETTING}: {path} holds no test_unique Parquet files; expected "
                        f"{PROMPT_SETS['pickapic-test-unique'].local_format}")
    return [row for file in files for row in _parquet_rows(file, str(file))]


def _parti_local(path: Path) -> Rows:
    return _file_rows(path)


def _hpdv2_local(path: Path) -> Rows:
    """The four HPS v2 benchmark files (`anime.json` ... `photo.json`, each a JSON list of 800
    prompts) in `path` or its `benchmark/` folder, one style after the other."""
    folder = path / "benchmark" if (path / "benchmark").is_dir() else path
    missing = [s for s in HPDV2_STYLES if not (folder / f"{s}.json").is_file()]
    if not path.is_dir() or missing:
        raise SmpoError(f"{SETTING}: {path} lacks {', '.join(f'{s}.json' for s in missing)}; "
                        f"expected {PROMPT_SETS['hpdv2-test'].local_format}")
    return [(prompt, style) for style in HPDV2_STYLES
            for prompt, _ in _json_rows(folder / f"{style}.json")]


def _hpdv2_hub() -> tuple[Rows, str]:
    from huggingface_hub import HfApi, constants, hf_hub_download

    # One metadata call first: it fails in seconds offline, where a download retries.
    commit = HfApi().dataset_info("zhwang/HPDv2", timeout=constants.HF_HUB_ETAG_TIMEOUT).sha
    files = {style: hf_hub_download("zhwang/HPDv2", f"benchmark/{style}.json",
                                    repo_type="dataset", revision=commit)
             for style in HPDV2_STYLES}
    rows = [(p, style) for style, file in files.items() for p, _ in _json_rows(Path(file))]
    return rows, f"hub zhwang/HPDv2@{commit} (benchmark/*.json)"


PROMPT_SETS: dict[str, NamedSet] = {
    "pickapic-test-unique": NamedSet(
        "Pick-a-Pic v2 test_unique", 500, "yuvalkirstain/pickapic_v2",
        "a Pick-a-Pic v2 folder in the hub layout (data/test_unique-NNNNN-of-NNNNN.parquet, "
        "caption column) or one of its Parquet files",
        lambda: _hub_parquet("yuvalkirstain/pickapic_v2", "test_unique"), _pickapic_local),
    "partiprompts": NamedSet(
        "PartiPrompts", 1632, "nateraw/parti-prompts",
        "PartiPrompts.tsv as google-research/parti publishes it (Prompt, Category, Challenge, "
        "Note), or a Parquet file with a Prompt column",
        lambda: _hub_parquet("nateraw/parti-prompts", "train"), _parti_local),
    "hpdv2-test": NamedSet(
        "HPDv2 test", 3200, "zhwang/HPDv2",
        "a folder with the HPS v2 benchmark files anime.json, concept-art.json, "
        "paintings.json and photo.json (JSON lists of prompts)",
        _hpdv2_hub, _hpdv2_local),
}


# --- choosing prompts ------------------------------------------------------------------------


def _distinct(rows: Rows) -> Rows:
    seen: set[str] = set()
    kept = []
    for prompt, style in rows:
        if prompt and prompt not in seen:
            seen.add(prompt)
            kept.append((prompt, style))
    return kept


def _first(rows: Rows, num_prompts: int | None) -> list[int]:
    """Indices of the prompts kept: all, or the first `num_prompts`; in a styled set the first
    ones of each style in turn (400 of HPDv2: 100 per style), so every style is measured."""
    if num_prompts is None or num_prompts >= len(rows):
        return list(range(len(rows)))
    styles = list(dict.fromkeys(style for _, style in rows))
    if styles == [None]:
        return list(range(num_prompts))
    by_style = {s: [i for i, (_, style) in enumerate(rows) if style == s] for s in styles}
    chosen: list[int] = []
    for k, style in enumerate(styles):
        share = num_prompts // len(styles) + (k < num_prompts % len(styles))
        chosen += by_style[style][:share]
    return sorted(chosen)


def _read(spec: str) -> tuple[Rows, str, int | None, bool]:
    """(rows, where they were read, published size, named set?)"""
    name, _, local = spec.partition(":")
    if name in PROMPT_SETS:
        named = PROMPT_SETS[name]
        if local:
            path = Path(local).expanduser()
            if not path.exists():
                raise SmpoError(f"{SETTING} {spec!r}: no such file or folder {path}; expected "
                                f"{named.local_format}")
            return named.read_local(path), str(path.resolve()), named.size, True
        try:
            rows, source = named.read_hub()
        except SmpoError:
            raise
        except Exception as exc:  # offline, gone, gated: all mean "not readable here"
            raise _hub_error(f"{named.title} ({named.hub})", exc,
                             f"{SETTING}={name}:PATH with {named.local_format}") from exc
        return rows, source, named.size, True
    path = Path(spec).expanduser()
    if path.exists():
        return _file_rows(path), str(path.resolve()), None, False
    if "@" in spec and not looks_local(spec):
        dataset, split = spec.rsplit("@", 1)
        try:
            rows, source = _hub_parquet(dataset, split)
        except SmpoError:
            raise
        except Exception as exc:
            raise _hub_error(f"{dataset} split {split}", exc,
                             f"{SETTING}=PATH to a .txt, .tsv, .json or Parquet file") from exc
        return rows, source, None, False
    raise SmpoError(f"{SETTING} {spec!r}: no such file, and not a named set; expected one of "
                    f"{', '.join(PROMPT_SETS)} (optionally NAME:PATH to a local copy), "
                    f"a .txt, .tsv, .csv, .json or "
                    f"Parquet file or folder, or <hub dataset id>@<split>")


def load_prompt_set(spec: str, num_prompts: int | None = None) -> PromptSet:
    """The prompt set `spec`, all of it or its first `num_prompts` (see `_first`). An empty
    set is an error: an evaluation of nothing would report NaNs."""
    rows, source, published, named = _read(spec)
    rows = [(str(p).strip(), None if s is None else str(s)) for p, s in rows if p is not None]
    rows = [(p, s) for p, s in rows if p]
    if not named:
        rows = _distinct(rows)
    if not rows:
        raise SmpoError(f"{SETTING} {spec!r}: no prompts found in {source}")
    kept = _first(rows, num_prompts)
    styled = any(style is not None for _, style in rows)
    return PromptSet(
        spec=spec, source=source, prompts=tuple(rows[i][0] for i in kept),
        indices=tuple(kept),
        styles=tuple(rows[i][1] or "unstyled" for i in kept) if styled else None,
        published_size=published, total=len(rows))


def is_local(spec: str) -> bool:
    """Whether reading `spec` needs no network (so it can be checked before a run starts)."""
    name, _, local = spec.partition(":")
    if name in PROMPT_SETS:
        return bool(local)
    return Path(spec).expanduser().exists() or looks_local(spec) \
        or "@" not in spec
