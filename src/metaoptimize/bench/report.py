"""Aggregate run records into tables: results.json, results.csv and a markdown report.

For each task and optimizer the summary row is:

* fixed-lr and scheduled baselines: the best value of their grid (by mean over seeds), with
  the number of runs the grid cost;
* MetaOptimize: its untuned default ``alpha0`` (runs cost: one per seed), next to its full
  ``alpha0`` sensitivity in a separate table;
* learning-rate-free baselines: their defaults.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from metaoptimize.bench.optimizers import OPTIMIZERS
from metaoptimize.bench.runner import read_record
from metaoptimize.bench.tasks import TASKS

__all__ = ["Row", "aggregate", "load_records", "summarize", "write_report"]


@dataclass
class Row:
    """One (task, optimizer, value) cell aggregated over seeds."""

    task: str
    optimizer: str
    family: str
    sweep_key: str
    value: float
    metric_name: str
    higher_is_better: bool
    seeds: int
    mean: float
    std: float
    diverged: int
    time_per_step_ms: float
    optimizer_state_mb: float
    blew_up: int = 0
    #: Mean over seeds of the first point of the training-loss curve.
    start: float = math.nan

    def sort_key(self) -> float:
        """Smaller is better; diverged runs sort last."""
        if math.isnan(self.mean):
            return math.inf
        return -self.mean if self.higher_is_better else self.mean


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every readable ``result.json`` under ``run_dir/runs`` (unreadable ones are warned of)."""
    paths = sorted((run_dir / "runs").glob("**/result.json"))
    return [record for record in map(read_record, paths) if record is not None]


def task_label(config: dict[str, Any]) -> str:
    """The task's name, with the run length when it is not the task's default (horizon view)."""
    task_cls = TASKS.get(config["task"])
    if task_cls is None:
        return str(config["task"])
    default = task_cls.quick_steps if config.get("quick") else task_cls.full_steps
    steps = config.get("steps") or default
    if steps == default:
        return str(config["task"])
    return f"{config['task']} ({steps // default}x: {steps} steps)"


def task_of(label: str) -> str:
    """The task name in a :func:`task_label`."""
    return label.split(" ")[0]


