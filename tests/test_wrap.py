"""wrap(torch optimizer) equals the native MetaOptimize rule."""

from __future__ import annotations

import copy
import io
import math
import pickle
from typing import Any

import pytest
import torch

from helpers import TinyNet, batches, clone_model, flat_step_sizes, loss_fn, step_together, train
from metaoptimize import MetaOptimize
from metaoptimize.wrap import wrap

# (torch optimizer factory, equivalent MetaOptimize base kwargs)
EQUIVALENT: dict[str, tuple[Any, dict[str, Any]]] = {
    "sgd": (
        lambda p: torch.optim.SGD(p, lr=0.05, weight_decay=0.01),
        {"base": "sgd", "weight_decay": 0.01},
    ),
    "sgdm": (
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, dampening=0.2, weight_decay=0.01),
        {"base": "sgdm", "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01},
    ),
    "nesterov": (
        lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.8, nesterov=True, weight_decay=0.02),
        {"base": "sgdm", "momentum": 0.8, "nesterov": True, "weight_decay": 0.02},
    ),
    "adam": (
        lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.8, 0.99), weight_decay=0.05),
        {"base": "adam", "betas": (0.8, 0.99), "weight_decay": 0.05},
    ),
    "adamw": (
        lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
        {"base": "adamw", "weight_decay": 0.1},
    ),
    "rmsprop": (
        lambda p: torch.optim.RMSprop(
            p, lr=0.01, alpha=0.9, centered=True, momentum=0.5, weight_decay=0.01
        ),
        {
            "base": "rmsprop",
            "betas": (0.9,),
            "centered": True,
            "momentum": 0.5,
            "weight_decay": 0.01,
        },
    ),
}


@pytest.mark.parametrize("blocks", ["scalar", "tensor", "weight"])
@pytest.mark.parametrize("meta", ["lion", "adam"])
@pytest.mark.parametrize("name", sorted(EQUIVALENT))
def test_wrapped_torch_optimizer_equals_native_metaoptimize(
    name: str, meta: str, blocks: str
) -> None:
    factory, base_kwargs = EQUIVALENT[name]
    wrapped_model = TinyNet()
    native_model = clone_model(wrapped_model)
    inner = factory(wrapped_model.parameters())
    alpha0 = inner.param_groups[0]["lr"]
    wrapped = wrap(inner, meta=meta, meta_lr=0.05, gamma=0.9, blocks=blocks)
    native = MetaOptimize(
        native_model.parameters(),
        meta=meta,
        meta_lr=0.05,
        gamma=0.9,
        blocks=blocks,
        alpha0=alpha0,
        **base_kwargs,
    )
    for batch in batches(25):
        step_together(((wrapped_model, wrapped), (native_model, native)), batch)
    for a, b in zip(wrapped_model.parameters(), native_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        flat_step_sizes(wrapped), flat_step_sizes(native), rtol=1e-10, atol=0
    )
    assert (flat_step_sizes(native) - alpha0).abs().max() > 1e-6


