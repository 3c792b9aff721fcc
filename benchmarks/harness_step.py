"""Whole training step of the harness tasks: MetaOptimize against AdamW, side by side.

    python benchmarks/harness_step.py [--tasks quadratic,charlm] [--steps 300] [--rounds 3]
        [--json out.json]

Each run is the harness's own training loop (``metaoptimize.bench.runner.run_one``: forward,
backward, optimizer step, logging), on one thread as in the harness's workers. The optimizers
of a task run interleaved, ``--rounds`` times each, and each number is the fastest of its
rounds' time per step (as ``timeit`` reports: on a shared machine the slower rounds measure
the neighbours); the table gives the ratio to AdamW's. ``MetaOptimize(defaults)`` is
what ``MetaOptimize(params)`` gives (and what the harness runs); ``per-tensor`` forces
``foreach=False`` to show what the multi-tensor kernel for small CPU tensors saves.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from metaoptimize.bench.runner import RunConfig, run_one
from metaoptimize.bench.suite import DEFAULT_TASKS

RUNS = {
    "AdamW": ("adamw", {}),
    "MetaOptimize(defaults)": ("metaoptimize", {}),
    "MetaOptimize(defaults, per-tensor)": ("metaoptimize", {"foreach": False}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the harness's workers
    results: dict[str, dict[str, float]] = {}
    for task in args.tasks.split(","):
        times: dict[str, list[float]] = {name: [] for name in RUNS}
        for _ in range(args.rounds):
            for name, (optimizer, options) in RUNS.items():
                config = RunConfig(task, optimizer, steps=args.steps, options=dict(options))
                times[name].append(run_one(config)["time_per_step_ms"])
        results[task] = {name: min(values) for name, values in times.items()}
    names = list(RUNS)
    print(f"{'task':<18}" + "".join(f"{n:>38}" for n in names))
    for task, row in results.items():
        adamw = row["AdamW"]
        cells = "".join(f"{row[n]:>28.3f} ms {row[n] / adamw:5.2f}x" for n in names)
        print(f"{task:<18}{cells}")
    for name in names[1:]:
        ratios = [row[name] / row["AdamW"] for row in results.values()]
        print(f"{name}: median {statistics.median(ratios):.2f}x, worst {max(ratios):.2f}x AdamW")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
