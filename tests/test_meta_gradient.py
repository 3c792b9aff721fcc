"""The meta-gradient is the true derivative (autograd through unrolled base steps, float64)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.func import functional_call

from cases import BASES
from helpers import DTYPE, TinyNet, batches, loss_fn
from metaoptimize import MetaOptimize
from metaoptimize.reference import reference_base_step

ALPHA0 = 0.05
META_LR = 0.3


def _step_size_params(mode: str, params: list[Tensor]) -> list[Tensor]:
    """Leaf log step sizes for a block mode, initialised at log(ALPHA0)."""
    if mode == "scalar":
        shapes: list[torch.Size] = [torch.Size([])]
    elif mode == "tensor":
        shapes = [torch.Size([]) for _ in params]
    else:
        shapes = [p.shape for p in params]
    return [torch.full(s, math.log(ALPHA0), dtype=DTYPE, requires_grad=True) for s in shapes]


def _alpha_of(mode: str, betas: list[Tensor], index: int) -> Tensor:
    return torch.exp(betas[0] if mode == "scalar" else betas[index])


def _flat_log_sizes(opt: MetaOptimize) -> Tensor:
    return torch.cat([v.log().flatten() for v in opt.step_sizes().values()])


@pytest.mark.parametrize("mode", ["scalar", "tensor", "weight"])
@pytest.mark.parametrize(("base", "extra"), BASES, ids=lambda x: str(x))
def test_gamma_zero_meta_gradient_is_autograd_of_next_loss(
    base: str, extra: dict[str, Any], mode: str
) -> None:
    """γ=0, meta sgd: β_2 = β_0 - η d f_1(w_1(β)) / dβ, w_1 the first base step."""
    model = TinyNet()
    data = batches(2)
    names = [n for n, _ in model.named_parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = MetaOptimize(
        model.parameters(),
        base=base,
        meta="sgd",
        gamma=0.0,
        meta_lr=META_LR,
        alpha0=ALPHA0,
        blocks=mode,
        weight_decay=0.1,
        **extra,
    )
    hp = opt.param_groups[0]  # resolved hyperparameters (betas, momentum, ...)

    g0 = torch.autograd.grad(loss_fn(model, data[0]), list(model.parameters()))
    betas = _step_size_params(mode, w0)
    w1 = [
        reference_base_step(base, w, g, {}, 0, _alpha_of(mode, betas, i), hp)[0]
        for i, (w, g) in enumerate(zip(w0, g0, strict=True))
    ]
    f1 = loss_fn(lambda x: functional_call(model, dict(zip(names, w1, strict=True)), (x,)), data[1])
    grads = torch.autograd.grad(f1, betas)
    expected = torch.cat(
        [(b - META_LR * g).detach().flatten() for b, g in zip(betas, grads, strict=True)]
    )

    for batch in data:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()
    torch.testing.assert_close(_flat_log_sizes(opt), expected, rtol=1e-12, atol=1e-13)
    assert (expected - math.log(ALPHA0)).abs().max() > 1e-4  # the step size really moved


# Bases whose state does not depend on the weights on a linear loss, so the Hessian-free trace
# is exact there: weight decay must be decoupled (or absent, or plain SGD's L2).
EXACT_ON_LINEAR = [
    ("sgd", {}, 0.1),
    ("sgdm", {"momentum": 0.8}, 0.0),
    ("sgdm", {"momentum": 0.9, "nesterov": True}, 0.0),
    ("sgdm", {"base_style": "paper", "momentum": 0.9}, 0.1),
    ("rmsprop", {"betas": (0.9,), "centered": True, "momentum": 0.5}, 0.0),
    ("rmsprop", {"base_style": "paper", "betas": (0.9,)}, 0.1),
    ("adam", {}, 0.0),
    ("adamw", {"betas": (0.8, 0.95)}, 0.1),
    ("lion", {}, 0.1),
]


@pytest.mark.parametrize("gamma", [0.5, 1.0])
@pytest.mark.parametrize("mode", ["scalar", "tensor", "weight"])
@pytest.mark.parametrize(("base", "extra", "wd"), EXACT_ON_LINEAR, ids=lambda x: str(x))
def test_trace_equals_discounted_unrolled_derivative(
    base: str, extra: dict[str, Any], wd: float, mode: str, gamma: float
) -> None:
    """z_τ = Σ_{t<τ} γ^{τ-1-t} ∂f_τ(w_τ)/∂β_t, by autograd through τ unrolled base steps.

    Each β_t is its own leaf (the paper's L-approximation: β's own dynamics are not
    differentiated), holding the values the optimizer actually used.
    """
    steps = 6
    generator = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (3,)]
    init = [torch.randn(s, generator=generator, dtype=DTYPE) for s in shapes]
    slopes = [
        [torch.randn(s, generator=generator, dtype=DTYPE) for s in shapes] for _ in range(steps)
    ]  # f_t(w) = Σ <c_t, w>, gradient c_t

    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = MetaOptimize(
        params,
        base=base,
        meta="sgd",
        meta_lr=META_LR,
        gamma=gamma,
        alpha0=ALPHA0,
        blocks=mode,
        weight_decay=wd,
        **extra,
    )
    hp = opt.param_groups[0]
    used_log_sizes, after = [], []
    for t in range(steps):
        used_log_sizes.append(_flat_log_sizes(opt))
        for p, c in zip(params, slopes[t], strict=True):
            p.grad = c.clone()
        opt.step()
        after.append(_flat_log_sizes(opt))
    measured_z = [
        (before - new) / META_LR for before, new in zip(used_log_sizes, after, strict=True)
    ]

    for tau in range(1, steps):
        leaves = [_unflatten(mode, used_log_sizes[t], init) for t in range(tau)]
        w = list(init)
        states: list[dict[str, Tensor]] = [{} for _ in init]
        for t in range(tau):
            for i in range(len(w)):
                w[i], states[i] = reference_base_step(
                    base, w[i], slopes[t][i], states[i], t, _alpha_of(mode, leaves[t], i), hp
                )
        f_tau = sum((c * wi).sum() for c, wi in zip(slopes[tau], w, strict=True))
        expected = torch.zeros_like(measured_z[tau])
        for t in range(tau):
            grads = torch.autograd.grad(f_tau, leaves[t], retain_graph=True)
            expected += gamma ** (tau - 1 - t) * torch.cat([g.flatten() for g in grads])
        torch.testing.assert_close(measured_z[tau], expected, rtol=1e-9, atol=1e-12)


def _unflatten(mode: str, flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    if mode == "scalar":
        return [flat[0].clone().requires_grad_(True)]
    if mode == "tensor":
        return [v.clone().requires_grad_(True) for v in flat]
    pieces, offset = [], 0
    for w in like:
        pieces.append(flat[offset : offset + w.numel()].view_as(w).clone().requires_grad_(True))
        offset += w.numel()
    return pieces
