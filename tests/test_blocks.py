"""Granularity identities and block-layout validation."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helpers import TinyNet, batches, clone_model, flat_step_sizes, loss_fn, train
from metaoptimize import MetaOptimize
from metaoptimize.blocks import build_layout

COMBOS = [
    ("adamw", "lion", 0.1),
    ("sgdm", "adam", 0.0),
    ("rmsprop", "sgd", 0.1),
    ("lion", "rmsprop", 0.0),
]
STEPS = 20


def _run(
    blocks_of: Any, base: str, meta: str, wd: float
) -> tuple[list[torch.Tensor], torch.Tensor]:
    model = TinyNet()
    groups = [{"params": list(model.hidden.parameters())}, {"params": list(model.out.parameters())}]
    opt = MetaOptimize(
        groups,
        base=base,
        meta=meta,
        alpha0=0.01,
        meta_lr=0.05 if meta != "sgd" else 0.5,
        gamma=0.95,
        weight_decay=wd,
        blocks=blocks_of(model),
    )
    train(model, opt, batches(STEPS))
    return [p.detach() for p in model.parameters()], flat_step_sizes(opt)


def _assert_runs_equal(a: Any, b: Any) -> None:
    for x, y in zip(a[0], b[0], strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)


@pytest.mark.parametrize(("base", "meta", "wd"), COMBOS)
def test_tensor_equals_explicit_one_tensor_blocks(base: str, meta: str, wd: float) -> None:
    tensor = _run(lambda m: "tensor", base, meta, wd)
    explicit = _run(lambda m: [[p] for p in m.parameters()], base, meta, wd)
    _assert_runs_equal(tensor, explicit)
    assert not torch.allclose(tensor[1], torch.full_like(tensor[1], 0.01))


@pytest.mark.parametrize(("base", "meta", "wd"), COMBOS)
def test_scalar_equals_one_explicit_block(base: str, meta: str, wd: float) -> None:
    _assert_runs_equal(
        _run(lambda m: "scalar", base, meta, wd),
        _run(lambda m: [list(m.parameters())], base, meta, wd),
    )


@pytest.mark.parametrize(("base", "meta", "wd"), COMBOS)
def test_group_equals_explicit_group_blocks(base: str, meta: str, wd: float) -> None:
    _assert_runs_equal(
        _run(lambda m: "group", base, meta, wd),
        _run(lambda m: [list(m.hidden.parameters()), list(m.out.parameters())], base, meta, wd),
    )


@pytest.mark.parametrize(("base", "meta", "wd"), COMBOS)
def test_layerwise_is_an_alias_of_tensor(base: str, meta: str, wd: float) -> None:
    _assert_runs_equal(
        _run(lambda m: "tensor", base, meta, wd), _run(lambda m: "layerwise", base, meta, wd)
    )


@pytest.mark.parametrize("meta", ["fixed", "lion"])
@pytest.mark.parametrize(("base", "_meta", "wd"), COMBOS)
def test_meta_off_makes_every_granularity_identical(
    base: str, _meta: str, wd: float, meta: str
) -> None:
    runs = []
    for blocks in ("scalar", "group", "tensor", "weight"):
        model = TinyNet()
        opt = MetaOptimize(
            model.parameters(),
            base=base,
            meta=meta,
            meta_lr=0.0,
            alpha0=0.01,
            weight_decay=wd,
            blocks=blocks,
        )
        train(model, opt, batches(STEPS))
        runs.append([p.detach() for p in model.parameters()])
    # Block step sizes are the same update at every granularity, but not always the same
    # kernel on CPU: one block merges the small tensors into one flat tensor for the
    # per-tensor kernel, one block per tensor leaves them to the multi-tensor kernel, whose
    # AdamW update rounds differently with a decoupled decay. Per-weight step sizes multiply
    # by α elementwise where a block's α folds into the update's last operation (Quotient).
    # All equal to the last bits of float64.
    for other in runs[1:]:
        for x, y in zip(runs[0], other, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-15)


def test_weight_blocks_on_scalar_parameters_equal_tensor_blocks() -> None:
    """A one-element parameter's per-weight step size is its per-tensor step size."""
    params_a = [torch.nn.Parameter(torch.tensor([v], dtype=torch.float64)) for v in (1.0, -2.0)]
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opts = [
        MetaOptimize(ps, base="adam", meta="adam", alpha0=0.1, meta_lr=0.05, blocks=b)
        for ps, b in ((params_a, "weight"), (params_b, "tensor"))
    ]
    for step in range(15):
        for ps, opt in zip((params_a, params_b), opts, strict=True):
            for p in ps:
                p.grad = (p - step * 0.1).detach().clone()
            opt.step()
    # Equal to the last bits: a block step size is folded into an addcdiv, a per-weight one
    # multiplies the formed step.
    torch.testing.assert_close(
        flat_step_sizes(opts[0]), flat_step_sizes(opts[1]), rtol=1e-14, atol=1e-16
    )


