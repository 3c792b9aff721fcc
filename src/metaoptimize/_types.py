"""The per-parameter entry of a step (the optimizer, the meta-gradient and the kernels)."""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["Entry"]


class Entry:
    """One parameter with a gradient, viewed as local tensors for this step."""

    __slots__ = ("block", "grad", "group", "param", "share", "state")

    def __init__(
        self,
        group: dict[str, Any],
        param: Tensor,
        grad: Tensor,
        state: dict[str, Any],
        block: int,
        share: float,
    ) -> None:
        self.group, self.param, self.grad = group, param, grad
        self.state, self.block, self.share = state, block, share
