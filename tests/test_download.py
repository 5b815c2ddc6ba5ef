"""The download stage: three source layouts, exact filter counts, quarantine, splits, max_pairs,
resume after a kill, hub failures with actionable messages, and Prefect retrying only network
errors."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from smpo_core.environment import environment
from smpo_core.errors import SmpoError
from smpo_core.pickapic import (
    DownloadProgress,
    ImageLimits,
    SourceUnreachable,
    describe_source,
    download_pairs,
    iter_source,
    open_source,
    pair_shards,
    quarantine_files,
)
from smpo_core.schema import PAIRS_SCHEMA, PICKAPIC_SCHEMA
from smpo_core.settings import load_settings
from smpo_core.worlds.tiny import expected_counts, write_synthetic_pickapic
from stages import tracking
from stages.common import RunContext, StageResult, run_stage, stage_task
from stages.download import compute, key_inputs, retry_if_transient

REPO = Path(__file__).resolve().parents[1]
TRAIN_PAIRS, VALIDATION_PAIRS = 320, 60
MIRROR = "smpo-test/pickapic_mirror"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --- sources ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same synthetic Pick-a-Pic data as a Parquet folder (train + validation), a saved
    DatasetDict and a saved single Dataset, with synthetic's expected counts per split."""
    import datasets

    root = tmp_path_factory.mktemp("sources")
    parquet = root / "parquet"
    expected = {}
    for split, pairs, files in (("train", TRAIN_PAIRS, 2), ("validation", VALIDATION_PAIRS, 1)):
        write_synthetic_pickapic(parquet, num_pairs=pairs, seed=0, split=split, num_files=files)
        expected[split] = expected_counts(pairs)
    cache = str(root / "hf-cache")
    loaded = {split: datasets.Dataset.from_parquet(
        [str(f) for f in sorted((parquet / "data").glob(f"{split}-*.parquet"))], cache_dir=cache)
        for split in expected}
    datasets.DatasetDict(loaded).save_to_disk(str(root / "saved-dict"))
    loaded["train"].save_to_disk(str(root / "saved-single"))
    return {"parquet": parquet, "saved-dict": root / "saved-dict",
            "saved-single": root / "saved-single", "expected": expected}


def _source_rows(folder: Path, split: str = "train") -> list[dict]:
    return pq.read_table(sorted((folder / "data").glob(f"{split}-*.parquet"))).to_pylist()


def _decodes(data: bytes) -> bool:
    """A full decode, independent of the stage's reduced-size check."""
    try:
        Image.open(io.BytesIO(data)).convert("RGB")
    except OSError:
        return False
    return True


def _usable_ids(rows: list[dict]) -> list[int]:
    """The pair ids that should survive, in source order, by the rules of METHOD.md §1."""
    return [r["ranking_id"] for r in rows
            if r["has_label"] and r["label_0"] != 0.5 and r["are_different"]
            and _decodes(r["jpg_0"]) and _decodes(r["jpg_1"])]


def _pairs(folder: Path) -> pa.Table:
    shards = pair_shards(folder)
    return pa.concat_tables([pq.read_table(s) for s in shards]) if shards else None


def _quarantine(folder: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(f) for f in quarantine_files(folder)])


def _download(source: Path | str, out: Path, split: str = "train", shard_rows: int = 64,
              **kwargs) -> DownloadProgress:
    return download_pairs(iter_source(str(source), split), out, shard_rows, **kwargs)


def _dropped(state: DownloadProgress) -> dict:
    return {k: v for k, v in state.dropped.items() if v}


# --- counts, contents, quarantine ------------------------------------------------------------


