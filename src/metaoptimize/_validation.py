"""Shared argument checks; every message names the offending argument."""

from __future__ import annotations

import math


def check_betas(
    betas: object, length: int, arg: str, one_allowed: tuple[bool, ...] = ()
) -> tuple[float, ...]:
    """Return ``betas`` as a tuple of ``length`` floats in [0, 1), or raise ValueError.

    ``one_allowed[i]`` admits 1 at index ``i`` (a factor that may keep everything).
    """
    if not isinstance(betas, (tuple, list)) or len(betas) != length:
        raise ValueError(f"Invalid {arg}: {betas!r}; expected a tuple of {length} floats")
    values = tuple(check_number(b, arg) for b in betas)
    for index, value in enumerate(values):
        closed = index < len(one_allowed) and one_allowed[index]
        if not (0.0 <= value <= 1.0 if closed else 0.0 <= value < 1.0):
            need = "0 <= beta <= 1" if closed else "0 <= beta < 1"
            raise ValueError(f"Invalid {arg} at index {index}: {value}; need {need}")
    return values


def check_number(value: object, arg: str) -> float:
    """Return ``value`` as a finite float, or raise TypeError/ValueError naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {arg}: {value!r}; expected a real number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"Invalid {arg}: {value!r}; expected a finite number")
    return number


def check_range(
    value: object,
    arg: str,
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float inside the interval, or raise naming ``arg``."""
    number = check_number(value, arg)
    too_low = number <= low if low_open else number < low
    too_high = number >= high if high_open else number > high
    if too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        raise ValueError(f"Invalid {arg}: {value!r}; need a value in {left}{low}, {high}{right}")
    return number
