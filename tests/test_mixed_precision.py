"""Mixed precision: GradScaler and autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metaoptimize import MetaOptimize


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))


def _data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(32, 8, generator=generator), torch.randn(32, 1, generator=generator))
        for _ in range(steps)
    ]


def test_grad_scaler_unscales_before_the_meta_gradient_and_skips_overflow() -> None:
    """A power-of-two loss scale must not change anything, and an overflowing step is
    skipped by the scaler without touching the optimizer."""
    data = _data(12)
    plain_model, scaled_model = _model(), _model()
    kwargs = {"base": "adamw", "meta": "adam", "alpha0": 1e-2, "meta_lr": 0.05}
    plain = MetaOptimize(plain_model.parameters(), **kwargs)
    scaled = MetaOptimize(scaled_model.parameters(), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for step, (x, y) in enumerate(data):
        plain.zero_grad()
        (plain_model(x) - y).square().mean().backward()
        plain.step()

        scaled.zero_grad()
        loss = (scaled_model(x) - y).square().mean()
        scaler.scale(loss).backward()
        if step == 5:  # an overflow the scaler must catch: the step is skipped entirely
            before = [p.detach().clone() for p in scaled_model.parameters()]
            sizes_before = scaled.step_sizes()["all"].clone()
            next(scaled_model.parameters()).grad[0, 0] = float("inf")
            scaler.step(scaled)
            scaler.update()
            assert all(
                torch.equal(a, b) for a, b in zip(before, scaled_model.parameters(), strict=True)
            )
            assert torch.equal(scaled.step_sizes()["all"], sizes_before)
            scaled.zero_grad()
            loss = (scaled_model(x) - y).square().mean()
            scaler.scale(loss).backward()
        scaler.step(scaled)
        scaler.update()
    for a, b in zip(plain_model.parameters(), scaled_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        scaled.step_sizes()["all"], plain.step_sizes()["all"], rtol=1e-6, atol=0
    )
    assert scaled.skipped_steps.item() == 0  # the scaler skipped it, not our guard


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_training_is_finite_with_fp32_state(dtype: torch.dtype) -> None:
    model = _model()
    opt = MetaOptimize(
        model.parameters(), base="adamw", meta="lion", alpha0=1e-3, meta_lr=1e-2, blocks="tensor"
    )
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    for x, y in _data(20):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype):
            loss = (model(x) - y).square().mean()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert {v.dtype for s in opt.state.values() for v in s.values()} == {torch.float32}
    sizes = torch.stack(list(opt.step_sizes().values()))
    assert torch.isfinite(sizes).all()
    assert (sizes != 1e-3).any()


@pytest.mark.parametrize("fused", [False, True])
def test_kahan_summation_keeps_small_updates_of_bf16_weights(fused: bool) -> None:
    """Updates below half a bf16 rounding step vanish with plain rounding; with Kahan
    summation the bf16 weights follow the float32 run to within one rounding step."""
    finals = {}
    for mode in ("float32", "bf16", "bf16-kahan"):
        dtype = torch.float32 if mode == "float32" else torch.bfloat16
        weight = torch.nn.Parameter(torch.ones(64, dtype=dtype))
        opt = MetaOptimize(
            [weight],
            base="sgd",
            meta="fixed",
            alpha0=1e-3,
            fused=fused,
            # Compiled on CPU only when asked, small tensors only without foreach.
            fused_backend="compile" if fused else "auto",
            foreach=False if fused else None,
            kahan_summation=mode == "bf16-kahan",
        )
        for _ in range(200):
            weight.grad = torch.full_like(weight, 1.0)  # each step moves w by -1e-3
            opt.step()
        finals[mode] = weight.detach().float()
    # bf16 spacing just below 1.0 is 2**-8 ~ 0.0039: a 1e-3 step rounds back to 1.0
    assert torch.equal(finals["bf16"], torch.ones(64))
    torch.testing.assert_close(finals["float32"], torch.full((64,), 0.8), rtol=1e-4, atol=0)
    assert (finals["bf16-kahan"] - finals["float32"]).abs().max() <= 2**-9


def test_kahan_state_is_saved_and_only_for_low_precision() -> None:
    low = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    full = torch.nn.Parameter(torch.ones(4))
    opt = MetaOptimize([low, full], base="adamw", meta="lion", kahan_summation=True)
    low.grad, full.grad = torch.ones_like(low), torch.ones_like(full)
    opt.step()
    assert opt.state[low]["kahan_comp"].dtype == torch.bfloat16
    assert "kahan_comp" not in opt.state[full]
    assert "kahan_comp" in opt.state_dict()["state"][0]
    with pytest.raises(TypeError, match=r"Invalid kahan_summation: 1"):
        MetaOptimize([full], kahan_summation=1)  # type: ignore[arg-type]
