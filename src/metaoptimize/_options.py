"""Defaults and option checks shared by :class:`MetaOptimize`, ``wrap`` and the optax port.

The defaults are the tuning-free configuration measured in docs/results.md ("Tuning-free
defaults"): the ``"auto"`` meta rule with its own meta step size, ``alpha0=1e-3``,
``gamma=0.999`` and the base rule's step-size range. The paper's settings are presets.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from metaoptimize._validation import check_betas, check_number, check_range
from metaoptimize.base import BaseRule

__all__ = [
    "BASE_STYLES",
    "DEFAULT_ALPHA0",
    "DEFAULT_GAMMA",
    "DEFAULT_META",
    "FUSED_BACKENDS",
    "WRAP_ALPHA_RANGE",
    "check_alpha0_in_bounds",
    "check_bool",
    "check_trace_dtype",
    "complete_group",
    "log_bounds",
]

DEFAULT_META = "auto"
DEFAULT_ALPHA0 = 1e-3
#: A meta horizon of about 1000 steps: long enough not to anneal early (γ = 0.99 did), short
#: enough to forget updates that no longer predict the gradient (γ = 1 did not, on drifting
#: targets).
DEFAULT_GAMMA = 0.999
#: ``wrap()``'s default step-size range: the wrapped rule is unknown, so only 0 and ∞ are ruled out.
WRAP_ALPHA_RANGE = (1e-12, 1e6)
BASE_STYLES = ("torch", "paper")
FUSED_BACKENDS = ("auto", "triton", "compile")


def log_bounds(
    alpha_min: float | None, alpha_max: float | None, default: tuple[float, float]
) -> tuple[float, float]:
    """Bounds on β = log α; None takes ``default``, 0 and ``math.inf`` remove a bound.

    Raises:
        ValueError: a bound is negative, not a number, or ``alpha_min >= alpha_max``.
    """
    alpha_min = default[0] if alpha_min is None else alpha_min
    alpha_max = default[1] if alpha_max is None else alpha_max
    low_value = check_range(alpha_min, "alpha_min", 0.0, math.inf, high_open=True)
    low = math.log(low_value) if low_value > 0.0 else -math.inf
    high = math.inf
    if alpha_max != math.inf:
        high = math.log(check_range(alpha_max, "alpha_max", 0.0, math.inf, low_open=True))
    if low >= high:
        raise ValueError(
            f"Invalid alpha_min/alpha_max: need alpha_min < alpha_max, got "
            f"{alpha_min} and {alpha_max}"
        )
    return low, high


def check_alpha0_in_bounds(param_groups: list[dict[str, Any]], bounds: tuple[float, float]) -> None:
    """Raise ValueError if a group's ``alpha0`` lies outside the log step-size ``bounds``."""
    for group in param_groups:
        if not bounds[0] <= math.log(group["alpha0"]) <= bounds[1]:
            raise ValueError(f"Invalid alpha0: {group['alpha0']}; outside [alpha_min, alpha_max]")


def check_bool(value: object, arg: str) -> bool:
    """Return ``value`` if it is a bool, or raise TypeError naming ``arg``."""
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {arg}: {value!r}; expected a bool")
    return value


def check_trace_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    """``trace_dtype`` as a floating dtype (a name such as ``"bfloat16"`` allowed), or None."""
    if value is None:
        return None
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"Invalid trace_dtype: {value!r}; expected a floating dtype such as torch.bfloat16"
        )
    return dtype


def complete_group(group: dict[str, Any], base: BaseRule) -> None:
    """Validate a MetaOptimize param group's hyperparameters and fill in the base rule's defaults.

    Raises:
        ValueError, TypeError: naming the offending hyperparameter.
    """
    for p in group["params"]:
        if p.is_complex():
            raise TypeError(
                "Invalid params: complex parameters are not supported; optimize "
                "torch.view_as_real(p) as a real parameter instead"
            )
    # ZeroRedundancyOptimizer copies every constructor keyword into its groups; the
    # process group is optimizer-wide and must not be serialised with them.
    group.pop("partition_group", None)
    for key in ("lr", "weight_decay", "eps"):
        group[key] = check_number(group[key], key)
        if group[key] < 0.0:
            raise ValueError(f"Invalid {key}: {group[key]}; need {key} >= 0")
    group["alpha0"] = check_range(
        group["alpha0"], "alpha0", 0.0, math.inf, low_open=True, high_open=True
    )
    group["gamma"] = check_range(group["gamma"], "gamma", 0.0, 1.0)
    if group["base_style"] not in BASE_STYLES:
        raise ValueError(
            f"Invalid base_style: {group['base_style']!r}; choose one of {list(BASE_STYLES)}"
        )
    if base.default_betas is None:
        if group["betas"] is not None:
            raise ValueError(
                f"Invalid betas: {group['betas']!r}; base {base.name!r} takes "
                "no betas (use momentum)"
            )
    elif group["betas"] is None:
        group["betas"] = base.default_betas
    else:
        group["betas"] = check_betas(group["betas"], len(base.default_betas), "betas")
    if group["momentum"] is None:
        group["momentum"] = base.default_momentum if base.default_momentum is not None else 0.0
    group["momentum"] = check_number(group["momentum"], "momentum")
    group["dampening"] = check_number(group["dampening"], "dampening")
    for flag in ("nesterov", "centered"):
        check_bool(group[flag], flag)
    base.check_group(group)