def test_wrapper_resumes_exactly_and_composes_with_schedulers() -> None:
    data = batches(16)
    model = TinyNet()
    opt = wrap(torch.optim.Adam(model.parameters(), lr=0.01), meta="adam", meta_lr=0.05)
    train(model, opt, data)

    first = TinyNet()
    first_opt = wrap(torch.optim.Adam(first.parameters(), lr=0.01), meta="adam", meta_lr=0.05)
    train(first, first_opt, data[:8])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second = TinyNet(seed=5)
    second.load_state_dict(saved["model"])
    second_opt = wrap(torch.optim.Adam(second.parameters(), lr=0.01), meta="adam", meta_lr=0.05)
    second_opt.load_state_dict(saved["opt"])
    train(second, second_opt, data[8:])
    for a, b in zip(model.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)

    scheduled = TinyNet()
    sched_opt = wrap(torch.optim.SGD(scheduled.parameters(), lr=0.1), meta="fixed")
    scheduler = torch.optim.lr_scheduler.StepLR(sched_opt, step_size=1, gamma=0.5)
    reference = clone_model(scheduled)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    ref_scheduler = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=1, gamma=0.5)
    for batch in data[:5]:
        for m, o, s in ((scheduled, sched_opt, scheduler), (reference, ref_opt, ref_scheduler)):
            o.zero_grad()
            loss_fn(m, batch).backward()
            o.step()
            s.step()
    for a, b in zip(scheduled.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_wrapping_an_unknown_optimizer_trains() -> None:
    model = TinyNet()
    with pytest.warns(UserWarning, match=r"trace is approximate for Adagrad"):
        opt = wrap(
            torch.optim.Adagrad(model.parameters(), lr=0.05, weight_decay=0.01),
            meta="lion",
            meta_lr=0.02,
            blocks="tensor",
        )
    train(model, opt, batches(20))
    sizes = flat_step_sizes(opt)
    assert torch.isfinite(sizes).all()
    assert (sizes != 0.05).any()


def test_wrap_errors() -> None:
    with pytest.raises(TypeError, match=r"Invalid optimizer: list"):
        wrap([], meta="lion")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Invalid gamma"):
        wrap(torch.optim.SGD(TinyNet().parameters(), lr=0.1), gamma=2.0)
    with pytest.raises(ValueError, match=r"Invalid state_dict"):
        wrap(torch.optim.SGD(TinyNet().parameters(), lr=0.1)).load_state_dict(
            torch.optim.SGD(TinyNet().parameters(), lr=0.1).state_dict()
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"alpha_min": -1.0}, ValueError, r"Invalid alpha_min"),
        ({"alpha_max": 0.0}, ValueError, r"Invalid alpha_max"),
        ({"alpha_min": 1e-2, "alpha_max": 1e-3}, ValueError, r"Invalid alpha_min/alpha_max"),
        ({"meta_lr": "0.1"}, TypeError, r"Invalid meta_lr"),
        ({"meta_lr": float("inf")}, ValueError, r"Invalid meta_lr"),
        ({"meta_lr": float("nan")}, ValueError, r"Invalid meta_lr"),
        ({"gamma": "x"}, TypeError, r"Invalid gamma"),
        ({"gamma": 1.5}, ValueError, r"Invalid gamma"),
        ({"meta_eps": -1e-8}, ValueError, r"Invalid meta_eps"),
        ({"meta_eps": "x"}, TypeError, r"Invalid meta_eps"),
    ],
)
def test_wrap_validates_its_arguments_like_metaoptimize(
    kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        wrap(torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), lr=1e-3), **kwargs)


def test_wrap_keeps_the_step_size_off_zero_and_infinity_by_default() -> None:
    opt = wrap(torch.optim.Adam(torch.nn.Linear(2, 1).parameters(), lr=1e-3))
    assert opt._step_sizes[0].bounds == (math.log(1e-12), math.log(1e6))


def test_wrap_with_a_zero_lr_takes_a_zero_step_not_nan() -> None:
    """Issue 16 item 1: a warm-up from 0 (LambdaLR s/10) scaled the update by alpha / 0."""
    model = TinyNet()
    start = [p.detach().clone() for p in model.parameters()]
    opt = wrap(torch.optim.AdamW(model.parameters(), lr=1e-3))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 10)
    train(model, opt, batches(1))  # the first step runs at lr 0
    for p, p0 in zip(model.parameters(), start, strict=True):
        assert torch.equal(p.detach(), p0)
    schedule.step()
    train(model, opt, batches(3))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(
        not torch.equal(p.detach(), p0) for p, p0 in zip(model.parameters(), start, strict=True)
    )


def test_wrap_refuses_one_step_size_across_groups_with_different_lr() -> None:
    """Issue 16 item 7: blocks='scalar' silently started from the last group's lr."""
    model = TinyNet()
    inner = torch.optim.Adam(
        [
            {"params": model.hidden.parameters(), "lr": 1e-3},
            {"params": model.out.parameters(), "lr": 1e-2},
        ]
    )
    with pytest.raises(ValueError, match=r"Invalid blocks: block 'all' spans param groups"):
        wrap(inner, blocks="scalar")
    opt = wrap(inner, blocks="group")  # one step size per group is fine
    assert [float(a) for a in opt.step_sizes().values()] == pytest.approx([1e-3, 1e-2])