def aggregate(records: list[dict[str, Any]]) -> list[Row]:
    """Group records by (task, optimizer, value) and average over seeds."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        config = record["config"]
        groups[(task_label(config), config["optimizer"], config["value"])].append(record)
    rows = []
    for (task, optimizer, value), members in sorted(groups.items()):
        metrics = [r["metric"] for r in members]
        finite = [m for m in metrics if not math.isnan(m)]
        diverged = len(metrics) - len(finite)
        mean = statistics.fmean(finite) if finite and not diverged else math.nan
        std = statistics.pstdev(finite) if len(finite) > 1 and not diverged else 0.0
        first = members[0]
        rows.append(
            Row(
                task,
                optimizer,
                first["family"],
                first["sweep_key"],
                value,
                first["metric_name"],
                first["higher_is_better"],
                len(members),
                mean,
                std,
                diverged,
                statistics.fmean(r["time_per_step_ms"] for r in members),
                statistics.fmean(r["optimizer_state_mb"] for r in members),
                sum(bool(r.get("blew_up", False)) for r in members),
                statistics.fmean(r["curve"][0] if r.get("curve") else math.nan for r in members),
            )
        )
    return rows


def summarize(rows: list[Row]) -> dict[str, list[dict[str, Any]]]:
    """Per task, one summary entry per optimizer, best first."""
    by_task: dict[str, dict[str, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_task[row.task][row.optimizer].append(row)
    summary: dict[str, list[dict[str, Any]]] = {}
    for task, optimizers in by_task.items():
        entries = []
        for optimizer, cells in optimizers.items():
            spec = OPTIMIZERS.get(optimizer)
            if cells[0].family == "metaoptimize" and spec is not None:
                chosen = min(cells, key=lambda c: abs(math.log(c.value) - math.log(spec.default)))
                setting = f"{cells[0].sweep_key}={chosen.value:g} (untuned)"
                runs = chosen.seeds
            elif len(cells) > 1:
                chosen = min(cells, key=Row.sort_key)
                setting = f"{cells[0].sweep_key}={chosen.value:g} (best of {len(cells)})"
                runs = sum(c.seeds for c in cells)
            else:
                chosen = cells[0]
                setting = (
                    "defaults" if not chosen.sweep_key else (f"{chosen.sweep_key}={chosen.value:g}")
                )
                runs = chosen.seeds
            entries.append({**asdict(chosen), "setting": setting, "runs_used": runs})
        entries.sort(key=lambda e: Row(**{k: e[k] for k in Row.__dataclass_fields__}).sort_key())
        summary[task] = entries
    return summary


def _badness(task: str, mean: float, higher_is_better: bool, start: float) -> float:
    """Smaller is better; on ``compare_digits`` tasks (quadratic) 1 / digits gained.

    Digits gained: log10 of the first point of the loss curve over the final metric.
    """
    if math.isnan(mean):
        return math.inf
    task_cls = TASKS.get(task_of(task))
    if task_cls is not None and task_cls.compare_digits:
        digits = math.log10(max(start, 1e-300) / max(mean, 1e-300))
        return 1.0 / digits if digits > 0 else math.inf
    return 1.0 - mean if higher_is_better else mean


def overall(rows: list[Row]) -> list[dict[str, Any]]:
    """Per method, over tasks: ratios of badness to tuned fixed AdamW and to tuned cosine.

    Badness is the error rate (1 - accuracy), the loss or the MSE; on `compare_digits` tasks it is
    1 / (digits of accuracy), so the ratio there compares digits. The swept MetaOptimize entry
    appears twice: at its default ``alpha0`` and at its worst ``alpha0`` of the grid.
    """
    summary = summarize(rows)
    per_method: dict[str, dict[str, float]] = defaultdict(dict)
    step_time: dict[str, list[float]] = defaultdict(list)
    ranks: dict[str, list[int]] = defaultdict(list)
    references: dict[str, dict[str, float]] = {}
    for task, entries in summary.items():
        by_name = {e["optimizer"]: e for e in entries}
        reference = {
            name: _badness(task, e["mean"], e["higher_is_better"], e["start"])
            for name, e in by_name.items()
            if name in ("adamw", "adamw-cosine")
        }
        references[task] = reference
        adamw_time = by_name["adamw"]["time_per_step_ms"] if "adamw" in by_name else math.nan
        for rank, entry in enumerate(entries, start=1):
            name = entry["optimizer"]
            per_method[name][task] = _badness(
                task, entry["mean"], entry["higher_is_better"], entry["start"]
            )
            ranks[name].append(rank)
            step_time[name].append(entry["time_per_step_ms"] / adamw_time)
        swept = [r for r in rows if r.task == task and r.optimizer == "metaoptimize"]
        if len(swept) > 1:
            worst = max(_badness(task, r.mean, r.higher_is_better, r.start) for r in swept)
            per_method["metaoptimize, worst alpha0"][task] = worst
    table = []
    for name, badness in per_method.items():
        line: dict[str, Any] = {"optimizer": name, "tasks": len(badness)}
        for ref in ("adamw", "adamw-cosine"):
            ratios = [
                value / references[task][ref] if references[task].get(ref) else math.nan
                for task, value in badness.items()
            ]
            ratios = [r for r in ratios if not math.isnan(r)]
            line[f"worst vs {ref}"] = max(ratios) if ratios else math.nan
            line[f"median vs {ref}"] = statistics.median(ratios) if ratios else math.nan
            line[f"within 1.1x of {ref}"] = sum(r <= 1.1 for r in ratios)
        line["mean rank"] = statistics.fmean(ranks[name]) if ranks.get(name) else math.nan
        times = [t for t in step_time.get(name, []) if not math.isnan(t)]
        line["step time vs adamw"] = statistics.median(times) if times else math.nan
        table.append(line)
    table.sort(key=lambda line: line["median vs adamw"])
    return table


def overall_table(rows: list[Row]) -> list[str]:
    """The overall summary as markdown lines."""
    lines = [
        (
            "| optimizer | tasks | worst / median vs tuned AdamW | within 1.1x | "
            "worst / median vs tuned cosine | within 1.1x | mean rank | step time vs AdamW |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for line in overall(rows):
        rank = "-" if math.isnan(line["mean rank"]) else f"{line['mean rank']:.1f}"
        time = line["step time vs adamw"]
        time_text = "-" if math.isnan(time) else f"{time:.2f}x"
        lines.append(
            f"| {line['optimizer']} | {line['tasks']} | {line['worst vs adamw']:.2f} / "
            f"{line['median vs adamw']:.2f} | {line['within 1.1x of adamw']} | "
            f"{line['worst vs adamw-cosine']:.2f} / {line['median vs adamw-cosine']:.2f} | "
            f"{line['within 1.1x of adamw-cosine']} | {rank} | {time_text} |"
        )
    return lines


def task_verdicts(summary: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One line per task: the winner, and where the default MetaOptimize stands."""
    lines = []
    for task, entries in summary.items():
        best = entries[0]
        text = f"{task}: best {best['optimizer']} ({_format_metric(best)})"
        names = [e["optimizer"] for e in entries]
        if "metaoptimize" in names and best["optimizer"] != "metaoptimize":
            rank = names.index("metaoptimize")
            ours = entries[rank]
            text += f"; metaoptimize {_format_metric(ours)}, rank {rank + 1} of {len(entries)}"
            if "adamw" in names:
                adamw = entries[names.index("adamw")]
                reference = _badness(task, adamw["mean"], adamw["higher_is_better"], adamw["start"])
                mine = _badness(task, ours["mean"], ours["higher_is_better"], ours["start"])
                if reference > 0 and math.isfinite(reference):
                    text += f", {mine / reference:.2f}x the tuned AdamW's badness"
        elif best["optimizer"] == "metaoptimize":
            text += f"; metaoptimize wins, of {len(entries)}"
        lines.append(text)
    return lines


