"""Multi-tensor (``torch._foreach_*``) version of the per-parameter update.

:func:`foreach_parameter_step` does what :func:`metaoptimize._kernels.eager.parameter_step`
does, for a list of parameters that share a param group, a device and a dtype. It issues each
elementwise operation once per list instead of once per tensor, which matters when launches
dominate (many small tensors, GPUs). The base rule's own multi-tensor form
(:meth:`~metaoptimize.base.BaseRule.foreach_direction`) gives the direction, and
``tests/test_foreach.py`` checks the two paths agree in float64.

Per-tensor scalars (step counters, step sizes) travel as lists of 0-d tensors, which the
foreach ops broadcast, and nothing is read on the host; with host scalars (CPU), as Python
floats, which take torch's scalar-list kernels.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from metaoptimize.base import (
    BaseRule,
    Quotient,
    Scalars,
    TensorList,
    has_decay,
    is_one,
    operand,
)

__all__ = ["foreach_parameter_step"]


def _where_finite(finite: Tensor, tensors: TensorList) -> TensorList:
    return [torch.where(finite, t, 0.0) for t in tensors]


def foreach_parameter_step(
    rule: BaseRule,
    params: TensorList,
    grads: TensorList,
    states: list[dict[str, Tensor]],
    group: dict[str, Any],
    finite: Tensor | None,
    ok: Tensor | float,
    alphas: Scalars,
    with_trace: bool,
    decoupled: bool,
) -> None:
    """:func:`metaoptimize._kernels.eager.parameter_step` for a list of parameters, in place.

    Args:
        rule: the base rule.
        params: the weights; one dtype, one device, the state dtype.
        grads: their gradients.
        states: their optimizer states (same keys).
        group: their param group (a float weight decay: the learned one uses the per-tensor
            path).
        finite: 0-d bool, False on a step that is skipped (device scalars); None with host
            scalars, where a skipped step never reaches the kernel.
        ok: ``finite`` as 0.0/1.0, or the float 1.0 with host scalars.
        alphas: effective step sizes ``lr * exp(β) * ok``: 0-d tensors, Python floats (host
            scalars) or parameter-shaped tensors (per-weight step sizes).
        with_trace: whether the meta rule is active (the traces exist).
        decoupled: whether weight decay is decoupled for this rule and group.
    """
    if finite is not None:
        grads = _where_finite(finite, grads)
    u, slopes = rule.foreach_direction(params, grads, states, group, ok)
    kappa = group["weight_decay"]
    host = isinstance(alphas[0], float)
    decoupled_kappa = kappa if decoupled else 0.0
    if isinstance(u, Quotient) and host:
        delta = _quotient_delta(u, params, cast("list[float]", alphas), decoupled_kappa)
    elif isinstance(u, Quotient):  # per-weight step sizes: -(u + κ w), then times α
        delta = _quotient_delta(u, params, [1.0] * len(params), decoupled_kappa)
        torch._foreach_mul_(delta, cast("list[Tensor]", alphas))
    else:
        neg_alphas = [-float(a) for a in alphas] if host else torch._foreach_neg(alphas)  # type: ignore[arg-type]
        if decoupled and kappa:
            delta = torch._foreach_add(u, params, alpha=kappa)
            torch._foreach_mul_(delta, neg_alphas)
        else:
            delta = torch._foreach_mul(u, neg_alphas)
    if with_trace:
        traces = [s["trace"] for s in states]
        gamma = 1.0 + ok * (group["gamma"] - 1.0)
        if has_decay(kappa) and decoupled and not host:
            # γ (1 - α κ) h as γh - κ α (γh): no decay tensors (α is a tensor here).
            if not is_one(gamma):
                torch._foreach_mul_(traces, operand(gamma, traces))
            torch._foreach_addcmul_(traces, cast("list[Tensor]", alphas), traces, value=-kappa)
        elif has_decay(kappa):
            # 1 - α κ ∂u/∂g̃ (docs/math.md §4); ∂u/∂g̃ = 1 for decoupled decay.
            decays = _trace_decays(alphas, kappa, None if decoupled else slopes, gamma)
            torch._foreach_mul_(traces, operand(decays, traces))
        elif not is_one(gamma):
            torch._foreach_mul_(traces, operand(gamma, traces))
        torch._foreach_add_(traces, delta)
    torch._foreach_add_(params, delta)


def _quotient_delta(
    u: Quotient, params: TensorList, alphas: list[float], kappa: float
) -> TensorList:
    """``Δ = -α (u + κ w)`` from ``u = s n / d``: ``-α κ w`` (or 0) plus ``addcdiv`` by ``-α s``."""
    values = [-a * s for a, s in zip(alphas, u.scales, strict=True)]
    if not kappa:
        delta = torch._foreach_div(u.numerators, u.denominators)
        torch._foreach_mul_(delta, operand(values, delta))
        return delta
    delta = torch._foreach_mul(params, operand([-a * kappa for a in alphas], params))
    torch._foreach_addcdiv_(delta, u.numerators, u.denominators, values)
    return delta


def _trace_decays(
    alphas: Scalars, kappa: float, slopes: Scalars | None, gamma: Tensor | float
) -> Scalars:
    """``γ (1 - α κ ∂u/∂g̃)`` per tensor: floats when every factor is a float."""
    scalar_slopes = slopes is None or isinstance(slopes[0], float)
    if isinstance(alphas[0], float) and scalar_slopes and isinstance(gamma, float):
        slope_values = [1.0] * len(alphas) if slopes is None else slopes
        factors: list[float] = [
            gamma * (1.0 - float(a) * kappa * float(s))  # type: ignore[arg-type]
            for a, s in zip(alphas, slope_values, strict=True)
        ]
        return factors
    # -(α κ s) built in one new list: negating is exact, so this is 1 - α κ s to the bit.
    if isinstance(alphas[0], float):  # elementwise slopes, scalar step sizes
        decays = torch._foreach_mul(slopes, [-float(a) * kappa for a in alphas])  # type: ignore[arg-type]
    else:
        decays = torch._foreach_mul(alphas, -kappa)
        if slopes is not None:  # (α κ) s; α may be 0-d
            decays = torch._foreach_mul(decays, slopes)
    torch._foreach_add_(decays, 1.0)
    if not is_one(gamma):
        torch._foreach_mul_(decays, gamma)
    return decays
