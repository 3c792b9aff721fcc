"""torch.optim contract: resume, errors, closure, no host sync, guards, schedulers, presets."""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from cases import CASES, Case
from helpers import TinyNet, batches, clone_model, flat_step_sizes, loss_fn, train
from metaoptimize import MetaOptimize, presets

RESUME_COMBOS = [
    {"base": "adamw", "meta": "lion", "blocks": "scalar", "weight_decay": 0.1},
    {"base": "sgdm", "meta": "adam", "blocks": "weight", "nesterov": True},
    {
        "base": "rmsprop",
        "meta": "rmsprop",
        "blocks": "tensor",
        "centered": True,
        "momentum": 0.5,
        "weight_decay": 0.01,
    },
    {"base": "lion", "meta": "sgd", "blocks": "group", "meta_lr": 0.5},
    {"base": "adam", "meta": "fixed", "blocks": "scalar"},
    {"base": "sgd", "meta": "adam", "blocks": "tensor", "gamma": 0.9, "alpha_max": 0.05},
]


def _groups(model: TinyNet) -> list[dict[str, Any]]:
    return [
        {"params": list(model.hidden.parameters())},
        {"params": list(model.out.parameters()), "lr": 0.5},
    ]


@pytest.mark.parametrize("kwargs", RESUME_COMBOS, ids=lambda k: f"{k['base']}-{k['meta']}")
def test_resume_is_bitwise_identical(kwargs: dict[str, Any]) -> None:
    kwargs = {"alpha0": 0.01, "meta_lr": 0.05, **kwargs}
    data = batches(20)
    model = TinyNet()
    uninterrupted = MetaOptimize(_groups(model), **kwargs)
    train(model, uninterrupted, data)

    first = TinyNet()
    opt = MetaOptimize(_groups(first), **kwargs)
    train(first, opt, data[:10])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = TinyNet(seed=99)  # different weights: everything must come from the checkpoint
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = MetaOptimize(_groups(resumed), **kwargs)
    resumed_opt.load_state_dict(checkpoint["opt"])
    train(resumed, resumed_opt, data[10:])

    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(flat_step_sizes(uninterrupted), flat_step_sizes(resumed_opt))
    assert (
        not torch.equal(
            flat_step_sizes(resumed_opt), torch.full_like(flat_step_sizes(resumed_opt), 0.01)
        )
        or kwargs["meta"] == "fixed"
    )


def test_loaded_state_is_a_copy() -> None:
    model = TinyNet()
    opt = MetaOptimize(model.parameters(), base="adam", meta="adam", alpha0=0.01)
    train(model, opt, batches(3))
    saved = opt.state_dict()
    snapshot = {k: v.clone() for k, v in saved["state"][0].items()}
    opt.load_state_dict(saved)
    train(model, opt, batches(3))
    for key, value in snapshot.items():
        assert torch.equal(saved["state"][0][key], value)


@pytest.mark.parametrize(
    ("change", "pattern"),
    [
        ({"base": "adam"}, r"saved with base='adamw', but this optimizer uses base='adam'"),
        ({"meta": "adam"}, r"saved with meta='lion', but this optimizer uses meta='adam'"),
        ({"blocks": "tensor"}, r"saved with block layout"),
    ],
)
def test_state_dict_from_another_configuration_is_rejected(
    change: dict[str, Any], pattern: str
) -> None:
    model = TinyNet()
    opt = MetaOptimize(model.parameters(), base="adamw", meta="lion")
    train(model, opt, batches(2))
    other = MetaOptimize(model.parameters(), **{"base": "adamw", "meta": "lion", **change})
    with pytest.raises(ValueError, match=pattern):
        other.load_state_dict(opt.state_dict())


