"""The `smpo` command: run the flow, list settings.

    smpo run                         all stages of the tiny profile
    smpo run train evaluate          those stages (upstream reused, built if missing)
    smpo run --profile sd15 --set train.beta=5000 --force train
    smpo settings [--profile P]      every setting, its value and what it means
    smpo compare base tuned=train:latest lora:/models/x --set evaluate.prompts=hpdv2-test
                                     models on the same prompts and seeds: table, grid, report
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from smpo_core.errors import SmpoError
from smpo_core.settings import STAGES, Settings, available_profiles, load_settings
from smpo_core.store import default_store


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run pipeline stages (upstream included)")
    run.add_argument("stages", nargs="*", metavar="STAGE",
                     help=f"stages to run, default all: {' '.join(STAGES)}")
    _common(run)
    run.add_argument("--store", default=None,
                     help="stage store folder (default $SMPO_STORE or ./smpo-store)")
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="recompute this stage even if its output exists (repeatable)")
    show = sub.add_parser("settings", help="print the resolved settings of a profile")
    _common(show)
    compare = sub.add_parser(
        "compare", help="evaluate models on the same prompts and seeds (the first is the "
        "reference): one table, one grid, one HTML report, one MLflow run")
    compare.add_argument("models", nargs="+", metavar="MODEL",
                         help="[LABEL=]base | train:KEY | train:latest | run:RUN_ID | "
                              "unet:PATH | lora:PATH | pipeline:PATH_OR_ID | PATH | HUB_ID")
    _common(compare)
    compare.add_argument("--store", default=None,
                         help="stage store folder (default $SMPO_STORE or ./smpo-store)")
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="tiny",
                        help=f"profile name ({', '.join(available_profiles())}) or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.KEY=VALUE", help="override one setting (repeatable)")


def print_table(rows: list[dict]) -> None:
    print(f"\n{'stage':<10} {'status':<7} {'key':<18} {'time':>8}")
    for row in rows:
        status = "reused" if row["reused"] else "ran"
        print(f"{row['stage']:<10} {status:<7} {row['key']:<18} {row['seconds']:>7.1f}s")


def print_settings(settings: Settings) -> None:
    for section in Settings.model_fields:
        value = getattr(settings, section)
        if not hasattr(value, "model_fields"):
            print(f"{section}: {value}")
            continue
        for name, info in type(value).model_fields.items():
            doc = f"  # {info.description}" if info.description else ""
            print(f"{section}.{name}={getattr(value, name)!r}{doc}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Offline machines: Prefect's temporary server would log a failed telemetry call each run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        settings = load_settings(args.profile, args.overrides)
        if args.command == "settings":
            print_settings(settings)
            return 0
        if args.command == "compare":
            return _compare(args)
        from flows.pipeline import preflight, prepare, smpo, with_upstream

        plan = with_upstream(args.stages)
        for stage in args.force:
            if stage not in STAGES:
                raise SmpoError(f"--force {stage!r}: unknown stage; expected one of "
                                f"{', '.join(STAGES)}")
        store = args.store or default_store()
        prepare(settings, store)  # an unreachable MLflow server fails here, before any stage
        preflight(settings, store, plan)
        rows = smpo(stages=args.stages or None, profile=args.profile,
                    overrides=args.overrides, store=store, force=args.force)
    except SmpoError as exc:
        print(f"smpo: error: {exc}", file=sys.stderr)
        return 2
    print_table(rows)
    _print_next_steps(Path(store).resolve(), rows)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from flows.compare import compare, plan_comparison

    # Checked before the flow starts, so a bad model or prompt set costs no server start.
    plan_comparison(args.models, args.profile, args.overrides, args.store)
    result = compare(models=args.models, profile=args.profile, overrides=args.overrides,
                     store=args.store)
    print_comparison(result["summary"])
    folder = Path(result["path"])
    print(f"\ntable: {folder / 'table.csv'}\nimage grid: {folder / 'grid.png'}\n"
          f"report: {folder / 'report.html'}\nMLflow run: {result['run_id']}")
    return 0


def print_comparison(summary: dict) -> None:
    """Every metric over all prompts: each model's mean and median, and against the
    reference the difference and win rate with their 95% intervals."""
    reference = summary["reference"]
    print(f"\n{'metric':<12} {'model':<16} {'mean':>10} {'median':>10}  "
          f"{'difference vs ' + reference + ' [95% CI]':<36} win rate [95% CI]")
    for kind, metric in summary["metrics"].items():
        result = metric["groups"]["all"]
        for label, stats in result["models"].items():
            paired = result["vs_reference"].get(label)
            diff = (f"{paired['diff_mean']:+.4f} [{paired['diff_ci'][0]:+.4f}, "
                    f"{paired['diff_ci'][1]:+.4f}]") if paired else "reference"
            win = (f"{paired['win_rate']:.3f} [{paired['win_rate_ci'][0]:.3f}, "
                   f"{paired['win_rate_ci'][1]:.3f}]") if paired else ""
            print(f"{kind:<12} {label:<16} {stats['mean']:>10.4f} {stats['median']:>10.4f}  "
                  f"{diff:<36} {win}")


def _print_next_steps(store: Path, rows: list[dict]) -> None:
    evaluate = next((r for r in rows if r["stage"] == "evaluate"), None)
    print(f"\nstore: {store}")
    if evaluate:
        print(f"report: {Path(evaluate['path']) / 'report.html'}")
        print(f"image grid: {Path(evaluate['path']) / 'grid.png'}")
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store / 'mlflow.db'}"
    print(f"MLflow UI: .venv/bin/mlflow ui --backend-store-uri {uri} --port 5000  "
          f"(then open http://127.0.0.1:5000)")


if __name__ == "__main__":
    sys.exit(main())