def test_parquet_folder_counts_match_synthetic_expectations(sources: dict, tmp_path: Path) -> None:
    expected = sources["expected"]["train"]
    state = _download(sources["parquet"], tmp_path, shard_rows=64)
    assert state.pairs == expected["usable"]
    assert _dropped(state) == {"tie": expected["ties"], "no_label": expected["no_label"],
                               "identical": expected["identical"],
                               "corrupt_jpeg": expected["corrupt"]}
    assert state.source_rows == expected["rows"]
    assert state.shards == -(-expected["usable"] // 64)
    assert [pq.read_metadata(s).num_rows for s in pair_shards(tmp_path)] == [64, 64, 64, 58]
    pairs = _pairs(tmp_path)
    assert pairs.schema.equals(PAIRS_SCHEMA)
    rows = _source_rows(sources["parquet"])
    assert pairs.column("pair_id").to_pylist() == _usable_ids(rows)
    by_id = {r["ranking_id"]: r for r in rows}
    for pair in pairs.to_pylist():
        source = by_id[pair["pair_id"]]
        assert {k: source[k] for k in pair if k != "pair_id"} == {
            k: v for k, v in pair.items() if k != "pair_id"}
        assert pair["label_0"] in (0.0, 1.0)


def test_undecodable_jpegs_are_quarantined_with_pair_id_column_error_and_bytes(
        sources: dict, tmp_path: Path) -> None:
    _download(sources["parquet"], tmp_path)
    quarantine = _quarantine(tmp_path)
    assert quarantine.schema.names == ["pair_id", "image", "error", "jpg"]
    corrupt = {(r["ranking_id"], image): r[image]
               for r in _source_rows(sources["parquet"]) for image in ("jpg_0", "jpg_1")
               if r["has_label"] and r["label_0"] != 0.5 and r["are_different"]
               and not _decodes(r[image])}
    assert len(corrupt) == sources["expected"]["train"]["corrupt"]
    assert {(r["pair_id"], r["image"]): r["jpg"] for r in quarantine.to_pylist()} == corrupt
    assert all("truncated" in error for error in quarantine.column("error").to_pylist())


def test_repeated_pair_ids_and_missing_labels_are_dropped(sources: dict, tmp_path: Path) -> None:
    rows = _source_rows(sources["parquet"])
    usable = set(_usable_ids(rows))
    rows = [r for r in rows if r["ranking_id"] in usable][:6]
    rows += [dict(rows[1]),  # the same ranking_id again
             rows[2] | {"ranking_id": 1, "label_0": None},
             rows[3] | {"ranking_id": 2, "label_0": float("nan")}]
    (tmp_path / "src" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, PICKAPIC_SCHEMA),
                   tmp_path / "src" / "data" / "part.parquet")
    state = _download(tmp_path / "src", tmp_path / "out")
    assert state.pairs == 6
    assert _dropped(state) == {"duplicate_pair": 1, "no_label": 2}


def test_all_layouts_give_identical_pairs(sources: dict, tmp_path: Path, fake_hub: str) -> None:
    results = {}
    for name in ("parquet", "saved-dict", "saved-single", "hub"):
        source = MIRROR if name == "hub" else sources[name]
        state = _download(source, tmp_path / name, shard_rows=100)
        results[name] = (_pairs(tmp_path / name), _quarantine(tmp_path / name), _dropped(state))
    assert open_source(str(sources["saved-dict"]), "train").kind == "save_to_disk"
    assert open_source(MIRROR, "train").revision == COMMIT
    reference = results["parquet"]
    assert reference[0].num_rows == sources["expected"]["train"]["usable"]
    for name, (pairs, quarantine, dropped) in results.items():
        assert pairs.equals(reference[0]), name
        assert quarantine.equals(reference[1]), name
        assert dropped == reference[2], name


def test_split_selection(sources: dict, tmp_path: Path) -> None:
    expected = sources["expected"]["validation"]
    train = set(_pairs(_run(sources["parquet"], tmp_path / "train")).column("pair_id").to_pylist())
    for name in ("parquet", "saved-dict"):
        state = _download(sources[name], tmp_path / name, split="validation")
        assert state.source_rows == VALIDATION_PAIRS
        assert state.pairs == expected["usable"]
        assert state.dropped["tie"] == expected["ties"]
        ids = _pairs(tmp_path / name).column("pair_id").to_pylist()
        assert ids == _usable_ids(_source_rows(sources["parquet"], "validation"))
        assert not train & set(ids)
    with pytest.raises(SmpoError, match=r"split 'test'.*it has split\(s\) train, validation"):
        open_source(str(sources["parquet"]), "test")
    with pytest.raises(SmpoError, match=r"split 'test' not in the saved dataset; it has train"):
        open_source(str(sources["saved-dict"]), "test")
    with pytest.raises(SmpoError, match=r"saved dataset holds split 'train', not 'validation'"):
        saved = tmp_path / "saved-train"
        import datasets

        datasets.load_from_disk(str(sources["saved-dict"]))["train"].save_to_disk(str(saved))
        open_source(str(saved), "validation")


