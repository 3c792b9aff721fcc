"""Adam and AdamW, per tensor and per list of tensors."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor

from metaoptimize._math import ema_square_, host_constant, sqrt
from metaoptimize.base._rule import (
    BaseRule,
    Group,
    Quotient,
    Scalars,
    Slope,
    TensorList,
    bias_corrections,
    foreach_add_,
    foreach_bias_corrections,
    foreach_ema_,
    foreach_ema_square_,
    foreach_l2,
    foreach_safe_div,
    foreach_sqrt_scalars,
    has_decay,
    l2,
    operand,
    safe_div,
    sqrt_scalar,
    step_counts,
    step_state,
    zeros_state,
)

__all__ = ["adam_l2_slope"]


def adam_l2_slope(
    g: Tensor,
    m_hat: Tensor,
    rms: Tensor,
    denom: Tensor,
    c1: Tensor | float,
    c2: Tensor | float,
) -> Tensor:
    """∂u/∂g̃ of Adam, u = m̂/(√v̂+ε): c1/(√v̂+ε) - c2 m̂ g̃/(√v̂ (√v̂+ε)²), docs/math.md §4."""
    return c1 / denom - safe_div(c2 * m_hat * g, rms * denom * denom)


class Adam(BaseRule):
    """Adam with L2 weight decay, equal to torch.optim.Adam (amsgrad=False)."""

    name = "adam"
    decoupled_weight_decay = False
    default_betas = (0.9, 0.999)
    unsupported = ("momentum", "dampening", "nesterov", "centered")

    def init_state(self, param: Tensor, group: Group) -> dict[str, Tensor]:
        return {
            "step": step_state(param),
            "exp_avg": zeros_state(param),
            "exp_avg_sq": zeros_state(param),
        }

    def direction(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[Tensor | Quotient, Slope]:
        beta1, beta2 = group["betas"]
        kappa = group["weight_decay"] if not self.decoupled_weight_decay else 0.0
        g = l2(grad, param, kappa)
        step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
        step.add_(ok if isinstance(ok, Tensor) else host_constant(ok, step))
        exp_avg.lerp_(g, ok * (1.0 - beta1))
        ema_square_(exp_avg_sq, g, ok * (1.0 - beta2))
        bias1, bias2 = bias_corrections((beta1, beta2), step, ok)
        if isinstance(bias1, float) and isinstance(bias2, float):  # host scalars
            if not has_decay(kappa):
                # u = m̂/(√v̂+ε) = (√c2/c1) m / (√v + ε√c2), c = bias corrections, left as a
                # quotient: the optimizer scales it once, with α, and each call on a small
                # tensor costs more than its arithmetic (each large allocation, page faults).
                root2 = math.sqrt(bias2)
                eps = host_constant(group["eps"], exp_avg_sq)
                denom = sqrt(exp_avg_sq).add_(eps, alpha=root2)
                return Quotient([exp_avg], [denom], [root2 / bias1]), None
            # With L2: ∂u/∂g̃ = (c1 - c2 m̂ g̃ / (√v̂ (√v̂+ε))) / (√v̂+ε), docs/math.md §4, built
            # in the L2 gradient's own temporary; with √v̂+ε and u, three large temporaries
            # where the general form takes eight. 0/0 (v̂ = 0) is taken as 0.
            rms = sqrt(exp_avg_sq).div_(math.sqrt(bias2))
            slope = g.mul_(exp_avg).div_(rms)  # m g̃ / √v̂; g̃ is not needed again
            denom = rms.add_(group["eps"])
            u = exp_avg.div(denom).div_(bias1)
            c1, c2 = (1.0 - beta1) / bias1, (1.0 - beta2) / bias2
            slope.div_(denom).mul_(-c2 / bias1).nan_to_num_(0.0, 0.0, 0.0)
            return u, slope.add_(c1).div_(denom)
        rms = sqrt(exp_avg_sq).div_(sqrt_scalar(bias2))  # sqrt(v̂), on a fresh tensor
        if not has_decay(kappa):
            # u = m̂/(√v̂+ε) built in that one temporary.
            return rms.add_(group["eps"]).reciprocal_().mul_(exp_avg).div_(bias1), None
        denom = rms + group["eps"]
        # ∂u/∂g̃ = c1/(√v̂+ε) - c2 m̂ g̃ / (√v̂ (√v̂+ε)²), c1 = (1-β1)/bc1, c2 = (1-β2)/bc2.
        c1, c2 = (1.0 - beta1) / bias1, (1.0 - beta2) / bias2
        m_hat = exp_avg / bias1
        u = m_hat / denom
        return u, adam_l2_slope(g, m_hat, rms, denom, c1, c2)

    def foreach_direction(
        self,
        params: TensorList,
        grads: TensorList,
        states: list[dict[str, Tensor]],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[TensorList | Quotient, Scalars | None]:
        beta1, beta2 = group["betas"]
        kappa = 0.0 if self.decoupled_weight_decay else group["weight_decay"]
        g = foreach_l2(grads, params, kappa)
        steps = [s["step"] for s in states]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        foreach_add_(steps, ok)
        foreach_ema_(exp_avgs, g, ok * (1.0 - beta1))
        foreach_ema_square_(exp_avg_sqs, g, ok * (1.0 - beta2))
        counts = step_counts(steps, ok)
        bias1 = foreach_bias_corrections(beta1, counts)
        bias2 = foreach_bias_corrections(beta2, counts)
        rms = torch._foreach_sqrt(exp_avg_sqs)
        if not has_decay(kappa) and isinstance(ok, float):
            # u = m (√c2/c1) / (√v + ε√c2), as the per-tensor host path, left as a quotient.
            roots2 = cast("list[float]", foreach_sqrt_scalars(bias2))
            eps = group["eps"]
            torch._foreach_add_(rms, operand([eps * r for r in roots2], rms))
            scales = [r / b for r, b in zip(roots2, cast("list[float]", bias1), strict=True)]
            return Quotient(exp_avgs, rms, scales), None
        torch._foreach_div_(rms, foreach_sqrt_scalars(bias2))  # sqrt(v̂)
        denoms = torch._foreach_add(rms, group["eps"])
        m_hat = torch._foreach_div(exp_avgs, bias1)
        u = torch._foreach_div(m_hat, denoms)
        if not has_decay(kappa):
            return u, None
        # adam_l2_slope: c1/(√v̂+ε) - c2 m̂ g̃ / (√v̂ (√v̂+ε)²)
        c1: Scalars
        c2: Scalars
        if isinstance(ok, float):
            c1 = [(1.0 - beta1) / float(b) for b in bias1]
            c2 = [(1.0 - beta2) / float(b) for b in bias2]
            first = torch._foreach_mul(torch._foreach_reciprocal(denoms), c1)
        else:
            c1 = torch._foreach_div([ok.new_full((), 1.0 - beta1)] * len(steps), bias1)
            c2 = torch._foreach_div([ok.new_full((), 1.0 - beta2)] * len(steps), bias2)
            first = torch._foreach_div(c1, denoms)
        numerators = torch._foreach_mul(torch._foreach_mul(m_hat, c2), g)
        products = torch._foreach_mul(torch._foreach_mul(rms, denoms), denoms)
        return u, torch._foreach_sub(first, foreach_safe_div(numerators, products))


class AdamW(Adam):
    """Adam with decoupled weight decay, equal to torch.optim.AdamW (amsgrad=False)."""

    name = "adamw"
    decoupled_weight_decay = True
