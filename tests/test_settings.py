from __future__ import annotations

import typing
from pathlib import Path

import pytest
import yaml

from smpo_core.environment import Environment, environment
from smpo_core.errors import SmpoError
from smpo_core.settings import (
    STAGES,
    is_result_setting,
    load_settings,
    read_profile,
    section_names,
    settings_model,
)
from smpo_core.store import Store, read_manifest, stage_key, write_json

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_profiles_load_and_differ_where_the_paper_says():
    sd15, sdxl = load_settings("sd15"), load_settings("sdxl")
    assert (sd15.train.beta, sdxl.train.beta) == (2000, 5000)
    assert (sd15.invert.num_levels, sdxl.invert.num_levels) == (5, 10)
    assert sdxl.train.optimizer == "adafactor" and sdxl.train.gradient_checkpointing
    assert sd15.score.bounds == "paper"


@pytest.mark.parametrize("profile", ["sd15", "sdxl"])
def test_the_paper_profiles_train_1024_pairs_a_step_at_1e8_per_pair(profile):
    """METHOD.md §4: effective batch 1024 (8 GPUs x 1 x 128), lr 1e-8 x 1024, t uniform."""
    train = load_settings(profile).train
    assert train.effective_batch == 1024
    assert train.learning_rate == pytest.approx(1e-8 * 1024, rel=1e-12)
    assert train.timestep_sampling == "uniform"
    eight = load_settings(profile, ["train.num_processes=8"]).train
    assert (eight.batch_size, eight.grad_accum) == (1, 128)
    assert load_settings(profile).train.grad_accum == 1024  # one GPU accumulates it all


def test_an_indivisible_batch_is_refused_naming_the_three_settings():
    assert load_settings("sd15", ["train.batch_size=4", "train.num_processes=8"]
                         ).train.grad_accum == 32
    with pytest.raises(SmpoError) as refused:
        load_settings("sd15", ["train.batch_size=3"])
    assert str(refused.value) == (
        "override 'train.batch_size=3': section train: train.effective_batch=1024 is not a "
        "multiple of train.batch_size x train.num_processes = 3 x 1 = 3; choose a batch_size "
        "that divides effective_batch / num_processes")
    with pytest.raises(SmpoError, match="= 2 x 3 = 6"):
        load_settings("sd15", ["train.batch_size=2", "train.num_processes=3"])


def test_overrides_are_typed_and_validated():
    settings = load_settings("tiny", ["train.beta=5000", "evaluate.metrics={clipscore: x}"])
    assert settings.train.beta == 5000.0
    assert settings.evaluate.metrics == {"clipscore": "x"}
    with pytest.raises(SmpoError, match=r"train\.max_steps"):
        load_settings("tiny", ["train.max_steps=0"])


@pytest.mark.parametrize("profile", ["tiny", "sd15"])
def test_a_nested_override_changes_one_entry_of_a_mapping(profile):
    before = load_settings(profile).evaluate.metrics
    after = load_settings(profile, ["evaluate.metrics.hpsv2=/models/HPS_v2.1.pt",
                                    "evaluate.metric_processors.clipscore=/models/clip"])
    assert after.evaluate.metrics == before | {"hpsv2": "/models/HPS_v2.1.pt"}
    assert after.evaluate.metric_processors["clipscore"] == "/models/clip"
    with pytest.raises(SmpoError, match=r"override 'evaluate\.metrics\.hpsv2=\[1\]': "
                                        r"setting evaluate\.metrics\.hpsv2: Input should be a "
                                        r"valid string"):
        load_settings(profile, ["evaluate.metrics.hpsv2=[1]"])
    with pytest.raises(SmpoError, match=r"train\.beta is not a mapping"):
        load_settings(profile, ["train.beta.x=1"])


