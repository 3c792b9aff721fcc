"""Defaults and option checks shared by :class:`MetaOptimize`, ``wrap`` and the optax port.

The defaults are the tuning-free configuration measured in docs/results.md ("Tuning-free
defaults"): the ``"auto"`` meta rule with its own meta step size, ``alpha0=1e-3``,
``gamma=0.999`` and the base rule's step-size range. The paper's settings are presets.
"""

from __future__ import annotations

import math

from metaoptimize._validation import check_range

__all__ = ["DEFAULT_ALPHA0", "DEFAULT_GAMMA", "DEFAULT_META", "WRAP_ALPHA_RANGE", "log_bounds"]

DEFAULT_META = "auto"
DEFAULT_ALPHA0 = 1e-3
#: A meta horizon of about 1000 steps: long enough not to anneal early (γ = 0.99 did), short
#: enough to forget updates that no longer predict the gradient (γ = 1 did not, on drifting
#: targets).
DEFAULT_GAMMA = 0.999
#: ``wrap()``'s default step-size range: the wrapped rule is unknown, so only 0 and ∞ are ruled out.
WRAP_ALPHA_RANGE = (1e-12, 1e6)


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
