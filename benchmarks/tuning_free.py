"""Robustness and horizon view: the default MetaOptimize from many alpha0 vs tuned AdamW.

For every task and length multiplier, runs AdamW (fixed, and with 5% warm-up + cosine decay)
over the task's lr grid and MetaOptimize (the harness entry ``metaoptimize``: the library's
defaults with weight decay 0.01) from each alpha0, and prints one markdown table per length:
the ratio of MetaOptimize's badness to the best fixed-lr AdamW's and to the best cosine's
(error rate, loss or MSE; 1.0 = as good; for ``quadratic`` the digits of accuracy lost,
-log10 of the suboptimality). "(blew up)" marks runs whose training loss rose above its start
after the first 10% of steps or lost most of its progress. Runs are cached under
``--out`` as in ``metaoptimize compare``, so a rerun only adds what is missing.

    python benchmarks/tuning_free.py --lengths 1,5 --seeds 0,1 --jobs 2
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from metaoptimize.bench.runner import RunConfig, execute
from metaoptimize.bench.tasks import get_task
from metaoptimize.cli import parse_set

BASELINES = ("adamw", "adamw-cosine")
TASKS = "quadratic,tracking,digits-mlp,digits-cnn,charlm,continual-digits"
ALPHA0 = "1e-6,1e-4,1e-2,1e-1"


def badness(task: str, metric: float) -> float:
    """Smaller is better; for quadratic, minus the digits of accuracy."""
    if not math.isfinite(metric):
        return math.inf
    if task == "quadratic":
        return math.log10(max(metric, 1e-300))
    return (1.0 - metric) if get_task(task).higher_is_better else metric


def ratio(task: str, ours: float, best: float) -> float:
    """Badness relative to tuned AdamW (digits lost for quadratic)."""
    return ours - best if task == "quadratic" else ours / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=TASKS)
    parser.add_argument("--lengths", default="1,5", help="multiples of each task's length")
    parser.add_argument("--alpha0", default=ALPHA0)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--optimizer", default="metaoptimize")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="option for the MetaOptimize runs (ablations), e.g. --set gamma=0.99",
    )
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="runs/tuning-free")
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    lengths = [int(m) for m in args.lengths.split(",")]
    alpha0s = [float(a) for a in args.alpha0.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    options = parse_set(args.set)
    configs = []
    for task in tasks:
        cls = get_task(task)
        for length in lengths:
            steps = cls.full_steps * length
            for seed in seeds:
                for baseline in BASELINES:
                    configs += [RunConfig(task, baseline, seed, steps, lr) for lr in cls.lr_grid]
                configs += [
                    RunConfig(task, args.optimizer, seed, steps, a, options) for a in alpha0s
                ]
    outcomes = execute(configs, Path(args.out), jobs=args.jobs)
    cells: dict[tuple[str, int, str, float], list[tuple[float, bool]]] = {}
    for outcome in outcomes:
        if outcome.record is None:
            print(f"failed: {outcome.config.run_id()}: {outcome.message}")
            continue
        config, record = outcome.config, outcome.record
        key = (config.task, config.steps or 0, config.optimizer, float(config.value or 0.0))
        cells.setdefault(key, []).append(
            (badness(config.task, record["metric"]), bool(record.get("blew_up")))
        )
    for length in lengths:
        header = " | ".join(f"alpha0={a:g}" for a in alpha0s)
        print(f"\n### {length}x the default length (ratio to the best fixed-lr AdamW)\n")
        print(f"| task | vs tuned | best lr | {header} |")
        print("|---" * (len(alpha0s) + 3) + "|")
        for task in tasks:
            steps = get_task(task).full_steps * length
            for baseline in BASELINES:
                grid = {
                    lr: statistics.fmean(b for b, _ in runs)
                    for (t, s, o, lr), runs in cells.items()
                    if (t, s, o) == (task, steps, baseline)
                }
                best_lr = min(grid, key=lambda lr: grid[lr])
                row = []
                for a in alpha0s:
                    runs = cells.get((task, steps, args.optimizer, a), [])
                    if not runs:
                        row.append("-")
                        continue
                    value = ratio(task, statistics.fmean(b for b, _ in runs), grid[best_lr])
                    flag = " (blew up)" if any(blown for _, blown in runs) else ""
                    row.append(f"{value:.2f}{flag}")
                print(f"| {task} | {baseline} | {best_lr:g} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
