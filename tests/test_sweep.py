"""Sweeps: a grid of train settings on one download, score and cache; concurrent variants
within a Prefect concurrency limit, one MLflow run each under the sweep's; one failing
variant leaves the others finished, and a rerun completes only it."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.cli import main, parse_grid
from flows.sweep import expand_grid, plan_sweep
from smpo_core.errors import SmpoError
from tests.conftest import FAST

GRID = {"train.beta": [1000, 5000], "train.labels": ["smoothed", "human"]}
BROKEN = "beta 5000 labels human"  # the variant the fault below breaks


def test_the_grid_is_every_combination_last_key_fastest():
    variants = expand_grid(GRID)
    assert [v.label for v in variants] == ["beta 1000 labels smoothed", "beta 1000 labels human",
                                           "beta 5000 labels smoothed", BROKEN]
    assert variants[1].overrides == ["train.beta=1000", 'train.labels="human"']


def test_grid_values_on_the_command_line():
    assert parse_grid(["train.beta=1000,2000", "train.labels=smoothed"]) == {
        "train.beta": [1000, 2000], "train.labels": ["smoothed"]}
    assert parse_grid(["evaluate.guidance_scale=[1.5, 7.5]"]) == {
        "evaluate.guidance_scale": [1.5, 7.5]}
    with pytest.raises(SmpoError, match=r"--grid 'train.beta': expected SECTION.KEY=V1,V2"):
        parse_grid(["train.beta"])


@pytest.mark.parametrize(("grid", "kwargs", "message"), [
    ({"invert.num_levels": [3, 5]}, {},
     "sweep grid key 'invert.num_levels': only train and evaluate settings can vary"),
    ({"train.labels": ["smoothed", "humna"]}, {},
     "sweep variant 'labels humna': override 'train.labels=\"humna\"': setting train.labels: "
     "Input should be 'smoothed' or 'human'"),
    ({"train.beta": []}, {}, "sweep grid key 'train.beta': expected a non-empty list"),
    (GRID, {"concurrency": 0}, "sweep concurrency 0: expected 1 or more"),
    (GRID, {"concurrency": 2, "devices": ["cuda:0"]},
     "sweep devices ['cuda:0']: 2 variants run at once, so give at least 2 devices"),
    (GRID, {"devices": ["gpu0"]}, "sweep device 'gpu0': Invalid device string"),
])
def test_a_bad_sweep_is_refused_before_anything_runs(tmp_path, grid, kwargs, message):
    with pytest.raises(SmpoError) as error:
        plan_sweep(grid, store=str(tmp_path / "store"), **kwargs)
    assert message in str(error.value)
    assert not (tmp_path / "store").exists()


def test_the_command_says_what_is_wrong_with_a_grid_and_exits_2(tmp_path, capsys):
    code = main(["sweep", "--grid", "download.max_pairs=4,8", "--store", str(tmp_path)])
    assert code == 2
    assert "smpo: error: sweep grid key 'download.max_pairs': only train and evaluate" in \
        capsys.readouterr().err


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """The 2 x 2 sweep through `smpo sweep`, two variants at a time, with one variant's
    training failing; then the same sweep again without the fault."""
    from prefect.testing.utilities import prefect_test_harness

    import stages.train

    store = tmp_path_factory.mktemp("store")
    run_training = stages.train.run_training
    running: list[int] = []  # trainings running now; the most at once is recorded
    most = [0]
    trained: list[tuple[float, str]] = []
    devices: set[str] = set()  # the model.device each training ran with
    lock = threading.Lock()
    fault = [True]

    def watched_training(job, *args, **kwargs):
        settings = job.settings
        with lock:
            devices.add(settings.model.device)
            running.append(1)
            most[0] = max(most[0], len(running))
        try:
            if fault[0] and settings.train.beta == 5000 and settings.train.labels == "human":
                raise RuntimeError("CUDA out of memory (a fault of this test)")
            time.sleep(0.5)  # the tiny training is quick: make overlaps visible
            result = run_training(job, *args, **kwargs)
            trained.append((settings.train.beta, settings.train.labels))
            return result
        finally:
            with lock:
                running.pop()

    small = [*FAST, "train.max_steps=2", "evaluate.num_prompts=2",
             "evaluate.metrics={pickscore: builtin:tiny-clip}"]
    command = ["sweep", "--grid", "train.beta=1000,5000", "--grid", "train.labels=smoothed,human",
               # Two device slots, one per running variant: on this CPU both are the CPU.
               "--concurrency", "2", "--devices", "cpu,cpu", "--store", str(store),
               *[arg for item in small for arg in ("--set", item)]]
    with pytest.MonkeyPatch.context() as mp, prefect_test_harness(server_startup_timeout=120):
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr(stages.train, "run_training", watched_training)
        first = main(command)
        first_trained, first_most = list(trained), most[0]
        trained.clear()
        fault[0] = False
        second = main(command)
    return {"store": store, "first": first, "second": second, "first_trained": first_trained,
            "most": first_most, "second_trained": list(trained), "devices": devices}


def _runs(store: Path):
    client = MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smpo")
    return client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.mark.integration
def test_a_failing_variant_leaves_the_others_finished_on_one_cache(swept):
    store = swept["store"]
    assert swept["first"] == 1  # the sweep fails, after finishing what it could
    assert sorted(swept["first_trained"]) == [(1000, "human"), (1000, "smoothed"),
                                              (5000, "smoothed")]
    # One download, one score, one cache of trajectories served all four variants.
    for stage in ("download", "score", "invert"):
        assert len([p for p in (store / stage).iterdir() if (p / "manifest.json").is_file()]) \
            == 1, stage
    assert swept["most"] <= 2  # never more trainings at once than the concurrency limit
    assert swept["devices"] == {"cpu"}  # each on its slot's device, not model.device's auto


def _most_at_once(runs) -> int:
    """The most runs open at one moment, from their MLflow start and end times."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1)
                                                             for r in runs])
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


