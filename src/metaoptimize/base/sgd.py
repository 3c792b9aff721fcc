"""SGD and SGD with momentum, per tensor and per list of tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from metaoptimize.base._rule import (
    BaseRule,
    Group,
    Scalars,
    Slope,
    TensorList,
    foreach_add_,
    foreach_ema_,
    foreach_l2,
    has_decay,
    l2,
    operand,
    step_counts,
    step_state,
    zeros_state,
)

__all__: list[str] = []  # the rules are reached through the registry


class SGD(BaseRule):
    """Plain SGD, ``u = g + κ w`` (torch.optim.SGD with momentum 0)."""

    name = "sgd"
    default_alpha_range = (1e-12, 1e6)
    decoupled_weight_decay = False
    unsupported = ("momentum", "dampening", "nesterov", "centered")

    def init_state(self, param: Tensor, group: Group) -> dict[str, Tensor]:
        return {}

    def direction(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[Tensor, Slope]:
        kappa = group["weight_decay"]
        if not has_decay(kappa):
            return l2(grad, param, kappa), None
        return l2(grad, param, kappa), (1.0 if isinstance(ok, float) else ok.new_ones(()))

    def foreach_direction(
        self,
        params: TensorList,
        grads: TensorList,
        states: list[dict[str, Tensor]],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[TensorList, Scalars | None]:
        kappa = group["weight_decay"]
        if not kappa:
            return grads, None
        ones: Scalars = [1.0] * len(params)
        if not isinstance(ok, float):
            ones = [ok.new_ones(())] * len(params)
        return foreach_l2(grads, params, kappa), ones


class SGDMomentum(BaseRule):
    """SGD with heavy-ball or Nesterov momentum.

    ``base_style="torch"`` (default) equals torch.optim.SGD: ``b ← μ b + (1-d) g̃`` with
    ``b₁ = g̃``, L2 weight decay, optional Nesterov. ``base_style="paper"`` is the paper's
    Algorithm 3: an EMA ``m ← ρ m + (1-ρ) g`` whose *previous* value drives the step (lagged by
    one step) and decoupled weight decay.
    """

    name = "sgdm"
    decoupled_in_paper_style = True
    default_alpha_range = (1e-12, 1e6)
    decoupled_weight_decay = False
    default_momentum = 0.9

    def check_group(self, group: Group) -> None:
        momentum, dampening = group["momentum"], group["dampening"]
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}; base 'sgdm' needs 0 < momentum < 1")
        if group["centered"]:
            raise ValueError("Invalid centered: True; base 'sgdm' has no centered variant")
        if group["base_style"] == "paper":
            if dampening != 0.0 or group["nesterov"]:
                raise ValueError(
                    "Invalid dampening/nesterov: base_style='paper' SGDm is an EMA without "
                    "dampening or Nesterov"
                )
        elif group["nesterov"] and dampening != 0.0:
            raise ValueError("Invalid nesterov: Nesterov momentum requires dampening=0")

    def init_state(self, param: Tensor, group: Group) -> dict[str, Tensor]:
        return {"step": step_state(param), "momentum_buffer": zeros_state(param)}

    def direction(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[Tensor, Slope]:
        mu, buf = group["momentum"], state["momentum_buffer"]
        if group["base_style"] == "paper":
            lagged = buf.clone()  # the paper steps with m_t, then updates m
            buf.lerp_(grad, ok * (1.0 - mu))
            return lagged, None
        kappa = group["weight_decay"]
        g = l2(grad, param, kappa)
        step = state["step"]
        # torch.optim.SGD starts the buffer at g̃ (no dampening on the first step).
        coef: Tensor | float
        if isinstance(ok, float):
            host_coef = 1.0 - group["dampening"] * float(step.item() > 0)
            buf.mul_(1.0 + ok * (mu - 1.0)).add_(g, alpha=ok * host_coef)
            coef = host_coef
        else:
            coef = 1.0 - group["dampening"] * (step > 0).to(step.dtype)
            buf.mul_(1.0 + ok * (mu - 1.0)).add_(g * (ok * coef))
        step.add_(ok)
        if group["nesterov"]:
            return g.add(buf, alpha=mu), (1.0 + mu * coef if has_decay(kappa) else None)
        return buf, (coef if has_decay(kappa) else None)

    def foreach_direction(
        self,
        params: TensorList,
        grads: TensorList,
        states: list[dict[str, Tensor]],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[TensorList, Scalars | None]:
        mu = group["momentum"]
        bufs = [s["momentum_buffer"] for s in states]
        if group["base_style"] == "paper":
            lagged = torch._foreach_mul(bufs, 1.0)  # copies: the step uses m_t
            foreach_ema_(bufs, grads, ok * (1.0 - mu))
            return lagged, None
        kappa = group["weight_decay"]
        g = foreach_l2(grads, params, kappa)
        steps = [s["step"] for s in states]
        dampening = group["dampening"]
        # torch.optim.SGD starts the buffer at g̃ (no dampening on the first step).
        coefs: Scalars
        torch._foreach_mul_(bufs, operand(1.0 + ok * (mu - 1.0), bufs))
        if isinstance(ok, float):
            host_coefs = [1.0 - dampening * float(t > 0) for t in step_counts(steps, ok)]
            torch._foreach_add_(
                bufs, torch._foreach_mul(g, operand([c * ok for c in host_coefs], g))
            )
            coefs = host_coefs
        else:
            started = torch.stack(steps) > 0
            coef_tensors = list((1.0 - dampening * started.to(ok.dtype)).unbind())
            torch._foreach_add_(bufs, torch._foreach_mul(g, torch._foreach_mul(coef_tensors, ok)))
            coefs = coef_tensors
        foreach_add_(steps, ok)
        slopes: Scalars | None = coefs if kappa else None
        if group["nesterov"]:
            if kappa and isinstance(ok, float):
                slopes = [1.0 + mu * float(c) for c in coefs]
            elif kappa:
                slopes = torch._foreach_add(torch._foreach_mul(coefs, mu), 1.0)  # type: ignore[arg-type]
            return torch._foreach_add(g, bufs, alpha=mu), slopes
        return bufs, slopes