def test_foreign_and_future_state_dicts_are_rejected() -> None:
    model = TinyNet()
    opt = MetaOptimize(model.parameters())
    adam = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match=r"no 'metaoptimize' entry"):
        opt.load_state_dict(adam.state_dict())
    future = opt.state_dict()
    future["param_groups"][0]["metaoptimize"]["format_version"] = 99
    with pytest.raises(ValueError, match=r"format_version 99 is not supported"):
        opt.load_state_dict(future)


ERROR_CASES: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"alpha0": 0.0}, ValueError, r"Invalid alpha0: 0\.0"),
    ({"alpha0": -1e-3}, ValueError, r"Invalid alpha0"),
    ({"alpha0": float("nan")}, ValueError, r"Invalid alpha0"),
    ({"alpha0": "big"}, TypeError, r"Invalid alpha0: 'big'"),
    ({"meta_lr": -1.0}, ValueError, r"Invalid meta_lr: -1\.0"),
    ({"meta_lr": "fast"}, TypeError, r"Invalid meta_lr: 'fast'"),
    ({"gamma": 1.5}, ValueError, r"Invalid gamma: 1\.5"),
    ({"gamma": -0.1}, ValueError, r"Invalid gamma"),
    ({"base": "adagrad"}, ValueError, r"Invalid base: 'adagrad'"),
    ({"base": 3}, TypeError, r"Invalid base: 3"),
    ({"meta": "newton"}, ValueError, r"Invalid meta: 'newton'"),
    ({"blocks": "rows"}, ValueError, r"Invalid blocks: 'rows'"),
    ({"betas": (0.9,)}, ValueError, r"Invalid betas: \(0\.9,\); expected a tuple of 2"),
    ({"betas": (1.0, 0.999)}, ValueError, r"Invalid betas at index 0: 1\.0"),
    ({"base": "sgd", "betas": (0.9, 0.9)}, ValueError, r"Invalid betas: .* takes no betas"),
    ({"weight_decay": -0.1}, ValueError, r"Invalid weight_decay: -0\.1"),
    ({"eps": -1e-8}, ValueError, r"Invalid eps"),
    ({"lr": -1.0}, ValueError, r"Invalid lr: -1\.0"),
    ({"base": "sgdm", "momentum": 1.0}, ValueError, r"Invalid momentum: 1\.0"),
    ({"base": "sgdm", "nesterov": True, "dampening": 0.1}, ValueError, r"Invalid nesterov"),
    ({"base": "sgd", "momentum": 0.9}, ValueError, r"Invalid momentum: 0\.9; base 'sgd'"),
    ({"base": "adam", "centered": True}, ValueError, r"Invalid centered"),
    ({"base": "sgdm", "nesterov": 1}, TypeError, r"Invalid nesterov: 1"),
    (
        {"base": "rmsprop", "base_style": "paper", "momentum": 0.5},
        ValueError,
        r"Invalid momentum/centered",
    ),
    ({"base_style": "keras"}, ValueError, r"Invalid base_style: 'keras'"),
    ({"meta": "adam", "meta_betas": (0.9,)}, ValueError, r"Invalid meta_betas"),
    ({"meta": "sgd", "meta_betas": (0.9,)}, ValueError, r"Invalid meta_betas.*takes no betas"),
    ({"meta_eps": -1.0}, ValueError, r"Invalid meta_eps"),
    ({"alpha_min": -1.0}, ValueError, r"Invalid alpha_min"),
    ({"alpha_max": 0.0}, ValueError, r"Invalid alpha_max"),
    ({"alpha0": 2.0}, ValueError, r"Invalid alpha0: 2\.0; outside"),
    ({"alpha_min": 1e-2, "alpha_max": 1e-3}, ValueError, r"Invalid alpha_min/alpha_max"),
    ({"alpha0": 1.0, "alpha_max": 0.1}, ValueError, r"Invalid alpha0: 1\.0; outside"),
]


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"), ERROR_CASES, ids=[str(c[0]) for c in ERROR_CASES]
)
def test_invalid_arguments_raise_naming_the_argument(
    kwargs: dict[str, Any], error: type[Exception], pattern: str
) -> None:
    with pytest.raises(error, match=pattern):
        MetaOptimize(TinyNet().parameters(), **kwargs)


