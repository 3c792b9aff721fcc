"""The ``metaoptimize`` command line: compare, run, sweep, list, plot, report.

``main(argv)`` returns the exit code: 0 on success, 1 when some runs failed, 2 on a usage
error (always a one-line message), 130 when interrupted (finished runs are kept).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from metaoptimize import presets

__all__ = ["entrypoint", "main", "parse_set"]


class UsageError(Exception):
    """Bad command-line input; reported as one line with exit code 2."""


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` where there is a default worth stating."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "(default" in text or default in (None, False, [], argparse.SUPPRESS):
            return text
        return f"{text} (default: {default})"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings as keyword arguments (values parsed as Python literals)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--set expects key=value, got {item!r}")
        try:
            options[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            options[key] = text
    return options


def _positive_int(text: str) -> int:
    """Parse a count such as ``--steps`` (at least 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as error:
        raise UsageError(f"{flag} expects comma-separated numbers, got {text!r}") from error
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        raise UsageError(f"{flag} expects positive numbers, got {text!r}")
    return values


def _seeds(text: str) -> tuple[int, ...]:
    try:
        parts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as error:
        raise UsageError(
            f"--seeds expects a count or a comma-separated list, got {text!r}"
        ) from error
    if len(parts) == 1 and "," not in text:
        if parts[0] < 1:
            raise UsageError("--seeds must be at least 1")
        return tuple(range(parts[0]))
    return tuple(parts)


QUICK_NOTE = (
    "--quick is a smoke test of the code path: 40-300 steps per task are too few for a "
    "learned step size to settle, so its ranking says nothing about MetaOptimize's quality; "
    "draw conclusions from the full run (docs/results.md)"
)


def _horizons(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"--horizons: expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"--horizons: every multiple must be at least 1, got {text!r}")
    return values


def _check_task(name: str, data_dir: str | None) -> None:
    from metaoptimize.bench.data import DataError
    from metaoptimize.bench.tasks import TASKS

    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    if TASKS[name].needs_data_dir:
        if data_dir is None:
            raise UsageError(f"task {name!r} reads real data: pass --data-dir")
        try:
            TASKS[name].check_data(data_dir)
        except DataError as error:
            raise UsageError(str(error)) from error


def _optimizer_spec(name: str) -> Any:
    """The harness entry ``name``, or a usage error."""
    from metaoptimize.bench.optimizers import OPTIMIZERS

    if name not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {name!r}; see 'metaoptimize list optimizers'")
    return OPTIMIZERS[name]


def _check_optimizer(
    name: str, options: dict[str, Any], values: Sequence[float | None] = (None,)
) -> None:
    """Build the optimizer on a throwaway parameter, once per swept value.

    Bad options and values fail here, before any training, not in the middle of a sweep.
    """
    import torch

    from metaoptimize.bench.optimizers import MissingDependency

    spec = _optimizer_spec(name)
    if spec.sweep_key and spec.sweep_key in options:
        raise UsageError(
            f"--set {spec.sweep_key}=... conflicts with the swept value: pass {spec.sweep_key} "
            "with --value (run) or --values (sweep)"
        )
    params = [torch.nn.Parameter(torch.zeros(2))]
    named = [("probe", params[0])] if spec.family == "metaoptimize" else params
    try:
        for value in values:
            spec.build(named, spec.default if value is None else value, 10, dict(options))
    except MissingDependency:
        return  # reported per run as a skip
    except (TypeError, ValueError) as error:
        texts = [f"{k}={v!r}" for k, v in options.items() if isinstance(v, str)]
        hint = f" (--set {', '.join(texts)}: not a number)" if texts else ""
        raise UsageError(f"optimizer {name!r}: {error}{hint}") from error


def _out_dir(given: str | None, default_name: str) -> Path:
    return Path(given) if given else Path("runs") / default_name


_LOCK = ".metaoptimize.lock"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _claim(out: Path) -> Iterator[None]:
    """Hold ``out`` for this process.

    It is checked writable before any training, and refused (naming the other process's pid)
    while another metaoptimize writes there.
    """
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    lock = out / _LOCK
    for _ in range(2):
        try:
            out.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            text = lock.read_text().strip() if lock.is_file() else ""
            if text.isdigit() and _process_alive(int(text)):
                raise UsageError(
                    f"{out} is in use by another metaoptimize (pid {text}); wait for it or "
                    "pass another --out"
                ) from None
            lock.unlink(missing_ok=True)  # left by a process that no longer runs
            continue
        except OSError as error:
            raise UsageError(f"cannot write to --out {out}: {error.strerror or error}") from None
        with os.fdopen(descriptor, "w") as handle:
            handle.write(str(os.getpid()))
        break
    else:
        raise UsageError(f"cannot take {lock}; remove it if no metaoptimize is running")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _progress(total: int, description: str) -> Callable[[Any], None]:
    try:
        from tqdm import tqdm  # type: ignore[import-untyped]
    except ImportError:
        count = [0]

        def plain(outcome: Any) -> None:
            count[0] += 1
            print(
                f"[{count[0]}/{total}] {outcome.status}: {outcome.config.run_id()}", file=sys.stderr
            )

        return plain
    bars: list[Any] = []  # created at the first outcome, after any resume message

    def update(outcome: Any) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc=description, unit="run", file=sys.stderr))
        bar = bars[0]
        bar.update(1)
        bar.set_postfix_str(outcome.config.task, refresh=False)
        if bar.n >= total:
            bar.close()

    return update


