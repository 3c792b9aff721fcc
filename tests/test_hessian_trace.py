"""trace="hessian": the trace equals autograd through unrolled steps, with the Hessian (float64).

The oracle (docs/math.md §13) perturbs β by ε_τ before step τ and differentiates the unrolled
system, in which the gradient ∇f_s(w_s) is a function of the weights (second derivatives
included) and the meta update uses z_s = C_sᵀ∇f_s(w_s) with C_s the optimizer's own recorded
trace, held constant (the 2×2 approximation drops ∂h/∂·). The L-approximation also holds
∇f_s constant inside z_s. Then, with the paper's initialisation Y₀ = I,

    [Y_t; X_t] = γ^t ∂(β_t, w_t)/∂ε_0 + Σ_{τ<t} (1-γ) γ^{t-1-τ} ∂(β_t, w_t)/∂ε_τ.
"""

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
from metaoptimize.base import is_decoupled
from metaoptimize.meta import get_meta_rule
from metaoptimize.reference import reference_base_step

STEPS = 3
ALPHA0 = 0.05


def _run(
    base: str, extra: dict[str, Any], meta: str, blocks: str, approximation: str, gamma: float
) -> tuple[MetaOptimize, TinyNet, list[list[Tensor]], list[Tensor]]:
    """Train STEPS steps; record the trace columns and Y before every step."""
    model = TinyNet()
    opt = MetaOptimize(
        model.parameters(),
        base=base,
        meta=meta,
        alpha0=ALPHA0,
        meta_lr=0.3 if meta == "sgd" else 0.05,
        gamma=gamma,
        blocks=blocks,
        weight_decay=0.1,
        trace="hessian",
        trace_approximation=approximation,
        **extra,
    )
    traces: list[list[Tensor]] = []
    ys: list[Tensor] = []
    columns = 1 if blocks in ("scalar", "weight") else len(list(model.parameters()))
    for batch in batches(STEPS):
        traces.append(
            [
                opt.state[p]["trace"].clone()
                if p in opt.state
                else torch.zeros(columns, *p.shape, dtype=DTYPE)
                for p in model.parameters()
            ]
        )
        if approximation == "2x2":
            ys.append(opt._hessian.meta_trace["log_alpha"].clone())
        opt.step(lambda batch=batch: loss_fn(model, batch))
    traces.append([opt.state[p]["trace"].clone() for p in model.parameters()])
    if approximation == "2x2":
        ys.append(opt._hessian.meta_trace["log_alpha"].clone())
    return opt, model, traces, ys


def _unrolled(
    opt: MetaOptimize,
    model: TinyNet,
    steps: int,
    blocks: str,
    approximation: str,
    recorded: list[list[Tensor]],
    eps: Tensor,
) -> Tensor:
    """(w_t, β_t) flattened, after ``steps`` steps of the unrolled system, as a function of ε."""
    base = opt._base.name
    hp = opt.param_groups[0]
    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone().requires_grad_() for p in TinyNet().parameters()]
    shapes = [p.shape for p in w]
    per_weight = blocks == "weight"
    if per_weight:
        beta: list[Tensor] = [torch.full(s, math.log(ALPHA0), dtype=DTYPE) for s in shapes]
    else:
        count = 1 if blocks == "scalar" else len(w)
        beta = [torch.full((count,), math.log(ALPHA0), dtype=DTYPE)]
    own = opt._step_size.rule
    rule = get_meta_rule(own.name, own.meta_lr, own.betas, own.eps)
    meta_state = [rule.init_state(b) for b in beta]
    base_state: list[dict[str, Tensor]] = [{} for _ in w]
    data = batches(STEPS)
    for s in range(steps):
        beta = [b + eps[s] for b in beta]  # ε_s: a shift of β_s before step s
        loss = loss_fn(
            lambda x, w=w: functional_call(model, dict(zip(names, w, strict=True)), (x,)), data[s]
        )
        grads = torch.autograd.grad(loss, w, create_graph=True)
        new_w = []
        for i, (wi, gi) in enumerate(zip(w, grads, strict=True)):
            log_alpha = beta[i] if per_weight else beta[0][0 if blocks == "scalar" else i]
            stepped, base_state[i] = reference_base_step(
                base, wi, gi, base_state[i], s, torch.exp(log_alpha), hp
            )
            new_w.append(stepped)
        # z_s = C_sᵀ ∇f_s(w_s) with the recorded trace C_s held constant.
        g_in_z = grads if approximation == "2x2" else [g.detach() for g in grads]
        if per_weight:
            z = [c[0] * g for c, g in zip(recorded[s], g_in_z, strict=True)]
        else:
            z = [
                torch.stack(
                    [
                        c.reshape(c.shape[0], -1) @ g.reshape(-1)
                        for c, g in zip(recorded[s], g_in_z, strict=True)
                    ]
                ).sum(0)
            ]
        updated = [rule.update(b, zb, st) for b, zb, st in zip(beta, z, meta_state, strict=True)]
        beta = [u[0] for u in updated]
        meta_state = [u[1] for u in updated]
        w = new_w
    return torch.cat([*(wi.flatten() for wi in w), *(b.flatten() for b in beta)])