def test_invalid_group_value_is_rejected_and_not_added() -> None:
    model = TinyNet()
    opt = MetaOptimize([{"params": list(model.hidden.parameters())}], blocks="group")
    with pytest.raises(ValueError, match=r"Invalid gamma: 2"):
        opt.add_param_group({"params": list(model.out.parameters()), "gamma": 2})
    assert len(opt.param_groups) == 1


def test_scalar_block_rejects_groups_with_different_alpha0() -> None:
    model = TinyNet()
    with pytest.raises(ValueError, match=r"spans param groups with different alpha0"):
        MetaOptimize(
            [
                {"params": list(model.hidden.parameters()), "alpha0": 0.1},
                {"params": list(model.out.parameters()), "alpha0": 0.2},
            ]
        )


def test_add_param_group_grows_blocks() -> None:
    model = TinyNet()
    opt = MetaOptimize(
        [{"params": list(model.hidden.parameters())}],
        blocks="group",
        meta="adam",
        alpha0=0.01,
        meta_lr=0.05,
    )
    train(model, opt, batches(3))
    first = opt.step_sizes()["group0"].clone()
    opt.add_param_group({"params": list(model.out.parameters()), "alpha0": 0.2})
    sizes = opt.step_sizes()
    assert torch.equal(sizes["group0"], first)
    assert sizes["group1"].item() == pytest.approx(0.2)
    train(model, opt, batches(3))
    assert opt.step_sizes()["group1"].item() != pytest.approx(0.2)
    explicit = MetaOptimize(model.hidden.parameters(), blocks=[list(model.hidden.parameters())])
    with pytest.raises(ValueError, match=r"explicit blocks cannot grow"):
        explicit.add_param_group({"params": list(model.out.parameters())})


def test_closure_is_evaluated_with_grad_and_its_loss_returned() -> None:
    model = TinyNet()
    twin = clone_model(model)
    batch = batches(1)[0]
    opt = MetaOptimize(model.parameters(), meta="adam", alpha0=0.01)
    twin_opt = MetaOptimize(twin.parameters(), meta="adam", alpha0=0.01)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert torch.equal(loss, loss_fn(twin, batch))
    train(twin, twin_opt, [batch])
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_step_without_any_gradient_is_a_no_op() -> None:
    model = TinyNet()
    before = [p.detach().clone() for p in model.parameters()]
    opt = MetaOptimize(model.parameters())
    assert opt.step() is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert len(opt.state) == 0


