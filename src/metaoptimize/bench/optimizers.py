"""Optimizers the harness can run, by name.

Each entry builds an optimizer (and optionally an lr scheduler) from the model's parameters, the
swept value (``lr`` for fixed baselines, ``alpha0`` for MetaOptimize), the run length, and user
options (``--set key=value``). Baselines from optional packages are imported only when built; a
missing package raises :class:`MissingDependency`, which the runner turns into a skipped run.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from metaoptimize import presets
from metaoptimize._options import DEFAULT_ALPHA0
from metaoptimize.optimizer import MetaOptimize

__all__ = ["OPTIMIZERS", "MissingDependency", "OptimizerSpec", "get_optimizer"]

Built = tuple[Optimizer, LRScheduler | None]


class MissingDependency(RuntimeError):
    """An optional baseline package is not installed."""


@dataclass(frozen=True)
class OptimizerSpec:
    """How to build one optimizer.

    Attributes:
        name: registry key.
        family: "metaoptimize", "fixed", "schedule" or "lr-free".
        description: one line for ``metaoptimize list``.
        sweep_key: the value a sweep varies: "alpha0" (MetaOptimize), "lr", or "" (none).
        default: the swept value used when none is given.
        grid: "adam" or "sgd": which of the task's lr grids a fixed baseline sweeps.
        package: PyPI package that provides it, if optional.
    """

    name: str
    family: str
    description: str
    sweep_key: str
    default: float
    build: Callable[[Iterable[Any], float, int, dict[str, Any]], Built]
    grid: str = "adam"
    package: str | None = None


def _import(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependency(f"{package} is not installed (pip install {package})") from error


# Short-run settings for the harness's own MetaOptimize entries (docs/results.md explains why
# they differ from the paper's meta_lr=1e-3, gamma=1 which assume 10^4-10^5 steps).
HARNESS_META = {"meta_lr": 1e-2, "gamma": 0.99}
_BASE_DECAY = {"adamw": 0.01, "lion": 0.1, "rmsprop": 0.0, "sgdm": 0.0, "adam": 0.0, "sgd": 0.0}
_COMBOS = {
    "adamw-lion": ("adamw", "lion"),
    "adamw-adam": ("adamw", "adam"),
    "lion-lion": ("lion", "lion"),
    "rmsprop-adam": ("rmsprop", "adam"),
    "sgdm-adam": ("sgdm", "adam"),
    "sgdm-lion": ("sgdm", "lion"),
}
_ALPHA0 = {"adamw": 1e-4, "adam": 1e-4, "lion": 1e-5, "rmsprop": 1e-4, "sgdm": 1e-3, "sgd": 1e-3}


def _metaoptimize(settings: dict[str, Any]) -> Callable[..., Built]:
    def build(params: Iterable[Tensor], value: float, steps: int, options: dict[str, Any]) -> Built:
        return MetaOptimize(params, **{**settings, "alpha0": value, **options}), None

    return build


def _fixed(base: str, **settings: Any) -> Callable[..., Built]:
    def build(params: Iterable[Tensor], value: float, steps: int, options: dict[str, Any]) -> Built:
        if base == "lion":  # MetaOptimize with the meta rule off is exactly Lion (tested)
            return MetaOptimize(
                params, base="lion", meta="fixed", **{**settings, "alpha0": value, **options}
            ), None
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[base]
        return cls(params, **{**settings, "lr": value, **options}), None

    return build


def _warmup_cosine(
    params: Iterable[Tensor], value: float, steps: int, options: dict[str, Any]
) -> Built:
    options = dict(options)
    warmup = max(1, int(options.pop("warmup_fraction", 0.05) * steps))
    opt = torch.optim.AdamW(params, **{"lr": value, "weight_decay": 0.01, **options})

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, LambdaLR(opt, factor)


def _lr_free(module: str, package: str, attribute: str, **settings: Any) -> Callable[..., Built]:
    def build(params: Iterable[Tensor], value: float, steps: int, options: dict[str, Any]) -> Built:
        cls = getattr(_import(module, package), attribute)
        return cls(params, **{**settings, **options}), None

    return build


def _mechanic(params: Iterable[Tensor], value: float, steps: int, options: dict[str, Any]) -> Built:
    mechanize = _import("mechanic_pytorch", "mechanic-pytorch").mechanize
    # Mechanic learns a scale on the base update; its authors run the base at lr 1.
    return mechanize(torch.optim.AdamW)(params, **{"lr": 1.0, "weight_decay": 0.0, **options}), None


def _registry() -> dict[str, OptimizerSpec]:
    table: dict[str, OptimizerSpec] = {}

    def add(spec: OptimizerSpec) -> None:
        table[spec.name] = spec

    for combo, (base, meta) in _COMBOS.items():
        settings = {"base": base, "meta": meta, "weight_decay": _BASE_DECAY[base], **HARNESS_META}
        if base in ("sgdm", "rmsprop"):
            settings["base_style"] = "paper"
        for suffix, blocks in (("", "scalar"), ("-blockwise", "tensor")):
            add(
                OptimizerSpec(
                    f"mo-{combo}{suffix}",
                    "metaoptimize",
                    f"MetaOptimize {base} base, {meta} meta, blocks={blocks}, meta_lr=1e-2, "
                    "gamma=0.99",
                    "alpha0",
                    _ALPHA0[base],
                    _metaoptimize({**settings, "blocks": blocks}),
                )
            )
    add(
        OptimizerSpec(
            "metaoptimize",
            "metaoptimize",
            "MetaOptimize with its defaults (adamw base, auto meta, gamma 0.999) and weight "
            "decay 0.01: MetaOptimize(params, alpha0=..., weight_decay=0.01)",
            "alpha0",
            DEFAULT_ALPHA0,
            _metaoptimize({"weight_decay": 0.01}),
        )
    )
    add(
        OptimizerSpec(
            "mo-adamw-lion-learnwd",
            "metaoptimize",
            "mo-adamw-lion that also meta-learns its weight decay (one log kappa, from 0.01)",
            "alpha0",
            _ALPHA0["adamw"],
            _metaoptimize(
                {
                    "base": "adamw",
                    "meta": "lion",
                    "weight_decay": 0.01,
                    "learn_weight_decay": True,
                    **HARNESS_META,
                }
            ),
        )
    )
    for name in presets.names():
        preset_settings: dict[str, Any] = presets.get(name)
        alpha0 = float(preset_settings.pop("alpha0"))
        add(
            OptimizerSpec(
                f"preset:{name}",
                "metaoptimize",
                f"MetaOptimize preset {name!r}, verbatim",
                "alpha0",
                alpha0,
                _metaoptimize(preset_settings),
            )
        )
    add(
        OptimizerSpec(
            "sgd", "fixed", "torch.optim.SGD, fixed lr", "lr", 1e-2, _fixed("sgd"), grid="sgd"
        )
    )
    add(
        OptimizerSpec(
            "sgdm",
            "fixed",
            "torch.optim.SGD momentum 0.9, fixed lr",
            "lr",
            1e-2,
            _fixed("sgd", momentum=0.9),
            grid="sgd",
        )
    )
    add(OptimizerSpec("adam", "fixed", "torch.optim.Adam, fixed lr", "lr", 1e-3, _fixed("adam")))
    add(
        OptimizerSpec(
            "adamw",
            "fixed",
            "torch.optim.AdamW (weight decay 0.01), fixed lr",
            "lr",
            1e-3,
            _fixed("adamw", weight_decay=0.01),
        )
    )
    add(
        OptimizerSpec(
            "lion",
            "fixed",
            "Lion (betas 0.9, 0.99; weight decay 0.1), fixed lr",
            "lr",
            1e-4,
            _fixed("lion", weight_decay=0.1),
        )
    )
    add(
        OptimizerSpec(
            "adamw-cosine",
            "schedule",
            "AdamW with 5% linear warm-up and cosine decay to 0 (peak lr swept)",
            "lr",
            1e-3,
            _warmup_cosine,
        )
    )
    add(
        OptimizerSpec(
            "prodigy",
            "lr-free",
            "Prodigy (prodigyopt), defaults, lr=1",
            "",
            1.0,
            _lr_free("prodigyopt", "prodigyopt", "Prodigy"),
            package="prodigyopt",
        )
    )
    add(
        OptimizerSpec(
            "dadapt-adam",
            "lr-free",
            "D-Adaptation Adam (dadaptation), lr=1",
            "",
            1.0,
            _lr_free("dadaptation", "dadaptation", "DAdaptAdam"),
            package="dadaptation",
        )
    )
    add(
        OptimizerSpec(
            "dog",
            "lr-free",
            "DoG (dog-optimizer), defaults",
            "",
            1.0,
            _lr_free("dog", "dog-optimizer", "DoG"),
            package="dog-optimizer",
        )
    )
    add(
        OptimizerSpec(
            "schedulefree-adamw",
            "lr-free",
            "Schedule-Free AdamW (schedulefree), lr 2.5e-3, 5% warm-up",
            "",
            2.5e-3,
            _schedule_free,
            package="schedulefree",
        )
    )
    add(
        OptimizerSpec(
            "mechanic-adamw",
            "lr-free",
            "Mechanic around AdamW (mechanic-pytorch)",
            "",
            1.0,
            _mechanic,
            package="mechanic-pytorch",
        )
    )
    return table


def _schedule_free(
    params: Iterable[Tensor], value: float, steps: int, options: dict[str, Any]
) -> Built:
    module = _import("schedulefree", "schedulefree")
    settings = {"lr": 2.5e-3, "warmup_steps": max(1, steps // 20), **options}
    return module.AdamWScheduleFree(params, **settings), None


OPTIMIZERS: dict[str, OptimizerSpec] = _registry()


def get_optimizer(name: str) -> OptimizerSpec:
    """The optimizer spec registered under ``name``.

    Raises:
        ValueError: unknown optimizer.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; see 'metaoptimize list'")
    return OPTIMIZERS[name]
