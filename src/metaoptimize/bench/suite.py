"""The default comparison suite behind ``metaoptimize compare``.

Per task and seed: fixed-lr baselines over the task's lr grid, AdamW with warm-up and cosine
decay over the same grid, MetaOptimize with the library's defaults over a wide ``alpha0`` grid
(1e-6..1e-1: the robustness view, the paper's Fig. 2 form), three more MetaOptimize variants
(the first release's settings among them), a hypergradient or IDBD special case, and the
learning-rate-free baselines at their defaults. ``horizons`` repeats everything at multiples
of each task's length (the horizon view).
"""

from __future__ import annotations

from metaoptimize.bench.optimizers import get_optimizer
from metaoptimize.bench.runner import RunConfig
from metaoptimize.bench.tasks import get_task

__all__ = ["DEFAULT_TASKS", "compare_configs", "sweep_values"]

DEFAULT_TASKS = ("quadratic", "tracking", "digits-mlp", "digits-cnn", "charlm", "continual-digits")
ALPHA0_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
QUICK_ALPHA0_GRID = (1e-6, 1e-3, 1e-1)  # keeps the default alpha0 (1e-3) in the grid
SENSITIVITY_OPTIMIZER = "metaoptimize"
UNTUNED_METAOPTIMIZE = ("mo-adamw-lion", "mo-adamw-adam", "mo-lion-lion")
LR_FREE = ("prodigy", "dadapt-adam", "dog", "schedulefree-adamw", "mechanic-adamw")
FIXED = {"tracking": ("sgd", "adamw", "adamw-cosine")}
DEFAULT_FIXED = ("adamw", "sgdm", "adamw-cosine")
SPECIAL = {
    "tracking": ("preset:idbd", "preset:hypergradient-sgd"),
    "quadratic": ("preset:hypergradient-sgd",),
}
DEFAULT_SPECIAL = ("preset:hypergradient-adam",)


def _thin(grid: tuple[float, ...], quick: bool) -> tuple[float, ...]:
    return grid[::2] if quick else grid


def sweep_values(task: str, optimizer: str, quick: bool = False) -> tuple[float, ...]:
    """The values a sweep of ``optimizer`` on ``task`` uses by default."""
    spec = get_optimizer(optimizer)
    task_cls = get_task(task)
    if spec.sweep_key == "alpha0":
        return QUICK_ALPHA0_GRID if quick else ALPHA0_GRID
    if spec.sweep_key == "lr":
        return _thin(task_cls.sgd_lr_grid if spec.grid == "sgd" else task_cls.lr_grid, quick)
    return (spec.default,)


def compare_configs(
    tasks: tuple[str, ...] = DEFAULT_TASKS,
    seeds: int = 2,
    quick: bool = False,
    data_dir: str | None = None,
    horizons: tuple[int, ...] = (1,),
) -> list[RunConfig]:
    """Every run of the comparison suite, in a stable order."""
    configs: list[RunConfig] = []
    for task, horizon in ((t, h) for t in tasks for h in horizons):
        task_cls = get_task(task)  # validate the name early
        length = task_cls.quick_steps if quick else task_cls.full_steps
        steps = None if horizon == 1 else length * horizon
        for seed in range(seeds):

            def add(
                optimizer: str,
                value: float | None = None,
                task: str = task,
                seed: int = seed,
                steps: int | None = steps,
            ) -> None:
                configs.append(
                    RunConfig(
                        task,
                        optimizer,
                        seed,
                        steps=steps,
                        value=value,
                        quick=quick,
                        data_dir=data_dir,
                    )
                )

            for optimizer in FIXED.get(task, DEFAULT_FIXED):
                for value in sweep_values(task, optimizer, quick):
                    add(optimizer, value)
            for value in sweep_values(task, SENSITIVITY_OPTIMIZER, quick):
                add(SENSITIVITY_OPTIMIZER, value)
            for optimizer in (*UNTUNED_METAOPTIMIZE, *SPECIAL.get(task, DEFAULT_SPECIAL), *LR_FREE):
                add(optimizer)
    return configs
