"""The `smpo` command: run the flow, explain the settings.

    smpo run                         all stages of the tiny profile
    smpo run train evaluate          those stages (upstream reused, built if missing)
    smpo run --profile sd15 --set train.beta=5000 --force train
    smpo run --dry-run --set train.beta=5000
                                     which stages would be reused and which would run, and why
    smpo runs                        the store's trainings and evaluations: settings, results
    smpo settings [--profile P]      every setting: value, where it comes from, meaning
    smpo sync [--store S]            log to MLflow what runs could not (tracking server down),
                                     close runs that dead processes left RUNNING
    smpo compare base tuned=train:latest lora:/models/x --set evaluate.prompts=hpdv2-test
                                     models on the same prompts and seeds: table, grid, report
    smpo sweep --grid train.beta=1000,2000,5000 --grid train.labels=smoothed,human
               [--concurrency 2 --devices cuda:0,cuda:1]
                                     every combination trained and evaluated on one cache,
                                     compared in one table
    smpo study [--seeds 0 1 2]       the toy world: every method x seeds, one table and plot
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows.plan import plan_run, tracking_uri
from flows.temporary_server import TemporaryServer
from flows.temporary_server import launch as launch_temporary_server
from smpo_core.environment import Environment, environment
from smpo_core.errors import SmpoError
from smpo_core.settings import (
    STAGES,
    available_profiles,
    describe,
    load_settings,
    parse_override,
    read_profile,
)
from smpo_core.store import disk_error_within
from smpo_core.study import METHODS


def _store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=None,
                        help=f"stage store folder (default ${Environment.variable('store')} or "
                             f"{Environment.model_fields['store'].default})")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    stages = "\n".join(f"  {name:<9} {stage.summary}" for name, stage in STAGES.items())
    run = sub.add_parser("run", help="run pipeline stages (upstream included)",
                         description=f"stages:\n{stages}",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("stages", nargs="*", metavar="STAGE",
                     help=f"stages to run, default all: {' '.join(STAGES)}")
    _common(run)
    _store(run)
    run.add_argument("--force", action="append", default=[], metavar="STAGE",
                     help="recompute this stage even if its output exists (repeatable)")
    sync = sub.add_parser("sync", help="log what runs could not track (server down) and "
                          "close runs left RUNNING by dead processes")
    _store(sync)
    run.add_argument("--dry-run", action="store_true",
                     help="say which stages would be reused and which would run, and why; "
                          "run nothing, write nothing")
    runs = sub.add_parser("runs", help="the store's train and evaluate outputs: the settings "
                          "that tell them apart and their results")
    _store(runs)
    show = sub.add_parser("settings", help="explain every setting of a profile")
    _common(show)
    compare = sub.add_parser(
        "compare", help="evaluate models on the same prompts and seeds (the first is the "
        "reference): one table, one grid, one HTML report, one MLflow run")
    compare.add_argument("models", nargs="+", metavar="MODEL",
                         help="[LABEL=]base | train:KEY | train:latest | run:RUN_ID | "
                              "unet:PATH | lora:PATH | pipeline:PATH_OR_ID | PATH | HUB_ID")
    _common(compare)
    _store(compare)
    sweep = sub.add_parser(
        "sweep", help="train and evaluate a grid of settings on one download, score and cache; "
        "one comparison of all variants")
    sweep.add_argument("--grid", action="append", default=[], required=True,
                       metavar="SECTION.KEY=V1,V2,...",
                       help="values of one train or evaluate setting (repeatable; each value "
                            "read as YAML, or a YAML list: train.beta=[1000, 2000])")
    sweep.add_argument("--concurrency", type=int, default=1,
                       help="variants running at once (a Prefect concurrency limit; one per "
                            "GPU), default 1")
    sweep.add_argument("--devices", default=None, metavar="DEV,DEV,...",
                       help="devices the running variants are placed on, one each "
                            "(e.g. cuda:0,cuda:1); default: model.device")
    _common(sweep)
    _store(sweep)
    study = sub.add_parser(
        "study", help="the toy world's study: every method x seeds through the five stages; "
        "one table, curves and an MLflow parent run (flows/study.py)")
    study.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    study.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                       help="default: all")
    study.add_argument("--out", default=None, help="default <store>/study")
    _common(study)
    study.set_defaults(profile="toy")
    _store(study)
    return parser


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """`train.beta=1000,2000` (or `train.beta=[1000, 2000]`) -> {"train.beta": [1000, 2000]}."""
    grid: dict[str, list[Any]] = {}
    for text in items:
        key, sep, values = text.partition("=")
        if not sep or not key.strip() or not values.strip():
            raise SmpoError(f"--grid {text!r}: expected SECTION.KEY=V1,V2,...")
        try:
            parsed = yaml.safe_load(values)
            if not isinstance(parsed, list):
                parsed = [yaml.safe_load(v) for v in values.split(",")]
        except yaml.YAMLError as exc:
            raise SmpoError(f"--grid {text!r}: values are not YAML ({exc})") from None
        grid[key.strip()] = parsed
    return grid


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


def print_results(results: dict[str, dict[str, float]]) -> None:
    """The evaluation's results: per metric the base and tuned means, the paired difference
    and the tuned model's win rate, each with its 95% interval; in the toy world, a sentence
    on the true-reward gain (its ground truth, the `toy-truth` metric)."""
    from smpo_core.evaluation import result_rows

    print(f"\n{'metric':<12} {'base':>10} {'tuned':>10}  {'difference [95% CI]':<29} "
          f"win rate [95% CI]")
    rows = result_rows(results)
    for row in rows:
        diff = (f"{row['difference']:+.4f} [{row['difference_ci'][0]:+.4f}, "
                f"{row['difference_ci'][1]:+.4f}]")
        low, high = row["win_rate_ci"]
        print(f"{row['metric']:<12} {row['base']:>10.4f} {row['tuned']:>10.4f}  {diff:<29} "
              f"{row['win_rate']:.3f} [{low:.3f}, {high:.3f}]")
    for row in rows:
        if row["metric"] == "toy-truth":
            low, high = row["difference_ci"]
            print(f"\ntrue-reward gain {row['difference']:+.4f} [95% CI {low:+.4f}, {high:+.4f}]"
                  f": the simulated annotators' mean reward, the toy world's ground truth, "
                  f"{row['base']:.4f} (base) -> {row['tuned']:.4f} (tuned)")


def print_dry_run(planned: list) -> None:
    print(f"{'stage':<10} {'would':<7} {'key':<18} why")
    for step in planned:
        print(f"{step.stage:<10} {'reuse' if step.reuse else 'run':<7} {step.key:<18} "
              f"{step.reason}")
    print("\n(dry run: nothing ran, nothing was written)")


def print_settings(profile: str, overrides: list[str]) -> None:
    """Every setting with its value, its origin (default, profile or --set) and meaning, then
    the environment variables."""
    settings = load_settings(profile, overrides)
    given = _keys(read_profile(profile))
    changed = {".".join(parse_override(text)[0][:2]) for text in overrides}
    print(f"# profile {settings.profile}. (default): the paper's SD1.5 run, smpo_core/settings.py; "
          f"(profile): set by the profile; (--set): an override")
    section = None
    for key, value, description in describe(settings):
        if key.split(".")[0] != section:
            section = key.split(".")[0]
            print(f"\n[{section}] {type(settings.section(section)).__doc__ or ''}".rstrip())
        origin = "--set" if key in changed else "profile" if key in given else "default"
        print(f"{key}={value!r}  ({origin})  # {description}")
    print("\n[environment] read once per run (smpo_core/environment.py)")
    env = environment()
    for name, field in Environment.model_fields.items():
        value = getattr(env, name)
        shown = "(unset)" if value is None else value
        print(f"{Environment.variable(name)}={shown}  # {field.description}")


def _keys(data: dict[str, Any]) -> set[str]:
    return {f"{section}.{key}" for section, values in data.items() if isinstance(values, dict)
            for key in values}


class _OneLineSmpoErrors(logging.Filter):
    """Prefect logs a failed flow or task with its traceback; for an SmpoError (bad input,
    said in one line) the command prints that line itself, so the traceback is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], SmpoError):
            record.exc_info, record.exc_text = None, None
        return True