def _execute(
    configs: list[Any], out: Path, jobs: int, description: str
) -> tuple[list[Any], list[str]]:
    from metaoptimize.bench.runner import execute

    def resuming(done: int) -> None:
        if done:
            print(
                f"resuming {out}: {done} of {len(configs)} runs already done, "
                f"{len(configs) - done} to go",
                file=sys.stderr,
            )

    outcomes = execute(
        configs,
        out,
        jobs=jobs,
        on_outcome=_progress(len(configs), description),
        on_resume=resuming,
    )
    notes = sorted(
        {f"skipped {o.config.optimizer}: {o.message}" for o in outcomes if o.status == "skipped"}
    )
    notes += [f"failed {o.config.run_id()}: {o.message}" for o in outcomes if o.status == "failed"]
    return outcomes, notes


def _print_tables(run_dir: Path) -> None:
    """Per-task tables, then the summary the report opens with, with column headers."""
    from metaoptimize.bench.report import (
        aggregate,
        load_records,
        overall_table,
        summarize,
        task_verdicts,
        text_table,
    )

    rows = aggregate(load_records(run_dir))
    summary = summarize(rows)
    print(text_table(summary))
    print("\nsummary (ratio of badness to the tuned baselines; docs/results.md explains):")
    print("\n".join(overall_table(rows)))
    print("\n".join(["", *task_verdicts(summary)]))


def _finish(out: Path, command: str, notes: list[str], plots: bool) -> None:
    from metaoptimize.bench.report import write_report

    plot_paths = None
    if plots:
        try:
            from metaoptimize.plotting import save_plots

            plot_paths = save_plots(out)
        except RuntimeError as error:  # matplotlib missing
            notes = [*notes, str(error)]
    report = write_report(out, command, notes, plot_paths)
    _print_tables(out)
    for note in notes:
        print(f"note: {note}")
    print(f"\nreport: {report}\nresults: {out / 'results.json'}, {out / 'results.csv'}")


def _default_jobs() -> int:
    return max(1, min(2, os.cpu_count() or 1))


def cmd_compare(args: argparse.Namespace) -> int:
    """The main job: the default suite, tables, report and plots."""
    from metaoptimize.bench.suite import DEFAULT_TASKS, compare_configs

    if args.tasks is None:
        tasks = DEFAULT_TASKS
    else:
        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        if not tasks:
            raise UsageError("--tasks is empty; name at least one task (see 'metaoptimize list')")
    for task in tasks:
        _check_task(task, args.data_dir)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 2)
    if seeds < 1:
        raise UsageError("--seeds must be at least 1")
    horizons = _horizons(args.horizons)
    identity = {
        "tasks": list(tasks),
        "seeds": seeds,
        "quick": args.quick,
        "horizons": list(horizons),
        "data_dir": args.data_dir,
    }
    out = Path(args.out) if args.out else _latest_unfinished_compare(identity)
    configs = compare_configs(tasks, seeds, args.quick, args.data_dir, horizons)
    with _claim(out):
        (out / _COMPARE_ID).write_text(json.dumps(identity))
        print(
            f"{len(configs)} runs ({len(tasks)} tasks x {seeds} seed(s)) into {out}",
            file=sys.stderr,
        )
        if args.quick:
            print(f"note: {QUICK_NOTE}", file=sys.stderr)
        outcomes, notes = _execute(configs, out, args.jobs, "compare")
        if args.quick:
            notes = [QUICK_NOTE, *notes]
        _finish(out, args.command_line, notes, not args.no_plots)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


_COMPARE_ID = "compare.json"


def _latest_unfinished_compare(identity: dict[str, Any]) -> Path:
    """Where a ``compare`` without ``--out`` writes.

    The latest folder under ``runs/`` that the same suite left unfinished (no report yet),
    else a new timestamped one.
    """
    for folder in sorted(Path("runs").glob("compare-*"), reverse=True):
        saved = folder / _COMPARE_ID
        if (folder / "report.md").exists() or not saved.is_file():
            continue
        with contextlib.suppress(ValueError, OSError):
            if json.loads(saved.read_text()) == identity:
                return folder
    return Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"