def _run(source: Path, out: Path, **kwargs) -> Path:
    _download(source, out, **kwargs)
    return out


def test_max_pairs_keeps_the_first_usable_pairs(sources: dict, tmp_path: Path) -> None:
    full = _pairs(_run(sources["parquet"], tmp_path / "full")).column("pair_id").to_pylist()
    state = _download(sources["parquet"], tmp_path / "capped", shard_rows=64, max_pairs=100)
    assert state.pairs == 100
    assert [pq.read_metadata(s).num_rows for s in pair_shards(tmp_path / "capped")] == [64, 36]
    assert _pairs(tmp_path / "capped").column("pair_id").to_pylist() == full[:100]
    rows = [r["ranking_id"] for r in _source_rows(sources["parquet"])]
    assert state.source_rows == rows.index(full[99]) + 1
    again = _download(sources["parquet"], tmp_path / "capped", shard_rows=64, max_pairs=100)
    assert (again.shards, again.pairs, again.source_rows) == (2, 100, state.source_rows)


# --- resume ----------------------------------------------------------------------------------


def test_resume_after_a_crash_mid_shard_gives_the_clean_rows(sources: dict, tmp_path: Path) -> None:
    clean = _download(sources["parquet"], tmp_path / "clean", shard_rows=48)

    def crashing(batches, after: int):
        for i, batch in enumerate(batches):
            if i == after:
                raise ConnectionResetError("connection reset by peer")
            yield batch

    out = tmp_path / "resumed"
    for after in (3, 5):  # crash twice, each time part-way through a shard
        with pytest.raises(ConnectionResetError):
            download_pairs(crashing(iter_source(str(sources["parquet"]), "train"), after), out,
                           48)
        assert list(out.glob(".*.partial"))
    progress = DownloadProgress.load(out)
    assert 0 < progress.shards < clean.shards
    # A shard renamed into place whose progress.json update was lost must not survive.
    (out / f"pairs-{progress.shards:05d}.parquet").write_bytes(b"stale")
    (out / "pairs-00099.parquet").write_bytes(b"stale")
    source = open_source(str(sources["parquet"]), "train")
    resumed = download_pairs(source.batches(skip_rows=progress.source_rows), out, 48)
    assert resumed == clean
    assert _pairs(out).equals(_pairs(tmp_path / "clean"))
    assert _quarantine(out).equals(_quarantine(tmp_path / "clean"))
    assert not list(out.glob(".*.partial"))


def test_batches_that_skip_unaccounted_rows_are_refused(sources: dict, tmp_path: Path) -> None:
    later = open_source(str(sources["parquet"]), "train").batches(skip_rows=10)
    with pytest.raises(ValueError, match=r"rows 0 to 9 of the source are missing"):
        download_pairs(later, tmp_path, 64)


def test_skip_rows_starts_at_that_row_in_every_layout(sources: dict) -> None:
    for name in ("parquet", "saved-dict"):
        batches = list(iter_source(str(sources[name]), "train", batch_rows=50, skip_rows=170))
        assert batches[0].start == 170
        ids = [i for b in batches for i in b.table.column("ranking_id").to_pylist()]
        assert ids == [r["ranking_id"] for r in _source_rows(sources["parquet"])][170:]


def run_download_stage(store: str, source: str, shard_rows: int,
                       tracking_uri: str | None = None) -> StageResult:
    """The real stage (key, manifest, MLflow child run) on a temporary store."""
    settings = load_settings("tiny", [f"download.source={source}",
                                      f"download.shard_rows={shard_rows}"])
    root = Path(store).resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or f"sqlite:///{root / 'mlflow.db'}"
    experiment = tracking.experiment_id(MlflowClient(uri), uri, root)
    return run_stage(RunContext(settings, str(root), uri, experiment), "download", {}, compute,
                     key_inputs=key_inputs)


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One MLflow database for the module: creating one costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module", autouse=True)
def no_prefect_server() -> None:
    """Stages run outside a flow here: skip their Prefect artifacts rather than start a
    temporary Prefect server for them (seconds per process)."""
    from prefect.settings import PREFECT_SERVER_ALLOW_EPHEMERAL_MODE, temporary_settings

    with temporary_settings(updates={PREFECT_SERVER_ALLOW_EPHEMERAL_MODE: False}):
        yield