_ONE_LINE = _OneLineSmpoErrors()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prefect: _PrefectApi | None = None
    # Offline machines: Prefect's temporary server would log a failed telemetry call each run.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Its start takes 4-10 s on a quiet machine, a minute on 2 busy cores (default limit 20 s).
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    try:
        if args.command == "settings":
            print_settings(args.profile, args.overrides)
            return 0
        if args.command == "compare":
            prefect = _prefect_api(_store_of(args))
            return _compare(args, prefect)
        if args.command == "sync":
            return _sync(Path(args.store or environment().store).expanduser().resolve())
        if args.command == "sweep":
            prefect = _prefect_api(_store_of(args))
            return _sweep(args, prefect)
        if args.command == "study":
            prefect = _prefect_api(_store_of(args))
            return _study(args, prefect)
        store = args.store or str(environment().store)
        if args.command == "runs":
            print_runs(Path(store).expanduser().resolve())
            return 0
        request = dict(stages=args.stages or None, profile=args.profile,
                       overrides=args.overrides, store=store, force=args.force)
        if args.dry_run:
            from flows.plan import dry_run

            print_dry_run(dry_run(plan_run(**request, build=False)))
            return 0
        prefect = _prefect_api(Path(store))  # before Prefect is imported
        plan = plan_run(**request)  # bad input fails at once, while the server boots
        prefect.wait_until_up()
        from flows.pipeline import run_checked

        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addFilter(_ONE_LINE)
        rows = run_checked(plan, **request)
    except SmpoError as exc:
        print(f"smpo: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the disk filled up or turned read-only outside a stage
        store = args.store or environment().store
        if error := disk_error_within(exc, f"store {store}", Path(store)):
            print(f"smpo: error: {error}", file=sys.stderr)
            return 2
        raise
    finally:
        if prefect:
            prefect.close()
    print_table(rows)
    _print_next_steps(Path(store).expanduser().resolve(), rows, plan.tracking_uri, prefect.ui)
    return 0


def _sync(store: Path) -> int:
    from mlflow.tracking import MlflowClient

    from flows.plan import check_reachable
    from stages import resync, tracking

    uri = tracking_uri(store)
    check_reachable(uri)
    client = MlflowClient(uri)
    experiment = tracking.experiment_id(client, uri, store)
    closed = resync.close_stale_runs(client, experiment)
    logged = resync.sync(client, experiment, store)
    print(f"{uri}: logged {logged} pending runs, closed {closed} runs left RUNNING")
    return 0
@dataclass
class _PrefectApi:
    """The Prefect server this command's flow runs report to."""

    ui: str | None = None  # a server that outlives the command: its UI, to print
    temporary: TemporaryServer | None = None  # the command's own, gone when it exits

    def close(self) -> None:
        """Point PREFECT_API_URL back at nothing (main() may be called again in one process,
        as tests do). The server itself stops at exit, after Prefect has sent its last logs."""
        if self.temporary and os.environ.get("PREFECT_API_URL") == self.temporary.api_url:
            del os.environ["PREFECT_API_URL"]

    def wait_until_up(self) -> None:
        if self.temporary:
            timeout = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
            self.temporary.wait_until_up(timeout)


def _prefect_api(store: Path) -> _PrefectApi:
    """The server PREFECT_API_URL names, else the one `make serve` runs for this store (so
    the UIs and the store agree), else a temporary one of this command's own, which dies with
    it (flows/temporary_server.py). Call before Prefect is imported: it reads
    PREFECT_API_URL once."""
    from flows.serve import served

    if url := os.environ.get("PREFECT_API_URL"):
        return _PrefectApi(ui=url.removesuffix("/").removesuffix("/api"))
    if state := served(store):
        ui = f"http://127.0.0.1:{state['prefect_port']}"
        os.environ["PREFECT_API_URL"] = f"{ui}/api"
        return _PrefectApi(ui=ui)
    return _PrefectApi(temporary=launch_temporary_server())


def _store_of(args: argparse.Namespace) -> Path:
    return Path(args.store or environment().store).expanduser().resolve()


def _compare(args: argparse.Namespace, prefect: _PrefectApi) -> int:
    from flows.compare import compare, plan_comparison

    # Checked before the flow starts, so a bad model or prompt set fails at once.
    plan_comparison(args.models, args.profile, args.overrides, args.store)
    prefect.wait_until_up()
    result = compare(models=args.models, profile=args.profile, overrides=args.overrides,
                     store=args.store)
    print_comparison(result["summary"])
    folder = Path(result["path"])
    print(f"\ntable: {folder / 'table.csv'}\nimage grid: {folder / 'grid.png'}\n"
          f"report: {folder / 'report.html'}\nMLflow run: {result['run_id']}")
    return 0


def _study(args: argparse.Namespace, prefect: _PrefectApi) -> int:
    from flows.study import study

    prefect.wait_until_up()
    record = study(args.profile, args.seeds, args.methods, args.overrides,
                   str(_store_of(args)), args.out)
    print(f"\nstudy: {record['out']}/table.md, curves.png, study.json "
          f"({record['minutes']} min)")
    return 0


def _sweep(args: argparse.Namespace, prefect: _PrefectApi) -> int:
    from flows.sweep import plan_sweep, sweep

    grid = parse_grid(args.grid)
    devices = [d.strip() for d in args.devices.split(",")] if args.devices else None
    request = dict(grid=grid, profile=args.profile, overrides=args.overrides,
                   store=args.store, concurrency=args.concurrency, devices=devices)
    plan = plan_sweep(**request)  # bad grid, limit or devices: fails at once
    prefect.wait_until_up()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_ONE_LINE)
    failure = None
    try:
        sweep(**request)
    except SmpoError as exc:  # failed variants: the table below still says what finished
        failure = exc
    if not (plan.out_dir / "summary.json").is_file():  # failed before any variant ran
        raise failure or SmpoError(f"sweep: no summary in {plan.out_dir}")
    summary = json.loads((plan.out_dir / "summary.json").read_text())
    print_sweep(summary["variants"])
    print(f"\ntable: {plan.out_dir / 'variants.csv'}")
    if summary["comparison"]:
        print(f"comparison report: {Path(summary['comparison']) / 'report.html'}")
    print(f"MLflow parent run: {summary['mlflow_run_id']}")
    if failure:
        print(f"smpo: error: {failure}", file=sys.stderr)
        return 1
    return 0