def cmd_run(args: argparse.Namespace) -> int:
    """One run of one optimizer on one task."""
    from metaoptimize.bench.runner import RunConfig, result_path

    options = parse_set(args.set)
    _check_task(args.task, args.data_dir)
    _check_optimizer(args.optimizer, options, (args.value,))
    config = RunConfig(
        args.task,
        args.optimizer,
        args.seed,
        args.steps,
        args.value,
        options,
        args.quick,
        args.data_dir,
    )
    out = _out_dir(args.out, "single")
    with _claim(out):
        outcomes, _ = _execute([config], out, 1, "run")
    outcome = outcomes[0]
    if outcome.record is None:
        print(f"{outcome.status}: {outcome.message}", file=sys.stderr)
        return 2 if outcome.status == "skipped" else 1
    record = outcome.record
    print(
        f"{record['run_id']}: {record['metric_name']} = {record['metric']:.6g}  "
        f"({record['time_per_step_ms']:.2f} ms/step)"
    )
    for name, values in list(record["step_sizes"].items())[:8]:
        print(f"  step size {name}: {values[0]:.3g} -> {values[-1]:.3g}")
    print(f"record: {result_path(out, config)}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """A resumable grid over lr or alpha0 and seeds."""
    from metaoptimize.bench.runner import RunConfig
    from metaoptimize.bench.suite import sweep_values

    options = parse_set(args.set)
    _check_task(args.task, args.data_dir)
    if not _optimizer_spec(args.optimizer).sweep_key:
        raise UsageError(f"optimizer {args.optimizer!r} has no lr or alpha0 to sweep")
    values = (
        _floats(args.values, "--values")
        if args.values
        else sweep_values(args.task, args.optimizer, args.quick)
    )
    _check_optimizer(args.optimizer, options, values)
    seeds = _seeds(args.seeds)
    out = _out_dir(args.out, f"sweep-{args.task}-{args.optimizer.replace(':', '_')}")
    configs = [
        RunConfig(
            args.task, args.optimizer, seed, args.steps, value, options, args.quick, args.data_dir
        )
        for value in values
        for seed in seeds
    ]
    with _claim(out):
        outcomes, notes = _execute(configs, out, args.jobs, "sweep")
        _finish(out, args.command_line, notes, not args.no_plots)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def cmd_list(args: argparse.Namespace) -> int:
    """Tasks, optimizers and presets."""
    import importlib.util

    from metaoptimize.bench.optimizers import OPTIMIZERS
    from metaoptimize.bench.tasks import describe

    what = args.what
    if what in ("all", "tasks"):
        print("tasks:")
        for row in describe():
            data = "  [needs --data-dir]" if row["needs_data_dir"] else ""
            print(
                f"  {row['name']:<18} {row['metric']} ({row['better']} is better): "
                f"{row['description']}{data}"
            )
    if what in ("all", "optimizers"):
        print("optimizers:")
        for spec in OPTIMIZERS.values():
            if spec.name.startswith("preset:"):
                continue
            missing = ""
            if spec.package:
                module = {"dog-optimizer": "dog", "mechanic-pytorch": "mechanic_pytorch"}.get(
                    spec.package, spec.package
                )
                if importlib.util.find_spec(module) is None:
                    missing = f"  [not installed: pip install {spec.package}]"
            sweep = f" sweeps {spec.sweep_key}" if spec.sweep_key else ""
            print(f"  {spec.name:<26} {spec.family:<13}{sweep}: {spec.description}{missing}")
    if what in ("all", "presets"):
        print("presets (run as optimizer 'preset:<name>'):")
        for name in presets.names():
            settings = ", ".join(f"{k}={v}" for k, v in presets.get(name).items())
            print(f"  {name:<32} {settings}")
    return 0


def _existing_run_dir(text: str) -> Path:
    path = Path(text)
    if not (path / "runs").is_dir():
        raise UsageError(
            f"{path} has no runs/ folder; pass a directory written by compare, run or sweep"
        )
    return path


def cmd_plot(args: argparse.Namespace) -> int:
    """Redraw the plots of a run directory."""
    from metaoptimize.plotting import save_plots

    run_dir = _existing_run_dir(args.run_dir)
    try:
        written = save_plots(run_dir)
    except RuntimeError as error:
        raise UsageError(str(error)) from error
    for paths in written.values():
        for path in paths:
            print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Rebuild results.json, results.csv and report.md of a run directory."""
    from metaoptimize.bench.report import load_records, task_label, write_report
    from metaoptimize.plotting import existing_plots

    run_dir = _existing_run_dir(args.run_dir)
    records = load_records(run_dir)
    plots = existing_plots(run_dir, sorted({task_label(r["config"]) for r in records}))
    # Keep the command that produced the runs (compare or sweep), and its notes, not this one.
    command, notes = args.command_line, None
    previous = run_dir / "results.json"
    if previous.is_file():
        saved = json.loads(previous.read_text())
        command = saved.get("command") or command
        notes = saved.get("notes")
    report = write_report(run_dir, command, notes, plots)
    _print_tables(run_dir)
    print(f"\nreport: {report}")
    return 0


def _build_parser() -> _Parser:
    parser = _Parser(
        prog="metaoptimize",
        description="MetaOptimize benchmark harness: compare "
        "learned step sizes with tuned baselines on small offline tasks.",
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=summary,
            description=description,
            formatter_class=_HelpFormatter,
        )

    def common(sub: argparse.ArgumentParser, jobs: bool = True) -> None:
        sub.add_argument(
            "--out",
            help="output directory; a rerun into it skips every finished run "
            "(default: under runs/)",
        )
        sub.add_argument("--data-dir", help="folder with real data (cifar10, tinystories)")
        sub.add_argument(
            "--quick",
            action="store_true",
            help="small step budgets: a smoke test of the code path, not a quality result",
        )
        if jobs:
            sub.add_argument("--jobs", type=int, default=_default_jobs(), help="worker processes")
            sub.add_argument("--no-plots", action="store_true", help="skip the PNG plots")

    def optimizer_settings(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--task", required=True, help="task name (see 'metaoptimize list')")
        sub.add_argument(
            "--optimizer", required=True, help="optimizer name (see 'metaoptimize list')"
        )
        sub.add_argument(
            "--steps", type=_positive_int, help="optimizer steps (default: the task's length)"
        )
        sub.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="optimizer keyword argument, repeatable, e.g. --set meta_lr=0.003",
        )

    compare = command(
        "compare",
        "run the default suite (the main job)",
        "Every task of the suite with MetaOptimize at its defaults (swept over alpha0 for the "
        "robustness view), tuned AdamW grids and the learning-rate-free baselines; writes "
        "report.md, results.json/csv and plots. Without --out, a rerun of the same command "
        "resumes the latest unfinished run.",
    )
    compare.add_argument("--tasks", help="comma-separated task names (default: the suite)")
    compare.add_argument(
        "--seeds", type=int, help="seeds per configuration (default: 2; 1 with --quick)"
    )
    compare.add_argument(
        "--horizons",
        default="1",
        help="comma-separated multiples of each task's length, e.g. 1,5",
    )
    common(compare)
    compare.set_defaults(handler=cmd_compare)

    run = command(
        "run",
        "one task with one optimizer",
        "One run; prints the metric, time per step and the learned step sizes.",
    )
    optimizer_settings(run)
    run.add_argument("--seed", type=int, default=0, help="seed for data and initialisation")
    run.add_argument(
        "--value",
        type=float,
        help="lr (baselines) or alpha0 (MetaOptimize) (default: the optimizer's)",
    )
    common(run, jobs=False)
    run.set_defaults(handler=cmd_run)

    sweep = command(
        "sweep",
        "grid over lr or alpha0 and seeds (resumable)",
        "A grid over the optimizer's lr (baselines) or alpha0 (MetaOptimize) and seeds.",
    )
    optimizer_settings(sweep)
    sweep.add_argument(
        "--values", help="comma-separated lr or alpha0 values (default: the task's grid)"
    )
    sweep.add_argument("--seeds", default="2", help="a count or a comma-separated list")
    common(sweep)
    sweep.set_defaults(handler=cmd_sweep)

    listing = command("list", "tasks, optimizers and presets", "List what can be run.")
    listing.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "tasks", "optimizers", "presets"],
        help="what to list",
    )
    listing.set_defaults(handler=cmd_list)

    plot = command("plot", "redraw plots of a run directory", "Redraw the PNG plots.")
    plot.add_argument("run_dir", help="a directory written by compare, run or sweep")
    plot.set_defaults(handler=cmd_plot)

    report = command(
        "report",
        "rebuild tables and report of a run directory",
        "Rebuild results.json, results.csv and report.md from the stored runs.",
    )
    report.add_argument("run_dir", help="a directory written by compare, run or sweep")
    report.set_defaults(handler=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _build_parser().parse_args(argv)
        args.command_line = shlex.join(["metaoptimize", *argv])
        if getattr(args, "jobs", 1) < 1:
            raise UsageError("--jobs must be at least 1")
        code: int = args.handler(args)
    except UsageError as error:
        print(f"metaoptimize: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "\nmetaoptimize: interrupted; every finished run is kept and a rerun of the same "
            "command skips it",
            file=sys.stderr,
        )
        return 130
    return code


def entrypoint() -> None:
    """Console-script entry point."""
    sys.exit(main())
