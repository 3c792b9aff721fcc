"""Lion, per tensor and per list of tensors."""

from __future__ import annotations

import torch
from torch import Tensor

from metaoptimize.base._rule import (
    BaseRule,
    Group,
    Scalars,
    Slope,
    TensorList,
    foreach_ema_,
    zeros_state,
)

__all__: list[str] = []  # the rule is reached through the registry


class Lion(BaseRule):
    """Lion (Chen et al. 2023): ``u = sign(β1 m + (1-β1) g)``, then ``m ← β2 m + (1-β2) g``.

    The paper writes ``c`` for β1 (interpolation) and ``ρ`` for β2 (momentum); defaults
    ``betas=(0.9, 0.99)``. Weight decay is decoupled.
    """

    name = "lion"
    decoupled_weight_decay = True
    default_betas = (0.9, 0.99)
    unsupported = ("momentum", "dampening", "nesterov", "centered")

    def init_state(self, param: Tensor, group: Group) -> dict[str, Tensor]:
        return {"exp_avg": zeros_state(param)}

    def direction(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[Tensor, Slope]:
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"]
        u = exp_avg.lerp(grad, 1.0 - beta1).sign_()
        exp_avg.lerp_(grad, ok * (1.0 - beta2))
        return u, None

    def foreach_direction(
        self,
        params: TensorList,
        grads: TensorList,
        states: list[dict[str, Tensor]],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[TensorList, Scalars | None]:
        beta1, beta2 = group["betas"]
        exp_avgs = [s["exp_avg"] for s in states]
        u = torch._foreach_sign(torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1))
        foreach_ema_(exp_avgs, grads, ok * (1.0 - beta2))
        return u, None
