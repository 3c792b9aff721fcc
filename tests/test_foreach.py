"""The multi-tensor (foreach) path equals the per-tensor path in float64."""

from __future__ import annotations

import math

import pytest
import torch

from cases import CASES, Case
from helpers import (
    TinyNet,
    batches,
    clone_model,
    flat_step_sizes,
    nan_out_bias,
    step_together,
)
from metaoptimize import MetaOptimize
from metaoptimize.base import operand
from metaoptimize.metagrad import _nonfinite_count


@pytest.mark.parametrize("scalars", ["host", "device"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_foreach_equals_per_tensor(case: Case, scalars: str) -> None:
    """Two groups (one with an lr multiplier), a skipped step, a parameter without gradient.

    On CPU the multi-tensor kernel takes Python scalars; ``device`` forces the sync-free form
    CUDA runs (0-d tensors, a skipped step reaching the kernel with ok = 0).
    """
    per_tensor_model = TinyNet()
    foreach_model = clone_model(per_tensor_model)
    optimizers = []
    for model, foreach in ((per_tensor_model, False), (foreach_model, True)):
        groups, blocks = case.groups(model)
        opt = MetaOptimize(groups, blocks=blocks, foreach=foreach, **case.kwargs())
        opt._device_scalars = foreach and scalars == "device"
        optimizers.append(opt)
    for step, batch in enumerate(batches(12)):
        pairs = list(zip((per_tensor_model, foreach_model), optimizers, strict=True))
        # A skipped step must be skipped by both; a parameter without a gradient keeps its state.
        step_together(pairs, batch, {5: nan_out_bias, 8: _drop_hidden_bias_grad}.get(step))
    per_tensor, foreach = optimizers
    for a, b in zip(per_tensor_model.parameters(), foreach_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-11, atol=1e-13)
        for key, value in per_tensor.state[a].items():
            torch.testing.assert_close(foreach.state[b][key], value, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(
        flat_step_sizes(foreach), flat_step_sizes(per_tensor), rtol=1e-11, atol=0
    )
    assert int(foreach.skipped_steps) == int(per_tensor.skipped_steps) == 1


def test_foreach_rejects_non_bools() -> None:
    model = TinyNet()
    with pytest.raises(TypeError, match="Invalid foreach"):
        MetaOptimize(model.parameters(), foreach=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("case", CASES[::4], ids=str)
def test_foreach_step_reads_no_tensor_value(case: Case) -> None:
    """On meta-device tensors any read of a value fails (e.g. a 0-d tensor taken as a Scalar)."""
    from test_contract import _forbid_host_sync

    model = TinyNet().to("meta")
    groups, blocks = case.groups(model)
    opt = MetaOptimize(groups, blocks=blocks, foreach=True, **case.kwargs())
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        with _forbid_host_sync():
            opt.step()


def _drop_hidden_bias_grad(model: torch.nn.Module) -> None:
    model.hidden.bias.grad = None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tensor_operands_compute_what_the_python_scalars_do(dtype: torch.dtype) -> None:
    """``operand`` turns CPU foreach scalars into 0-d tensors: every value stays bitwise."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=generator, dtype=dtype) for s in (7, (3, 5), 1)]
    same, distinct = 0.999, [0.1, 1.0 / 3.0, 2.0**-30 + 1.0]
    for value in (same, [same] * 3, distinct):
        for op in (torch._foreach_mul, torch._foreach_add):
            expected = op(tensors, value)
            got = op(tensors, operand(value, tensors))
            for e, g in zip(expected, got, strict=True):
                assert torch.equal(e, g)
    assert isinstance(operand(same, tensors)[0], torch.Tensor)
    # Signed zeros stay apart (they are equal as cache keys).
    assert math.copysign(1.0, float(operand(0.0, tensors)[0])) == 1.0
    assert math.copysign(1.0, float(operand(-0.0, tensors)[0])) == -1.0
    # Tensors, and lists that take no tensor operand, pass through untouched.
    scalar_tensor = torch.tensor(2.0, dtype=dtype)
    assert operand(scalar_tensor, tensors) is scalar_tensor
    assert operand(same, [t.to(torch.bfloat16) for t in tensors]) == same
    assert operand(same, []) == same


def test_nonfinite_count_sees_nan_and_both_infinities() -> None:
    """The verdict of per-weight meta-gradients: any NaN, +inf or -inf anywhere counts."""
    finite = [torch.randn(4, 3, dtype=torch.float64), torch.zeros(5), torch.empty(0)]
    cpu = torch.device("cpu")
    assert int(_nonfinite_count(finite, cpu)) == 0
    for bad in (math.nan, math.inf, -math.inf):
        tensors = [t.clone() for t in finite]
        tensors[0][2, 1] = bad
        tensors[1][4] = bad
        assert int(_nonfinite_count(tensors, cpu)) >= 2, bad  # two tensors, at least one each
        tensors[0][2, 1] = 0.0
        assert int(_nonfinite_count(tensors, cpu)) >= 1, bad