def _other_value(value: typing.Any, annotation: typing.Any) -> typing.Any:
    """A valid value of the field's type that differs from `value`."""
    if typing.get_origin(annotation) is typing.Literal:
        return next(option for option in typing.get_args(annotation) if option != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        return value / 2
    if isinstance(value, int):
        return value + 1
    if isinstance(value, dict):
        return value | {"other": "x"}
    if value is None:
        return 3 if int in typing.get_args(annotation) else "x"
    return f"{value}-other"


def test_result_settings_change_their_stage_keys_and_runtime_settings_do_not():
    """Every setting, through the key the store files a stage's output under."""
    from stages.common import stage_key_for

    settings = load_settings("tiny")
    keys = {stage: stage_key_for(settings, stage, {}) for stage in STAGES}
    for section in section_names():
        values = settings.section(section)
        for name, field in type(values).model_fields.items():
            changed = settings.model_copy(update={section: values.model_copy(
                update={name: _other_value(getattr(values, name), field.annotation)})})
            for stage in STAGES:
                moved = stage_key_for(changed, stage, {}) != keys[stage]
                # A stage reads its own and its shared sections, and the settings of other
                # sections it borrows (invert: train.reference_errors=cached borrows the plan).
                borrowed = {name.split(".")[0] for s in (settings, changed)
                            for name in s.section(stage).borrowed_settings(s)}
                reads = section in (stage, *STAGES[stage].shares, *borrowed)
                assert moved == (reads and is_result_setting(field)), (
                    f"{section}.{name} {'moves' if moved else 'keeps'} the {stage} key")


def test_every_setting_and_environment_variable_is_described():
    model = settings_model()
    for section in section_names():
        assert model.model_fields[section].description, section
        for name, field in model.model_fields[section].annotation.model_fields.items():
            assert field.description and len(field.description) > 10, f"{section}.{name}"
    for name, field in Environment.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize("profile", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_profiles_state_only_what_differs_from_the_defaults(profile):
    defaults, settings = settings_model()(), load_settings(profile)
    for section, values in read_profile(profile).items():
        for name in values:
            default = getattr(defaults.section(section), name)
            assert getattr(settings.section(section), name) != default, (
                f"configs/{profile}.yaml repeats the default {section}.{name}={default!r}")


def test_the_defaults_are_one_run_the_paper_describes():
    """SD1.5 with the paper's data, reward model and evaluation prompts, not a real model
    mixed with the tiny world's data."""
    defaults = settings_model()()
    refs = [defaults.model.base, defaults.download.source, defaults.score.checkpoint,
            defaults.evaluate.prompts, *defaults.evaluate.metrics.values()]
    assert not [ref for ref in refs if ref.startswith("builtin:")]
    assert defaults.evaluate.prompts == "pickapic-test-unique"  # Pick-a-Pic v2 test_unique


def test_environment_variables_are_read_in_one_place(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump({"train": {"beta": 7.0}}))
    monkeypatch.setenv("SMPO_CONFIGS", str(tmp_path))
    monkeypatch.setenv("SMPO_STORE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("SMPO_EXPERIMENT", "")  # empty: the default
    assert load_settings("mine").train.beta == 7.0
    with pytest.raises(SmpoError, match=r"profile 'tiny': no such profile; expected one of mine"):
        load_settings("tiny")
    assert environment().store == tmp_path / "elsewhere"
    assert environment().experiment == "smpo"
    monkeypatch.setenv("SMPO_MLFLOW_PORT", "80000")
    with pytest.raises(SmpoError, match=r"SMPO_MLFLOW_PORT='80000': Input should be less than "
                                        r"65536 \(`make serve`: the MLflow server's port"):
        environment()


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


@pytest.mark.parametrize(("override", "message"), [
    ("model.resolution=33", r"override 'model.resolution=33': setting model.resolution: "
                            r"Input should be a multiple of 8"),
    ("train.beta=.inf", r"setting train.beta: Input should be a finite number"),
    ("train.learning_rate=.nan", r"setting train.learning_rate: Input should be a finite"),
])
def test_settings_no_stage_could_use_are_refused_up_front(override, message):
    """Refused when read, before any stage runs (the issue: resolution 33 passed invert and
    train and failed in evaluate minutes later; beta=inf trained)."""
    with pytest.raises(SmpoError, match=message):
        load_settings("tiny", [override])


def test_cached_reference_errors_key_the_cache_by_what_decides_them():
    """With train.reference_errors=cached the invert stage computes the reference's errors at
    the run's draws, in the run's precision: the cache's key moves with the draws (seed, batch,
    steps, timestep sampling), the captions dropped and the precision, and not with what only
    the policy's update reads (beta, learning rate) or with micro-batching."""
    from stages.common import stage_key_for

    cached = load_settings("tiny", ["train.reference_errors=cached"])
    key = stage_key_for(cached, "invert", {})
    moves = {"seed": 1, "effective_batch": 4, "max_steps": 7, "timestep_sampling": "level",
             "empty_caption_prob": 0.5, "mixed_precision": "bf16"}
    keeps = {"beta": 123.0, "learning_rate": 1e-3, "batch_size": 1}
    for name, value in (moves | keeps).items():
        changed = cached.model_copy(update={"train": cached.train.model_copy(
            update={name: value})})
        assert (stage_key_for(changed, "invert", {}) != key) == (name in moves), name
