"""Adversarial initial step sizes on the harness tasks: does training stay finite, and how
long does the learned step size take to come back into a useful range?

    python benchmarks/adversarial_starts.py [--tasks digits-mlp,charlm] [--jobs 2]

For each task, MetaOptimize (AdamW base, Lion meta, the harness's short-run settings) starts
at alpha0 = 1e-12 and at alpha0 = 10 (the non-finite guard is always on; alpha_min/alpha_max
must contain alpha0, so they are not used here). "Recovery" is
the first logged step at which the learned step size is within a factor 10 of the best fixed
AdamW learning rate found for the task in docs/results (3e-3 ... 1e-1).
"""

from __future__ import annotations

import argparse
import math
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from metaoptimize.bench.runner import RunConfig, run_one

# best fixed AdamW lr per task from docs/results.md (default suite)
BEST_LR = {
    "quadratic": 0.1,
    "tracking": 0.03,
    "digits-mlp": 0.01,
    "digits-cnn": 0.01,
    "charlm": 0.01,
    "continual-digits": 0.003,
}


def _one(args: tuple[str, float, dict[str, Any]]) -> dict[str, Any]:
    task, alpha0, options = args
    record = run_one(RunConfig(task, "mo-adamw-lion", value=alpha0, options=options))
    (sizes,) = record["step_sizes"].values()
    target = BEST_LR[task]
    recovered = next(
        (
            step
            for step, size in zip(record["step_size_steps"], sizes, strict=True)
            if target / 10 <= size <= target * 10
        ),
        None,
    )
    finite = all(math.isfinite(v) for v in record["curve"]) and not record["diverged"]
    return {
        "task": task,
        "alpha0": alpha0,
        "skipped": record.get("skipped_steps", 0),
        "finite": finite,
        "recovered_at": recovered,
        "steps": record["steps_completed"],
        "final_alpha": sizes[-1],
        "metric": record["metric"],
        "metric_name": record["metric_name"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(BEST_LR))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    work = [(task, alpha0, {}) for task in args.tasks.split(",") for alpha0 in (1e-12, 10.0)]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(_one, work))
    print(
        "| task | alpha0 | finite loss curve | recovered at step | steps | final alpha | metric |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        recovered = row["recovered_at"] if row["recovered_at"] is not None else "never"
        print(
            f"| {row['task']} | {row['alpha0']:g} | {row['finite']} | {recovered} | {row['steps']} | {row['final_alpha']:.2e} | "
            f"{row['metric_name']} {row['metric']:.4g} |"
        )


if __name__ == "__main__":
    main()
