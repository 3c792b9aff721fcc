"""Shared test helpers: a small regression problem, trajectories, a plain Lion step."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

DTYPE = torch.float64


class TinyNet(nn.Module):
    """Two layers, four parameter tensors: enough for groups and blocks to matter."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.hidden = nn.Linear(5, 4).to(DTYPE)
        self.out = nn.Linear(4, 2).to(DTYPE)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=DTYPE) * 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def batches(count: int, seed: int = 1, size: int = 16) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(count):
        x = torch.randn(size, 5, generator=generator, dtype=DTYPE)
        y = torch.randn(size, 2, generator=generator, dtype=DTYPE)
        data.append((x, y))
    return data


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return (model(x) - y).square().mean()


def two_groups(
    model: TinyNet, first: dict[str, Any], second: dict[str, Any]
) -> list[dict[str, Any]]:
    return [
        {"params": list(model.hidden.parameters()), **first},
        {"params": list(model.out.parameters()), **second},
    ]


def train(
    model: nn.Module,
    opt: Any,
    data: Sequence[tuple[Tensor, Tensor]],
    on_step: Callable[[int], None] | None = None,
) -> None:
    for index, batch in enumerate(data):
        for p in model.parameters():
            p.grad = None
        loss_fn(model, batch).backward()
        opt.step()
        if on_step is not None:
            on_step(index)


def step_together(
    pairs: Sequence[tuple[nn.Module, Any]],
    batch: tuple[Tensor, Tensor],
    tamper: Callable[[nn.Module], None] | None = None,
) -> None:
    """One training step of every (model, optimizer) pair on the same batch.

    ``tamper(model)`` edits the fresh gradients before the optimizer steps.
    """
    for model, opt in pairs:
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        if tamper is not None:
            tamper(model)
        opt.step()


def nan_out_bias(model: nn.Module) -> None:
    """A non-finite gradient entry: the step must be skipped."""
    model.out.bias.grad[0] = float("nan")


def params_of(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def clone_model(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def flat_step_sizes(opt: Any) -> Tensor:
    sizes = opt.step_sizes()
    if isinstance(sizes, Tensor):
        return sizes.flatten()
    return torch.cat([v.flatten() for v in sizes.values()])


class PlainLion(torch.optim.Optimizer):
    """Lion exactly as in Chen et al. 2023 (Algorithm 2), for the meta-off oracle."""

    def __init__(
        self,
        params: Any,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(beta1 * m + (1 - beta1) * p.grad), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
