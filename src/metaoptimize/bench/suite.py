"""The default comparison suite behind ``metaoptimize compare``.

Per task and seed: fixed-lr baselines over the task's lr grid, AdamW with warm-up and cosine
decay over the same grid, MetaOptimize (AdamW base, Lion meta) over a wide ``alpha0`` grid (the
paper's robustness claim), three more MetaOptimize variants at their untuned defaults, a
hypergradient or IDBD special case, and the learning-rate-free baselines at their defaults.
"""

from __future__ import annotations

from metaoptimize.bench.optimizers import get_optimizer
from metaoptimize.bench.runner import RunConfig
from metaoptimize.bench.tasks import get_task

__all__ = ["DEFAULT_TASKS", "compare_configs", "sweep_values"]

DEFAULT_TASKS = ("quadratic", "tracking", "digits-mlp", "digits-cnn", "charlm", "continual-digits")
ALPHA0_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2)
SENSITIVITY_OPTIMIZER = "mo-adamw-lion"
UNTUNED_METAOPTIMIZE = ("mo-adamw-adam", "mo-adamw-lion-blockwise", "mo-lion-lion")
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
        return _thin(ALPHA0_GRID, quick)
    if spec.sweep_key == "lr":
        return _thin(task_cls.sgd_lr_grid if spec.grid == "sgd" else task_cls.lr_grid, quick)
    return (spec.default,)


def compare_configs(
    tasks: tuple[str, ...] = DEFAULT_TASKS,
    seeds: int = 2,
    quick: bool = False,
    data_dir: str | None = None,
) -> list[RunConfig]:
    """Every run of the comparison suite, in a stable order."""
    configs: list[RunConfig] = []
    for task in tasks:
        get_task(task)  # validate the name early
        for seed in range(seeds):

            def add(
                optimizer: str, value: float | None = None, task: str = task, seed: int = seed
            ) -> None:
                configs.append(
                    RunConfig(task, optimizer, seed, value=value, quick=quick, data_dir=data_dir)
                )

            for optimizer in FIXED.get(task, DEFAULT_FIXED):
                for value in sweep_values(task, optimizer, quick):
                    add(optimizer, value)
            for value in sweep_values(task, SENSITIVITY_OPTIMIZER, quick):
                add(SENSITIVITY_OPTIMIZER, value)
            for optimizer in (*UNTUNED_METAOPTIMIZE, *SPECIAL.get(task, DEFAULT_SPECIAL), *LR_FREE):
                add(optimizer)
    return configs