@pytest.mark.integration
def test_every_variant_is_an_mlflow_run_under_the_sweep_and_failures_are_marked(swept):
    runs = _runs(swept["store"])
    sweeps = sorted((r for r in runs if r.data.tags.get("smpo.kind") == "sweep"),
                    key=lambda r: r.info.start_time)
    assert len(sweeps) == 2
    for parent, failed in zip(sweeps, ([BROKEN], []), strict=True):
        children = {r.data.tags["mlflow.runName"]: r for r in runs
                    if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        variants = {name: r for name, r in children.items() if name.startswith("variant ")}
        assert set(variants) == {f"variant {v.label}" for v in expand_grid(GRID)}
        assert {n for n, r in variants.items() if r.info.status == "FAILED"} == \
            {f"variant {label}" for label in failed}
        assert "shared stages" in children
        if failed:  # the first sweep: variants ran two at a time, never more
            assert _most_at_once(list(variants.values())) == 2
        assert parent.data.tags["smpo.failed_variants"] == ", ".join(failed)
        comparison = next(r for r in children.values()
                          if r.data.tags.get("smpo.kind") == "comparison")
        compared = json.loads((Path(comparison.data.tags["smpo.output"]) / "summary.json")
                              .read_text())
        # the base and every variant that trained, in one comparison
        assert set(compared["models"]) == {"base", *[v.label for v in expand_grid(GRID)
                                                     if v.label not in failed]}
        stage_runs = [r for r in runs if r.data.tags.get("mlflow.parentRunId")
                      == variants[f"variant {expand_grid(GRID)[0].label}"].info.run_id]
        assert {r.data.tags["smpo.stage"] for r in stage_runs} >= {"train", "evaluate"}


@pytest.mark.integration
def test_the_rerun_trains_only_the_failed_variant_and_compares_all_four(swept):
    assert swept["second"] == 0
    assert swept["second_trained"] == [(5000, "human")]  # the three others were reused
    store = swept["store"]
    trains = [p for p in (store / "train").iterdir() if (p / "manifest.json").is_file()]
    assert len(trains) == 4
    summary = json.loads(next((store / "sweep").glob("*/summary.json")).read_text())
    assert [row["state"] for row in summary["variants"]] == ["completed"] * 4
    compared = json.loads((Path(summary["comparison"]) / "summary.json").read_text())
    assert set(compared["models"]) == {"base", *[v.label for v in expand_grid(GRID)]}
    for row in summary["variants"]:
        assert isinstance(row["pickscore.mean"], float)


def test_running_variants_each_hold_their_own_device(monkeypatch, tmp_path):
    """The GPU placement of a sweep, without GPUs: the worker's SMPO_SWEEP_DEVICES are the
    slots, and variants running at the same time never share one."""
    import queue
    from concurrent.futures import ThreadPoolExecutor

    from flows.sweep import device_slot

    monkeypatch.setenv("SMPO_SWEEP_DEVICES", "cuda:0, cuda:1")
    with pytest.raises(SmpoError, match=r"sweep devices \['cuda:0', 'cuda:1'\]: 3 variants"):
        plan_sweep(GRID, store=str(tmp_path), concurrency=3)
    slots: queue.Queue = queue.Queue()
    for device in ["cuda:0", "cuda:1"]:
        slots.put(device)
    together = threading.Barrier(2)
    held: list[str] = []

    def variant(_: int) -> str:
        with device_slot(slots) as device:
            together.wait(timeout=10)  # both variants hold a device now
            held.append(device)
            together.wait(timeout=10)
        return device

    with ThreadPoolExecutor(2) as pool:
        first = list(pool.map(variant, range(2)))
        second = list(pool.map(variant, range(2)))  # the devices came back
    assert sorted(first) == sorted(second) == ["cuda:0", "cuda:1"]


def test_variants_loading_models_in_threads_never_get_meta_or_uninitialised_weights(tmp_path):
    """Sweep variants are threads of one process, and diffusers/transformers patch torch for
    the whole process while they load (meta parameters, no-op init). Two threads loading a
    UNet and attaching LoRA over and over must each get real weights with zero LoRA updates,
    and leave the process able to build ordinary modules afterwards."""
    import torch

    from smpo_core.models import add_lora, load_unet
    from smpo_core.worlds import builtins

    base = builtins.resolve("builtin:tiny-sd", tmp_path)
    problems: list[str] = []

    def load_and_adapt():
        for _ in range(10):
            unet = load_unet(base)
            add_lora(unet, rank=2)
            for name, param in unet.named_parameters():
                if param.is_meta:
                    problems.append(f"{name} on meta")
                elif "lora_B" in name and param.abs().max() != 0:
                    problems.append(f"{name} not zero at the start")

    threads = [threading.Thread(target=load_and_adapt) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert problems == []
    assert not torch.nn.Linear(2, 2).weight.is_meta  # no loader's patch left behind
