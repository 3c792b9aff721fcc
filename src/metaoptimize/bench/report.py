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

    def sort_key(self) -> float:
        """Smaller is better; diverged runs sort last."""
        if math.isnan(self.mean):
            return math.inf
        return -self.mean if self.higher_is_better else self.mean


def load_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every ``result.json`` under ``run_dir/runs``."""
    return [json.loads(p.read_text()) for p in sorted((run_dir / "runs").glob("**/result.json"))]


def aggregate(records: list[dict[str, Any]]) -> list[Row]:
    """Group records by (task, optimizer, value) and average over seeds."""
    groups: dict[tuple[str, str, float], list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        config = record["config"]
        groups[(config["task"], config["optimizer"], config["value"])].append(record)
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

    lines = ["# MetaOptimize benchmark report", ""]
    if command:
        lines += ["Produced by:", "", "```bash", command, "```", ""]
    if versions:
        lines += ["Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), ""]
    lines += [
        (
            "Each cell is the mean ± std over seeds of the task's metric at the end of "
            "training. Fixed-lr and scheduled baselines show the best value of their grid "
            "and how many runs that grid cost; MetaOptimize rows are untuned (default "
            "alpha0); learning-rate-free baselines run at their defaults."
        ),
        "",
    ]
    for task, entries in summary.items():
        task_cls = TASKS.get(task)
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