def print_sweep(rows: list[dict]) -> None:
    """One line per variant: its state, its training's key and final loss, its headline
    evaluation numbers (or its error)."""
    print(f"\n{'variant':<32} {'state':<10} {'train key':<17} {'final loss':>10}  results")
    for row in rows:
        results = " ".join(f"{k} {v:.4g}" for k, v in row.items()
                           if k.endswith((".mean", ".win_rate")) and isinstance(v, float))
        loss = row.get("final_loss")
        loss = f"{loss:>10.5f}" if isinstance(loss, float) else f"{'':>10}"
        print(f"{row['variant']:<32} {row['state']:<10} {row.get('train_key', ''):<17} "
              f"{loss}  {results or row.get('error', '')}")


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


def _print_next_steps(store: Path, rows: list[dict], uri: str, prefect_ui: str | None) -> None:
    """The results, then where everything is: weights, report, grid, the UIs."""
    by_stage = {row["stage"]: row for row in rows}
    evaluate, train = by_stage.get("evaluate"), by_stage.get("train")
    if evaluate and evaluate["summary"].get("results"):
        print_results(evaluate["summary"]["results"])
    print(f"\nstore:      {store}")
    if train and train["summary"].get("weights_path"):
        print(f"weights:    {train['summary']['weights_path']}  (diffusers layout; README: "
              f"Loading the trained weights)")
    if evaluate:
        print(f"report:     {Path(evaluate['path']) / 'report.html'}")
        print(f"image grid: {Path(evaluate['path']) / 'grid.png'}")
    print(f"MLflow:     {_mlflow_ui(store, uri)}")
    if prefect_ui:
        print(f"Prefect UI: {prefect_ui}/runs")


