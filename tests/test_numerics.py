"""Numerical faults that must neither poison the weights nor pass unnoticed (issue 16).

A gradient that is finite but whose square overflows is a normal step for torch.optim: the
second moment saturates at inf and the update goes to 0. Every path here must do the same.
"""

from __future__ import annotations

import pytest
import torch

from metaoptimize import MetaOptimize

TORCH_RULES = {
    "adam": lambda p: torch.optim.Adam(p, lr=0.1),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.0),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.1),
}


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("base", sorted(TORCH_RULES))
def test_a_gradient_whose_square_overflows_saturates_like_torch(base: str, foreach: bool) -> None:
    ours = torch.zeros(2, requires_grad=True)
    theirs = torch.zeros(2, requires_grad=True)
    optimizer = MetaOptimize([ours], base=base, meta="fixed", alpha0=0.1, foreach=foreach)
    reference = TORCH_RULES[base]([theirs])
    for grad in ([1e20, 1.0], [1.0, 1.0], [1.0, -1.0]):
        ours.grad, theirs.grad = torch.tensor(grad), torch.tensor(grad)
        optimizer.step()
        reference.step()
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, theirs)
    assert int(optimizer.skipped_steps) == 0


@pytest.mark.parametrize("meta", ["adam", "rmsprop", "auto", "lion"])
def test_a_meta_gradient_whose_square_overflows_keeps_the_step_size_finite(meta: str) -> None:
    weights = torch.zeros(2, requires_grad=True)
    optimizer = MetaOptimize([weights], base="lion", meta=meta)
    for step in range(8):
        spike = [1e23, 1.0] if step < 3 else [1.0, -1.0]
        weights.grad = torch.tensor(spike)
        optimizer.step()
    assert torch.isfinite(weights).all()
    assert all(torch.isfinite(a).all() for a in optimizer.step_sizes().values())
    assert int(optimizer.skipped_steps) == 0