# A download stage in its own process that SIGKILLs itself at a fixed point: when committing
# shard N (`argv[5]`), before or after progress.json records it (`argv[6]`). A kill -9 gives
# the process no chance to clean up, as a crash or an OOM kill would not.
_KILLED_AT_SHARD = """
import os, signal, sys
sys.path.insert(0, "tests")
from smpo_core.pickapic import DownloadProgress
from test_download import run_download_stage

save, shard, when = DownloadProgress.save, int(sys.argv[5]), sys.argv[6]

def save_and_die(self, folder):
    if when == "after":
        save(self, folder)
    if self.shards == shard:
        os.kill(os.getpid(), signal.SIGKILL)
    save(self, folder)

DownloadProgress.save = save_and_die
run_download_stage(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
"""


def _killed_stage(store: Path, source: Path, shard_rows: int, tracking_uri: str, shard: int,
                  when: str) -> int:
    """Run the stage in a process that is killed at `shard`; its exit status."""
    env = os.environ | {"PYTHONPATH": str(REPO), "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "false"}
    return subprocess.run([sys.executable, "-c", _KILLED_AT_SHARD, str(store), str(source),
                           str(shard_rows), tracking_uri, str(shard), when], cwd=REPO,
                          stderr=subprocess.DEVNULL, env=env, timeout=600).returncode


@pytest.mark.integration
def test_killed_stage_resumes_to_exactly_the_clean_result(tmp_path: Path,
                                                          tracking_uri: str) -> None:
    source = tmp_path / "source"
    write_synthetic_pickapic(source, num_pairs=1500, seed=3, num_files=3)
    clean = run_download_stage(str(tmp_path / "clean"), str(source), 16, tracking_uri)
    out = tmp_path / "killed" / "download" / clean.key
    # Killed with shard 5 renamed into place but not yet in progress.json; resumed and killed
    # again right after shard 20 is recorded; then resumed to the end.
    for shard, when, recorded in ((5, "before", 4), (20, "after", 20)):
        status = _killed_stage(tmp_path / "killed", source, 16, tracking_uri, shard, when)
        assert status == -signal.SIGKILL
        assert DownloadProgress.load(out).shards == recorded
        assert len(pair_shards(out)) == shard  # the 5th shard is there, but not recorded
        assert not (out / "manifest.json").exists()
    kept = {f.name: f.stat().st_ino for f in pair_shards(out)}
    resumed = run_download_stage(str(tmp_path / "killed"), str(source), 16, tracking_uri)
    assert resumed.key == clean.key and not resumed.reused
    assert clean.summary["shards"] > 20
    # Resumed, not redone: the 20 recorded shards are the files the killed runs wrote.
    assert {f.name: f.stat().st_ino for f in pair_shards(out)[:20]} == kept
    assert _pairs(out).equals(_pairs(Path(clean.path)))
    assert _quarantine(out).equals(_quarantine(Path(clean.path)))
    fields = ("pairs", "source_rows", "shards", "dropped", "quarantined_images",
              "quarantine_files", "source_kind")
    assert {k: resumed.summary[k] for k in fields} == {k: clean.summary[k] for k in fields}
    assert not list(out.glob(".*.partial"))
    assert len(pair_shards(out)) == clean.summary["shards"]


# --- the stage -------------------------------------------------------------------------------


def test_stage_writes_manifest_and_tracks_it(sources: dict, tmp_path: Path,
                                             tracking_uri: str) -> None:
    expected = sources["expected"]["train"]
    result = run_download_stage(str(tmp_path), str(sources["parquet"]), 100, tracking_uri)
    manifest = json.loads((Path(result.path) / "manifest.json").read_text())
    assert manifest["pairs"] == expected["usable"]
    assert manifest["source_rows"] == expected["rows"]
    assert manifest["dropped"] == {"no_label": expected["no_label"], "tie": expected["ties"],
                                   "identical": expected["identical"],
                                   "corrupt_jpeg": expected["corrupt"], "duplicate_pair": 0,
                                   "bad_caption": 0, "image_size": 0}
    # Each synthetic corrupt pair has one truncated image.
    assert manifest["quarantined_images"] == expected["corrupt"]
    assert manifest["quarantine_files"] == [f.name for f in quarantine_files(Path(result.path))]
    assert manifest["shards"] == 3 and manifest["source_kind"] == "parquet"
    assert manifest["source_files"] == 2 and manifest["split"] == "train"
    assert _pairs(Path(result.path)).num_rows == expected["usable"]
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(environment().experiment).experiment_id
    [run] = client.search_runs([experiment], f"tags.`smpo.output` = '{result.path}'")
    assert run.info.status == "FINISHED" and run.data.tags["smpo.reused"] == "false"
    # The manifest is logged as an artifact (never as metrics).
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "manifest.json"))
                        .read_text())
    assert logged["pairs"] == expected["usable"] and logged["dropped"]["tie"] == expected["ties"]
    assert not [key for key in run.data.metrics if key.startswith("manifest.")]
    again = run_download_stage(str(tmp_path), str(sources["parquet"]), 100, tracking_uri)
    assert again.reused and again.summary["pairs"] == expected["usable"]


