"""The `accelerate launch` command lines of multi-process stages: one machine, several
machines (accelerate's own settings, from the environment) or an accelerate config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from smpo_core.errors import SmpoError
from stages.launch import launch_command


def _options(command: list[str]) -> dict[str, str]:
    flags = command[command.index("accelerate.commands.launch") + 1:command.index("-m", 3)]
    options, name = {}, None
    for item in flags:
        if item.startswith("--"):
            name = item
            options[name] = ""
        else:
            options[name] = item
    return options


@pytest.fixture(autouse=True)
def _no_machines(monkeypatch):
    for name in ("SMPO_NUM_MACHINES", "SMPO_MACHINE_RANK", "SMPO_MAIN_PROCESS_IP",
                 "SMPO_MAIN_PROCESS_PORT", "SMPO_ACCELERATE_CONFIG"):
        monkeypatch.delenv(name, raising=False)


def test_one_machine_takes_a_free_port_and_the_module_runs_each_process():
    command = launch_command(2, "stages.score", Path("/s/launch.json"), cuda=False)
    assert command[-4:] == ["-m", "stages.score", "--spec", "/s/launch.json"]
    assert _options(command) == {"--multi_gpu": "", "--num_processes": "2",
                                 "--num_machines": "1", "--machine_rank": "0",
                                 "--mixed_precision": "no", "--dynamo_backend": "no",
                                 "--main_process_port": "0"}


def test_several_machines_use_accelerates_own_settings(monkeypatch, tmp_path):
    config = tmp_path / "accelerate.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\n")
    monkeypatch.setenv("SMPO_NUM_MACHINES", "2")
    monkeypatch.setenv("SMPO_MACHINE_RANK", "1")
    monkeypatch.setenv("SMPO_MAIN_PROCESS_IP", "10.0.0.1")
    monkeypatch.setenv("SMPO_MAIN_PROCESS_PORT", "29500")
    monkeypatch.setenv("SMPO_ACCELERATE_CONFIG", str(config))
    options = _options(launch_command(16, "stages.invert", Path("spec"), cuda=True,
                                      mixed_precision="bf16"))
    assert {k: options[k] for k in ("--config_file", "--num_processes", "--num_machines",
                                    "--machine_rank", "--main_process_ip",
                                    "--main_process_port", "--mixed_precision")} == {
        "--config_file": str(config), "--num_processes": "16", "--num_machines": "2",
        "--machine_rank": "1", "--main_process_ip": "10.0.0.1", "--main_process_port": "29500",
        "--mixed_precision": "bf16"}


@pytest.mark.parametrize(("env", "message"), [
    ({"SMPO_NUM_MACHINES": "2"}, "SMPO_NUM_MACHINES=2: the machines meet on machine 0; set "
     "SMPO_MAIN_PROCESS_IP and SMPO_MAIN_PROCESS_PORT"),
    ({"SMPO_NUM_MACHINES": "2", "SMPO_MACHINE_RANK": "2", "SMPO_MAIN_PROCESS_IP": "h",
      "SMPO_MAIN_PROCESS_PORT": "1"}, "SMPO_MACHINE_RANK=2 of SMPO_NUM_MACHINES=2 with 4 "
     "processes: expected a rank below the machine count"),
])
def test_incomplete_machine_settings_are_refused(monkeypatch, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SmpoError) as error:
        launch_command(4, "stages.train", Path("spec"), cuda=False)
    assert message in str(error.value)


@pytest.mark.integration
def test_launched_cpu_processes_form_one_group_and_each_knows_its_rank(tmp_path):
    """On a machine without GPUs the two launched processes are processes 0 and 1 of 2 (each
    takes its own shards); not two lone processes 0 of 1 that each do all the work. They
    start without Prefect and MLflow."""
    from types import SimpleNamespace

    from stages.launch import launch

    lines: list[str] = []
    run = SimpleNamespace(out_dir=tmp_path, stage="probe", log=lambda *args: None)
    result = launch(run, "tests.launch_probe", 2, {}, on_line=lines.append, cuda=False)
    assert result == {"processes": [[0, 2], [1, 2]], "imported": []}, "\n".join(lines)
