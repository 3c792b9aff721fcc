"""Meta-learned weight decay: the meta-gradient of log(weight decay) against autograd."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.func import functional_call

from cases import BASES
from helpers import DTYPE, TinyNet, batches, loss_fn, train
from metaoptimize import MetaOptimize
from metaoptimize.reference import reference_base_step

KAPPA0, ALPHA0, ETA = 0.05, 0.05, 0.3


def _flat(sizes: dict[str, Tensor]) -> Tensor:
    return torch.cat([v.reshape(-1) for v in sizes.values()])


@pytest.mark.parametrize("mode", ["scalar", "tensor"])
@pytest.mark.parametrize(("base", "extra"), BASES, ids=lambda x: str(x))
def test_gamma_zero_weight_decay_meta_gradient_is_autograd(
    base: str, extra: dict[str, Any], mode: str
) -> None:
    """γ=0, meta sgd: θ₂ = θ₀ - η d f₁(w₁(θ))/dθ with θ = log κ."""
    model = TinyNet()
    data = batches(2)
    names = [n for n, _ in model.named_parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]
    opt = MetaOptimize(
        model.parameters(),
        base=base,
        meta="sgd",
        gamma=0.0,
        meta_lr=ETA,
        alpha0=ALPHA0,
        blocks=mode,
        weight_decay=KAPPA0,
        learn_weight_decay=True,
        **extra,
    )
    hp = dict(opt.param_groups[0])
    g0 = torch.autograd.grad(loss_fn(model, data[0]), list(model.parameters()))
    count = 1 if mode == "scalar" else len(w0)
    theta = torch.full((count,), math.log(KAPPA0), dtype=DTYPE, requires_grad=True)
    w1 = []
    for i, (w, g) in enumerate(zip(w0, g0, strict=True)):
        leaf_hp = {**hp, "weight_decay": torch.exp(theta[0 if mode == "scalar" else i])}
        alpha = torch.tensor(ALPHA0, dtype=DTYPE)
        w1.append(reference_base_step(base, w, g, {}, 0, alpha, leaf_hp)[0])
    f1 = loss_fn(lambda x: functional_call(model, dict(zip(names, w1, strict=True)), (x,)), data[1])
    (grad_theta,) = torch.autograd.grad(f1, [theta])
    expected = (theta - ETA * grad_theta).detach()
    for batch in data:
        opt.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        opt.step()
    got = _flat(opt.weight_decays()).log()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)
    # Normalised bases (Adam, RMSprop) barely feel an L2 change on their first step (u is
    # nearly g/|g|), so the move can be ~1e-9; it is still far above the 1e-12 tolerance.
    assert (expected - math.log(KAPPA0)).abs().max() > 1e-11


EXACT_ON_LINEAR = [
    ("sgd", {}),
    ("sgdm", {"base_style": "paper", "momentum": 0.9}),
    ("adamw", {}),
    ("lion", {}),
    ("rmsprop", {"base_style": "paper", "betas": (0.9,)}),
]


@pytest.mark.parametrize(("base", "extra"), EXACT_ON_LINEAR, ids=lambda x: str(x))
def test_weight_decay_trace_equals_discounted_unrolled_derivative(
    base: str, extra: dict[str, Any]
) -> None:
    """On linear losses (no Hessian) z^κ_τ = Σ_t γ^{τ-1-t} ∂f_τ(w_τ)/∂θ_t, exactly."""
    steps, gamma = 6, 0.7
    generator = torch.Generator().manual_seed(3)
    shapes = [(3, 4), (3,)]
    init = [torch.randn(s, generator=generator, dtype=DTYPE) for s in shapes]
    slopes = [
        [torch.randn(s, generator=generator, dtype=DTYPE) for s in shapes] for _ in range(steps)
    ]
    params = [torch.nn.Parameter(w.clone()) for w in init]
    opt = MetaOptimize(
        params,
        base=base,
        meta="sgd",
        meta_lr=ETA,
        gamma=gamma,
        alpha0=ALPHA0,
        weight_decay=KAPPA0,
        learn_weight_decay=True,
        blocks="tensor",
        **extra,
    )
    hp = dict(opt.param_groups[0])
    used_alpha, used_theta, after_theta = [], [], []
    for t in range(steps):
        used_alpha.append(_flat(opt.step_sizes()).log())
        used_theta.append(_flat(opt.weight_decays()).log())
        for p, c in zip(params, slopes[t], strict=True):
            p.grad = c.clone()
        opt.step()
        after_theta.append(_flat(opt.weight_decays()).log())
    for tau in range(1, steps):
        thetas = [used_theta[t].clone().requires_grad_(True) for t in range(tau)]
        w = list(init)
        states: list[dict[str, Tensor]] = [{} for _ in init]
        for t in range(tau):
            for i in range(len(w)):
                leaf_hp = {**hp, "weight_decay": torch.exp(thetas[t][i])}
                w[i], states[i] = reference_base_step(
                    base, w[i], slopes[t][i], states[i], t, torch.exp(used_alpha[t][i]), leaf_hp
                )
        f_tau = sum((c * wi).sum() for c, wi in zip(slopes[tau], w, strict=True))
        expected = torch.zeros(len(init), dtype=DTYPE)
        for t in range(tau):
            (grad,) = torch.autograd.grad(f_tau, [thetas[t]], retain_graph=True)
            expected += gamma ** (tau - 1 - t) * grad
        measured = (used_theta[tau] - after_theta[tau]) / ETA
        torch.testing.assert_close(measured, expected, rtol=1e-9, atol=1e-12)


def test_learned_weight_decay_resumes_bitwise_and_validates() -> None:
    kwargs = {
        "base": "adamw",
        "meta": "adam",
        "alpha0": 0.01,
        "meta_lr": 0.05,
        "weight_decay": 0.1,
        "learn_weight_decay": True,
        "blocks": "group",
    }
    data = batches(12)
    model = TinyNet()
    groups = lambda m: [
        {"params": list(m.hidden.parameters())},
        {"params": list(m.out.parameters())},
    ]
    opt = MetaOptimize(groups(model), **kwargs)
    train(model, opt, data)
    first = TinyNet()
    first_opt = MetaOptimize(groups(first), **kwargs)
    train(first, first_opt, data[:6])
    buffer = io.BytesIO()
    torch.save({"m": first.state_dict(), "o": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second = TinyNet(seed=3)
    second.load_state_dict(saved["m"])
    second_opt = MetaOptimize(groups(second), **kwargs)
    second_opt.load_state_dict(saved["o"])
    train(second, second_opt, data[6:])
    for a, b in zip(model.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(_flat(opt.weight_decays()), _flat(second_opt.weight_decays()))
    assert not torch.allclose(_flat(opt.weight_decays()), torch.full((2,), 0.1, dtype=DTYPE))
    with pytest.raises(ValueError, match=r"saved with learn_weight_decay=True"):
        MetaOptimize(groups(TinyNet()), **{**kwargs, "learn_weight_decay": False}).load_state_dict(
            saved["o"]
        )


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"meta": "fixed"}, r"Invalid learn_weight_decay: it needs an active meta rule"),
        ({"blocks": "weight"}, r"Invalid learn_weight_decay: not supported with blocks='weight'"),
        ({"weight_decay": 0.0}, r"Invalid weight_decay: 0\.0; learn_weight_decay needs"),
        ({"weight_decay_meta_lr": -1.0}, r"Invalid weight_decay_meta_lr"),
    ],
)
def test_invalid_weight_decay_learning(kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        MetaOptimize(
            TinyNet().parameters(), **{"weight_decay": 0.1, "learn_weight_decay": True, **kwargs}
        )


def test_weight_decays_needs_learning() -> None:
    with pytest.raises(RuntimeError, match=r"the weight decay is not learned"):
        MetaOptimize(TinyNet().parameters()).weight_decays()
