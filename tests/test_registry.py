"""The stage registry is the one place the pipeline's stages are known: a sixth stage is its
registry entry and its module, and the flow itself checks what a deployment hands it."""

from __future__ import annotations

import contextlib
import io
import json

import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

from flows import cli
from flows.serve import Config, deployments_file
from smpo_core.errors import SmpoError
from smpo_core.settings import STAGES, Stage, load_settings, setting_keys, with_upstream

# The whole of a new stage: its settings section and its computation.
LENGTHS_MODULE = '''
"""lengths: the caption length, in words, of every downloaded pair."""
from pydantic import Field

from smpo_core.pickapic import iter_pairs
from smpo_core.settings import Section, runtime_setting
from smpo_core.store import write_json


class LengthSettings(Section):
    """Caption lengths of the pairs."""

    min_words: int = Field(1, ge=0, description="Captions with fewer words are left out.")
    batch_rows: int = runtime_setting(64, "Pairs read at a time.")


def compute(run):
    cfg = run.settings.lengths
    lengths = [len(caption.split())
               for batch in iter_pairs(run.input_dir("download"), ["caption"], cfg.batch_rows)
               for caption in batch.column("caption").to_pylist()]
    kept = [n for n in lengths if n >= cfg.min_words]
    write_json(run.out_dir / "lengths.json", kept)
    return {"captions": len(kept)}
'''


def _smpo(*args: str) -> str:
    """`smpo ARGS` in this process (where the new stage is registered): what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli.main(list(args)) == 0
    return printed.getvalue()


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def lengths_stage(tmp_path, monkeypatch) -> Stage:
    """A sixth stage: a module of its own and one registry entry, nothing else."""
    (tmp_path / "caption_lengths.py").write_text(LENGTHS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import caption_lengths

    stage = Stage("lengths", "The caption length of every pair.", caption_lengths.LengthSettings,
                  upstream=("download",), module="caption_lengths")
    monkeypatch.setitem(STAGES, "lengths", stage)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return stage


@pytest.mark.integration
def test_a_sixth_stage_is_its_registry_entry_and_its_module(lengths_stage, harness, tmp_path):
    # Settings: its section is part of every profile, explained, overridable.
    assert {"lengths.min_words", "lengths.batch_rows"} <= set(setting_keys())
    assert load_settings("tiny", ["lengths.min_words=9"]).lengths.min_words == 9
    assert "lengths.min_words=9  (--set)  # Captions with fewer words are left out." in \
        _smpo("settings", "--set", "lengths.min_words=9")
    # The graph and the deployments.
    assert with_upstream(["lengths"]) == ["download", "lengths"]
    assert with_upstream(None)[-1] == "lengths"
    spec = yaml.safe_load(deployments_file(Config(tmp_path / "served", 1, 2, "pool")).read_text())
    assert {d["name"]: d["parameters"] for d in spec["deployments"]}["lengths"] == \
        {"stages": ["lengths"]}
    # `smpo run lengths`: the flow runs download, then the new stage; the next run reuses both.
    store = tmp_path / "store"
    args = ["run", "lengths", "--store", str(store), "--set", "download.max_pairs=40",
            "--set", "lengths.min_words=9"]
    out = _smpo(*args) + _smpo(*args)
    table = [line.split()[:2] for line in out.splitlines()
             if line.startswith(("download ", "lengths "))]
    assert table == [["download", "ran"], ["lengths", "ran"],
                     ["download", "reused"], ["lengths", "reused"]]
    [folder] = (store / "lengths").iterdir()
    captions = pq.read_table(sorted((store / "download").glob("*/pairs-*.parquet")),
                             columns=["caption"]).column("caption").to_pylist()
    assert len(captions) == 40
    assert json.loads((folder / "lengths.json").read_text()) == \
        [len(c.split()) for c in captions if len(c.split()) >= 9]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["version"] == lengths_stage.version
    assert manifest["settings"] == {"lengths": {"min_words": 9}}  # batch_rows: not a result
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("smpo").experiment_id],
                              "tags.`smpo.stage` = 'lengths'")
    assert sorted(r.data.tags["smpo.reused"] for r in runs) == ["false", "true"]
    assert {r.data.params["lengths.min_words"] for r in runs} == {"9"}


@pytest.mark.parametrize(("parameters", "message"), [
    ({"force": ["trian"]},
     "--force 'trian': unknown (did you mean 'train'?); expected some of download, score"),
    ({"stages": ["evaluat"]},
     "stage 'evaluat': unknown (did you mean 'evaluate'?); expected some of download"),
    ({"overrides": ["train.bta=1"]}, "unknown setting 'train.bta'"),
    ({"stages": ["evaluate"], "overrides": ["evaluate.metrics.hpsv2=/nowhere/HPS.pt"]},
     "evaluate.metrics.hpsv2 '/nowhere/HPS.pt': no such file or folder"),
], ids=["force", "stage", "setting", "nested-setting"])
@pytest.mark.integration
def test_the_flow_itself_refuses_what_the_command_refuses(harness, tmp_path, monkeypatch,
                                                          parameters, message):
    """What a deployment run hands the flow is checked as `smpo run` checks it, before
    anything is written."""
    from flows.pipeline import smpo

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    with pytest.raises(SmpoError) as raised:
        smpo(store=str(store), **parameters)
    assert message in str(raised.value)
    assert not store.exists()


def test_a_registry_entry_with_an_unknown_upstream_is_refused(monkeypatch):
    monkeypatch.setitem(STAGES, "orphan", Stage("orphan", "x", STAGES["score"].settings,
                                                upstream=("nowhere",)))
    with pytest.raises(SmpoError, match="stage 'orphan': unknown stage 'nowhere'"):
        with_upstream(["orphan"])


def test_a_stage_registered_before_its_upstream_is_refused(monkeypatch):
    monkeypatch.setattr("smpo_core.settings.STAGES", {
        "score": STAGES["score"], "download": STAGES["download"]})
    with pytest.raises(SmpoError, match="its upstream 'download' must be registered before it"):
        with_upstream(["score"])