def _discounted_jacobian(
    opt: MetaOptimize, model: TinyNet, t: int, blocks: str, approx: str, recorded: Any
) -> Tensor:
    gamma = opt.param_groups[0]["gamma"]
    width = 1 if blocks in ("scalar", "weight") else len(list(model.parameters()))
    eps = torch.zeros(t, width, dtype=DTYPE)
    jac = torch.autograd.functional.jacobian(
        lambda e: _unrolled(opt, model, t, blocks, approx, recorded, e), eps
    )  # (outputs, t, width)
    weights = torch.tensor(
        [
            (1 - gamma) * gamma ** (t - 1 - tau) + (gamma**t if tau == 0 else 0.0)
            for tau in range(t)
        ],
        dtype=DTYPE,
    )
    return torch.einsum("otc,t->oc", jac, weights)


def _flat_trace(trace: list[Tensor]) -> Tensor:
    """Per-parameter (columns, *shape) traces -> (weights, columns)."""
    return torch.cat([c.reshape(c.shape[0], -1).T for c in trace])


@pytest.mark.parametrize("blocks", ["scalar", "tensor", "weight"])
@pytest.mark.parametrize(("base", "extra"), BASES, ids=lambda x: str(x))
def test_l_approximation_trace_is_discounted_unrolled_derivative(
    base: str, extra: dict[str, Any], blocks: str
) -> None:
    opt, model, traces, _ = _run(base, extra, "adam", blocks, "L", 0.8)
    n = sum(p.numel() for p in model.parameters())
    for t in range(1, STEPS + 1):
        expected = _discounted_jacobian(opt, model, t, blocks, "L", traces)[:n]
        if blocks == "weight":
            # One shared column: the trace of a common shift of every β.
            expected = expected.sum(1, keepdim=True)
        torch.testing.assert_close(_flat_trace(traces[t]), expected, rtol=1e-10, atol=1e-12)
    assert _flat_trace(traces[STEPS]).abs().max() > 1e-3


@pytest.mark.parametrize("meta", ["sgd", "adam", "lion"])
@pytest.mark.parametrize("blocks", ["scalar", "tensor"])
@pytest.mark.parametrize(("base", "extra"), BASES[::2], ids=lambda x: str(x))
def test_2x2_trace_and_meta_trace_are_discounted_unrolled_derivatives(
    base: str, extra: dict[str, Any], blocks: str, meta: str
) -> None:
    opt, model, traces, ys = _run(base, extra, meta, blocks, "2x2", 0.8)
    n = sum(p.numel() for p in model.parameters())
    for t in range(1, STEPS + 1):
        expected = _discounted_jacobian(opt, model, t, blocks, "2x2", traces)
        torch.testing.assert_close(_flat_trace(traces[t]), expected[:n], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ys[t], expected[n:], rtol=1e-10, atol=1e-12)
    if meta == "lion":  # sign: no dependence of β on the weights, Y stays I
        assert torch.equal(ys[STEPS], torch.eye(ys[STEPS].shape[0], dtype=DTYPE))
    else:
        assert (ys[STEPS] - torch.eye(ys[STEPS].shape[0], dtype=DTYPE)).abs().max() > 1e-6


