"""Plots of benchmark records (matplotlib, from the ``bench`` extra, imported lazily).

Three figures per task:

* ``<task>-sensitivity.png``: final metric against the swept value, with MetaOptimize's
  ``alpha0`` and the baselines' ``lr`` on one log axis (the paper's robustness claim);
* ``<task>-curves.png``: training-loss curves of every optimizer at its summary setting;
* ``<task>-step-sizes.png``: learned step sizes over training: the ``alpha0`` sweep (left)
  and every block of the blockwise variant (right).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
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
    plt = _pyplot()
    # 20 distinct colours: a task's table has more methods than the default cycle's 10.
    with plt.rc_context({"axes.prop_cycle": plt.cycler(color=plt.get_cmap("tab20").colors)}):
        return _draw(plt, run_dir)


def _draw(plt: Any, run_dir: Path) -> dict[str, list[Path]]:
    from metaoptimize.bench.report import aggregate, load_records, summarize, task_label, task_of
    from metaoptimize.bench.tasks import TASKS

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

        figure, axis = plt.subplots(figsize=(8.5, 4.2))
        swept: dict[str, list[Any]] = defaultdict(list)
        for row in rows:
            if row.task == task:
                swept[row.optimizer].append(row)
        kept_means: list[float] = []
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
            kept_means += [c.mean for c in cells if not c.blew_up]
        axis.set_xscale("log")
        if log_metric:
            axis.set_yscale("log")
        _clip_to(axis, kept_means, log=log_metric)
        axis.set_xlabel("initial step size alpha0 (MetaOptimize) / learning rate (baselines)")
        axis.set_ylabel(metric)
        axis.set_title(f"{task}: sensitivity to the step size")
        _outside_legend(axis)
        written[task].append(_save(plt, figure, out / f"{slug}-sensitivity.png"))

        figure, axis = plt.subplots(figsize=(8.5, 4.2))
        curves: list[_Series] = []
        kept: list[float] = []  # values of the runs that did not blow up: they set the y range
        for entry in entries:
            record = _seed0(task_records, entry["optimizer"], entry["value"])
            if record is None or not record["curve"]:
                continue
            curve = record["curve"]
            blew_up = bool(record.get("blew_up")) or not all(map(math.isfinite, curve))
            steps = [(i + 1) * record["curve_every"] for i in range(len(curve))]
            label = entry["optimizer"] + (" (blew up)" if blew_up else "")
            style = "-" if entry["family"] == "metaoptimize" else "--"
            curves.append(_Series(label, steps, curve, style))
            if not blew_up:
                kept += curve
        for series in _mark_duplicates(curves):
            axis.plot(series.x, series.y, series.style, linewidth=1.2, label=series.label)
        axis.set_yscale("log")
        _clip_to(axis, kept)
        axis.set_xlabel("step")
        axis.set_ylabel("training loss (window mean, seed 0)")
        axis.set_title(f"{task}: training loss at each optimizer's summary setting")
        _outside_legend(axis)
        written[task].append(_save(plt, figure, out / f"{slug}-curves.png"))

        step_size_records = [
            r for r in task_records if r["step_sizes"] and r["config"]["seed"] == 0
        ]
        blockwise = any(
            r["config"]["optimizer"].endswith("-blockwise") and len(r["step_sizes"]) > 1
            for r in step_size_records
        )
        if step_size_records:
            # The right panel only when the suite ran the blockwise variant on this task.
            figure, axes = plt.subplots(
                1, 2 if blockwise else 1, figsize=(14 if blockwise else 8.5, 4.2)
            )
            left, right = (axes[0], axes[1]) if blockwise else (axes, None)
            for record in sorted(step_size_records, key=lambda r: r["config"]["value"]):
                config = record["config"]
                if len(record["step_sizes"]) == 1:
                    (values,) = record["step_sizes"].values()
                    left.plot(
                        record["step_size_steps"],
                        values,
                        label=f"{config['optimizer']} alpha0={config['value']:g}",
                    )
                elif right is not None and config["optimizer"].endswith("-blockwise"):
                    blocks = [
                        _Series(name, record["step_size_steps"], values, "-")
                        for name, values in record["step_sizes"].items()
                    ]
                    marked = _mark_duplicates(blocks)
                    for series in marked:
                        right.plot(series.x, series.y, linewidth=0.9, label=series.label)
                    hidden = sum("same as" in series.label for series in marked)
                    note = f"; {hidden} lie under others" if hidden else ""
                    right.set_title(
                        f"{config['optimizer']}: one step size per tensor "
                        f"({len(blocks)} tensors{note})",
                        fontsize=9,
                    )
            for axis in (left, right) if right is not None else (left,):
                axis.set_yscale("log")
                axis.set_xlabel("step")
                axis.set_ylabel("learned step size")
                if len(axis.lines) <= _MAX_LEGEND:
                    _outside_legend(axis)
            left.set_title(f"{task}: scalar step sizes from different alpha0", fontsize=9)
            written[task].append(_save(plt, figure, out / f"{slug}-step-sizes.png"))
    return dict(written)


@dataclass
class _Series:
    label: str
    x: list[float]
    y: list[float]
    style: str


def _mark_duplicates(series: list[_Series]) -> list[_Series]:
    """Label every line that coincides with an earlier one ("= name"), which it would hide."""
    marked: list[_Series] = []
    for line in series:
        twin = next(
            (m for m in marked if m.x == line.x and _close(m.y, line.y)),
            None,
        )
        if twin is not None:
            first = twin.label.split(" (same as")[0]
            line = _Series(f"{line.label} (same as {first})", line.x, line.y, ":")
        marked.append(line)
    return marked


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(
        x == y or abs(x - y) <= 1e-9 * max(abs(x), abs(y)) for x, y in zip(a, b, strict=True)
    )


def _clip_to(axis: Any, values: list[float], log: bool = True) -> None:
    """Fit the y range to ``values`` (those of the runs that did not blow up).

    One run that blew up to 1e21 must not flatten the others: its line leaves the frame and
    its legend entry says it blew up.
    """
    finite = [v for v in values if math.isfinite(v) and (v > 0 or not log)]
    if not finite:
        return
    low, high = min(finite), max(finite)
    if log:
        # A loss that touches 0 for a moment would stretch a log axis over many decades.
        low = max(low, sorted(finite)[len(finite) // 50])
        axis.set_ylim(low / 1.5, high * 1.5)
    else:
        margin = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
        axis.set_ylim(low - margin, high + margin)


def _outside_legend(axis: Any) -> None:
    """A legend to the right of the axes, where it cannot cover data."""
    if axis.lines:
        axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


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
