"""What a run says while it runs and when it ends: one progress channel, run names that say
what differs, the results table, nearest-name suggestions, and a dry run that writes nothing."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from flows.plan import run_name
from smpo_core.evaluation import result_rows
from smpo_core.settings import STAGES, did_you_mean, setting_keys
from stages.common import Progress


class _Captured(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def smpo_log():
    handler, log = _Captured(), logging.getLogger("smpo")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield handler.lines
    log.removeHandler(handler)


def test_progress_without_a_terminal_is_a_log_line_at_every_tenth_and_no_bar(
        smpo_log, capsys, monkeypatch):
    clock = iter(range(0, 100_000, 20))  # 20 s between updates
    monkeypatch.setattr("stages.common.time.monotonic", lambda: next(clock))
    progress = Progress("train", 200, "steps")
    for _ in range(200):
        progress.update()
    progress.close()
    assert smpo_log == [f"train: {20 * i}/200 ({10 * i}%)" for i in range(1, 11)]
    assert progress.bar is None and capsys.readouterr().err == ""


def test_fast_progress_says_only_that_it_finished(smpo_log):
    progress = Progress("evaluate score pickscore", 8, "images")
    for _ in range(8):
        progress.update()
    assert smpo_log == ["evaluate score pickscore: 8/8 (100%)"]


def test_progress_of_unknown_length_stays_quiet_between_its_lines(smpo_log):
    progress = Progress("download", None, "rows")
    for _ in range(1000):
        progress.update()
    assert smpo_log == []  # the first "N done" line comes after 30 s


@pytest.mark.parametrize(("args", "name"), [
    (("tiny",), "tiny"),
    (("sd15", None, ["train.beta=5000"]), "sd15 train.beta=5000"),
    (("configs/sdxl.yaml", ["train", "evaluate"], ["train.lora_rank=4"], ["train"]),
     "sdxl train,evaluate train.lora_rank=4 --force train"),
])
def test_run_names_say_what_differs(args, name):
    assert run_name(*args) == name


def test_result_rows_pair_each_metric_of_base_and_tuned():
    results = {
        "pickscore.base": {"mean": 20.0, "median": 20.1},
        "pickscore.tuned": {"mean": 21.5, "median": 21.0, "diff_mean": 1.5, "diff_ci_low": 1.0,
                            "diff_ci_high": 2.0, "win_rate": 0.75, "win_rate_ci_low": 0.5,
                            "win_rate_ci_high": 0.9},
    }
    assert result_rows(results) == [{"metric": "pickscore", "base": 20.0, "tuned": 21.5,
                                     "difference": 1.5, "difference_ci": (1.0, 2.0),
                                     "win_rate": 0.75,
                                     "win_rate_ci": (0.5, 0.9)}]


@pytest.mark.parametrize(("given", "known", "suggestion"), [
    ("train.bta", setting_keys(), " (did you mean 'train.beta'?)"),
    ("evalute.num_prompts", setting_keys(), " (did you mean 'evaluate.num_prompts'?)"),
    ("trian", list(STAGES), " (did you mean 'train'?)"),
    ("zzz", list(STAGES), ""),
])
def test_a_mistyped_name_gets_the_nearest_known_one(given, known, suggestion):
    assert did_you_mean(given, known) == suggestion


def test_dry_run_of_an_empty_store_would_run_everything_and_writes_nothing(tmp_path):
    store = tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--dry-run", "--store",
                           str(store), "--set", "train.beta=5000"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split(maxsplit=3) for line in done.stdout.splitlines()
            if line.split() and line.split()[0] in STAGES]
    assert [row[0] for row in rows] == list(STAGES)
    assert all(row[1] == "run" and row[3] == "no output of this stage in the store yet"
               for row in rows)
    assert not store.exists() and list(tmp_path.iterdir()) == []


def test_runs_of_an_empty_store_says_how_to_make_some(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flows.cli", "runs", "--store",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"no train or evaluate outputs in {tmp_path} yet: `smpo run` " \
                                  f"makes them"


def test_results_state_the_difference_interval_and_the_toy_worlds_true_reward_gain(capsys):
    from flows.cli import print_results

    tuned = {"mean": 0.67, "median": 0.66, "diff_mean": 0.07, "diff_ci_low": 0.04,
             "diff_ci_high": 0.1, "win_rate": 0.875, "win_rate_ci_low": 0.79,
             "win_rate_ci_high": 0.96}
    print_results({"toy-truth.base": {"mean": 0.6, "median": 0.6}, "toy-truth.tuned": tuned})
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["toy-truth", "0.6000", "0.6700", "+0.0700", "[+0.0400,",
                                "+0.1000]", "0.875", "[0.790,", "0.960]"]
    assert lines[-1].startswith("true-reward gain +0.0700 [95% CI +0.0400, +0.1000]")
    print_results({"pickscore.base": {"mean": 20.0, "median": 20.0},
                   "pickscore.tuned": tuned | {"mean": 20.07}})
    assert "true-reward gain" not in capsys.readouterr().out
