"""Checks on a loaded state dict, made before anything in the optimizer changes.

A state dict is data from outside: a NaN step size, a negative second moment or a tensor of the
wrong shape would otherwise load silently and turn the weights into NaN on the first step
without counting it as skipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["check_section", "check_section_tensors", "check_state_tensor", "restored_bounds"]

#: State entries that are never negative: counts, squared-gradient averages, running scales.
_NONNEGATIVE = ("step", "exp_avg_sq", "square_avg", "scale", "sum_sq", "skipped_steps")


def check_state_tensor(
    where: str,
    key: str,
    value: object,
    expected: Tensor | None,
    local: Callable[[Tensor], Tensor],
) -> None:
    """Raise ValueError naming ``where`` and ``key`` if a saved state tensor cannot be used.

    Args:
        where: which parameter, e.g. ``"state[3]"``.
        key: the state entry.
        value: the saved value.
        expected: a tensor shaped as this optimizer would create the entry (None: unknown
            entry, only its values are checked).
        local: this rank's view of a (possibly sharded) tensor.
    """
    if not isinstance(value, Tensor):
        if expected is not None:
            raise ValueError(f"Invalid state_dict: {where}[{key!r}] is not a tensor: {value!r}")
        return
    if expected is not None and tuple(value.shape) != tuple(expected.shape):
        raise ValueError(
            f"Invalid state_dict: {where}[{key!r}] has shape {tuple(value.shape)}, "
            f"expected {tuple(expected.shape)}"
        )
    if not (value.is_floating_point() or value.is_complex()):
        return
    values = local(value).detach()
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"Invalid state_dict: {where}[{key!r}] has NaN or infinite values")
    if key.removeprefix("meta_") in _NONNEGATIVE and bool((values < 0).any()):
        raise ValueError(f"Invalid state_dict: {where}[{key!r}] has negative values")


def check_section_tensors(
    section: Mapping[str, Any], expected: Mapping[str, Tensor | dict[str, Tensor]]
) -> None:
    """Check the section's optimizer-wide tensors against their current counterparts.

    Each must be present, shaped as the current one, and finite.
    """
    for name, mine in expected.items():
        saved = section.get(name)
        pairs = (
            [
                (f"{name}[{k!r}]", saved.get(k) if isinstance(saved, Mapping) else None, v)
                for k, v in mine.items()
            ]
            if isinstance(mine, dict)
            else [(name, saved, mine)]
        )
        for label, value, current in pairs:
            if not isinstance(value, Tensor):
                raise TypeError(f"Invalid state_dict: metaoptimize {label} is missing")
            check_state_tensor("metaoptimize", label, value, current, lambda t: t)


def restored_bounds(saved: object) -> tuple[float, float]:
    """Validate saved log step-size bounds ``(low, high)``."""
    if not (isinstance(saved, (tuple, list)) and len(saved) == 2):
        raise ValueError(f"Invalid state_dict: log_alpha_bounds {saved!r} is not a pair")
    low, high = (float(b) for b in saved)
    if math.isnan(low) or math.isnan(high) or low >= high or low == math.inf:
        raise ValueError(f"Invalid state_dict: log_alpha_bounds {saved!r}; need low < high")
    return low, high


def check_section(
    section: Mapping[str, Any] | None,
    *,
    format_version: int,
    rules: Mapping[str, str],
    learn_weight_decay: bool,
    trace: tuple[str, str],
    blocks: object,
) -> None:
    """Raise ValueError unless the saved ``"metaoptimize"`` section fits this optimizer.

    Args:
        section: the saved section (None: not saved by MetaOptimize).
        format_version: the version this code writes and reads.
        rules: this optimizer's rule names (``"base"``, ``"meta"``).
        learn_weight_decay: whether this optimizer learns its weight decay.
        trace: this optimizer's ``(trace, trace_approximation)``.
        blocks: this optimizer's layout signature.
    """
    if section is None:
        raise ValueError(
            "Invalid state_dict: no 'metaoptimize' entry; it was not saved by MetaOptimize"
        )
    version = section.get("format_version")
    if version != format_version:
        raise ValueError(
            f"Invalid state_dict: format_version {version!r} is not supported "
            f"(expected {format_version})"
        )
    for what, mine in rules.items():
        if section[what] != mine:
            raise ValueError(
                f"Invalid state_dict: saved with {what}={section[what]!r}, but "
                f"this optimizer uses {what}={mine!r}"
            )
    saved_wd = section.get("learn_weight_decay", False)
    if saved_wd != learn_weight_decay:
        raise ValueError(
            f"Invalid state_dict: saved with learn_weight_decay={saved_wd}, but this "
            f"optimizer uses learn_weight_decay={learn_weight_decay}"
        )
    saved_trace = (section.get("trace", "hessian-free"), section.get("trace_approximation", "L"))
    if saved_trace[0] != trace[0] or (trace[0] == "hessian" and saved_trace != trace):
        raise ValueError(
            f"Invalid state_dict: saved with trace={saved_trace[0]!r} "
            f"(trace_approximation={saved_trace[1]!r}), but this optimizer uses "
            f"trace={trace[0]!r} (trace_approximation={trace[1]!r})"
        )
    if section["blocks"] != blocks:
        raise ValueError(
            f"Invalid state_dict: saved with block layout {section['blocks']!r}"
            f", but this optimizer has {blocks!r}"
        )