def test_stage_fails_when_no_pair_is_usable(sources: dict, tmp_path: Path,
                                            tracking_uri: str) -> None:
    rows = [r | {"label_0": 0.5, "label_1": 0.5} for r in _source_rows(sources["parquet"])[:5]]
    (tmp_path / "ties" / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, PICKAPIC_SCHEMA),
                   tmp_path / "ties" / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(SmpoError, match=r"no usable pairs in 5 source rows .*'tie': 5"):
        run_download_stage(str(tmp_path / "store"), str(tmp_path / "ties"), 16, tracking_uri)
    # Nothing is left that a rerun would resume from and fail on again.
    assert not (tmp_path / "store" / "download").exists() or not any(
        (tmp_path / "store" / "download").iterdir())


def test_a_local_source_fixed_in_place_is_read_again(sources: dict, tmp_path: Path,
                                                     tracking_uri: str) -> None:
    """The download key holds the source files' content: a file fixed (or replaced) in place
    is a new input, not a reuse of the old download nor a replay of its error."""
    rows = _source_rows(sources["parquet"])[:40]
    file = tmp_path / "source" / "data" / "train-00000-of-00001.parquet"
    file.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([r | {"label_0": 0.5, "label_1": 0.5} for r in rows],
                                        PICKAPIC_SCHEMA), file)
    store = str(tmp_path / "store")
    with pytest.raises(SmpoError, match="no usable pairs in 40 source rows"):
        run_download_stage(store, str(tmp_path / "source"), 16, tracking_uri)
    pq.write_table(pa.Table.from_pylist(rows, PICKAPIC_SCHEMA), file)  # fixed in place
    fixed = run_download_stage(store, str(tmp_path / "source"), 16, tracking_uri)
    usable = sum(1 for r in rows if r["has_label"] and r["label_0"] in (0.0, 1.0)
                 and r["image_0_uid"] != r["image_1_uid"] and r["jpg_0"] != r["jpg_1"]
                 and _decodes(r["jpg_0"]) and _decodes(r["jpg_1"]))
    assert not fixed.reused and fixed.summary["pairs"] == usable > 0
    pq.write_table(pa.Table.from_pylist(rows[:20], PICKAPIC_SCHEMA), file)  # replaced again
    replaced = run_download_stage(store, str(tmp_path / "source"), 16, tracking_uri)
    assert replaced.key != fixed.key and not replaced.reused
    assert replaced.summary["source_rows"] == 20
    pq.write_table(pa.Table.from_pylist(rows, PICKAPIC_SCHEMA), file)  # the same bytes again
    assert run_download_stage(store, str(tmp_path / "source"), 16, tracking_uri).reused


# --- wrong columns ---------------------------------------------------------------------------


def _bad_tables(sources: dict) -> dict[str, tuple[pa.Table, str]]:
    table = pq.read_table(sorted((sources["parquet"] / "data").glob("train-*.parquet")))
    wrong = table.set_column(table.schema.get_field_index("label_0"), "label_0",
                             table.column("label_0").cast(pa.string()))
    return {"wrong type": (wrong, r"column 'label_0' has type string; expected double"),
            "missing": (table.drop_columns(["has_label"]), r"column 'has_label' \(bool\) missing")}


