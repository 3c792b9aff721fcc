"""The per-parameter update of one step, eager or compiled into one fused kernel.

:func:`parameter_step` is the whole update of one parameter after the meta-gradient was taken:
the base rule's direction, the Hessian-free trace and the weight step. The eager path calls it
as it is. ``fused=True`` calls a ``torch.compile``-d copy on flat views of the tensors, so
Inductor fuses the elementwise body into one loop (CPU) or kernel (CUDA) for every base rule.
Per-step scalars are 0-d tensors; one compiled graph (dynamic shapes) serves every parameter
shape of a given dtype and group.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from metaoptimize.base import BaseRule, has_decay
from metaoptimize.meta import MetaRule

__all__ = [
    "compile_meta_step",
    "compile_parameter_step",
    "fused_meta_step",
    "fused_parameter_step",
    "meta_step",
    "parameter_step",
    "supports_fused",
]


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
    """
    if isinstance(finite, Tensor):
        grad = torch.where(finite, grad, 0.0)
    u, slope = rule.direction(param, grad, state, group, ok)
    # A direction that is neither the gradient nor a state tensor is a temporary of the rule:
    # the update is built in it rather than in a new allocation.
    own = u is not grad and all(u is not value for value in state.values())
    kappa = group["weight_decay"]  # a float, or a 0-d tensor when it is learned
    if decoupled and isinstance(kappa, Tensor):
        delta = (u + kappa * param.to(u.dtype)).mul_(-alpha)
    elif decoupled and kappa:
        delta = (u.add_ if own else u.add)(param.to(u.dtype), alpha=kappa).mul_(-alpha)
    else:
        delta = u.mul_(-alpha) if own else u * (-alpha)
    if with_trace:
        trace = state["trace"]
        gamma = 1.0 + ok * (group["gamma"] - 1.0)  # γ, or 1 on a skipped step
        if has_decay(kappa):
            # Hessian-free ∂w_{t+1}/∂w_t (docs/math.md, "Decay factors").
            slope_w = 1.0 if decoupled else cast(Tensor, slope)
            scalars = not any(isinstance(v, Tensor) for v in (alpha, kappa, gamma))
            if scalars and isinstance(slope_w, Tensor) and "wd_trace" not in state:
                # Host scalars: γ(1 - α κ s) built in the rule's slope temporary.
                trace.mul_(slope_w.mul_(-alpha * kappa * gamma).add_(gamma))
            else:
                decay = 1.0 - alpha * kappa * slope_w
                if "wd_trace" in state:
                    # Trace of the log weight decay θ: ∂w_{t+1}/∂θ_t = -α κ s w (math.md §12).
                    state["wd_trace"].mul_(gamma * decay).add_(
                        -(alpha * kappa) * slope_w * param.to(trace.dtype)
                    )
                trace.mul_(gamma * decay)
        else:
            trace.mul_(gamma)
        trace.add_(delta)
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
        param.add_(delta.to(param.dtype))


def supports_fused(param: Tensor, grad: Tensor, state: dict[str, Any]) -> bool:
    """The fused kernel works on flat views: every tensor must be contiguous."""
    return (
        param.is_contiguous()
        and grad.is_contiguous()
        and all(v.is_contiguous() for v in state.values() if isinstance(v, Tensor))
    )


def _compile_own_copy(function: Callable[..., None], **options: Any) -> Callable[..., None]:
    """``torch.compile`` of a fresh copy of ``function``'s code, with a compile cache of its own.

    torch.compile keeps one cache per code object, with a small recompile limit; every
    optimizer gets its own copy of the code so that one process can run many optimizers
    (the benchmark harness does) without exhausting a shared cache.
    """
    code = function.__code__
    copy = types.FunctionType(
        code.replace(), function.__globals__, code.co_name, function.__defaults__
    )
    return cast(Callable[..., None], torch.compile(copy, fullgraph=True, dynamic=True, **options))


def compile_parameter_step() -> Callable[..., None]:
    """A compiled :func:`parameter_step` (see :func:`_compile_own_copy`)."""
    # emulate_precision_casts: keep the rounding of low-precision casts (the Kahan update
    # measures what rounding to bfloat16 lost; without it Inductor skips the round trip).
    return _compile_own_copy(parameter_step, options={"emulate_precision_casts": True})


def fused_parameter_step(
    compiled: Callable[..., None],
    rule: BaseRule,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    finite: Tensor,
    ok: Tensor,
    alpha: Tensor,
    with_trace: bool,
    decoupled: bool,
) -> None:
    """Run ``compiled`` (from :func:`compile_parameter_step`) on flat views of the tensors."""
    # 0-d state (step counters) goes in as a shape-[1] view too: under torch.compile with
    # dynamic shapes (torch 2.13) an in-place update of a 0-d input is lost, while the
    # update of a one-element view reaches the same storage (tests/test_fused.py).
    flat_state = {k: v.view(-1) if isinstance(v, Tensor) else v for k, v in state.items()}
    flat_alpha = alpha.view(-1) if alpha.dim() else alpha
    compiled(
        rule,
        param.view(-1),
        grad.view(-1),
        flat_state,
        group,
        finite,
        ok,
        flat_alpha,
        with_trace,
        decoupled,
    )


def meta_step(
    rule: MetaRule,
    log_alpha: Tensor,
    z: Tensor,
    meta_state: dict[str, Tensor],
    keep: Tensor,
    low: float,
    high: float,
) -> None:
    """The meta rule on ``β = log α`` where ``keep`` holds, clamped to ``[low, high]``; in place."""
    new_log_alpha, new_state = rule.update(log_alpha, z, meta_state)
    if low > float("-inf") or high < float("inf"):
        new_log_alpha = new_log_alpha.clamp(low, high)
    log_alpha.copy_(torch.where(keep, new_log_alpha, log_alpha))
    for key, value in new_state.items():
        meta_state[key].copy_(torch.where(keep, value, meta_state[key]))


def compile_meta_step() -> Callable[..., None]:
    """A compiled :func:`meta_step`, for per-weight step sizes (see :func:`_compile_own_copy`)."""
    return _compile_own_copy(meta_step)


def fused_meta_step(
    compiled: Callable[..., None],
    rule: MetaRule,
    log_alpha: Tensor,
    z: Tensor,
    meta_state: dict[str, Tensor],
    keep: Tensor,
    low: float,
    high: float,
) -> None:
    """Run ``compiled`` (from :func:`compile_meta_step`) on flat views (see above for why)."""
    flat_state = {key: value.view(-1) for key, value in meta_state.items()}
    compiled(rule, log_alpha.view(-1), z.reshape(-1), flat_state, keep, low, high)