def test_wrap_stays_attached_to_the_inner_optimizer_after_a_resume() -> None:
    """Issue 16 item 2: after load_state_dict a scheduler on the wrapper must reach the inner lr,
    and a fresh wrapper around Adam with weight decay must resume where the first left off."""
    model = TinyNet()
    opt = wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, 0.5)
    opt.load_state_dict(opt.state_dict())
    for _ in range(5):
        train(model, opt, batches(1))
        schedule.step()
    assert opt.param_groups[0]["lr"] == opt.inner.param_groups[0]["lr"] == pytest.approx(0.003125)

    def make(net: torch.nn.Module) -> Any:
        return wrap(torch.optim.Adam(net.parameters(), lr=1e-2, weight_decay=1e-2))

    reference, first = TinyNet(), TinyNet()
    uninterrupted, interrupted = make(reference), make(first)
    data = batches(6)
    train(reference, uninterrupted, data)
    train(first, interrupted, data[:3])
    resumed_model = clone_model(first)
    resumed = make(resumed_model)
    resumed.load_state_dict(interrupted.state_dict())
    train(resumed_model, resumed, data[3:])  # used to raise KeyError: 'step'
    for a, b in zip(reference.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("blocks", ["scalar", "group", "tensor", "weight"])
def test_wrap_accepts_an_empty_param_group(blocks: str) -> None:
    weights = torch.zeros(3, requires_grad=True)
    inner = torch.optim.Adam([{"params": []}, {"params": [weights], "lr": 0.01}], lr=1e-3)
    wrapped = wrap(inner, blocks=blocks)
    for _ in range(3):
        weights.grad = torch.ones(3)
        wrapped.step()
    sizes = wrapped.step_sizes()
    if blocks == "group":
        assert sizes["group0"].item() == pytest.approx(1e-3)  # the empty group keeps its lr
    assert all(torch.isfinite(a).all() for a in sizes.values())
    assert torch.isfinite(weights).all()
    assert (weights < 0).all()


def test_wrap_refuses_complex_parameters() -> None:
    complex_param = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match=r"complex"):
        wrap(torch.optim.Adam([complex_param]))


@pytest.mark.parametrize(
    ("make", "exact"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), True),
        (lambda p: torch.optim.Adam(p, lr=0.1), True),
        (lambda p: torch.optim.AdamW(p, lr=0.1), True),
        (lambda p: torch.optim.RMSprop(p, lr=0.1, centered=True), True),
        (lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True), False),
        (lambda p: torch.optim.NAdam(p, lr=0.1), False),
        (lambda p: torch.optim.RAdam(p, lr=0.1), False),
        (lambda p: torch.optim.Rprop(p, lr=0.1), False),
        (lambda p: torch.optim.Adadelta(p, lr=0.1), False),
        (lambda p: torch.optim.LBFGS(p, lr=0.1), False),
    ],
)
def test_wrap_warns_when_it_cannot_reproduce_the_inner_update_exactly(
    make: Any, exact: bool
) -> None:
    inner = make([torch.zeros(2, requires_grad=True)])
    if exact:
        wrap(inner)  # filterwarnings=error: any warning fails
    else:
        with pytest.warns(UserWarning, match=rf"approximate for {type(inner).__name__}"):
            wrap(inner)


def test_monitor_reads_a_wrapped_optimizer() -> None:
    from metaoptimize.monitor import step_size_scalars

    weights = torch.zeros(3, requires_grad=True)
    wrapped = wrap(torch.optim.Adam([weights], lr=1e-3))
    assert step_size_scalars(wrapped) == {"step_size/all": pytest.approx(1e-3)}


def test_deepcopy_and_pickle_give_wrappers_that_continue_the_run() -> None:
    model = TinyNet()
    opt = wrap(torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01))
    data = batches(6)
    train(model, opt, data[:3])
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    for other_model, other_opt in copies:
        train(other_model, other_opt, data[3:])
    train(model, opt, data[3:])
    for other_model, other_opt in copies:
        for a, b in zip(model.parameters(), other_model.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(flat_step_sizes(other_opt), flat_step_sizes(opt), rtol=0, atol=0)
