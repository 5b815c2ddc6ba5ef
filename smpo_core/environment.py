"""The environment variables that change what smpo does, read in one place.

Profiles (configs/*.yaml) say what a run computes; these say where it keeps things and which
servers it talks to, so none of them enters a stage key. `smpo settings` lists them with the
profile's settings; `Environment` is their single definition (name, default, meaning).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from smpo_core.errors import SmpoError

REPO = Path(__file__).resolve().parents[1]
PREFIX = "SMPO_"


class Environment(BaseSettings):
    """SMPO_* variables, and MLflow's own MLFLOW_TRACKING_URI. Unset or empty: the default."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, env_ignore_empty=True, extra="ignore",
                                      frozen=True)

    store: Path = Field(
        Path("smpo-store"),
        description="The stage store (outputs, built-in models, MLflow database) when `smpo run "
        "--store` or the flow's `store` parameter is not given; `make serve` serves it.")
    experiment: str = Field(
        "smpo", min_length=1, description="The MLflow experiment every run is logged to.")
    configs: Path = Field(
        REPO / "configs", description="The folder of profiles: `--profile NAME` reads "
        "NAME.yaml there.")
    prefect_port: int = Field(
        4200, gt=0, lt=65536, description="`make serve`: the Prefect server's port (API and "
        "UI) on 127.0.0.1.")
    mlflow_port: int = Field(
        5000, gt=0, lt=65536, description="`make serve`: the MLflow server's port (API and UI) "
        "on 127.0.0.1.")
    work_pool: str = Field(
        "smpo-local", pattern=r"^[^/%&><]+$", description="`make serve`: the Prefect work pool "
        "(process type) whose worker runs the deployments; no / % & > or <.")
    fault: str | None = Field(
        None, pattern=r"^[a-z]+\.[a-z]+:[1-9][0-9]*$", description="Tests only: `POINT:N` "
        "kills the process (SIGKILL) the N-th time it passes POINT, e.g. invert.shard:1 "
        "(smpo_core/faults.py lists the points).")
    num_machines: int = Field(
        1, gt=0, description="Machines a multi-process stage (train, score, invert, evaluate "
        "with <stage>.num_processes > 1) runs on; each runs the same `smpo run`, with its own "
        "SMPO_MACHINE_RANK, on a store all of them see (accelerate's --num_machines).")
    machine_rank: int = Field(
        0, ge=0, description="This machine's rank among SMPO_NUM_MACHINES; 0 is the main one "
        "(accelerate's --machine_rank).")
    main_process_ip: str | None = Field(
        None, description="Address of machine 0, which the others connect to; needed with "
        "SMPO_NUM_MACHINES > 1 (accelerate's --main_process_ip).")
    main_process_port: int | None = Field(
        None, gt=0, lt=65536, description="Port on machine 0 for the processes' rendezvous; "
        "needed with SMPO_NUM_MACHINES > 1; unset on one machine: a free port "
        "(accelerate's --main_process_port).")
    accelerate_config: Path | None = Field(
        None, description="An `accelerate config` file for every multi-process launch (e.g. "
        "GPU ids); the settings above and <stage>.num_processes override its values.")
    sweep_devices: str | None = Field(
        None, description="Devices a sweep places its running variants on, one each, when its "
        "`devices` parameter is not given: comma-separated, e.g. cuda:0,cuda:1 (a multi-GPU "
        "worker's GPUs); unset: every variant on model.device.")
    tracking_uri: str | None = Field(
        None, validation_alias="MLFLOW_TRACKING_URI", description="Where runs are logged: an "
        "MLflow server (http://...) or database URI; unset: sqlite:///<store>/mlflow.db.")

    @classmethod
    def variable(cls, field: str) -> str:
        """The environment variable that sets `field`."""
        alias = cls.model_fields[field].validation_alias
        return alias if isinstance(alias, str) else PREFIX + field.upper()


def environment() -> Environment:
    """The environment as it is now (read on every call: cheap, and tests change it)."""
    try:
        return Environment()
    except ValidationError as exc:
        error = exc.errors()[0]
        field = Environment.model_fields[str(error["loc"][0])]
        name = Environment.variable(str(error["loc"][0]))
        raise SmpoError(f"{name}={error.get('input')!r}: {error['msg']} ({field.description})"
                        ) from None
