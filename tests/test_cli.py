"""Bad input at the command line: exit 2, one clear line naming the input, nothing written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from smpo_core.environment import Environment
from smpo_core.settings import describe, load_settings

CASES = [
    (["--profile", "nope"], "profile 'nope': no such profile; expected one of"),
    (["--profile", "sd51"], "profile 'sd51': no such profile (did you mean 'sd15'?)"),
    (["--set", "train.bta=1"], "unknown setting 'train.bta' (did you mean 'train.beta'?)"),
    (["--set", "train.beta=abc"], "override 'train.beta=abc': setting train.beta:"),
    (["--set", "train.labels=maybe"], "train.labels: Input should be 'smoothed' or 'human'"),
    (["--set", "nokey"], "expected SECTION.KEY=VALUE"),
    (["evaluat"], "stage 'evaluat': unknown (did you mean 'evaluate'?); expected some of "
                  "download, score"),
    (["--force", "trian"], "--force 'trian': unknown (did you mean 'train'?); expected some "
                           "of download, score"),
    (["--set", "train.beta.x=1"], "train.beta is not a mapping, so it has no key 'x'"),
    (["--set", "train.batch_size=3"],
     "override 'train.batch_size=3': section train: train.effective_batch=8 is not a multiple "
     "of train.batch_size x train.num_processes = 3 x 1 = 3"),
    (["evaluate", "--set", "evaluate.metrics.hpsv2=/nowhere/HPS.pt"],
     "evaluate.metrics.hpsv2 '/nowhere/HPS.pt': no such file or folder"),
]


@pytest.mark.parametrize(("args", "message"), CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    store = tmp_path / "store"
    result = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--store", str(store),
                             *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("smpo: error:")]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert not store.exists()


def test_settings_explains_every_setting_of_a_profile():
    result = subprocess.run([sys.executable, "-m", "flows.cli", "settings", "--profile", "sd15",
                             "--set", "train.beta=5000", "--set",
                             "evaluate.metrics.hpsv2=/models/HPS_v2.1_compressed.pt"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = {line.split("=", 1)[0]: line for line in result.stdout.splitlines()
             if "=" in line and not line.startswith("#")}
    settings = load_settings("sd15")
    for key, _, description in describe(settings):
        assert description, f"{key} has no description"
        assert f"# {description}" in lines[key]
    assert lines["train.beta"].startswith("train.beta=5000.0  (--set)")
    assert "(profile)" in lines["invert.max_pairs"]  # sd15.yaml sets it
    # The paper's numbers, as the defaults the profile keeps.
    assert lines["train.effective_batch"].startswith("train.effective_batch=1024  (default)")
    assert lines["train.timestep_sampling"].startswith("train.timestep_sampling='uniform'")
    assert lines["train.learning_rate"].startswith("train.learning_rate=1.024e-05  (default)")
    # The nested override changed one metric and kept the other four.
    metrics = dict(settings.evaluate.metrics, hpsv2="/models/HPS_v2.1_compressed.pt")
    assert lines["evaluate.metrics"].startswith(f"evaluate.metrics={metrics!r}  (--set)")
    for name in Environment.model_fields:
        assert Environment.variable(name) in lines, name


def test_source_missing_a_column_fails_before_any_stage_output(tmp_path):
    import pyarrow.parquet as pq

    from smpo_core.worlds.tiny import write_synthetic_pickapic

    source = tmp_path / "source"
    for file in write_synthetic_pickapic(source, num_pairs=20, num_files=1):
        pq.write_table(pq.read_table(file).drop_columns(["label_0"]), file)
    store = tmp_path / "store"
    result = subprocess.run([sys.executable, "-m", "flows.cli", "run", "download", "--store",
                             str(store), "--set", f"download.source={source}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("smpo: error:")]
    assert len(error) == 1, result.stderr
    assert "column 'label_0'" in error[0] and "missing" in error[0]
    assert "train-00000-of-00001.parquet" in error[0]
    assert not (store / "download").exists()


def test_missing_reward_checkpoint_fails_before_any_stage(tmp_path):
    store = tmp_path / "store"
    result = subprocess.run([sys.executable, "-m", "flows.cli", "run", "score", "--store",
                             str(store), "--set", "score.checkpoint=/nowhere/PickScore"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "smpo: error: score.checkpoint '/nowhere/PickScore': no such file or folder" \
        in result.stderr
    assert not (store / "download").exists()


@pytest.mark.parametrize(("setting", "message"), [
    ("evaluate.prompts=/nowhere/prompts.txt",
     "evaluate.prompts '/nowhere/prompts.txt': no such file, and not a named set"),
    ("evaluate.metrics={pickscor: builtin:tiny-clip}",
     "evaluate.metrics: unknown reward model kind 'pickscor'; expected one of pickscore"),
])
def test_bad_evaluation_input_fails_before_the_first_stage(tmp_path, setting, message):
    store = tmp_path / "store"
    result = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--store", str(store),
                             "--set", setting], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    error = [line for line in result.stderr.splitlines() if line.startswith("smpo: error:")]
    assert len(error) == 1 and message in error[0], result.stderr
    assert not (store / "download").exists() and not (store / "builtin").exists()