def test_step_sizes_names_and_shapes() -> None:
    model = TinyNet()
    named = MetaOptimize(model.named_parameters(), blocks="tensor")
    assert list(named.step_sizes()) == ["hidden.weight", "hidden.bias", "out.weight", "out.bias"]
    assert all(v.dim() == 0 for v in named.step_sizes().values())
    weight = MetaOptimize(model.parameters(), blocks="weight", alpha0=0.3)
    sizes = weight.step_sizes()
    assert list(sizes) == ["param0", "param1", "param2", "param3"]
    assert [v.shape for v in sizes.values()] == [p.shape for p in model.parameters()]
    assert all(torch.all(v == 0.3) for v in sizes.values())
    groups = MetaOptimize(
        [{"params": [model.hidden.weight]}, {"params": [model.out.weight]}], blocks="group"
    )
    assert list(groups.step_sizes()) == ["group0", "group1"]
    named_blocks = MetaOptimize(
        model.parameters(),
        blocks={"body": list(model.hidden.parameters()), "head": list(model.out.parameters())},
    )
    assert list(named_blocks.step_sizes()) == ["body", "head"]


def test_parameter_without_grad_does_not_shift_other_blocks() -> None:
    """Skipping a parameter leaves it and its block alone; other blocks match a run without it."""
    model = TinyNet()
    twin = clone_model(model)
    frozen_before = model.hidden.bias.detach().clone()
    opt = MetaOptimize(
        model.parameters(), base="adamw", meta="adam", alpha0=0.01, meta_lr=0.05, blocks="tensor"
    )
    others = [p for n, p in twin.named_parameters() if n != "hidden.bias"]
    twin_opt = MetaOptimize(
        others, base="adamw", meta="adam", alpha0=0.01, meta_lr=0.05, blocks="tensor"
    )
    for batch in batches(10):
        for m, o in ((model, opt), (twin, twin_opt)):
            m.zero_grad(set_to_none=True)
            loss_fn(m, batch).backward()
            m.hidden.bias.grad = None
            o.step()
    sizes = opt.step_sizes()
    assert torch.equal(model.hidden.bias, frozen_before)
    assert sizes["param1"].item() == pytest.approx(0.01, rel=1e-12)
    assert model.hidden.bias not in opt.state
    twin_sizes = list(twin_opt.step_sizes().values())
    for mine, theirs in zip(
        [sizes[k] for k in ("param0", "param2", "param3")], twin_sizes, strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    for mine, theirs in zip(
        others, [p for n, p in model.named_parameters() if n != "hidden.bias"], strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("spec", "error", "pattern"),
    [
        ("rows", ValueError, r"Invalid blocks: 'rows'"),
        (42, TypeError, r"Invalid blocks: int"),
        ("missing", ValueError, r"Invalid blocks: parameters \[1\] are in no block"),
        ("twice", ValueError, r"Invalid blocks: a parameter appears in more than one block"),
        ("stranger", ValueError, r"not in the optimizer"),
        ("empty", ValueError, r"Invalid blocks: block 1 is empty"),
    ],
)
def test_invalid_blocks(spec: Any, error: type[Exception], pattern: str) -> None:
    a, b = (torch.nn.Parameter(torch.zeros(2)) for _ in range(2))
    stranger = torch.nn.Parameter(torch.zeros(1))
    specs = {
        "missing": [[a]],
        "twice": [[a, b], [b]],
        "stranger": [[a, b, stranger]],
        "empty": [[a, b], []],
    }
    with pytest.raises(error, match=pattern):
        build_layout(specs.get(spec, spec), [{"params": [a, b]}])