def _format_metric(entry: dict[str, Any]) -> str:
    if math.isnan(entry["mean"]):
        return f"diverged ({entry['diverged']}/{entry['seeds']})"
    magnitude = abs(entry["mean"])
    digits = ".3g" if magnitude and (magnitude < 1e-2 or magnitude >= 1e4) else ".4f"
    text = f"{entry['mean']:{digits}}"
    if entry["seeds"] > 1:
        text += f" ± {entry['std']:{digits}}"
    if entry.get("blew_up"):
        text += f" (blew up {entry['blew_up']}/{entry['seeds']})"
    return text


def text_table(summary: dict[str, list[dict[str, Any]]]) -> str:
    """A plain-text table of the summary for the terminal."""
    lines = []
    for task, entries in summary.items():
        metric = entries[0]["metric_name"]
        better = "higher" if entries[0]["higher_is_better"] else "lower"
        lines.append(f"\n{task}: {metric} ({better} is better)")
        lines.append(f"  {'optimizer':<26} {'metric':<24} {'setting':<28} {'time/step':>15}")
        lines.extend(
            f"  {entry['optimizer']:<26} {_format_metric(entry):<24} "
            f"{entry['setting']:<28} {entry['time_per_step_ms']:7.2f} ms/step"
            for entry in entries
        )
    return "\n".join(lines)


