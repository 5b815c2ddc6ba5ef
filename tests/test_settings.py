from __future__ import annotations

import pytest

from smpo_core.errors import SmpoError
from smpo_core.settings import load_settings, setting_keys
from smpo_core.store import Store, read_manifest, stage_key, write_json


def test_profiles_load_and_differ_where_the_paper_says():
    sd15, sdxl = load_settings("sd15"), load_settings("sdxl")
    assert (sd15.train.beta, sdxl.train.beta) == (2000, 5000)
    assert (sd15.invert.num_levels, sdxl.invert.num_levels) == (5, 10)
    assert sdxl.train.optimizer == "adafactor" and sdxl.train.gradient_checkpointing
    assert sd15.score.bounds == "paper"


def test_overrides_are_typed_and_validated():
    settings = load_settings("tiny", ["train.beta=5000", "evaluate.metrics={clipscore: x}"])
    assert settings.train.beta == 5000.0
    assert settings.evaluate.metrics == {"clipscore": "x"}
    with pytest.raises(SmpoError, match=r"train\.max_steps"):
        load_settings("tiny", ["train.max_steps=0"])


def test_runtime_settings_stay_out_of_the_key():
    settings = load_settings("tiny")
    kept = settings.score.result_settings()
    assert "batch_size" not in kept and "device" not in kept
    assert "gamma" in kept
    assert {"train.beta", "invert.renoise_steps", "download.source"} <= set(setting_keys())


def test_profile_from_a_yaml_path(tmp_path):
    profile = tmp_path / "mine.yaml"
    profile.write_text("train:\n  beta: 123\n")
    settings = load_settings(str(profile))
    assert settings.profile == "mine" and settings.train.beta == 123
    profile.write_text("train:\n  betta: 1\n")
    with pytest.raises(SmpoError, match=r"train\.betta"):
        load_settings(str(profile))


def test_stage_key_depends_on_settings_inputs_and_version():
    base = stage_key("train", {"beta": 1}, {"invert": "a"}, "1")
    assert base == stage_key("train", {"beta": 1}, {"invert": "a"}, "1")
    assert base != stage_key("train", {"beta": 2}, {"invert": "a"}, "1")
    assert base != stage_key("train", {"beta": 1}, {"invert": "b"}, "1")
    assert base != stage_key("train", {"beta": 1}, {"invert": "a"}, "2")


def test_manifest_marks_completion_and_clear_forgets(tmp_path):
    store = Store(tmp_path)
    folder = store.stage_dir("score", "k")
    folder.mkdir(parents=True)
    (folder / "labels.parquet").write_text("partial")
    assert not store.is_complete("score", "k")
    store.complete("score", "k", {"pairs": 3})
    assert store.is_complete("score", "k")
    assert read_manifest(folder) == {"pairs": 3}
    store.clear("score", "k")
    assert not folder.exists()


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"a": 1})

    class Boom:
        def __repr__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_json(target, {"a": Boom()})
    assert read_manifest(tmp_path) is None
    assert target.read_text().strip().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]