@pytest.mark.parametrize("problem", ["wrong type", "missing"])
@pytest.mark.parametrize("layout", ["parquet", "saved-dict", "saved-single"])
def test_column_errors_name_column_file_and_expected_type(
        sources: dict, tmp_path: Path, layout: str, problem: str) -> None:
    import datasets

    table, message = _bad_tables(sources)[problem]
    if layout == "parquet":
        file = tmp_path / "data" / "train-00000-of-00001.parquet"
        file.parent.mkdir()
        pq.write_table(table, file)
    else:
        dataset = datasets.Dataset(table)
        if layout == "saved-dict":
            datasets.DatasetDict({"train": dataset}).save_to_disk(str(tmp_path / "saved"))
            file = tmp_path / "saved" / "train" / "data-00000-of-00001.arrow"
        else:
            dataset.save_to_disk(str(tmp_path / "saved"))
            file = tmp_path / "saved" / "data-00000-of-00001.arrow"
    source = tmp_path if layout == "parquet" else tmp_path / "saved"
    with pytest.raises(SmpoError, match=message) as raised:
        open_source(str(source), "train")
    assert str(file) in str(raised.value)


def test_unreadable_parquet_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train-00000-of-00001.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SmpoError, match=r"train-00000-of-00001.parquet: not a readable Parquet"):
        open_source(str(tmp_path), "train")


def test_column_errors_name_the_hub_file(sources: dict, fake_hub: str) -> None:
    with pytest.raises(SmpoError, match=r"hf://datasets/smpo-test/broken@0123.*/data/train-00000"
                                        r"-of-00001.parquet: column 'label_0' has type string"):
        list(iter_source("smpo-test/broken", "train"))


# --- the hub ---------------------------------------------------------------------------------


class _FakeHub(BaseHTTPRequestHandler):
    """The three Hub endpoints that dataset_info and HfFileSystem reads use, over local
    folders; unknown repos answer 404 RepoNotFound as the real Hub does."""

    repos: ClassVar[dict[str, Path]] = {}

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _repo(self, path: str) -> tuple[str, Path, str] | None:
        for repo, folder in self.repos.items():
            if path == repo or path.startswith(repo + "/"):
                return repo, folder, path[len(repo):].strip("/")
        return None

    def do_GET(self) -> None:
        path = unquote(urlparse(self.path).path)
        api = path.startswith("/api/datasets/")
        resolve = re.fullmatch(r"/datasets/(.+?/.+?)/resolve/[^/]+/(.+)", path)
        found = self._repo(path[len("/api/datasets/"):] if api else
                           resolve.group(1) if resolve else "")
        if not found:
            self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"})
            return
        repo, folder, rest = found
        if resolve:
            data = (folder / resolve.group(2)).read_bytes()
            if self.headers["range"] is None:
                self._send(200, data)
                return
            first, last = self.headers["range"].split("=")[1].split("-")
            self._send(206, data[int(first):int(last) + 1])
        elif rest == "" or rest.startswith("revision/"):
            files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                           if p.is_file())
            self._send(200, json.dumps({"id": repo, "sha": COMMIT, "private": False,
                                        "siblings": [{"rfilename": f} for f in files]}).encode())
        else:  # tree/<revision>/<folder>
            base = folder / rest.split("/", 2)[2] if rest.count("/") >= 2 else folder
            entries = [{"type": "directory" if p.is_dir() else "file", "oid": "0",
                        "size": p.stat().st_size if p.is_file() else 0,
                        "path": p.relative_to(folder).as_posix()} for p in sorted(base.iterdir())]
            self._send(200, json.dumps(entries).encode())