def _sensitivity_table(rows: list[Row]) -> list[str]:
    swept: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        swept[row.optimizer].append(row)
    swept = {k: v for k, v in swept.items() if len(v) > 1}
    if not swept:
        return []
    lines = [
        "",
        "Sensitivity (mean metric at each swept value; lr for baselines, alpha0 for MetaOptimize):",
        "",
        "| optimizer | values → metric |",
        "|---|---|",
    ]
    for optimizer, cells in swept.items():
        cells.sort(key=lambda c: c.value)
        text = ", ".join(
            f"{c.sweep_key}={c.value:g}: " + ("diverged" if math.isnan(c.mean) else f"{c.mean:.4g}")
            for c in cells
        )
        lines.append(f"| {optimizer} | {text} |")
    return lines


def write_report(
    run_dir: Path,
    command: str = "",
    notes: list[str] | None = None,
    plots: dict[str, list[Path]] | None = None,
) -> Path:
    """Write results.json, results.csv and report.md under ``run_dir``; return the report."""
    records = load_records(run_dir)
    rows = aggregate(records)
    summary = summarize(rows)
    versions = records[0]["versions"] if records else {}
    (run_dir / "results.json").write_text(
        json.dumps(
            {
                "command": command,
                "versions": versions,
                "summary": summary,
                "rows": [asdict(r) for r in rows],
                "notes": notes or [],
            },
            indent=1,
            allow_nan=True,
        )
    )
    with (run_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(Row.__dataclass_fields__))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))

    quick = any(r["config"].get("quick") for r in records)
    lines = ["# MetaOptimize benchmark report", ""]
    if quick:
        lines += [
            (
                "**Smoke test (`--quick`)**: too few steps per task for a learned step size to "
                "settle; the ranking below says nothing about quality. See docs/results.md for "
                "the full run."
            ),
            "",
        ]
    lines += [
        "## Summary",
        "",
        (
            "Ratio of each method's badness (error rate, loss or MSE; 1/digits gained on "
            "`quadratic`) to that of the tuned fixed-lr AdamW and the tuned warm-up + cosine "
            "AdamW, over tasks (1.0 = as good; diverged = inf); mean rank among the methods "
            "of each task's table; median time per training step relative to AdamW's."
        ),
        "",
        *overall_table(rows),
        "",
        *[f"- {line}" for line in task_verdicts(summary)],
        "",
    ]
    if command:
        lines += ["Produced by:", "", "```bash", command, "```", ""]
    if versions:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    lines += [
        (
            "Each cell is the mean ± std over seeds of the task's metric at the end of "
            "training (mean only with one seed). Fixed-lr and scheduled baselines show the "
            "best value of their grid and how many runs that grid cost; MetaOptimize rows are "
            "untuned (default alpha0); learning-rate-free baselines run at their defaults. "
            "Every optimizer runs the code path a user gets without flags: for MetaOptimize "
            "on CPU, host scalars and, for groups of 3 or more small tensors, the "
            "multi-tensor kernel (docs/performance.md); ms/step is the whole training step, "
            "on one thread per run."
        ),
        "",
    ]
    for task, entries in summary.items():
        task_cls = TASKS.get(task_of(task))
        description = task_cls.description if task_cls else ""
        better = "higher" if entries[0]["higher_is_better"] else "lower"
        lines += [
            f"## {task}",
            "",
            f"{description}. Metric: `{entries[0]['metric_name']}` ({better} is better).",
            "",
            "| optimizer | family | setting | metric | runs used | ms/step | state MB |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in entries:
            lines.append(
                f"| {e['optimizer']} | {e['family']} | {e['setting']} | "
                f"{_format_metric(e)} | {e['runs_used']} | "
                f"{e['time_per_step_ms']:.2f} | {e['optimizer_state_mb']:.3f} |"
            )
        lines += _sensitivity_table([r for r in rows if r.task == task])
        for path in (plots or {}).get(task, []):
            lines += ["", f"![{path.stem}]({path.relative_to(run_dir).as_posix()})"]
        lines.append("")
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    report = run_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