def _mlflow_ui(store: Path, uri: str) -> str:
    """Where to see the runs: the runs table of the MLflow server that tracks them or that
    `make serve` runs on this store, else the command that serves the store's database."""
    from flows.serve import served

    state = served(store)
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
    elif state and uri == tracking_uri(store):
        base = f"http://127.0.0.1:{state['mlflow_port']}"
    else:
        return (f".venv/bin/mlflow ui --backend-store-uri {uri} --port 5000  (then open "
                f"http://127.0.0.1:5000)")
    from mlflow.tracking import MlflowClient

    from stages.tracking import runs_table_url

    experiment = MlflowClient(uri).get_experiment_by_name(environment().experiment)
    return runs_table_url(base, experiment.experiment_id) if experiment else base


def print_runs(store: Path) -> None:
    """The store's train and evaluate outputs, oldest first: key, when, the settings that
    differ between them (an evaluation's include those of the training it evaluates) and
    their headline results."""
    from smpo_core.evaluation import result_rows
    from smpo_core.store import Store
    from stages.tracking import flatten

    outputs = Store(store)
    trains = {folder.name: manifest for folder, manifest in outputs.outputs("train")}
    evaluations = outputs.outputs("evaluate")
    if not trains and not evaluations:
        print(f"no train or evaluate outputs in {store} yet: `smpo run` makes them")
        return
    settings = {key: flatten(m.get("settings", {})) for key, m in trains.items()}
    print(f"train outputs in {store / 'train'}:")
    differ = _differing(list(settings.values()))
    print(f"{'key':<18} {'finished':<20} {'final loss':>10} {'impl. acc':>9}  settings")
    for key, manifest in trains.items():
        print(f"{key:<18} {_when(manifest):<20} {_number(manifest.get('final_loss')):>10} "
              f"{_number(manifest.get('final_implicit_accuracy')):>9}  "
              f"{_shown(settings[key], differ)}")
    if not evaluations:
        return
    print(f"\nevaluate outputs in {store / 'evaluate'} (tuned mean vs base, win rate):")
    combined = [flatten(m.get("settings", {})) | settings.get(m.get("inputs", {}).get("train"), {})
                for _, m in evaluations]
    differ = _differing(combined)
    print(f"{'key':<18} {'finished':<20} {'train':<18} settings / results")
    for (folder, manifest), values in zip(evaluations, combined, strict=True):
        results = ", ".join(f"{r['metric']} {r['tuned']:.4g} vs {r['base']:.4g} "
                            f"(win {r['win_rate']:.2f})"
                            for r in result_rows(manifest.get("results", {})))
        print(f"{folder.name:<18} {_when(manifest):<20} "
              f"{manifest.get('inputs', {}).get('train', '?'):<18} {_shown(values, differ)}"
              f"\n{'':<58} {results}")


def _differing(rows: list[dict[str, Any]]) -> list[str]:
    """The keys whose values are not the same in every row (all keys of a single row would
    say nothing: none)."""
    keys = sorted({key for row in rows for key in row})
    return [key for key in keys if len({repr(row.get(key)) for row in rows}) > 1]


def _shown(values: dict[str, Any], keys: list[str]) -> str:
    return " ".join(f"{key}={values.get(key)}" for key in keys) or "-"


def _when(manifest: dict) -> str:
    return manifest.get("finished_at", "?")[:19].replace("T", " ")


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


if __name__ == "__main__":
    sys.exit(main())