def test_l_and_2x2_agree_for_lion_meta() -> None:
    runs = [_run("adamw", {}, "lion", "tensor", approx, 0.9) for approx in ("L", "2x2")]
    for a, b in zip(runs[0][2][-1], runs[1][2][-1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0.0)


DECOUPLED_OR_PLAIN = [
    ("sgd", {}, 0.0),
    ("sgdm", {"base_style": "paper", "momentum": 0.9}, 0.1),
    ("adamw", {}, 0.1),
    ("lion", {}, 0.1),
]


@pytest.mark.parametrize("blocks", ["scalar", "tensor", "weight"])
@pytest.mark.parametrize(("base", "extra", "wd"), DECOUPLED_OR_PLAIN, ids=lambda x: str(x))
def test_zero_hessian_gives_the_hessian_free_trace(
    base: str, extra: dict[str, Any], wd: float, blocks: str
) -> None:
    """On a linear loss the Hessian is 0 and Hessian-free is exact: the traces agree."""
    generator = torch.Generator().manual_seed(0)
    init = [torch.randn(3, 4, generator=generator, dtype=DTYPE), torch.randn(3, dtype=DTYPE)]
    slopes = [
        [torch.randn(w.shape, generator=generator, dtype=DTYPE) for w in init] for _ in range(6)
    ]
    runs = []
    for trace in ("hessian-free", "hessian"):
        params = [torch.nn.Parameter(w.clone()) for w in init]
        opt = MetaOptimize(
            params,
            base=base,
            meta="adam",
            alpha0=0.05,
            meta_lr=0.05,
            gamma=0.9,
            blocks=blocks,
            weight_decay=wd,
            trace=trace,
            **extra,
        )
        for c in slopes:

            def closure(
                c: list[Tensor] = c, params: list[Tensor] = params, trace: str = trace
            ) -> Tensor:
                loss = sum((ci * p).sum() for ci, p in zip(c, params, strict=True))
                assert isinstance(loss, Tensor)
                if trace == "hessian-free":
                    for p in params:
                        p.grad = None
                    loss.backward()
                return loss

            opt.step(closure)
        runs.append((params, opt))
    (free_params, free), (full_params, full) = runs
    for a, b in zip(free_params, full_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        # Columns have disjoint supports; their sum is the Hessian-free trace.
        torch.testing.assert_close(free.state[a]["trace"], full.state[b]["trace"].sum(0))
    assert is_decoupled(full._base, full.param_groups[0]) or wd == 0.0


# ---------------------------------------------------------------------------- the contract


def _hessian_opt(model: torch.nn.Module, **kwargs: Any) -> MetaOptimize:
    settings: dict[str, Any] = {
        "base": "adam",
        "meta": "adam",
        "alpha0": 0.02,
        "meta_lr": 0.05,
        "gamma": 0.9,
        "trace": "hessian",
        **kwargs,
    }
    return MetaOptimize(model.parameters(), **settings)


def _train(model: TinyNet, opt: MetaOptimize, data: list[tuple[Tensor, Tensor]]) -> None:
    for batch in data:
        opt.step(lambda batch=batch: loss_fn(model, batch))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trace": "exact"}, "Invalid trace"),
        ({"trace_approximation": "3x3"}, "Invalid trace_approximation"),
        ({"meta": "fixed"}, "needs an active meta rule"),
        ({"meta_lr": 0.0}, "needs an active meta rule"),
        ({"fused": True}, "Invalid fused"),
        ({"learn_weight_decay": True, "weight_decay": 0.1}, "Invalid learn_weight_decay"),
        ({"kahan_summation": True}, "Invalid kahan_summation"),
        ({"trace_dtype": torch.bfloat16}, "Invalid trace_dtype"),
        ({"blocks": "weight", "trace_approximation": "2x2"}, "n×n meta trace"),
    ],
)
def test_invalid_hessian_settings_are_rejected(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _hessian_opt(TinyNet(), **kwargs)


def test_hessian_rejects_half_parameters_and_mixed_gamma_for_2x2() -> None:
    with pytest.raises(ValueError, match="float32 or float64"):
        _hessian_opt(torch.nn.Linear(2, 1).to(torch.bfloat16))
    model = TinyNet()
    groups = [
        {"params": list(model.hidden.parameters()), "gamma": 0.9},
        {"params": list(model.out.parameters()), "gamma": 0.5},
    ]
    with pytest.raises(ValueError, match="one gamma"):
        MetaOptimize(groups, meta="adam", trace="hessian", trace_approximation="2x2")
    MetaOptimize(groups, meta="adam", trace="hessian")  # L: per-group gamma is fine


def test_hessian_step_needs_a_closure_that_returns_the_loss() -> None:
    model = TinyNet()
    opt = _hessian_opt(model)
    with pytest.raises(RuntimeError, match=r"needs step\(closure\)"):
        opt.step()
    with pytest.raises(RuntimeError, match="must return the loss"):
        opt.step(lambda: float(loss_fn(model, batches(1)[0]).detach()))


def test_hessian_step_sets_grad_and_returns_the_loss() -> None:
    model = TinyNet()
    batch = batches(1)[0]
    expected = torch.autograd.grad(loss_fn(model, batch), list(model.parameters()))
    loss = _hessian_opt(model).step(lambda: loss_fn(model, batch))
    assert isinstance(loss, Tensor)
    for p, g in zip(model.parameters(), expected, strict=True):
        assert p.grad is not None
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
        assert not p.grad.requires_grad


@pytest.mark.parametrize(
    "kwargs",
    [
        {"blocks": "scalar"},
        {"blocks": "tensor", "trace_approximation": "2x2"},
        {"blocks": "weight", "base": "sgdm", "meta": "lion"},
    ],
    ids=str,
)
def test_hessian_resume_is_bitwise(kwargs: dict[str, Any]) -> None:
    data = batches(6)
    model = TinyNet()
    opt = _hessian_opt(model, **kwargs)
    _train(model, opt, data)

    resumed = TinyNet()
    first = _hessian_opt(resumed, **kwargs)
    _train(resumed, first, data[:3])
    saved = first.state_dict()
    second = _hessian_opt(resumed, **kwargs)
    second.load_state_dict(saved)
    _train(resumed, second, data[3:])
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        for key, value in opt.state[p].items():
            assert torch.equal(value, second.state[q][key]), key
    for key, value in opt._hessian.meta_trace.items():
        assert torch.equal(value, second._hessian.meta_trace[key])


def test_state_dict_of_another_trace_is_rejected() -> None:
    model = TinyNet()
    free = MetaOptimize(model.parameters(), base="adam", meta="adam")
    with pytest.raises(ValueError, match="trace="):
        _hessian_opt(model).load_state_dict(free.state_dict())
    with pytest.raises(ValueError, match="trace_approximation="):
        _hessian_opt(model, trace_approximation="2x2").load_state_dict(
            _hessian_opt(model).state_dict()
        )


def test_non_finite_loss_skips_the_step_and_changes_nothing() -> None:
    model = TinyNet()
    opt = _hessian_opt(model, blocks="tensor", trace_approximation="2x2")
    _train(model, opt, batches(2))
    before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    weights = [p.detach().clone() for p in model.parameters()]
    meta_trace = {k: v.clone() for k, v in opt._hessian.meta_trace.items()}
    opt.step(lambda: loss_fn(model, batches(1)[0]) * float("nan"))
    assert int(opt.skipped_steps) == 1
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    for key, value in opt.state_dict()["state"][0].items():
        assert torch.equal(value, before[key]), key
    for key, value in opt._hessian.meta_trace.items():
        assert torch.equal(value, meta_trace[key])


def test_new_param_group_adds_a_zero_trace_column() -> None:
    model = TinyNet()
    opt = MetaOptimize(
        list(model.hidden.parameters()),
        meta="adam",
        blocks="tensor",
        trace="hessian",
        trace_approximation="2x2",
    )
    data = batches(3)
    _train(model, opt, data[:2])
    columns = opt.state[model.hidden.weight]["trace"].shape[0]
    opt.add_param_group({"params": list(model.out.parameters())})
    _train(model, opt, data[2:])
    assert columns == 2
    assert opt.state[model.hidden.weight]["trace"].shape[0] == 4
    assert opt.state[model.out.weight]["trace"].shape[0] == 4
    assert opt._hessian.meta_trace["log_alpha"].shape == (4, 4)
    assert int(opt.skipped_steps) == 0


def test_hessian_step_reads_no_tensor_value() -> None:
    """Every Python-level read of a tensor value raises inside the step.

    (Forward-mode AD does not run on meta-device tensors, which the Hessian-free test uses.)
    """
    from test_contract import _forbid_host_sync

    model = TinyNet()
    x = batches(1)[0][0]
    for kwargs in ({"blocks": "tensor", "trace_approximation": "2x2"}, {"blocks": "weight"}):
        opt = _hessian_opt(model, **kwargs)
        for _ in range(2):
            with _forbid_host_sync():
                opt.step(lambda: model(x).square().mean())


def test_ignored_parameters_and_linear_losses_are_handled() -> None:
    """A parameter outside the loss gets no step; a loss linear in a tensor has no Hessian."""
    used = torch.nn.Parameter(torch.ones(3, dtype=DTYPE))
    unused = torch.nn.Parameter(torch.ones(2, dtype=DTYPE))
    opt = MetaOptimize([used, unused], base="sgd", meta="adam", trace="hessian", blocks="tensor")
    for _ in range(3):
        opt.step(lambda: (2.0 * used).sum())
    assert unused.grad is None
    assert torch.equal(unused, torch.ones(2, dtype=DTYPE))
    assert unused not in opt.state
    assert int(opt.skipped_steps) == 0


# ------------------------------------------------- the full trace (Q kept), SGD/SGD on least squares


def _least_squares(steps: int, n: int = 5) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(7)
    inputs = torch.randn(steps, n, generator=generator, dtype=DTYPE)
    targets = torch.randn(steps, generator=generator, dtype=DTYPE)
    return inputs, targets, torch.randn(n, generator=generator, dtype=DTYPE)


def test_full_trace_without_q_is_the_2x2_approximation() -> None:
    from metaoptimize.bench.full_trace import full_trace_sgd_sgd

    inputs, targets, w0 = _least_squares(30)
    losses, betas, w_final, _ = full_trace_sgd_sgd(
        inputs, targets, w0, 0.05, 0.3, 0.8, include_q=False
    )
    w = torch.nn.Parameter(w0.clone())
    opt = MetaOptimize(
        [w],
        base="sgd",
        meta="sgd",
        alpha0=0.05,
        meta_lr=0.3,
        gamma=0.8,
        trace="hessian",
        trace_approximation="2x2",
    )
    for t in range(30):
        assert torch.allclose(opt.step_sizes()["all"].log(), betas[t], rtol=1e-12, atol=1e-14)
        loss = opt.step(lambda t=t: 0.5 * (inputs[t] @ w - targets[t]) ** 2)
        torch.testing.assert_close(loss.detach(), losses[t], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w.detach(), w_final, rtol=1e-12, atol=1e-14)
    assert (betas[-1] - betas[0]).abs() > 1e-3


def test_full_trace_is_the_discounted_derivative_of_the_system_with_its_trace() -> None:
    """[Y; X; Q]_t against autograd: the trace X is now a state whose own derivative counts."""
    from metaoptimize.bench.full_trace import full_trace_sgd_sgd

    gamma, eta, steps = 0.8, 0.3, 4
    inputs, targets, w0 = _least_squares(steps)
    # B_s = γ Y_s + (1-γ), held constant within each step (paper eq. 47)
    mixes = [
        gamma * full_trace_sgd_sgd(inputs[:s], targets[:s], w0, 0.05, eta, gamma)[3][0]
        + (1 - gamma)
        for s in range(steps)
    ]

    def unrolled(eps: Tensor, t: int) -> Tensor:
        w, beta, x = w0.clone(), torch.tensor(math.log(0.05), dtype=DTYPE), torch.zeros_like(w0)
        for s in range(t):
            beta = beta + eps[s]
            a = inputs[s]
            g = (a @ w - targets[s]) * a
            alpha = beta.exp()
            z = x @ g
            x = -alpha * g * mixes[s] + gamma * (x - alpha * a * (a @ x))
            w = w - alpha * g
            beta = beta - eta * z
        return torch.cat([beta.reshape(1), w, x])

    for t in range(1, steps + 1):
        jac = torch.autograd.functional.jacobian(
            lambda e, t=t: unrolled(e, t), torch.zeros(t, dtype=DTYPE)
        )
        weights = torch.tensor(
            [
                (1 - gamma) * gamma ** (t - 1 - tau) + (gamma**t if tau == 0 else 0.0)
                for tau in range(t)
            ],
            dtype=DTYPE,
        )
        expected = jac @ weights
        y, x, q = full_trace_sgd_sgd(inputs[:t], targets[:t], w0, 0.05, eta, gamma)[3]
        torch.testing.assert_close(
            torch.cat([y.reshape(1), x, q]), expected, rtol=1e-10, atol=1e-12
        )
