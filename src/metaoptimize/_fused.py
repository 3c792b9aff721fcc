"""Fused per-tensor kernels (torch.compile) for the AdamW and Lion bases.

Each kernel does the base update, the trace update and the weight update of one parameter in
one pass over memory (Inductor fuses the elementwise body into one loop on CPU and one kernel on
CUDA). The meta-gradient partial sum ``<h, g>`` is taken before the update, by the caller, with
the trace from before this step. Every per-step scalar is a 0-d tensor so the kernels compile
once per dtype and device; they are compiled with dynamic shapes.

The math is exactly the eager path's (``base.py`` and ``MetaOptimize.step``): tests compare the
two in float64 (tests/test_fused.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["fused_step", "supports_fused"]

FUSED_BASES = ("adamw", "lion")


def supports_fused(base: str, group: dict[str, Any], param: Tensor, grad: Tensor) -> bool:
    """Whether the fused kernel covers this base rule, group and (contiguous) parameter."""
    return (
        base in FUSED_BASES
        and group["base_style"] == "torch"
        and param.is_contiguous()
        and grad.is_contiguous()
    )


def _adamw_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    finite: Tensor,
    ok: Tensor,
    alpha: Tensor,
    bias1: Tensor,
    bias2_sqrt: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    kappa: float,
) -> Tensor:
    g = torch.where(finite, grad, 0.0)
    exp_avg.copy_(exp_avg + (ok * (1.0 - beta1)) * (g - exp_avg))
    exp_avg_sq.copy_(exp_avg_sq + (ok * (1.0 - beta2)) * (g * g - exp_avg_sq))
    u = (exp_avg / bias1) / (exp_avg_sq.sqrt() / bias2_sqrt + eps)
    return -(u + kappa * param) * alpha


def _lion_update(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    finite: Tensor,
    ok: Tensor,
    alpha: Tensor,
    beta1: float,
    beta2: float,
    kappa: float,
) -> Tensor:
    g = torch.where(finite, grad, 0.0)
    u = torch.sign(exp_avg + (1.0 - beta1) * (g - exp_avg))
    exp_avg.copy_(exp_avg + (ok * (1.0 - beta2)) * (g - exp_avg))
    return -(u + kappa * param) * alpha


def _apply(
    param: Tensor,
    trace: Tensor | None,
    delta: Tensor,
    ok: Tensor,
    alpha: Tensor,
    kappa: float,
    gamma: float,
) -> None:
    if trace is not None:
        decay = (1.0 + ok * (gamma - 1.0)) * (1.0 - alpha * kappa)
        trace.copy_(trace * decay + delta)
    param.copy_(param + delta)


# Four entry points with distinct code objects, so each has its own compile cache: with and
# without a trace (meta rule off), for each base.
def _adamw_with_trace(
    param: Tensor,
    trace: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    finite: Tensor,
    ok: Tensor,
    alpha: Tensor,
    bias1: Tensor,
    bias2_sqrt: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    kappa: float,
    gamma: float,
) -> None:
    delta = _adamw_update(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        finite,
        ok,
        alpha,
        bias1,
        bias2_sqrt,
        beta1,
        beta2,
        eps,
        kappa,
    )
    _apply(param, trace, delta, ok, alpha, kappa, gamma)


def _adamw_without_trace(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    finite: Tensor,
    ok: Tensor,
    alpha: Tensor,
    bias1: Tensor,
    bias2_sqrt: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    kappa: float,
) -> None:
    delta = _adamw_update(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        finite,
        ok,
        alpha,
        bias1,
        bias2_sqrt,
        beta1,
        beta2,
        eps,
        kappa,
    )
    _apply(param, None, delta, ok, alpha, kappa, 1.0)


def _lion_with_trace(
    param: Tensor,
    trace: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    finite: Tensor,
    ok: Tensor,
    alpha: Tensor,
    beta1: float,
    beta2: float,
    kappa: float,
    gamma: float,
) -> None:
    delta = _lion_update(param, grad, exp_avg, finite, ok, alpha, beta1, beta2, kappa)
    _apply(param, trace, delta, ok, alpha, kappa, gamma)


def _lion_without_trace(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    finite: Tensor,
    ok: Tensor,
    alpha: Tensor,
    beta1: float,
    beta2: float,
    kappa: float,
) -> None:
    delta = _lion_update(param, grad, exp_avg, finite, ok, alpha, beta1, beta2, kappa)
    _apply(param, None, delta, ok, alpha, kappa, 1.0)


_BODIES: dict[str, Callable[..., None]] = {
    "adamw-trace": _adamw_with_trace,
    "adamw": _adamw_without_trace,
    "lion-trace": _lion_with_trace,
    "lion": _lion_without_trace,
}
_COMPILED: dict[str, Callable[..., None]] = {}


def _kernel(name: str) -> Callable[..., None]:
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(_BODIES[name], fullgraph=True, dynamic=True)
    return _COMPILED[name]


def fused_step(
    base: str,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    group: dict[str, Any],
    finite: Tensor,
    ok: Tensor,
    alpha: Tensor,
    with_trace: bool,
) -> None:
    """Apply one fused AdamW or Lion step (base, trace and weights) to ``param`` in place.

    ``alpha`` already includes the group's ``lr`` and ``ok`` (0 on a skipped step).
    """
    beta1, beta2 = group["betas"]
    kappa, gamma = group["weight_decay"], group["gamma"]
    # Flat views: one compiled graph serves every parameter shape (see supports_fused).
    flat = param.view(-1)
    flat_alpha = alpha.reshape(-1) if alpha.dim() else alpha.reshape(1)
    tensors = [grad.view(-1), state["exp_avg"].view(-1)]
    if base == "adamw":
        step = state["step"]
        step.add_(ok)
        clamped = step.clamp_min(1.0)
        bias1 = 1.0 - torch.pow(beta1, clamped)
        bias2_sqrt = (1.0 - torch.pow(beta2, clamped)).sqrt()
        tensors.append(state["exp_avg_sq"].view(-1))
        scalars: tuple[Any, ...] = (
            finite,
            ok,
            flat_alpha,
            bias1,
            bias2_sqrt,
            beta1,
            beta2,
            group["eps"],
            kappa,
        )
    else:
        scalars = (finite, ok, flat_alpha, beta1, beta2, kappa)
    if with_trace:
        _kernel(f"{base}-trace")(flat, state["trace"].view(-1), *tensors, *scalars, gamma)
    else:
        _kernel(base)(flat, *tensors, *scalars)
