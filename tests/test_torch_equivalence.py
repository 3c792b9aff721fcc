"""With the meta rule off, every base equals its torch.optim counterpart step for step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from helpers import PlainLion, TinyNet, batches, clone_model, step_together, two_groups
from metaoptimize import MetaOptimize, ReferenceMetaOptimize

STEPS = 50

# name -> (base, our group 1, our group 2, torch class, torch group 1, torch group 2)
# Our alpha0 plays torch's lr; the two groups differ in every hyperparameter the rule has.
EQUIVALENCES: dict[
    str,
    tuple[str, dict[str, Any], dict[str, Any], Callable[..., Any], dict[str, Any], dict[str, Any]],
] = {
    "sgd": (
        "sgd",
        {"alpha0": 0.05, "weight_decay": 0.01},
        {"alpha0": 0.02},
        torch.optim.SGD,
        {"lr": 0.05, "weight_decay": 0.01},
        {"lr": 0.02},
    ),
    "sgdm": (
        "sgdm",
        {"alpha0": 0.03, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01},
        {"alpha0": 0.01, "momentum": 0.5},
        torch.optim.SGD,
        {"lr": 0.03, "momentum": 0.9, "dampening": 0.2, "weight_decay": 0.01},
        {"lr": 0.01, "momentum": 0.5},
    ),
    "sgdm-nesterov": (
        "sgdm",
        {"alpha0": 0.03, "momentum": 0.9, "nesterov": True, "weight_decay": 0.02},
        {"alpha0": 0.01, "momentum": 0.7},
        torch.optim.SGD,
        {"lr": 0.03, "momentum": 0.9, "nesterov": True, "weight_decay": 0.02},
        {"lr": 0.01, "momentum": 0.7},
    ),
    "rmsprop": (
        "rmsprop",
        {"alpha0": 0.01, "betas": (0.9,), "eps": 1e-6, "weight_decay": 0.01},
        {"alpha0": 0.003, "betas": (0.99,), "centered": True, "momentum": 0.5},
        torch.optim.RMSprop,
        {"lr": 0.01, "alpha": 0.9, "eps": 1e-6, "weight_decay": 0.01},
        {"lr": 0.003, "alpha": 0.99, "centered": True, "momentum": 0.5},
    ),
    "adam": (
        "adam",
        {"alpha0": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.05},
        {"alpha0": 0.003, "eps": 1e-6},
        torch.optim.Adam,
        {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.05},
        {"lr": 0.003, "eps": 1e-6},
    ),
    "adamw": (
        "adamw",
        {"alpha0": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1},
        {"alpha0": 0.003, "eps": 1e-6, "weight_decay": 0.0},
        torch.optim.AdamW,
        {"lr": 0.01, "betas": (0.8, 0.99), "weight_decay": 0.1},
        {"lr": 0.003, "eps": 1e-6, "weight_decay": 0.0},
    ),
    "lion": (
        "lion",
        {"alpha0": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1},
        {"alpha0": 3e-4, "betas": (0.95, 0.98)},
        PlainLion,
        {"lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1},
        {"lr": 3e-4, "betas": (0.95, 0.98)},
    ),
}

# Ways of switching the meta rule off, and of spelling the step size.
VARIANTS = {
    "fixed-group-blocks": {"meta": "fixed", "blocks": "group"},
    "lion-meta-lr-0-tensor-blocks": {"meta": "lion", "meta_lr": 0.0, "blocks": "tensor"},
    "adam-meta-lr-0-weight-blocks": {"meta": "adam", "meta_lr": 0.0, "blocks": "weight"},
}


def _assert_same_trajectory(
    ours: Any, theirs: Any, ours_model: TinyNet, their_model: TinyNet
) -> None:
    for step, batch in enumerate(batches(STEPS)):
        step_together(((ours_model, ours), (their_model, theirs)), batch)
        for p_ours, p_theirs in zip(ours_model.parameters(), their_model.parameters(), strict=True):
            torch.testing.assert_close(
                p_ours,
                p_theirs,
                rtol=1e-12,
                atol=1e-13,
                msg=lambda m, step=step: f"step {step}: {m}",
            )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("name", sorted(EQUIVALENCES))
def test_meta_off_equals_torch_optim(name: str, variant: str) -> None:
    base, ours1, ours2, torch_cls, theirs1, theirs2 = EQUIVALENCES[name]
    model = TinyNet()
    reference_model = clone_model(model)
    ours = MetaOptimize(two_groups(model, ours1, ours2), base=base, **VARIANTS[variant])
    theirs = torch_cls(two_groups(reference_model, theirs1, theirs2))
    _assert_same_trajectory(ours, theirs, model, reference_model)


@pytest.mark.parametrize("name", sorted(EQUIVALENCES))
def test_group_lr_is_a_multiplier(name: str) -> None:
    """alpha0=1 with group lr=x equals torch.optim with lr=x: lr multiplies the step size."""
    base, ours1, ours2, torch_cls, theirs1, theirs2 = EQUIVALENCES[name]
    model = TinyNet()
    reference_model = clone_model(model)
    ours1 = {**ours1, "alpha0": 1.0, "lr": theirs1["lr"]}
    ours2 = {**ours2, "alpha0": 1.0, "lr": theirs2["lr"]}
    ours = MetaOptimize(two_groups(model, ours1, ours2), base=base, meta="fixed")
    theirs = torch_cls(two_groups(reference_model, theirs1, theirs2))
    _assert_same_trajectory(ours, theirs, model, reference_model)


@pytest.mark.parametrize("name", sorted(EQUIVALENCES))
def test_reference_meta_off_equals_torch_optim(name: str) -> None:
    """The reference's pure base steps are themselves checked against torch.optim."""
    base, ours1, ours2, torch_cls, theirs1, theirs2 = EQUIVALENCES[name]
    model = TinyNet()
    reference_model = clone_model(model)
    ours = ReferenceMetaOptimize(
        two_groups(model, ours1, ours2), base=base, meta="fixed", blocks="group"
    )
    theirs = torch_cls(two_groups(reference_model, theirs1, theirs2))
    _assert_same_trajectory(ours, theirs, model, reference_model)


def test_equivalences_cover_every_base() -> None:
    from metaoptimize import BASE_RULES

    assert {entry[0] for entry in EQUIVALENCES.values()} == set(BASE_RULES)
