"""Multi-tensor (``torch._foreach_*``) versions of the per-parameter update.

:func:`foreach_parameter_step` does what :func:`metaoptimize._kernels.eager.parameter_step` does, for a
list of parameters that share a param group, a device and a dtype. It issues each elementwise
operation once per list instead of once per tensor, which matters when launches dominate (many
small tensors, GPUs). It is written to repeat the single-tensor rules operation by operation,
and ``tests/test_foreach.py`` checks that the two agree in float64.

Per-tensor scalars (step counters, step sizes) travel as lists of 0-d tensors, which the
foreach ops broadcast; nothing is read on the host.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from metaoptimize.base import BaseRule, has_decay

__all__ = ["foreach_direction", "foreach_parameter_step"]

TensorList = list[Tensor] | tuple[Tensor, ...]


def _where_finite(finite: Tensor, tensors: TensorList) -> TensorList:
    return [torch.where(finite, t, 0.0) for t in tensors]


def _l2(grads: TensorList, params: TensorList, kappa: float) -> TensorList:
    return torch._foreach_add(grads, params, alpha=kappa) if kappa else grads


def _ema_(averages: TensorList, inputs: TensorList, weight: Tensor) -> None:
    """``a ← (1-w) a + w x`` in place, for a 0-d tensor ``w``.

    ``lerp_`` with a tensor weight would read it on the host; the multiply and add overloads
    that take a 0-d tensor do not (rounding differs from ``lerp_`` in the last bits).
    """
    torch._foreach_mul_(averages, 1.0 - weight)
    torch._foreach_add_(averages, torch._foreach_mul(inputs, weight))


def _ema_square_(averages: TensorList, inputs: TensorList, weight: Tensor) -> None:
    """``a ← (1-w) a + w x²`` in place, as :func:`metaoptimize._math.ema_square_` (overflow-safe)."""
    torch._foreach_mul_(averages, 1.0 - weight)
    torch._foreach_addcmul_(averages, torch._foreach_mul(inputs, weight), inputs)


def _add_(tensors: TensorList, value: Tensor) -> None:
    """``t += value`` for a 0-d tensor ``value``.

    With a list of 0-d tensors, ``_foreach_add_(list, value)`` takes the Scalar overload (a host
    read), so ``value`` goes in as a list.
    """
    torch._foreach_add_(tensors, [value] * len(tensors))


def _bias_corrections(beta: float, steps: TensorList) -> TensorList:
    """``1 - β^max(t, 1)`` per tensor (as :func:`metaoptimize.base._bias_correction`)."""
    powers = torch._foreach_pow(beta, torch._foreach_clamp_min(steps, 1.0))
    return torch._foreach_add(torch._foreach_neg(powers), 1.0)


def _sqrt(tensors: TensorList) -> TensorList:
    return torch._foreach_sqrt(tensors)


def _safe_div(numerators: TensorList, denominators: TensorList) -> TensorList:
    """Elementwise ``n / d`` with 0 where ``d`` is 0 (as :func:`metaoptimize.base._safe_div`)."""
    return [
        torch.where(d > 0, n / d.clamp_min(1e-300), 0.0)
        for n, d in zip(numerators, denominators, strict=True)
    ]


def foreach_direction(
    rule: BaseRule,
    params: TensorList,
    grads: TensorList,
    states: list[dict[str, Tensor]],
    group: dict[str, Any],
    ok: Tensor,
) -> tuple[TensorList, TensorList | None]:
    """The base rule's ``(u, ∂u/∂g̃ or None)`` for a list of parameters; state in place."""
    name, paper = rule.name, group["base_style"] == "paper"
    kappa = group["weight_decay"]
    if name == "sgd":
        return _l2(grads, params, kappa), ([ok.new_ones(())] * len(params) if kappa else None)
    if name == "sgdm":
        mu = group["momentum"]
        bufs = [s["momentum_buffer"] for s in states]
        if paper:
            lagged = torch._foreach_mul(bufs, 1.0)  # copies: the step uses m_t
            _ema_(bufs, grads, ok * (1.0 - mu))
            return lagged, None
        g = _l2(grads, params, kappa)
        steps = [s["step"] for s in states]
        started = torch.stack(steps) > 0
        coefs = list((1.0 - group["dampening"] * started.to(ok.dtype)).unbind())
        torch._foreach_mul_(bufs, 1.0 + ok * (mu - 1.0))
        torch._foreach_add_(bufs, torch._foreach_mul(g, torch._foreach_mul(coefs, ok)))
        _add_(steps, ok)
        if group["nesterov"]:
            slopes = torch._foreach_add(torch._foreach_mul(coefs, mu), 1.0) if kappa else None
            return torch._foreach_add(g, bufs, alpha=mu), slopes
        return bufs, (coefs if kappa else None)
    if name == "rmsprop":
        return _rmsprop(params, grads, states, group, ok)
    if name in ("adam", "adamw"):
        return _adam(rule, params, grads, states, group, ok)
    if name == "lion":
        beta1, beta2 = group["betas"]
        exp_avgs = [s["exp_avg"] for s in states]
        u = torch._foreach_sign(torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1))
        _ema_(exp_avgs, grads, ok * (1.0 - beta2))
        return u, None
    raise ValueError(f"Invalid base: {name!r}")


