"""The toy-world study: the five methods of METHOD.md §4 x seeds, through the five stages.

    smpo study [--profile toy] [--seeds 0 1 2] [--methods smpo sft ...]
               [--set section.key=value ...] [--store DIR] [--out DIR]

Each (method, seed) is one run of the `smpo` flow (a subflow here) with the method's
switches and `train.seed`; download, score and invert are shared by every run (same data),
and the base model's evaluation images are drawn once. The study then pools each method's
seeds (smpo_core.study) and writes `study.json`, `table.md` and `curves.png` into `--out`
(default `<store>/study/`), and logs them to MLflow as one parent run with a child run per
method (metrics: gain, interval ends, win rate, fidelity, diversity; per-step mean curves).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow

from flows.pipeline import code_version, smpo
from flows.plan import tracking_uri
from smpo_core.environment import environment
from smpo_core.errors import SmpoError
from smpo_core.store import atomic_path
from smpo_core.study import METHODS, mean_curves, plot_curves, summarise_method, table_markdown
from stages import tracking


def _outputs(results: list[dict[str, Any]]) -> dict[str, Path]:
    return {r["stage"]: Path(r["path"]) for r in results}


@flow(name="smpo-study", log_prints=True)
def study(profile: str = "toy", seeds: list[int] | None = None,
          methods: list[str] | None = None, overrides: list[str] | None = None,
          store: str | None = None, out: str | None = None) -> dict[str, Any]:
    """Run every method with every seed through the pipeline; pool, tabulate, plot, log."""
    seeds = [0, 1, 2] if seeds is None else seeds
    methods = list(METHODS) if methods is None else methods
    if unknown := [m for m in methods if m not in METHODS]:
        raise SmpoError(f"study: unknown method {unknown[0]!r}; expected some of "
                        f"{', '.join(METHODS)}")
    root = Path(store or environment().store).expanduser().resolve()
    out_dir = Path(out) if out else root / "study"
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    runs: dict[str, list[dict[str, Path]]] = {m: [] for m in methods}
    for method in methods:
        for seed in seeds:
            print(f"study: {method}, seed {seed}")
            runs[method].append(_outputs(smpo(
                stages=["evaluate"], profile=profile, store=str(root),
                overrides=[*(overrides or []), *METHODS[method], f"train.seed={seed}"])))
    summary = {m: summarise_method([r["evaluate"] for r in rs]) for m, rs in runs.items()}
    curves = {m: mean_curves([json.loads((r["train"] / "history.json").read_text())
                              for r in rs]) for m, rs in runs.items()}
    record = {"profile": profile, "seeds": seeds, "out": str(out_dir), "overrides": overrides or [],
              "minutes": round((time.time() - started) / 60, 1), "methods": summary,
              "curves": curves,
              "runs": {m: [{k: str(v) for k, v in r.items()} for r in rs]
                       for m, rs in runs.items()}}
    with atomic_path(out_dir / "study.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    with atomic_path(out_dir / "table.md") as tmp:
        tmp.write_text(table_markdown(summary))
    plot_curves(curves, out_dir / "curves.png")
    _log(record, out_dir, root, profile)
    print(table_markdown(summary))
    return record


def _log(record: dict[str, Any], out_dir: Path, root: Path, profile: str) -> None:
    """One MLflow parent run for the study, a child per method."""
    uri = tracking_uri(root)
    client = MlflowClient(uri)
    experiment = tracking.experiment_id(client, uri, root)
    tags = {"smpo.kind": "study", "smpo.profile": profile, "smpo.code_version": code_version()}
    with tracking.run(client, experiment, f"study {profile} {time.strftime('%H:%M:%S')}",
                      tags) as parent:
        parent.params({"profile": profile, "seeds": record["seeds"],
                       "overrides": " ".join(record["overrides"])})
        for name in ("study.json", "table.md", "curves.png"):
            parent.artifact(out_dir / name)
        for method, values in record["methods"].items():
            with tracking.run(client, experiment, method, tags | {"smpo.method": method},
                              parent.run_id) as child:
                child.metrics({"true_reward_gain": values["true_reward_gain"],
                               "true_reward_gain_ci_low": values["true_reward_gain_ci"][0],
                               "true_reward_gain_ci_high": values["true_reward_gain_ci"][1],
                               "win_rate": values["win_rate"],
                               "caption_fidelity": values["caption_fidelity"],
                               "diversity": values["diversity"]})
                curve = record["curves"][method]
                for i, step in enumerate(curve["step"]):
                    child.metrics({k: v[i] for k, v in curve.items() if k != "step"}, step=step)
