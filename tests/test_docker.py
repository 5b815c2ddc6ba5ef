"""docker/ checked statically (no Docker engine runs here): the compose file parses and hangs
together, its images and builds exist and agree with pyproject.toml's pins, and the image
installs the project with the Makefile's own command."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.serve import DEFAULT_POOL

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _pins() -> dict[str, str]:
    """`name==version` pins of pyproject.toml's dependencies."""
    text = (REPO / "pyproject.toml").read_text()
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([^"]+)"', text))


def _named_volumes(service: dict) -> set[str]:
    names = set()
    for volume in service.get("volumes", []):
        source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
        if not source.startswith((".", "/", "~", "$")):
            names.add(source)
    return names


def _bind_sources(service: dict) -> set[str]:
    sources = set()
    for volume in service.get("volumes", []):
        source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
        if source.startswith("."):
            sources.add(source)
    return sources


def _dockerfile_runs(path: Path) -> list[str]:
    """The RUN instructions of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    return [line[4:].strip() for line in text.splitlines() if line.startswith("RUN ")]


def test_compose_has_the_four_services(compose):
    assert set(compose["services"]) == {"postgres", "prefect-server", "mlflow", "worker"}


def test_every_service_image_or_build_exists(compose):
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            context = DOCKER / (build if isinstance(build, str) else build["context"])
            dockerfile = context / (build.get("dockerfile", "Dockerfile")
                                    if isinstance(build, dict) else "Dockerfile")
            assert context.is_dir(), f"{name}: build context {context} missing"
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            froms = [line for line in dockerfile.read_text().splitlines()
                     if line.startswith("FROM ")]
            assert froms, f"{dockerfile}: no FROM"
        else:
            image = service["image"]
            assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"


def test_server_images_run_the_versions_pyproject_pins(compose):
    pins = _pins()
    prefect_image = compose["services"]["prefect-server"]["image"]
    assert prefect_image.split(":")[1].startswith(f"{pins['prefect']}-"), prefect_image
    mlflow_build = compose["services"]["mlflow"]["build"]
    mlflow_from = (DOCKER / mlflow_build["context"] / mlflow_build["dockerfile"]).read_text()
    assert f"ghcr.io/mlflow/mlflow:v{pins['mlflow']}" in mlflow_from


def test_every_volume_network_and_dependency_is_declared(compose):
    services = compose["services"]
    declared_volumes = set(compose.get("volumes") or {})
    declared_networks = set(compose.get("networks") or {}) | {"default"}
    used_volumes = set()
    for name, service in services.items():
        used_volumes |= _named_volumes(service)
        for source in _bind_sources(service):
            assert (DOCKER / source).exists(), f"{name}: bind mount {source} missing"
        assert set(service.get("networks", [])) <= declared_networks, name
        depends = service.get("depends_on") or []
        assert set(depends) <= set(services), f"{name}: depends on a missing service"
        for target, spec in (depends.items() if isinstance(depends, dict) else []):
            if spec.get("condition") == "service_healthy":  # needs something to report it
                assert "healthcheck" in services[target], f"{name} waits on {target}"
    assert used_volumes <= declared_volumes, used_volumes - declared_volumes
    assert {"postgres-data", "mlflow-artifacts", "smpo-store"} <= used_volumes


def test_servers_and_worker_are_wired_together(compose):
    services = compose["services"]
    prefect_env = services["prefect-server"]["environment"]
    assert prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://")
    assert "@postgres:5432/prefect" in prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow = shlex.split(services["mlflow"]["command"])
    assert mlflow[mlflow.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert "--serve-artifacts" in mlflow
    destination = mlflow[mlflow.index("--artifacts-destination") + 1]
    assert f"mlflow-artifacts:{destination}" in services["mlflow"]["volumes"]
    assert "@postgres:5432/mlflow" in mlflow[mlflow.index("--backend-store-uri") + 1]
    assert "CREATE DATABASE mlflow" in (DOCKER / "postgres-init.sql").read_text()

    worker = services["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert f"prefect worker start --pool {DEFAULT_POOL}" in worker["command"]
    assert "python -m flows.serve deploy" in worker["command"]  # on the pool above
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    store = worker["environment"]["SMPO_STORE"]
    assert f"smpo-store:{store}" in worker["volumes"]


def test_image_installs_the_project_with_the_makefile_commands():
    makefile = (REPO / "Makefile").read_text()
    recipe = re.search(r"^\$\(STAMP\):.*\n((?:\t.*\n)+)", makefile, flags=re.M).group(1)
    installs = re.findall(r"^\t\$\(BIN\)/(pip install .*)$", recipe, flags=re.M)
    assert any("-e '.[dev]'" in line for line in installs), installs
    commands = [part.strip() for run in _dockerfile_runs(DOCKER / "Dockerfile")
                for part in run.split("&&")]
    missing = [line for line in installs if line not in commands]
    assert not missing, f"docker/Dockerfile does not run the Makefile's {missing}"


def test_image_takes_torch_at_the_pinned_version_from_a_cuda_index():
    dockerfile = (DOCKER / "Dockerfile").read_text()
    torch_install = next(run for run in _dockerfile_runs(DOCKER / "Dockerfile")
                         if "torch" in run and "--index-url" in run)
    # The version comes from pyproject.toml: run the Dockerfile's own grep on it.
    grep = re.search(r"\$\((grep [^)]*pyproject\.toml)\)", torch_install).group(1)
    found = subprocess.run(["sh", "-c", grep], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    assert found == [f"torch=={_pins()['torch']}"]
    cuda = re.search(r"ARG TORCH_INDEX=https://download.pytorch.org/whl/cu(\d+)", dockerfile)
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-\w+-ubuntu", dockerfile, flags=re.M)
    assert cuda and base and cuda.group(1) == base.group(1) + base.group(2)
