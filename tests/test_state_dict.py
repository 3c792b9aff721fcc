"""Saved state: format stability, hyperparameters restored, bad dicts refused (issues 15-17).

A state dict is data from outside. Loading must either give an optimizer that continues
exactly where the saved one stopped, or raise a ValueError that names the culprit and leaves
the optimizer as it was.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import TinyNet, batches, flat_step_sizes, train
from metaoptimize import MetaOptimize

FIXTURE = Path(__file__).parent / "fixtures" / "state_v1.pt"


def _run(optimizer: MetaOptimize, weights: list[torch.Tensor], grads: list[Any]) -> None:
    for step_grads in grads:
        for w, g in zip(weights, step_grads, strict=True):
            w.grad = g.clone()
        optimizer.step()


def test_a_state_dict_saved_in_format_1_continues() -> None:
    """The release that wrote the file continued it to these weights. The format is fixed; the
    arithmetic may change in the last bits between releases (within one, resuming is bitwise:
    see the tests below), so the continuation is compared to float64 rounding."""
    saved = torch.load(FIXTURE, weights_only=True)  # plain tensors only: no code runs
    weights = [w.clone().requires_grad_() for w in saved["weights"]]
    optimizer = MetaOptimize(weights, **saved["constructor"])
    optimizer.load_state_dict(saved["state_dict"])
    _run(optimizer, weights, saved["grads"])
    for mine, theirs in zip(weights, saved["final_weights"], strict=True):
        torch.testing.assert_close(mine.detach(), theirs, rtol=1e-12, atol=1e-14)
    for name, alpha in optimizer.step_sizes().items():
        torch.testing.assert_close(alpha, saved["final_step_sizes"][name], rtol=1e-12, atol=0)


def _trained(seed: int = 0, steps: int = 5, **kwargs: Any) -> tuple[MetaOptimize, list[Any]]:
    generator = torch.Generator().manual_seed(seed)
    weights = [torch.randn(5, 3, generator=generator, dtype=torch.float64).requires_grad_()]
    optimizer = MetaOptimize(weights, **kwargs)
    grads = [[torch.randn(5, 3, generator=generator, dtype=torch.float64)] for _ in range(steps)]
    _run(optimizer, weights, grads)
    return optimizer, weights


def test_load_state_dict_restores_every_hyperparameter() -> None:
    settings = {
        "meta_lr": 0.2,
        "meta_betas": (0.99, 0.9),
        "meta_eps": 1e-6,
        "alpha_min": 1e-5,
        "alpha_max": 0.5,
        "gamma": 0.9,
        "betas": (0.8, 0.99),
        "eps": 1e-6,
        "weight_decay": 0.1,
        "lr": 0.5,
        "alpha0": 0.01,
    }
    saved, weights = _trained(**settings)
    grads = [[torch.full((5, 3), value, dtype=torch.float64)] for value in (1.0, -2.0, 0.5)]
    resumed_weights = [w.detach().clone().requires_grad_() for w in weights]
    resumed = MetaOptimize(resumed_weights)  # every argument different: defaults
    resumed.load_state_dict(saved.state_dict())
    assert resumed.meta_lr == 0.2
    _run(saved, weights, grads)
    _run(resumed, resumed_weights, grads)
    assert torch.equal(resumed_weights[0], weights[0])
    assert torch.equal(resumed.step_sizes()["all"], saved.step_sizes()["all"])


def test_a_state_dict_from_before_hyperparameters_were_saved_still_loads() -> None:
    saved, _ = _trained()
    state = saved.state_dict()
    del state["param_groups"][0]["metaoptimize"]["hyperparameters"]
    fresh, _ = _trained(seed=1, meta_lr=0.3)
    fresh.load_state_dict(state)
    assert fresh.meta_lr == 0.3  # nothing saved: the optimizer keeps its own


def test_a_float64_state_dict_is_cast_to_float32_parameters() -> None:
    saved, _ = _trained(weight_decay=0.01)
    weights32 = [torch.zeros(5, 3, requires_grad=True)]
    optimizer = MetaOptimize(weights32, weight_decay=0.01)
    optimizer.load_state_dict(saved.state_dict())
    for value in optimizer.state[weights32[0]].values():
        assert value.dtype == torch.float32
    weights32[0].grad = torch.ones(5, 3)
    optimizer.step()
    assert torch.isfinite(weights32[0]).all()
    assert optimizer.skipped_step_count == 0


def _param_state(state: dict[str, Any]) -> dict[str, Any]:
    return next(iter(state["state"].values()))


def _section(state: dict[str, Any]) -> dict[str, Any]:
    return state["param_groups"][0]["metaoptimize"]


CORRUPTIONS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "nan log_alpha": (
        lambda s: _section(s)["log_alpha"].fill_(math.nan),
        r"log_alpha.*NaN or infinite",
    ),
    "inf log_alpha": (
        lambda s: _section(s)["log_alpha"].fill_(math.inf),
        r"log_alpha.*NaN or infinite",
    ),
    "nan exp_avg": (
        lambda s: _param_state(s)["exp_avg"].view(-1)[0].fill_(math.nan),
        r"state\[0\]\['exp_avg'\] has NaN",
    ),
    "negative exp_avg_sq": (
        lambda s: _param_state(s)["exp_avg_sq"].view(-1)[0].fill_(-1.0),
        r"'exp_avg_sq'\] has negative values",
    ),
    "nan step": (
        lambda s: _param_state(s)["step"].fill_(math.nan),
        r"'step'\] has NaN",
    ),
    "wrong shape": (
        lambda s: _param_state(s).update(exp_avg=torch.zeros(3, 5, dtype=torch.float64)),
        r"'exp_avg'\] has shape \(3, 5\), expected \(5, 3\)",
    ),
    "nan lr": (lambda s: s["param_groups"][0].update(lr=math.nan), r"Invalid lr"),
    "gamma 2": (lambda s: s["param_groups"][0].update(gamma=2.0), r"Invalid gamma"),
    "betas 1.5": (lambda s: s["param_groups"][0].update(betas=(1.5, 0.999)), r"Invalid betas"),
    "alpha0 text": (lambda s: s["param_groups"][0].update(alpha0="abc"), r"Invalid alpha0"),
    "nan meta_lr": (
        lambda s: _section(s)["hyperparameters"].update(meta_lr=math.nan),
        r"Invalid meta_lr",
    ),
    "bounds reversed": (
        lambda s: _section(s)["hyperparameters"].update(log_alpha_bounds=(0.0, -1.0)),
        r"log_alpha_bounds",
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_corrupted_state_dict_is_refused_and_changes_nothing(corruption: str) -> None:
    saved, _ = _trained()
    state = copy.deepcopy(saved.state_dict())
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(state)
    target, weights = _trained(seed=1)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises((ValueError, TypeError), match=message):
        target.load_state_dict(state)
    after = target.state_dict()
    assert _same(after, before)
    weights[0].grad = torch.ones(5, 3, dtype=torch.float64)
    target.step()
    assert torch.isfinite(weights[0]).all()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_loading_into_a_stepped_optimizer_continues_like_loading_into_a_fresh_one() -> None:
    """The CPU meta step keeps its values as Python floats between steps; a load must
    replace them (the floats follow every in-place write to the tensors)."""
    torch.manual_seed(0)
    start = [torch.randn(4, 3), torch.randn(3)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(6)]
    kwargs = {"blocks": "tensor", "meta_lr": 0.05}
    first = [w.clone().requires_grad_() for w in start]
    source = MetaOptimize(first, **kwargs)
    _run(source, first, grads[:2])
    saved = copy.deepcopy(source.state_dict())
    loaded_weights = [w.detach().clone() for w in first]

    stepped_weights = [w.clone().requires_grad_() for w in start]
    stepped = MetaOptimize(stepped_weights, **kwargs)
    _run(stepped, stepped_weights, grads[2:5])  # its float copies are current
    with torch.no_grad():
        for w, value in zip(stepped_weights, loaded_weights, strict=True):
            w.copy_(value)
    stepped.load_state_dict(copy.deepcopy(saved))
    fresh_weights = [w.clone().requires_grad_() for w in loaded_weights]
    fresh = MetaOptimize(fresh_weights, **kwargs)
    fresh.load_state_dict(copy.deepcopy(saved))
    _run(stepped, stepped_weights, grads[5:])
    _run(fresh, fresh_weights, grads[5:])
    for mine, theirs in zip(stepped_weights, fresh_weights, strict=True):
        assert torch.equal(mine, theirs)
    for name, alpha in stepped.step_sizes().items():
        assert torch.equal(alpha, fresh.step_sizes()[name])


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"foreach": False}, {"blocks": "weight"}, {"meta": "lion", "learn_weight_decay": True}],
    ids=["defaults", "per-tensor", "per-weight", "learned-decay"],
)
def test_deepcopy_and_pickle_give_optimizers_that_continue_the_run(kwargs: dict[str, Any]) -> None:
    """torch.optim's ``__getstate__`` keeps three attributes; MetaOptimize's meta parameters,
    rules and kernels live in others, and a copy must carry them (it failed with an
    AttributeError before)."""
    model = TinyNet()
    opt = MetaOptimize(model.parameters(), weight_decay=0.01, **kwargs)
    data = batches(6)
    train(model, opt, data[:3])
    copied = copy.deepcopy((model, opt))
    pickled = pickle.loads(pickle.dumps((model, opt)))
    for other_model, other_opt in (copied, pickled):
        train(other_model, other_opt, data[3:])
    train(model, opt, data[3:])
    for other_model, other_opt in (copied, pickled):
        for a, b in zip(model.parameters(), other_model.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
        torch.testing.assert_close(flat_step_sizes(other_opt), flat_step_sizes(opt), rtol=0, atol=0)
