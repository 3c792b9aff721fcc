"""The fast optimizer equals the readable reference on every case of the table (float64)."""

from __future__ import annotations

import functools
import math
from typing import Any

import pytest
import torch

from cases import CASES, Case
from helpers import TinyNet, batches, clone_model, flat_step_sizes, nan_out_bias, step_together
from metaoptimize import MetaOptimize, ReferenceMetaOptimize

STEPS = 25


def _groups(model: TinyNet) -> list[dict[str, Any]]:
    # The second group scales the learned step size, so group handling is exercised too.
    return [
        {"params": list(model.hidden.parameters())},
        {"params": list(model.out.parameters()), "lr": 0.5},
    ]


def _blocks(case: Case, model: TinyNet) -> Any:
    if case.blocks != "explicit":
        return case.blocks
    # Blocks that cut across param groups.
    return [[model.hidden.weight, model.out.bias], [model.hidden.bias, model.out.weight]]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fast_path_equals_reference(case: Case) -> None:
    fast_model = TinyNet()
    ref_model = clone_model(fast_model)
    fast = MetaOptimize(_groups(fast_model), blocks=_blocks(case, fast_model), **case.kwargs())
    ref = ReferenceMetaOptimize(
        _groups(ref_model), blocks=_blocks(case, ref_model), **case.kwargs()
    )
    moved = False
    for batch in batches(STEPS):
        step_together(((fast_model, fast), (ref_model, ref)), batch)
        for p_fast, p_ref in zip(fast_model.parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(p_fast, p_ref, rtol=1e-10, atol=1e-12)
        fast_sizes, ref_sizes = flat_step_sizes(fast), flat_step_sizes(ref)
        torch.testing.assert_close(fast_sizes, ref_sizes, rtol=1e-10, atol=1e-14)
        moved |= bool((fast_sizes - 0.02).abs().max() > 1e-6)
    # The comparison is only meaningful if the meta rule actually moved the step sizes.
    assert moved == (case.meta != "fixed")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_device_scalar_path_equals_the_host_scalar_path(case: Case) -> None:
    """On CPU the per-tensor kernel takes Python scalars and skips a non-finite step on the
    host; CUDA keeps the sync-free device-scalar path. Forced on CPU, it must agree, skipped
    step included (the reference test above checks the host path)."""
    host_model = TinyNet()
    device_model = clone_model(host_model)
    host = MetaOptimize(_groups(host_model), blocks=_blocks(case, host_model), **case.kwargs())
    device = MetaOptimize(
        _groups(device_model), blocks=_blocks(case, device_model), **case.kwargs()
    )
    device._device_scalars = True
    for step, batch in enumerate(batches(12)):
        pairs = ((host_model, host), (device_model, device))
        step_together(pairs, batch, nan_out_bias if step == 5 else None)
        for p_host, p_device in zip(
            host_model.parameters(), device_model.parameters(), strict=True
        ):
            torch.testing.assert_close(p_host, p_device, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(
            flat_step_sizes(host), flat_step_sizes(device), rtol=1e-12, atol=1e-15
        )
    assert host.skipped_step_count == device.skipped_step_count == 1


@pytest.mark.parametrize("blocks", ["scalar", "tensor"])
def test_host_and_device_scalar_paths_agree_in_float32(blocks: str) -> None:
    """In float32 the host path rounds its double-precision block sums, step sizes and meta
    state to float32 as the tensor path stores them: the two stay within float32 rounding,
    over enough steps for a rounding mismatch to compound."""
    torch.manual_seed(3)
    host_model = TinyNet().float()
    device_model = clone_model(host_model)
    host = MetaOptimize(host_model.parameters(), blocks=blocks, meta_lr=0.05)
    device = MetaOptimize(device_model.parameters(), blocks=blocks, meta_lr=0.05)
    device._device_scalars = True
    for x, y in batches(40):
        step_together(((host_model, host), (device_model, device)), (x.float(), y.float()))
    for p_host, p_device in zip(host_model.parameters(), device_model.parameters(), strict=True):
        torch.testing.assert_close(p_host, p_device, rtol=1e-4, atol=1e-6)
    host_sizes, device_sizes = flat_step_sizes(host), flat_step_sizes(device)
    assert (host_sizes / 1e-3 - 1.0).abs().max() > 0.05  # they moved from alpha0 = 1e-3
    torch.testing.assert_close(host_sizes, device_sizes, rtol=1e-4, atol=0.0)
    # The floats the host path steps from are exactly the stored float32 values.
    values, state = host._step_size._floats()
    assert values == host._step_size.values.tolist()
    assert state == {key: value.tolist() for key, value in host._step_size.state.items()}


def test_cpu_meta_steps_write_the_step_sizes_when_they_are_read() -> None:
    """A run of CPU meta steps keeps the step sizes as floats and writes the tensors only when
    they are read; a write from outside is seen by the next step."""
    model = TinyNet()
    opt = MetaOptimize(model.parameters(), blocks="tensor", meta_lr=0.05)
    data = batches(4)
    step_together(((model, opt),), data[0])
    stored = opt._step_size._values
    version = stored._version
    for batch in data[1:]:
        step_together(((model, opt),), batch)
    assert stored._version == version  # three meta steps, nothing written
    floats = opt._step_size._floats()[0]
    assert opt._step_size.values.tolist() == floats  # written on reading
    assert stored._version > version
    opt._step_size.values.fill_(math.log(0.01))
    assert opt._step_size._floats()[0] == pytest.approx([math.log(0.01)] * 4)
    assert flat_step_sizes(opt).tolist() == pytest.approx([0.01] * 4)


@pytest.mark.parametrize("blocks", ["scalar", "tensor"])
def test_parameters_whose_gradient_comes_and_goes_follow_the_reference(blocks: str) -> None:
    """The kernel plan is reused per set of parameters with gradients: a parameter without a
    gradient on some steps changes the set, and each set must get its own plan."""
    fast_model = TinyNet()
    ref_model = clone_model(fast_model)
    settings: dict[str, Any] = {"base": "adamw", "meta": "adam", "meta_lr": 0.05}
    settings |= {"alpha0": 0.02, "gamma": 0.99, "weight_decay": 0.01, "alpha_max": 1.0}
    fast = MetaOptimize(fast_model.parameters(), blocks=blocks, **settings)
    ref = ReferenceMetaOptimize(ref_model.parameters(), blocks=blocks, **settings)
    for step, batch in enumerate(batches(12)):
        tamper = functools.partial(_drop_some_gradients, step=step)
        step_together(((fast_model, fast), (ref_model, ref)), batch, tamper)
        for p_fast, p_ref in zip(fast_model.parameters(), ref_model.parameters(), strict=True):
            torch.testing.assert_close(p_fast, p_ref, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            flat_step_sizes(fast), flat_step_sizes(ref), rtol=1e-10, atol=1e-14
        )
    assert len(fast._plan_cache) > 1  # several sets of parameters were planned


def _drop_some_gradients(model: torch.nn.Module, step: int) -> None:
    if step % 3 == 1:
        model.hidden.bias.grad = None
    if step % 4 == 2:
        model.out.weight.grad = None