@pytest.fixture
def fake_hub(sources: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    from huggingface_hub import constants

    broken = tmp_path / "broken"
    (broken / "data").mkdir(parents=True)
    pq.write_table(_bad_tables(sources)["wrong type"][0],
                   broken / "data" / "train-00000-of-00001.parquet")
    handler = type("Hub", (_FakeHub,), {"repos": {MIRROR: sources["parquet"],
                                                  "smpo-test/broken": broken}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    # What HF_ENDPOINT sets when huggingface_hub is imported.
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    yield endpoint
    server.shutdown()


def test_a_gone_hub_dataset_says_so_and_how_to_point_elsewhere(fake_hub: str) -> None:
    with pytest.raises(SmpoError) as raised:
        open_source("yuvalkirstain/pickapic_v2", "train")
    message = str(raised.value)
    assert not isinstance(raised.value, SourceUnreachable)
    assert f"the hub at {fake_hub} answers that this dataset is gone" in message
    assert "canonical Pick-a-Pic v2 repo has been reported unavailable" in message
    assert "mirror dataset id" in message and "save_to_disk folder" in message


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_PROBE = """
import sys, time
from smpo_core.pickapic import SourceUnreachable, is_transient, open_source
started = time.monotonic()
try:
    open_source("yuvalkirstain/pickapic_v2", "train")
except Exception as exc:
    print(type(exc).__name__, is_transient(exc), round(time.monotonic() - started, 1))
    print(exc)
"""


@pytest.mark.parametrize("env, kind, transient, words", [
    ({"HF_HUB_OFFLINE": "1"}, "SmpoError", False, "offline mode is on"),
    ({"HF_DATASETS_OFFLINE": "1"}, "SmpoError", False, "offline mode is on"),
    ({"HF_ENDPOINT": "http://127.0.0.1:{closed}"}, "SourceUnreachable", True,
     "is unreachable or failing (ConnectError"),
    ({"HF_ENDPOINT": "http://127.0.0.1:{silent}", "HF_HUB_ETAG_TIMEOUT": "1"},
     "SourceUnreachable", True, "is unreachable or failing (ReadTimeout"),
], ids=["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "closed-port", "silent-server"])
def test_an_unreachable_or_offline_hub_fails_fast_with_advice(
        env: dict, kind: str, transient: bool, words: str) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        ports = {"closed": _closed_port(), "silent": silent.getsockname()[1]}
        env = {k: v.format(**ports) for k, v in env.items()}
        clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True,
                             env=clean | env | {"PYTHONPATH": str(REPO)}, cwd=REPO, timeout=60)
    head, message = out.stdout.splitlines()[:2]
    name, retry, seconds = head.split()
    assert (name, retry) == (kind, str(transient))
    assert float(seconds) < 10  # never minutes of library retries
    assert words in message
    assert "local folder of Pick-a-Pic Parquet files" in message
    assert "save_to_disk folder" in message


def test_local_looking_sources_that_do_not_exist_are_named(tmp_path: Path) -> None:
    for source in (str(tmp_path / "nothere"), "./pickapic", "data/pickapic/v2", "~/nothere"):
        with pytest.raises(SmpoError, match=r"no such folder .* not a hub dataset id"):
            describe_source(source)
    (tmp_path / "file.parquet").write_bytes(b"")
    with pytest.raises(SmpoError, match="is a file"):
        describe_source(str(tmp_path / "file.parquet"))
    assert describe_source("yuvalkirstain/pickapic_v2") == "hub"


# --- retries ---------------------------------------------------------------------------------


def test_retry_condition_retries_network_errors_only() -> None:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled
    from prefect.states import Failed

    def retried(error: BaseException) -> bool:
        return retry_if_transient(stage_task("download"), None, Failed(data=error))

    assert retried(SourceUnreachable("hub unreachable"))
    assert retried(ConnectionResetError("reset by peer"))
    assert retried(TimeoutError("timed out"))
    assert retried(httpx2.ConnectError("refused"))
    assert retried(httpx2.ReadTimeout("read timed out"))
    assert not retried(SmpoError("column 'label_0' has type string"))
    assert not retried(OfflineModeIsEnabled("offline"))
    assert not retried(ValueError("bug"))


@pytest.mark.integration
def test_prefect_retries_the_stage_on_network_errors_only(
        sources: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    bad = tmp_path / "bad" / "data"
    bad.mkdir(parents=True)
    pq.write_table(_bad_tables(sources)["wrong type"][0], bad / "train-00000-of-00001.parquet")
    store = (tmp_path / "store").resolve()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    store.mkdir()
    client = MlflowClient(uri)
    experiment = tracking.experiment_id(client, uri, store)
    task = stage_task("download").with_options(retry_delay_seconds=0)

    @flow
    def attempt(source: str) -> None:
        settings = load_settings("tiny", [f"download.source={source}"])
        task(RunContext(settings, str(store), uri, experiment))

    with prefect_test_harness(server_startup_timeout=120):
        for source, error, attempts in (("yuvalkirstain/pickapic_v2", SourceUnreachable, 3),
                                        (str(tmp_path / "bad"), SmpoError, 1)):
            with pytest.raises(error):
                attempt(source)
            runs = client.search_runs([experiment], "tags.`smpo.stage` = 'download'")
            failed = [r for r in runs if r.data.params.get("download.source") == source]
            assert len(failed) == attempts and {r.info.status for r in failed} == {"FAILED"}


# --- damaged input -----------------------------------------------------------------------------


def _jpeg(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _claims_size(data: bytes, width: int, height: int) -> bytes:
    """A JPEG whose header (SOF0) says width x height: what a 20000 x 20000 upload looks like
    to a reader that checks sizes before decoding, without building one."""
    sof = data.index(b"\xff\xc0")
    return (data[:sof + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big")
            + data[sof + 9:])


def test_tiny_huge_and_undecodable_rows_are_dropped_and_counted(sources: dict,
                                                                 tmp_path: Path) -> None:
    rows = _source_rows(sources["parquet"])[:60]
    usable = _usable_ids(rows)
    tiny, huge, caption = usable[0], usable[1], usable[2]
    table = pa.Table.from_pylist(
        [r | {"jpg_0": _jpeg(1, 1)} if r["ranking_id"] == tiny
         else r | {"jpg_1": _claims_size(_jpeg(64, 64), 20000, 20000)}
         if r["ranking_id"] == huge else r for r in rows], PICKAPIC_SCHEMA)
    # Invalid UTF-8 in a string column: Parquet stores it unchecked.
    captions = [c.encode() if i != rows.index(next(r for r in rows if r["ranking_id"] == caption))
                else b"a cat \xff\xfe" for i, c in enumerate(table.column("caption").to_pylist())]
    table = table.set_column(table.schema.get_field_index("caption"), "caption",
                             pa.array(captions, pa.binary()).view(pa.string()))
    (tmp_path / "src" / "data").mkdir(parents=True)
    pq.write_table(table, tmp_path / "src" / "data" / "train-00000-of-00001.parquet")
    state = download_pairs(iter_source(str(tmp_path / "src"), "train"), tmp_path / "out", 16,
                           limits=ImageLimits(min_side=8, max_pixels=4096 * 4096))
    assert state.dropped["image_size"] == 2 and state.dropped["bad_caption"] == 1
    kept = _pairs(tmp_path / "out")
    assert kept.column("pair_id").to_pylist() == [i for i in usable if i not in (tiny, huge,
                                                                                  caption)]
    kept.column("caption").to_pylist()  # every kept caption reads as text
    assert not any(r["pair_id"] in (tiny, huge) for r in _quarantine_rows(tmp_path / "out"))


def _quarantine_rows(folder: Path) -> list[dict]:
    files = quarantine_files(folder)
    return pa.concat_tables([pq.read_table(f) for f in files]).to_pylist() if files else []


def test_a_parquet_file_damaged_mid_file_is_named_with_its_row_group(sources: dict,
                                                                     tmp_path: Path) -> None:
    """Not at the footer (which fails on open) but inside row group 2's data."""
    rows = _source_rows(sources["parquet"])[:50]
    file = tmp_path / "src" / "data" / "train-00000-of-00001.parquet"
    file.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, PICKAPIC_SCHEMA), file, row_group_size=10,
                   compression="snappy")
    column = pq.ParquetFile(file).metadata.row_group(2).column(
        PICKAPIC_SCHEMA.get_field_index("label_0"))
    data = bytearray(file.read_bytes())
    start = column.data_page_offset + 20  # inside the compressed values, past the page header
    data[start:start + 16] = b"\xff" * 16
    file.write_bytes(bytes(data))
    with pytest.raises(SmpoError, match=(
            rf"^{re.escape(str(file))}: row group 2 of 5 \(rows 20 to 29 of the file\) cannot "
            r"be read \(OSError: .+\); the file is damaged: "
            r"replace it with a good copy or remove it from the source$")):
        download_pairs(iter_source(str(tmp_path / "src"), "train"), tmp_path / "out", 8)
