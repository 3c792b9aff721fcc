"""The Triton kernels (AdamW and Lion bases) equal the per-tensor path in float64.

Run through Triton's interpreter on CPU (``TRITON_INTERPRET=1``); skipped without Triton.
``tests/test_gpu.py`` runs the compiled kernels on a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from cases import CASES, Case
from helpers import TinyNet, batches, flat_step_sizes, loss_fn
from metaoptimize import MetaOptimize
from metaoptimize._kernels import triton as _triton

pytest.importorskip("triton")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Define the kernels under the interpreter (the decorator reads the flag) and forget them."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _triton._KERNELS.clear()
    yield
    _triton._KERNELS.clear()


# The Triton kernel's cases from the shared table: AdamW and Lion with every meta rule, then
# every sixth of the AdamW/Lion block-mode x gamma x weight-decay grid.
_SUPPORTED = [case for case in CASES if case.triton]
TRITON_CASES = _SUPPORTED[:12] + _SUPPORTED[12::6]


def _train(case: Case, **options: Any) -> tuple[TinyNet, MetaOptimize]:
    model = TinyNet()
    groups, blocks = case.groups(model)
    opt = MetaOptimize(groups, blocks=blocks, **case.kwargs(), **options)
    # The Triton kernels run on CUDA, where step() keeps every scalar on the device and a
    # skipped step reaches the kernel with ok = 0: the same here, in the interpreter.
    opt._device_scalars = bool(options.get("fused"))
    for step, batch in enumerate(batches(10)):
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        if step == 4:  # a skipped step must be skipped by both
            model.out.bias.grad[0] = float("nan")
        opt.step()
    return model, opt


def _assert_same(a: tuple[TinyNet, MetaOptimize], b: tuple[TinyNet, MetaOptimize]) -> None:
    (model_a, opt_a), (model_b, opt_b) = a, b
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)
        for key, value in opt_a.state[p].items():
            torch.testing.assert_close(opt_b.state[q][key], value, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat_step_sizes(opt_b), flat_step_sizes(opt_a), rtol=1e-12, atol=0)
    assert int(opt_a.skipped_steps) == int(opt_b.skipped_steps) == 1


@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
def test_triton_kernel_equals_per_tensor_path(case: Case) -> None:
    calls = []
    original = _triton.triton_parameter_step

    def counting(*args: Any, **kw: Any) -> None:
        calls.append(args[0])
        original(*args, **kw)

    per_tensor = _train(case)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("metaoptimize._kernels.runner.triton_parameter_step", counting)
        triton_run = _train(case, fused=True, fused_backend="triton")
    assert len(calls) == 10 * 4  # every step, every tensor went through the kernel
    _assert_same(per_tensor, triton_run)


def test_unsupported_base_uses_the_compiled_kernel() -> None:
    case = Case("adam", "adam", "scalar", 0.9, 0.1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            "metaoptimize._kernels.runner.triton_parameter_step",
            lambda *a, **k: pytest.fail("adam is not a Triton base"),
        )
        fused = _train(case, fused=True, fused_backend="triton")
    _assert_same(_train(case), fused)


def test_a_failing_kernel_falls_back_with_a_warning() -> None:
    case = Case("adamw", "lion", "scalar", 0.9, 0.1)

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("no kernel today")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("metaoptimize._kernels.runner.triton_parameter_step", broken)
        with pytest.warns(RuntimeWarning, match="Triton kernel failed"):
            fallback = _train(case, fused=True, fused_backend="triton")
    _assert_same(_train(case), fallback)


def test_fused_backend_is_validated() -> None:
    with pytest.raises(ValueError, match="Invalid fused_backend"):
        MetaOptimize(TinyNet().parameters(), fused=True, fused_backend="cuda")
