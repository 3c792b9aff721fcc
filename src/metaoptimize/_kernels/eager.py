"""The eager per-parameter update: the ground truth every other kernel is tested against.

:func:`parameter_step` is the whole update of one parameter after the meta-gradient was taken:
the base rule's direction, the Hessian-free trace and the weight step; :func:`meta_step` is
the meta rule's update of the log step sizes. The per-tensor path calls them as they are;
:mod:`metaoptimize._kernels.compiled` compiles these same functions (``fused=True``).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor

from metaoptimize._math import as_dtype, host_constant
from metaoptimize.base import BaseRule, Quotient, has_decay
from metaoptimize.meta import MetaRule

__all__ = ["meta_step", "parameter_step"]


def parameter_step(
    rule: BaseRule,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    group: dict[str, Any],
    finite: Tensor | bool,
    ok: Tensor | float,
    alpha: Tensor | float,
    with_trace: bool,
    decoupled: bool,
    *,
    weight_decay: Tensor | float | None = None,
) -> None:
    """Base step, trace update and weight step of one parameter, in place.

    Args:
        rule: the base rule.
        param: the weights (local shard for DTensors).
        grad: the gradient, in the state dtype.
        state: the parameter's optimizer state.
        group: its param group.
        finite: 0-d bool, False on a step that is skipped; or the Python ``True`` (host
            scalars: the optimizer skips a non-finite step before it gets here).
        ok: ``finite`` as 0.0/1.0 in the state dtype (the float 1.0 with host scalars).
        alpha: effective step size ``lr * exp(β) * ok`` (0-d, parameter-shaped, or a float).
        with_trace: whether the meta rule is active (the trace exists).
        decoupled: whether weight decay is decoupled for this rule and group.
        weight_decay: the learned weight decay ``κ`` of this parameter's block (a float with
            host scalars, else 0-d); None takes the group's.
    """
    if isinstance(finite, Tensor):
        grad = torch.where(finite, grad, 0.0)
    if weight_decay is not None:  # the rule reads κ from the group for its L2 term
        group = {**group, "weight_decay": weight_decay}
    u, slope = rule.direction(param, grad, state, group, ok)
    kappa = group["weight_decay"]  # a float, or a 0-d tensor when it is learned
    if isinstance(u, Quotient):  # host scalars: u = s m / d
        if _host_quotient_step(u, param, state, group, alpha, with_trace, decoupled):
            return
        (m,), (d,), (s,) = u
        u = torch.div(m, d, out=d).mul_(s)
    # A direction that is neither the gradient nor a state tensor is a temporary of the rule:
    # the update is built in it rather than in a new allocation.
    own = u is not grad and all(u is not value for value in state.values())
    if decoupled and isinstance(kappa, Tensor):
        delta = (u + kappa * as_dtype(param, u.dtype)).mul_(-alpha)
    elif decoupled and kappa:
        delta = (u.add_ if own else u.add)(as_dtype(param, u.dtype), alpha=kappa).mul_(-alpha)
    else:
        delta = u.mul_(-alpha) if own else u * (-alpha)
    if with_trace:
        trace = state["trace"]
        gamma = 1.0 + ok * (group["gamma"] - 1.0)  # γ, or 1 on a skipped step
        decay: Tensor | float | None = gamma  # the factor on the old trace
        if has_decay(kappa):
            # Hessian-free ∂w_{t+1}/∂w_t (docs/math.md, "Decay factors").
            slope_w = 1.0 if decoupled else cast(Tensor, slope)
            scalars = not any(isinstance(v, Tensor) for v in (alpha, kappa, gamma))
            simple = decoupled and isinstance(kappa, float) and "wd_trace" not in state
            if simple and isinstance(alpha, Tensor) and alpha.dim() > 0:  # per-weight α
                # γ (1 - α κ) h as γh - κ α (γh): no parameter-sized decay tensor.
                trace.mul_(gamma).addcmul_(alpha, trace, value=-kappa)
                decay = None
            elif scalars and isinstance(slope_w, Tensor) and "wd_trace" not in state:
                # Host scalars: γ(1 - α κ s) built in the rule's slope temporary.
                decay = slope_w.mul_(-alpha * kappa * gamma).add_(gamma)
            else:
                decay = gamma * (1.0 - alpha * kappa * slope_w)
                if "wd_trace" in state:
                    # Trace of the log weight decay θ: ∂w_{t+1}/∂θ_t = -α κ s w (math.md §12).
                    state["wd_trace"].mul_(decay).add_(
                        -(alpha * kappa) * slope_w * as_dtype(param, trace.dtype)
                    )
        if decay is None:  # decayed above
            trace.add_(delta)
        elif isinstance(decay, float):
            torch.add(delta, trace, alpha=decay, out=trace)  # h ← decay h + Δ in one call
        else:
            trace.mul_(decay).add_(delta)
    if "kahan_comp" in state:
        # Kahan-compensated update of low-precision weights: the part of the update that
        # rounding to the parameter's dtype loses is carried to the next step.
        comp = state["kahan_comp"]
        total = comp.to(delta.dtype) + delta
        old = param.to(delta.dtype)
        new = (old + total).to(param.dtype)
        comp.copy_(total - (new.to(delta.dtype) - old))
        param.copy_(new)
    else:
        param.add_(as_dtype(delta, param.dtype))


def _host_quotient_step(
    u: Quotient,
    param: Tensor,
    state: dict[str, Tensor],
    group: dict[str, Any],
    alpha: Tensor | float,
    with_trace: bool,
    decoupled: bool,
) -> bool:
    """:func:`parameter_step`'s trace and weight step from ``u = s m / d`` (host scalars).

    ``Δ = -α s m/d - α κ w`` (decoupled decay) is added to the trace and to the weights by
    ``addcdiv``, whose ``value`` takes the scalars: no step tensor is formed and no scalar is
    wrapped into a tensor. The trace reads ``w`` before the weights move. False, with nothing
    done, where the general path is needed (per-weight step sizes, a learned weight decay,
    Kahan summation, a trace or state in another dtype).
    """
    (numerator,), (denominator,), (scale,) = u
    kappa = group["weight_decay"] if decoupled else 0.0  # an L2 decay is in u already
    trace = state["trace"] if with_trace else None
    if not (isinstance(alpha, float) and isinstance(kappa, float)):
        return False
    if "kahan_comp" in state or "wd_trace" in state or denominator.dtype != param.dtype:
        return False
    if trace is not None and trace.dtype != param.dtype:
        return False
    value, gamma = -alpha * scale, group["gamma"]
    if trace is not None:
        if kappa:  # ∂w_{t+1}/∂w_t = 1 - α κ (docs/math.md, "Decay factors")
            trace.mul_(gamma * (1.0 - alpha * kappa)).add_(param, alpha=-alpha * kappa)
        elif gamma != 1.0:
            trace.mul_(host_constant(gamma, trace))
        trace.addcdiv_(numerator, denominator, value=value)
    if kappa:
        param.add_(param, alpha=-alpha * kappa)
    param.addcdiv_(numerator, denominator, value=value)
    return True


def meta_step(
    rule: MetaRule,
    log_alpha: Tensor,
    z: Tensor,
    meta_state: dict[str, Tensor],
    keep: Tensor | None,
    low: float,
    high: float,
) -> None:
    """The meta rule on ``β = log α`` where ``keep`` holds, clamped to ``[low, high]``; in place.

    ``keep=None``: every entry steps (known on the host: no ``where`` needed).
    """
    new_log_alpha, new_state = rule.update(log_alpha, z, meta_state)
    if low > float("-inf") or high < float("inf"):
        new_log_alpha = new_log_alpha.clamp(low, high)
    if keep is None:
        log_alpha.copy_(new_log_alpha)
        for key, value in new_state.items():
            meta_state[key].copy_(value)
        return
    log_alpha.copy_(torch.where(keep, new_log_alpha, log_alpha))
    for key, value in new_state.items():
        meta_state[key].copy_(torch.where(keep, value, meta_state[key]))
