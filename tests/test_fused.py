"""The fused (torch.compile) kernels equal the eager path in float64."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helpers import TinyNet, batches, clone_model, flat_step_sizes, loss_fn
from metaoptimize import MetaOptimize

CASES = [
    {"base": "adamw", "meta": "lion", "blocks": "scalar", "weight_decay": 0.1, "gamma": 1.0},
    {"base": "adamw", "meta": "adam", "blocks": "weight", "weight_decay": 0.0, "gamma": 0.9},
    {"base": "adamw", "meta": "fixed", "blocks": "tensor", "weight_decay": 0.1},
    {"base": "lion", "meta": "lion", "blocks": "tensor", "weight_decay": 0.1, "gamma": 0.99},
    {"base": "lion", "meta": "sgd", "blocks": "group", "weight_decay": 0.0, "meta_lr": 0.5},
]


@pytest.mark.parametrize("kwargs", CASES, ids=lambda k: f"{k['base']}-{k['meta']}-{k['blocks']}")
def test_fused_equals_eager(kwargs: dict[str, Any]) -> None:
    kwargs = {"alpha0": 0.01, "meta_lr": 0.05, **kwargs}
    eager_model = TinyNet()
    fused_model = clone_model(eager_model)
    groups = [
        {"params": list(eager_model.hidden.parameters())},
        {"params": list(eager_model.out.parameters()), "lr": 0.5},
    ]
    fused_groups = [
        {"params": list(fused_model.hidden.parameters())},
        {"params": list(fused_model.out.parameters()), "lr": 0.5},
    ]
    eager = MetaOptimize(groups, **kwargs)
    fused = MetaOptimize(fused_groups, fused=True, **kwargs)
    for step, batch in enumerate(batches(15)):
        for model, opt in ((eager_model, eager), (fused_model, fused)):
            model.zero_grad(set_to_none=True)
            loss_fn(model, batch).backward()
            if step == 7:  # a skipped step must be skipped by both
                model.out.bias.grad[0] = float("nan")
            opt.step()
        for a, b in zip(eager_model.parameters(), fused_model.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            flat_step_sizes(fused), flat_step_sizes(eager), rtol=1e-12, atol=0
        )
    for p in eager_model.parameters():
        for key, value in eager.state[p].items():
            torch.testing.assert_close(
                fused.state[fused_model.get_parameter(_name(eager_model, p))][key],
                value,
                rtol=1e-12,
                atol=1e-14,
            )
    assert fused.skipped_steps.item() == eager.skipped_steps.item() == 1


def _name(model: torch.nn.Module, param: torch.Tensor) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


def test_fused_falls_back_to_eager_for_other_bases() -> None:
    model = TinyNet()
    twin = clone_model(model)
    eager = MetaOptimize(model.parameters(), base="sgdm", meta="adam", alpha0=0.01)
    fused = MetaOptimize(twin.parameters(), base="sgdm", meta="adam", alpha0=0.01, fused=True)
    for batch in batches(5):
        for m, o in ((model, eager), (twin, fused)):
            o.zero_grad()
            loss_fn(m, batch).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_fused_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match=r"Invalid fused: 'yes'"):
        MetaOptimize(TinyNet().parameters(), fused="yes")  # type: ignore[arg-type]
