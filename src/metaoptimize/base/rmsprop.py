"""RMSProp, per tensor and per list of tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from metaoptimize._math import ema_square_, sqrt
from metaoptimize.base._rule import (
    BaseRule,
    Group,
    Scalars,
    Slope,
    TensorList,
    bias_correction,
    foreach_add_,
    foreach_bias_corrections,
    foreach_ema_,
    foreach_ema_square_,
    foreach_l2,
    foreach_safe_div,
    has_decay,
    l2,
    lean_slope,
    operand,
    safe_div,
    step_counts,
    step_state,
    zeros_state,
)

__all__ = ["rmsprop_l2_slope"]


def rmsprop_l2_slope(
    g: Tensor,
    centred_g: Tensor,
    rms: Tensor,
    denom: Tensor,
    smoothing: float,
    *,
    host: bool = False,
) -> Tensor:
    """∂u/∂g̃ of RMSProp, u = g̃/(s+ε), s = sqrt(v - ḡ²): docs/math.md §4."""
    if host:
        return lean_slope(g, centred_g, 1.0 - smoothing, rms, denom, 1.0)
    return 1.0 / denom - safe_div((1.0 - smoothing) * g * centred_g, rms * denom * denom)


class RMSprop(BaseRule):
    """RMSProp.

    ``base_style="torch"`` (default) equals torch.optim.RMSprop (smoothing ``betas[0]``, eps
    outside the square root, optional ``centered`` and ``momentum``, L2 weight decay).
    ``base_style="paper"`` follows the released code: a bias-corrected average
    ``v̂ = v/(1-λ^t)``, ``u = g/(√v̂ + ε)`` and decoupled weight decay.
    """

    name = "rmsprop"
    decoupled_in_paper_style = True
    decoupled_weight_decay = False
    default_betas = (0.99,)
    default_momentum = 0.0

    def check_group(self, group: Group) -> None:
        if group["momentum"] < 0.0 or group["momentum"] >= 1.0:
            raise ValueError(f"Invalid momentum: {group['momentum']}; need 0 <= momentum < 1")
        if group["nesterov"] or group["dampening"] != 0.0:
            raise ValueError("Invalid nesterov/dampening: base 'rmsprop' does not use them")
        if group["base_style"] == "paper" and (group["momentum"] or group["centered"]):
            raise ValueError(
                "Invalid momentum/centered: base_style='paper' RMSProp has neither momentum "
                "nor a centered variant"
            )

    def init_state(self, param: Tensor, group: Group) -> dict[str, Tensor]:
        state = {"step": step_state(param), "square_avg": zeros_state(param)}
        if group["centered"]:
            state["grad_avg"] = zeros_state(param)
        if group["momentum"] > 0.0:
            state["momentum_buffer"] = zeros_state(param)
        return state

    def direction(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[Tensor, Slope]:
        (smoothing,) = group["betas"]
        eps, kappa = group["eps"], group["weight_decay"]
        square_avg, step = state["square_avg"], state["step"]
        step.add_(ok)
        if group["base_style"] == "paper":
            ema_square_(square_avg, grad, ok * (1.0 - smoothing))
            rms = sqrt(square_avg / bias_correction(smoothing, step, ok), inplace=True)
            return grad / rms.add_(eps), None
        g = l2(grad, param, kappa)
        ema_square_(square_avg, g, ok * (1.0 - smoothing))
        if has_decay(kappa) and isinstance(ok, float) and not group["centered"]:
            # Host scalars with L2: ∂u/∂g̃ = (1 - (1-a) g̃² / (s (s+ε))) / (s+ε), s = √v
            # (docs/math.md §4), with u built in the L2 gradient's own temporary: three large
            # temporaries where the general form takes five. 0/0 (v = 0) is taken as 0.
            rms = sqrt(square_avg)
            slope = torch.mul(g, g).mul_(1.0 - smoothing).div_(rms)
            denom = rms.add_(eps)
            u = self._with_momentum(g.div_(denom), state, group, ok)
            slope.div_(denom).nan_to_num_(0.0, 0.0, 0.0).neg_().add_(1.0)
            return u, slope.div_(denom)
        if group["centered"]:
            grad_avg = state["grad_avg"]
            grad_avg.lerp_(g, ok * (1.0 - smoothing))
            rms = sqrt(square_avg.addcmul(grad_avg, grad_avg, value=-1.0), inplace=True)
        else:
            grad_avg = None
            rms = sqrt(square_avg)
        denom = rms + eps
        u = self._with_momentum(g / denom, state, group, ok)
        if not has_decay(kappa):
            return u, None
        # ∂(g̃/(s+ε))/∂g̃ with s = sqrt(v - ḡ²), ∂s/∂g̃ = (1-a)(g̃ - ḡ)/s.
        centred_g = g if grad_avg is None else g - grad_avg
        host = isinstance(ok, float)
        return u, rmsprop_l2_slope(g, centred_g, rms, denom, smoothing, host=host)

    @staticmethod
    def _with_momentum(
        u: Tensor, state: dict[str, Tensor], group: Group, ok: Tensor | float
    ) -> Tensor:
        """``u`` through the momentum buffer, when the group has momentum."""
        if group["momentum"] <= 0.0:
            return u
        buf = state["momentum_buffer"]
        buf.mul_(1.0 + ok * (group["momentum"] - 1.0))
        buf.add_(u, alpha=ok) if isinstance(ok, float) else buf.add_(u * ok)
        return buf

    def foreach_direction(
        self,
        params: TensorList,
        grads: TensorList,
        states: list[dict[str, Tensor]],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[TensorList, Scalars | None]:
        (smoothing,) = group["betas"]
        eps, kappa = group["eps"], group["weight_decay"]
        square_avgs = [s["square_avg"] for s in states]
        steps = [s["step"] for s in states]
        foreach_add_(steps, ok)
        if group["base_style"] == "paper":
            foreach_ema_square_(square_avgs, grads, ok * (1.0 - smoothing))
            rms = torch._foreach_sqrt(
                torch._foreach_div(
                    square_avgs, foreach_bias_corrections(smoothing, step_counts(steps, ok))
                )
            )
            return torch._foreach_div(grads, torch._foreach_add(rms, eps)), None
        g = foreach_l2(grads, params, kappa)
        foreach_ema_square_(square_avgs, g, ok * (1.0 - smoothing))
        grad_avgs: TensorList | None = None
        if group["centered"]:
            grad_avgs = [s["grad_avg"] for s in states]
            foreach_ema_(grad_avgs, g, ok * (1.0 - smoothing))
            rms = torch._foreach_sqrt(
                torch._foreach_addcmul(square_avgs, grad_avgs, grad_avgs, value=-1.0)
            )
        else:
            rms = torch._foreach_sqrt(square_avgs)
        denoms = torch._foreach_add(rms, eps)
        u: TensorList = torch._foreach_div(g, denoms)
        if group["momentum"] > 0.0:
            bufs = [s["momentum_buffer"] for s in states]
            torch._foreach_mul_(bufs, operand(1.0 + ok * (group["momentum"] - 1.0), bufs))
            torch._foreach_add_(bufs, torch._foreach_mul(u, ok))
            u = bufs
        if not kappa:
            return u, None
        centred = g if grad_avgs is None else torch._foreach_sub(g, grad_avgs)
        # rmsprop_l2_slope: 1/(s+ε) - (1-a) g̃ (g̃-ḡ) / (s (s+ε)²), in the same operation order
        numerators = torch._foreach_mul(torch._foreach_mul(g, 1.0 - smoothing), centred)
        products = torch._foreach_mul(torch._foreach_mul(rms, denoms), denoms)
        correction = foreach_safe_div(numerators, products)
        return u, torch._foreach_sub(torch._foreach_reciprocal(denoms), correction)
