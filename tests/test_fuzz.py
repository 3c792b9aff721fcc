"""Hypothesis fuzzing: random shapes, dtypes, groups, block specs and hyperparameters."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metaoptimize import MetaOptimize

BASE_EXTRAS: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    "sgd": st.just({}),
    "sgdm": st.fixed_dictionaries({"momentum": st.floats(0.1, 0.99), "nesterov": st.booleans()}),
    "rmsprop": st.fixed_dictionaries(
        {
            "betas": st.tuples(st.floats(0.5, 0.999)),
            "centered": st.booleans(),
            "momentum": st.sampled_from([0.0, 0.5]),
        }
    ),
    "adam": st.fixed_dictionaries(
        {"betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.999))}
    ),
    "adamw": st.just({}),
    "lion": st.fixed_dictionaries(
        {"betas": st.tuples(st.floats(0.0, 0.99), st.floats(0.5, 0.999))}
    ),
}


@st.composite
def setups(draw: st.DrawFn) -> dict[str, Any]:
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    shapes = draw(
        st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=4)
    )
    params = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in shapes]
    base = draw(st.sampled_from(sorted(BASE_EXTRAS)))
    split = draw(st.integers(0, len(params) - 1)) if len(params) > 1 else 0
    groups = [{"params": params[: split or len(params)]}]
    if 0 < split < len(params):
        groups.append(
            {
                "params": params[split:],
                "lr": draw(st.floats(0.0, 2.0)),
                "gamma": draw(st.floats(0.0, 1.0)),
                "weight_decay": draw(st.floats(0.0, 0.5)),
            }
        )
    blocks = draw(st.sampled_from(["scalar", "group", "tensor", "weight", "explicit"]))
    if blocks == "explicit":
        owner = [draw(st.integers(0, 1)) for _ in params]
        blocks = [[p for p, o in zip(params, owner, strict=True) if o == b] for b in (0, 1)]
        blocks = [b for b in blocks if b] or [params]
    return {
        "groups": groups,
        "params": params,
        "blocks": blocks,
        "base": base,
        "meta": draw(st.sampled_from(["fixed", "sgd", "rmsprop", "adam", "lion", "auto"])),
        "extra": draw(BASE_EXTRAS[base]),
        "alpha0": draw(st.floats(1e-6, 0.5)),
        "meta_lr": draw(st.floats(0.0, 0.05)),
        "gamma": draw(st.floats(0.0, 1.0)),
        "weight_decay": draw(st.floats(0.0, 0.5)),
        "fused": False,
        "nan_step": draw(st.integers(-1, 4)),
    }


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups())
def test_random_configurations_train_finitely(setup: dict[str, Any]) -> None:
    extra = setup["extra"]
    if extra.get("nesterov"):
        extra = {**extra, "dampening": 0.0}
    opt = MetaOptimize(
        setup["groups"],
        base=setup["base"],
        meta=setup["meta"],
        blocks=setup["blocks"],
        alpha0=setup["alpha0"],
        meta_lr=setup["meta_lr"],
        gamma=setup["gamma"],
        weight_decay=setup["weight_decay"],
        **extra,
    )
    generator = torch.Generator().manual_seed(0)
    for step in range(5):
        for p in setup["params"]:
            p.grad = (torch.rand(p.shape, generator=generator) * 2 - 1).to(p.dtype)
        if step == setup["nan_step"]:
            setup["params"][0].grad.view(-1)[0] = float("nan")
        opt.step()
    assert opt.skipped_steps.item() == (1 if setup["nan_step"] >= 0 else 0)
    for p in setup["params"]:
        assert torch.isfinite(p).all()
        for value in opt.state[p].values():
            assert torch.isfinite(value).all()
    for size in opt.step_sizes().values():
        assert torch.isfinite(size).all()
        assert (size > 0).all()


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(["alpha0", "meta_lr", "gamma", "weight_decay", "eps", "lr", "meta_eps"]),
    value=st.one_of(
        st.floats(-1e6, -1e-9),
        st.just(float("nan")),
        st.just(float("inf")),
        st.text(max_size=3),
        st.none(),
    ),
)
def test_invalid_values_raise_a_clear_error(name: str, value: Any) -> None:
    if name == "meta_lr" and value is None:
        return  # None means "the meta rule's own default" (test_tuning_free.py)
    with pytest.raises((ValueError, TypeError), match=rf"Invalid {name}"):
        MetaOptimize([torch.nn.Parameter(torch.zeros(2))], **{name: value})


def _clone_setup(setup: dict[str, Any]) -> tuple[list[torch.Tensor], list[dict[str, Any]], Any]:
    """Fresh float64 copies of the setup's parameters, groups and explicit blocks."""
    originals = setup["params"]
    copies = [torch.nn.Parameter(p.detach().to(torch.float64, copy=True)) for p in originals]
    index = {id(p): i for i, p in enumerate(originals)}
    groups = [{**g, "params": [copies[index[id(p)]] for p in g["params"]]} for g in setup["groups"]]
    blocks = setup["blocks"]
    if not isinstance(blocks, str):
        blocks = [[copies[index[id(p)]] for p in block] for block in blocks]
    return copies, groups, blocks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups())
def test_foreach_equals_per_tensor_on_random_configurations(setup: dict[str, Any]) -> None:
    """Random shapes (0-d included), groups, blocks and rules: foreach = per tensor (float64)."""
    extra = setup["extra"]
    if extra.get("nesterov"):
        extra = {**extra, "dampening": 0.0}
    runs = []
    for foreach in (False, True):
        params, groups, blocks = _clone_setup(setup)
        opt = MetaOptimize(
            groups,
            base=setup["base"],
            meta=setup["meta"],
            blocks=blocks,
            alpha0=setup["alpha0"],
            meta_lr=setup["meta_lr"],
            gamma=setup["gamma"],
            weight_decay=setup["weight_decay"],
            foreach=foreach,
            **extra,
        )
        generator = torch.Generator().manual_seed(0)
        for step in range(5):
            for i, p in enumerate(params):
                grad = torch.rand(p.shape, generator=generator, dtype=torch.float64) * 2 - 1
                p.grad = None if (step == 2 and i == len(params) - 1) else grad
            if step == setup["nan_step"] and params[0].grad is not None:
                params[0].grad.view(-1)[0] = float("nan")
            opt.step()
        runs.append((params, opt))
    (loop_params, loop_opt), (foreach_params, foreach_opt) = runs
    for p, q in zip(loop_params, foreach_params, strict=True):
        torch.testing.assert_close(q, p, rtol=1e-10, atol=1e-12)
        for key, value in loop_opt.state[p].items():
            torch.testing.assert_close(foreach_opt.state[q][key], value, rtol=1e-10, atol=1e-12)
    assert int(loop_opt.skipped_steps) == int(foreach_opt.skipped_steps)