@contextlib.contextmanager
def _forbid_host_sync() -> Iterator[None]:
    """Make every Python-level way of reading a tensor value raise."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("host synchronisation inside step()")

    names = ["item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"]
    saved = {name: getattr(torch.Tensor, name) for name in names}
    try:
        for name in names:
            setattr(torch.Tensor, name, refuse)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


@pytest.mark.parametrize("case", CASES[::3], ids=str)
def test_step_reads_no_tensor_value(case: Case) -> None:
    """Meta-device tensors have no values: a step that completes never read one."""
    model = TinyNet().to("meta")
    blocks: Any = case.blocks
    if blocks == "explicit":
        blocks = [[model.hidden.weight, model.out.bias], [model.hidden.bias, model.out.weight]]
    opt = MetaOptimize(model.parameters(), blocks=blocks, **case.kwargs())
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        with _forbid_host_sync():
            opt.step()
    assert next(iter(opt.step_sizes().values())).device.type == "meta"


def test_forbid_host_sync_would_catch_a_sync() -> None:
    with _forbid_host_sync(), pytest.raises(AssertionError, match="host synchronisation"):
        bool(torch.ones(()) > 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("kwargs", RESUME_COMBOS, ids=lambda k: f"{k['base']}-{k['meta']}")
def test_non_finite_step_changes_nothing_and_is_counted(kwargs: dict[str, Any], bad: float) -> None:
    kwargs = {"alpha0": 0.01, "meta_lr": 0.05, **kwargs}
    data = batches(8)
    clean_model = TinyNet()
    clean = MetaOptimize(_groups(clean_model), **kwargs)
    train(clean_model, clean, data)

    model = TinyNet()
    opt = MetaOptimize(_groups(model), **kwargs)
    train(model, opt, data[:4])
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.out.bias.grad[0] = bad
    opt.step()  # must be a no-op
    train(model, opt, data[4:])

    for a, b in zip(clean_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(flat_step_sizes(clean), flat_step_sizes(opt))
    assert opt.skipped_steps.item() == 1
    assert clean.skipped_steps.item() == 0


def test_non_finite_first_step_leaves_fresh_state() -> None:
    model = TinyNet()
    twin = clone_model(model)
    opt = MetaOptimize(model.parameters(), base="sgdm", meta="adam", alpha0=0.01)
    twin_opt = MetaOptimize(twin.parameters(), base="sgdm", meta="adam", alpha0=0.01)
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step()
    data = batches(5)
    train(model, opt, data)
    train(twin, twin_opt, data)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_step_size_bounds_are_enforced() -> None:
    model = TinyNet()
    opt = MetaOptimize(
        model.parameters(),
        base="sgd",
        meta="sgd",
        meta_lr=1e3,
        alpha0=0.01,
        alpha_min=5e-3,
        alpha_max=2e-2,
        blocks="weight",
    )
    seen_low = seen_high = False
    for batch in batches(30):
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()
        sizes = flat_step_sizes(opt)
        assert sizes.min() >= 5e-3 * (1 - 1e-12)
        assert sizes.max() <= 2e-2 * (1 + 1e-12)
        seen_low |= bool(torch.isclose(sizes, torch.tensor(5e-3, dtype=sizes.dtype)).any())
        seen_high |= bool(torch.isclose(sizes, torch.tensor(2e-2, dtype=sizes.dtype)).any())
    assert seen_low
    assert seen_high


def test_lr_scheduler_composes_as_a_multiplier() -> None:
    """A LambdaLR on MetaOptimize(meta fixed) equals the same schedule on torch.optim.Adam."""
    model = TinyNet()
    twin = clone_model(model)
    schedule = lambda step: 1.0 / (1 + step)
    ours = MetaOptimize(model.parameters(), base="adam", meta="fixed", alpha0=0.01)
    theirs = torch.optim.Adam(twin.parameters(), lr=0.01)
    ours_sched = torch.optim.lr_scheduler.LambdaLR(ours, schedule)
    their_sched = torch.optim.lr_scheduler.LambdaLR(theirs, schedule)
    for batch in batches(10):
        for m, o, s in ((model, ours, ours_sched), (twin, theirs, their_sched)):
            o.zero_grad()
            loss_fn(m, batch).backward()
            o.step()
            s.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert ours.param_groups[0]["lr"] == pytest.approx(1.0 / 11)


def test_lr_zero_freezes_weights_but_not_the_trace_bookkeeping() -> None:
    model = TinyNet()
    before = [p.detach().clone() for p in model.parameters()]
    opt = MetaOptimize(model.parameters(), meta="adam", alpha0=0.01, lr=0.0)
    train(model, opt, batches(3))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_is_a_torch_optimizer_with_working_hooks() -> None:
    model = TinyNet()
    opt = MetaOptimize(model.parameters())
    assert isinstance(opt, torch.optim.Optimizer)
    calls: list[str] = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    train(model, opt, batches(1))
    assert calls == ["pre", "post"]
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in model.parameters())
    assert "MetaOptimize" in repr(opt)


def test_half_precision_parameters_keep_float32_state() -> None:
    param = torch.nn.Parameter(torch.randn(4, 3).to(torch.bfloat16))
    opt = MetaOptimize([param], base="adamw", meta="lion", blocks="weight", alpha0=1e-2)
    param.grad = torch.randn_like(param)
    opt.step()
    state = opt.state[param]
    assert param.dtype == torch.bfloat16
    assert {v.dtype for v in state.values()} == {torch.float32}
    reloaded = MetaOptimize([param], base="adamw", meta="lion", blocks="weight", alpha0=1e-2)
    reloaded.load_state_dict(opt.state_dict())
    assert reloaded.state[param]["log_alpha"].dtype == torch.float32


@pytest.mark.parametrize("name", presets.names())
def test_every_preset_builds_and_steps(name: str) -> None:
    model = TinyNet()
    opt = presets.make(model.parameters(), name)
    train(model, opt, batches(2))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_paper_presets_carry_the_paper_settings() -> None:
    row = presets.get("cifar10-lion-lion")
    assert row == {
        "base": "lion",
        "betas": (0.9, 0.99),
        "weight_decay": 0.1,
        "meta": "lion",
        "meta_betas": (0.9, 0.99),
        "meta_lr": 1e-3,
        "alpha_min": 0.0,
        "alpha_max": math.inf,
        "alpha0": 1e-6,
        "gamma": 1.0,
        "blocks": "scalar",
    }
    assert presets.get("paper") == {
        "base": "adamw",
        "meta": "lion",
        "meta_betas": (0.9, 0.99),
        "meta_lr": 1e-3,
        "alpha_min": 0.0,
        "alpha_max": math.inf,
        "alpha0": 1e-6,
        "gamma": 1.0,
        "blocks": "scalar",
    }
    assert presets.get("continual-adamw-adam")["gamma"] == 0.999
    assert presets.get("imagenet-sgdm-lion")["alpha0"] == 1e-5
    assert presets.get("hypergradient-sgd")["gamma"] == 0.0
    assert presets.get("idbd")["blocks"] == "weight"
    with pytest.raises(ValueError, match=r"Invalid preset: 'nope'"):
        presets.get("nope")


def test_state_saved_with_meta_lr_zero_loads_into_an_active_optimizer() -> None:
    model = TinyNet()
    frozen = MetaOptimize(model.parameters(), meta="lion", meta_lr=0.0, alpha0=0.01)
    train(model, frozen, batches(3))
    assert all("trace" not in s for s in frozen.state.values())
    active = MetaOptimize(model.parameters(), meta="lion", meta_lr=0.05, alpha0=0.01)
    active.load_state_dict(frozen.state_dict())
    assert active.meta_lr == 0.0  # restored, as torch.optim restores every hyperparameter
    active.meta_lr = 0.05
    train(model, active, batches(5))
    assert flat_step_sizes(active).item() != pytest.approx(0.01)


@pytest.mark.parametrize("fused", [False, True])
def test_bfloat16_trace_halves_its_memory_and_tracks_the_float32_run(fused: bool) -> None:
    runs = {}
    for trace_dtype in (None, "bfloat16"):
        model = TinyNet()
        opt = MetaOptimize(
            model.parameters(),
            base="adamw",
            meta="adam",
            alpha0=0.01,
            meta_lr=0.05,
            trace_dtype=trace_dtype,
            fused=fused,
        )
        train(model, opt, batches(15))
        traces = [opt.state[p]["trace"] for p in model.parameters()]
        runs[trace_dtype] = (flat_step_sizes(opt), traces)
    full, half = runs[None], runs["bfloat16"]
    assert {t.dtype for t in half[1]} == {torch.bfloat16}
    assert sum(t.nbytes for t in half[1]) * 4 == sum(t.nbytes for t in full[1])  # f64 -> bf16
    torch.testing.assert_close(half[0], full[0], rtol=1e-2, atol=0)
    assert not torch.equal(half[0], full[0])


def test_invalid_trace_dtype() -> None:
    with pytest.raises(ValueError, match=r"Invalid trace_dtype: 'int8'"):
        MetaOptimize(TinyNet().parameters(), trace_dtype="int8")
    with pytest.raises(ValueError, match=r"Invalid trace_dtype: torch\.int32"):
        MetaOptimize(TinyNet().parameters(), trace_dtype=torch.int32)


def test_a_rejected_param_group_does_not_stay() -> None:
    """Issue 16 item 6: the group is removed again, nothing else changes, a retry works."""
    model = TinyNet()
    opt = MetaOptimize(model.hidden.parameters(), alpha0=1e-3)
    step_sizes = opt.step_sizes()
    with pytest.raises(ValueError, match=r"Invalid alpha0: block 'all' spans param groups"):
        opt.add_param_group({"params": list(model.out.parameters()), "alpha0": 1e-2})
    assert len(opt.param_groups) == 1
    assert len(opt.layout.block_of_param) == 2  # the hidden layer's weight and bias only
    assert opt.step_sizes() == step_sizes
    opt.add_param_group({"params": list(model.out.parameters()), "alpha0": 1e-3})
    assert len(opt.param_groups) == 2
    train(model, opt, batches(2))
    assert all(p in opt.state for p in model.parameters())


def test_a_rejected_param_group_with_learned_weight_decay_changes_nothing() -> None:
    model = TinyNet()
    opt = MetaOptimize(
        model.hidden.parameters(), weight_decay=0.1, learn_weight_decay=True, blocks="scalar"
    )
    step_sizes, weight_decays = opt.step_sizes(), opt.weight_decays()
    with pytest.raises(ValueError, match=r"Invalid weight_decay: block 'all'"):
        opt.add_param_group({"params": list(model.out.parameters()), "weight_decay": 0.2})
    assert len(opt.param_groups) == 1
    assert opt.step_sizes() == step_sizes
    assert opt.weight_decays() == weight_decays


@pytest.mark.parametrize("blocks", ["scalar", "group", "tensor", "weight"])
@pytest.mark.parametrize("empty_first", [True, False])
def test_empty_param_groups_are_accepted_as_in_torch(blocks: str, empty_first: bool) -> None:
    # meta="fixed": the optimizer must equal torch's AdamW with or without the empty group.
    model, twin = TinyNet(), TinyNet()
    twin.load_state_dict(model.state_dict())
    groups: list[dict[str, Any]] = [{"params": list(model.parameters())}]
    groups.insert(0 if empty_first else 1, {"params": []})
    ours = MetaOptimize(groups, meta="fixed", alpha0=0.01, blocks=blocks, weight_decay=0.1)
    theirs = torch.optim.AdamW(twin.parameters(), lr=0.01, weight_decay=0.1)
    train(model, ours, batches(3))
    train(twin, theirs, batches(3))
    for mine, reference in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(mine, reference)
    assert len(ours.step_sizes()) == (2 if blocks == "group" else len(ours.layout.names))
    active = MetaOptimize(
        [{"params": []}, {"params": list(model.parameters())}], blocks=blocks, weight_decay=0.1
    )
    train(model, active, batches(3))
    active.load_state_dict(active.state_dict())
    assert all(torch.isfinite(a).all() for a in active.step_sizes().values())


def test_complex_parameters_are_refused_with_a_clear_message() -> None:
    complex_param = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(TypeError, match=r"Invalid params: complex .*view_as_real"):
        MetaOptimize([complex_param])
    optimizer = MetaOptimize([torch.zeros(2, requires_grad=True)])
    with pytest.raises(TypeError, match=r"complex"):
        optimizer.add_param_group({"params": [complex_param]})
    assert len(optimizer.param_groups) == 1


def test_skipped_step_count_is_an_int() -> None:
    weights = torch.zeros(2, requires_grad=True)
    optimizer = MetaOptimize([weights])
    weights.grad = torch.tensor([math.nan, 1.0])
    optimizer.step()
    assert optimizer.skipped_step_count == 1
    assert isinstance(optimizer.skipped_step_count, int)