def _rmsprop(
    params: TensorList,
    grads: TensorList,
    states: list[dict[str, Tensor]],
    group: dict[str, Any],
    ok: Tensor,
) -> tuple[TensorList, TensorList | None]:
    (smoothing,) = group["betas"]
    eps, kappa = group["eps"], group["weight_decay"]
    square_avgs = [s["square_avg"] for s in states]
    steps = [s["step"] for s in states]
    _add_(steps, ok)
    if group["base_style"] == "paper":
        _ema_square_(square_avgs, grads, ok * (1.0 - smoothing))
        rms = _sqrt(torch._foreach_div(square_avgs, _bias_corrections(smoothing, steps)))
        return torch._foreach_div(grads, torch._foreach_add(rms, eps)), None
    g = _l2(grads, params, kappa)
    _ema_square_(square_avgs, g, ok * (1.0 - smoothing))
    grad_avgs: TensorList | None = None
    if group["centered"]:
        grad_avgs = [s["grad_avg"] for s in states]
        _ema_(grad_avgs, g, ok * (1.0 - smoothing))
        rms = _sqrt(torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1.0))
    else:
        rms = _sqrt(square_avgs)
    denoms = torch._foreach_add(rms, eps)
    u: TensorList = torch._foreach_div(g, denoms)
    if group["momentum"] > 0.0:
        bufs = [s["momentum_buffer"] for s in states]
        torch._foreach_mul_(bufs, 1.0 + ok * (group["momentum"] - 1.0))
        torch._foreach_add_(bufs, torch._foreach_mul(u, ok))
        u = bufs
    if not kappa:
        return u, None
    centred = g if grad_avgs is None else torch._foreach_sub(g, grad_avgs)
    # rmsprop_l2_slope: 1/(s+ε) - (1-a) g̃ (g̃-ḡ) / (s (s+ε)²), in the same operation order
    numerators = torch._foreach_mul(torch._foreach_mul(g, 1.0 - smoothing), centred)
    products = torch._foreach_mul(torch._foreach_mul(rms, denoms), denoms)
    correction = _safe_div(numerators, products)
    return u, torch._foreach_sub(torch._foreach_reciprocal(denoms), correction)


def _adam(
    rule: BaseRule,
    params: TensorList,
    grads: TensorList,
    states: list[dict[str, Tensor]],
    group: dict[str, Any],
    ok: Tensor,
) -> tuple[TensorList, TensorList | None]:
    beta1, beta2 = group["betas"]
    kappa = 0.0 if rule.decoupled_weight_decay else group["weight_decay"]
    g = _l2(grads, params, kappa)
    steps = [s["step"] for s in states]
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    _add_(steps, ok)
    _ema_(exp_avgs, g, ok * (1.0 - beta1))
    _ema_square_(exp_avg_sqs, g, ok * (1.0 - beta2))
    bias1 = _bias_corrections(beta1, steps)
    bias2 = _bias_corrections(beta2, steps)
    rms = torch._foreach_div(_sqrt(exp_avg_sqs), _sqrt(bias2))  # sqrt(v̂)
    denoms = torch._foreach_add(rms, group["eps"])
    m_hat = torch._foreach_div(exp_avgs, bias1)
    u = torch._foreach_div(m_hat, denoms)
    if not has_decay(kappa):
        return u, None
    # adam_l2_slope: c1/(√v̂+ε) - c2 m̂ g̃ / (√v̂ (√v̂+ε)²)
    c1 = torch._foreach_div([ok.new_full((), 1.0 - beta1)] * len(steps), bias1)
    c2 = torch._foreach_div([ok.new_full((), 1.0 - beta2)] * len(steps), bias2)
    first = torch._foreach_div(c1, denoms)
    numerators = torch._foreach_mul(torch._foreach_mul(m_hat, c2), g)
    products = torch._foreach_mul(torch._foreach_mul(rms, denoms), denoms)
    return u, torch._foreach_sub(first, _safe_div(numerators, products))


def foreach_parameter_step(
    rule: BaseRule,
    params: TensorList,
    grads: TensorList,
    states: list[dict[str, Tensor]],
    group: dict[str, Any],
    finite: Tensor,
    ok: Tensor,
    alphas: TensorList,
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
        finite: 0-d bool, False on a step that is skipped.
        ok: ``finite`` as 0.0/1.0.
        alphas: effective step sizes ``lr * exp(β) * ok`` (0-d, or parameter-shaped).
        with_trace: whether the meta rule is active (the traces exist).
        decoupled: whether weight decay is decoupled for this rule and group.
    """
    grads = _where_finite(finite, grads)
    u, slopes = foreach_direction(rule, params, grads, states, group, ok)
    kappa = group["weight_decay"]
    if decoupled and kappa:
        delta = torch._foreach_add(u, params, alpha=kappa)
        torch._foreach_mul_(delta, torch._foreach_neg(alphas))
    else:
        delta = torch._foreach_mul(u, torch._foreach_neg(alphas))
    if with_trace:
        traces = [s["trace"] for s in states]
        gamma = 1.0 + ok * (group["gamma"] - 1.0)
        if has_decay(kappa):
            # 1 - α κ ∂u/∂g̃ (docs/math.md §4); ∂u/∂g̃ = 1 for decoupled decay.
            scaled = torch._foreach_mul(alphas, kappa)
            if not decoupled and slopes is not None:
                scaled = torch._foreach_mul(scaled, slopes)
            decays = torch._foreach_add(torch._foreach_neg(scaled), 1.0)
            torch._foreach_mul_(traces, torch._foreach_mul(decays, gamma))
        else:
            torch._foreach_mul_(traces, gamma)
        torch._foreach_add_(traces, delta)
    torch._foreach_add_(params, delta)
