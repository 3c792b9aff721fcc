"""Plots of benchmark records (matplotlib, from the ``bench`` extra, imported lazily).

Three figures per task:

* ``<task>-sensitivity.png``: final metric against the swept value, with MetaOptimize's
  ``alpha0`` and the baselines' ``lr`` on one log axis (the paper's robustness claim);
* ``<task>-curves.png``: training-loss curves of every optimizer at its summary setting;
* ``<task>-step-sizes.png``: learned step sizes over training: the ``alpha0`` sweep (left)
  and every block of the blockwise variant (right).
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = ["existing_plots", "save_plots"]


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise RuntimeError("plots need matplotlib: pip install 'metaoptimize[bench]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _seed0(records: list[dict[str, Any]], optimizer: str, value: float) -> dict[str, Any] | None:
    for record in records:
        config = record["config"]
        if config["optimizer"] == optimizer and config["value"] == value and config["seed"] == 0:
            return record
    return None


def save_plots(run_dir: Path) -> dict[str, list[Path]]:
    """Write every task's figures under ``run_dir/plots``; return their paths by task."""
    from metaoptimize.bench.report import aggregate, load_records, summarize, task_label, task_of
    from metaoptimize.bench.tasks import TASKS

    plt = _pyplot()
    records = load_records(run_dir)
    rows = aggregate(records)
    summary = summarize(rows)
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = defaultdict(list)
    for task, entries in summary.items():
        task_records = [r for r in records if task_label(r["config"]) == task]
        task_cls = TASKS.get(task_of(task))
        slug = _slug(task)
        log_metric = bool(task_cls and task_cls.log_scale)
        metric = entries[0]["metric_name"]

        figure, axis = plt.subplots(figsize=(6.5, 4.2))
        swept: dict[str, list[Any]] = defaultdict(list)
        for row in rows:
            if row.task == task:
                swept[row.optimizer].append(row)
        for optimizer, cells in sorted(swept.items()):
            if len(cells) < 2:
                continue
            cells.sort(key=lambda c: c.value)
            style = "-o" if cells[0].family == "metaoptimize" else "--s"
            axis.errorbar(
                [c.value for c in cells],
                [c.mean for c in cells],
                yerr=[c.std for c in cells],
                fmt=style,
                capsize=3,
                label=f"{optimizer} ({cells[0].sweep_key})",
            )
        axis.set_xscale("log")
        if log_metric:
            axis.set_yscale("log")
        axis.set_xlabel("initial step size alpha0 (MetaOptimize) / learning rate (baselines)")
        axis.set_ylabel(metric)
        axis.set_title(f"{task}: sensitivity to the step size")
        axis.legend(fontsize=7)
        written[task].append(_save(plt, figure, out / f"{slug}-sensitivity.png"))

        figure, axis = plt.subplots(figsize=(6.5, 4.2))
        for entry in entries:
            record = _seed0(task_records, entry["optimizer"], entry["value"])
            if record is None or not record["curve"]:
                continue
            steps = [(i + 1) * record["curve_every"] for i in range(len(record["curve"]))]
            style = "-" if entry["family"] == "metaoptimize" else "--"
            label = entry["optimizer"] + (" (blew up)" if record.get("blew_up") else "")
            axis.plot(steps, record["curve"], style, linewidth=1.2, label=label)
        axis.set_yscale("log")
        axis.set_xlabel("step")
        axis.set_ylabel("training loss (window mean, seed 0)")
        axis.set_title(f"{task}: training loss at each optimizer's summary setting")
        axis.legend(fontsize=6, ncol=2)
        written[task].append(_save(plt, figure, out / f"{slug}-curves.png"))

        step_size_records = [
            r for r in task_records if r["step_sizes"] and r["config"]["seed"] == 0
        ]
        if step_size_records:
            figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
            for record in sorted(step_size_records, key=lambda r: r["config"]["value"]):
                config = record["config"]
                if len(record["step_sizes"]) == 1:
                    (values,) = record["step_sizes"].values()
                    left.plot(
                        record["step_size_steps"],
                        values,
                        label=f"{config['optimizer']} alpha0={config['value']:g}",
                    )
                elif config["optimizer"].endswith("-blockwise"):
                    for name, values in record["step_sizes"].items():
                        right.plot(record["step_size_steps"], values, linewidth=0.9, label=name)
                    count = len(record["step_sizes"])
                    right.set_title(
                        f"{config['optimizer']}: one step size per tensor ({count} tensors)",
                        fontsize=9,
                    )
            for axis in (left, right):
                axis.set_yscale("log")
                axis.set_xlabel("step")
                axis.set_ylabel("learned step size")
                if 0 < len(axis.lines) <= _MAX_LEGEND:
                    axis.legend(fontsize=6)
            left.set_title(f"{task}: scalar step sizes from different alpha0", fontsize=9)
            written[task].append(_save(plt, figure, out / f"{slug}-step-sizes.png"))
    return dict(written)


def _slug(task: str) -> str:
    """A file-name stem for a task label ("charlm (5x: 2000 steps)" -> "charlm-5x-2000-steps")."""
    return re.sub(r"[^A-Za-z0-9]+", "-", task).strip("-")


def _save(plt: Any, figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


_KINDS = ("sensitivity", "curves", "step-sizes")
_MAX_LEGEND = 12  # beyond this a legend hides the lines it names


def existing_plots(run_dir: Path, tasks: list[str]) -> dict[str, list[Path]]:
    """The figures already under ``run_dir/plots`` for ``tasks``."""
    found: dict[str, list[Path]] = {}
    for task in tasks:
        slug = _slug(task)
        paths = [run_dir / "plots" / f"{slug}-{kind}.png" for kind in _KINDS]
        found[task] = [p for p in paths if p.is_file()]
    return found
