"""``fused=True`` on CPU for Adam(W): the host-compiled kernel equals the eager one in float64.

The kernel (metaoptimize._kernels.host_compiled) takes one compiled call per tensor, with the
small tensors merged into one flat tensor (metaoptimize._kernels.flat, tests/test_flat.py); the
per-tensor eager kernel with host scalars (``foreach=False``) is the oracle.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from helpers import DTYPE, flat_step_sizes
from metaoptimize import MetaOptimize
from metaoptimize._kernels import HOST_COMPILED
from metaoptimize._kernels.flat import FLAT_MAX_NUMEL
from metaoptimize._kernels.host_compiled import HostCompiledKernel


class Net(nn.Module):
    """One weight above FLAT_MAX_NUMEL (its own compiled call), three small tensors (flat)."""

    def __init__(self, dtype: torch.dtype = DTYPE) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.hidden = nn.Linear(200, 180).to(dtype)
        self.out = nn.Linear(180, 3).to(dtype)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype) * 0.1)
        assert self.hidden.weight.numel() > FLAT_MAX_NUMEL >= self.out.weight.numel()

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def _batches(count: int, dtype: torch.dtype = DTYPE) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(8, 200, generator=generator, dtype=dtype), torch.randn(8, 3, dtype=dtype))
        for _ in range(count)
    ]


def _step(
    model: Net,
    opt: MetaOptimize,
    batch: tuple[Tensor, Tensor],
    tamper: Callable[[Net], None] | None = None,
) -> None:
    """One training step; ``tamper(model)`` edits the fresh gradients first."""
    model.zero_grad(set_to_none=True)
    x, y = batch
    (model(x) - y).square().mean().backward()
    if tamper is not None:
        tamper(model)
    opt.step()


def _drop_bias_grad(model: Net) -> None:
    model.out.bias.grad = None


def _nan_bias_grad(model: Net) -> None:
    assert model.out.bias.grad is not None
    model.out.bias.grad[0] = float("nan")


def _pair(
    groups: Callable[[Net], Any] = lambda m: m.parameters(),
    dtype: torch.dtype = DTYPE,
    **kwargs: Any,
) -> tuple[Net, MetaOptimize, Net, MetaOptimize]:
    eager_model, fused_model = Net(dtype), Net(dtype)
    eager = MetaOptimize(groups(eager_model), foreach=False, **kwargs)
    fused = MetaOptimize(groups(fused_model), fused=True, **kwargs)
    return eager_model, eager, fused_model, fused


def _assert_equal(
    eager_model: nn.Module,
    eager: MetaOptimize,
    fused_model: nn.Module,
    fused: MetaOptimize,
    rtol: float = 1e-12,
) -> None:
    pairs = zip(eager_model.parameters(), fused_model.parameters(), strict=True)
    for a, b in pairs:
        torch.testing.assert_close(b, a, rtol=rtol, atol=rtol * 1e-2)
        for key, value in eager.state[a].items():
            torch.testing.assert_close(fused.state[b][key], value, rtol=rtol, atol=rtol * 1e-2)
    torch.testing.assert_close(flat_step_sizes(fused), flat_step_sizes(eager), rtol=rtol, atol=0)


def _two_groups(model: Net) -> list[dict[str, Any]]:
    return [
        {"params": list(model.hidden.parameters()), "lr": 0.5, "weight_decay": 0.1},
        {"params": list(model.out.parameters()), "betas": (0.8, 0.99), "eps": 1e-6},
    ]


@pytest.mark.parametrize(
    ("groups", "kwargs"),
    [
        (lambda m: m.parameters(), {"weight_decay": 0.01}),  # the defaults (auto meta rule)
        (lambda m: m.parameters(), {"meta": "lion", "alpha0": 1e-3, "gamma": 0.99}),
        (lambda m: m.parameters(), {"meta": "fixed", "weight_decay": 0.01}),  # no trace
        (lambda m: m.parameters(), {"base": "adam", "meta": "adam", "blocks": "tensor"}),
        (_two_groups, {"blocks": "group", "weight_decay": 0.05}),
        (lambda m: m.parameters(), {"base": "lion", "alpha0": 1e-4, "weight_decay": 0.1}),
        (lambda m: m.parameters(), {"base": "lion", "meta": "fixed", "gamma": 0.9}),
        (lambda m: m.parameters(), {"base": "adam", "weight_decay": 0.05, "gamma": 0.99}),
        (lambda m: m.parameters(), {"base": "adam", "meta": "fixed", "weight_decay": 0.05}),
    ],
    ids=[
        "defaults",
        "lion-gamma",
        "fixed",
        "adam-tensor-blocks",
        "two-groups",
        "lion-base",
        "lion-base-fixed",
        "adam-l2",
        "adam-l2-fixed",
    ],
)
def test_equals_the_eager_kernel_in_float64(
    groups: Callable[[Net], Any], kwargs: dict[str, Any]
) -> None:
    eager_model, eager, fused_model, fused = _pair(groups, **kwargs)
    for batch in _batches(6):
        _step(eager_model, eager, batch)
        _step(fused_model, fused, batch)
        _assert_equal(eager_model, eager, fused_model, fused)
    # The small tensors' state lives in flat buffers (not with one block per tensor: nothing
    # to merge), the large tensor's does not.
    small, large = fused.state[fused_model.out.weight], fused.state[fused_model.hidden.weight]
    assert (small["exp_avg"]._base is not None) == (kwargs.get("blocks") != "tensor")
    assert small["exp_avg"].shape == (3, 180)
    assert large["exp_avg"]._base is None
    # Three parameter-sized state tensors with the trace (two without), as the other kernels.
    sizes = {key: value.numel() for key, value in small.items() if value.dim()}
    moments = {"exp_avg"} if kwargs.get("base") == "lion" else {"exp_avg", "exp_avg_sq"}
    expected = moments | ({"trace"} if kwargs.get("meta") != "fixed" else set())
    assert set(sizes) == expected
    assert set(sizes.values()) == {540}


def test_the_plan_takes_it_for_adam_and_lion_bases_only() -> None:
    cases = (("adamw", True), ("adam", True), ("lion", True), ("sgd", False), ("rmsprop", False))
    for base, kernel_taken in cases:
        model = Net()
        opt = MetaOptimize(model.parameters(), base=base, fused=True)
        _step(model, opt, _batches(1)[0])
        kernels = {bucket.kernel for bucket in opt._plan(opt._gather_entries(), True)}
        assert (HOST_COMPILED in kernels) == kernel_taken, base
    # Adam with an L2 decay takes its own body (the slope of u in the trace's decay).
    model = Net()
    opt = MetaOptimize(model.parameters(), base="adam", weight_decay=0.01, fused=True)
    _step(model, opt, _batches(1)[0])
    assert {b.kernel for b in opt._plan(opt._gather_entries(), True)} == {HOST_COMPILED}


def test_float32_close_to_the_eager_kernel() -> None:
    eager_model, eager, fused_model, fused = _pair(dtype=torch.float32, weight_decay=0.01)
    for batch in _batches(5, torch.float32):
        _step(eager_model, eager, batch)
        _step(fused_model, fused, batch)
    _assert_equal(eager_model, eager, fused_model, fused, rtol=1e-4)


def test_state_dict_round_trip_and_resume() -> None:
    """A saved state (views of the flat buffers) loads anywhere and the run resumes exactly."""
    eager_model, eager, fused_model, fused = _pair(weight_decay=0.01)
    data = _batches(8)
    for batch in data[:4]:
        _step(eager_model, eager, batch)
        _step(fused_model, fused, batch)
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_model = copy.deepcopy(fused_model)
    resumed = MetaOptimize(resumed_model.parameters(), fused=True, weight_decay=0.01)
    resumed.load_state_dict(saved)
    fused.load_state_dict(fused.state_dict())  # loading into itself replaces the views
    for batch in data[4:]:
        for model, opt in ((eager_model, eager), (fused_model, fused), (resumed_model, resumed)):
            _step(model, opt, batch)
    _assert_equal(eager_model, eager, fused_model, fused)
    _assert_equal(eager_model, eager, resumed_model, resumed)


def test_steps_taken_apart_split_the_flat_state_by_step_count() -> None:
    """A step without some gradients updates the rest; the step counts then differ, and the
    parameters that shared a flat state go on in one flat state per count."""
    eager_model, eager, fused_model, fused = _pair(weight_decay=0.01)
    for index, batch in enumerate(_batches(6)):
        tamper = _drop_bias_grad if index == 2 else None  # this step leaves the bias out
        _step(eager_model, eager, batch, tamper)
        _step(fused_model, fused, batch, tamper)
        _assert_equal(eager_model, eager, fused_model, fused)
    counts = {fused.state[p]["step"].item() for p in fused_model.parameters()}
    assert counts == {5.0, 6.0}
    # The last step's bucket: the hidden bias and output weight merged, the bias (one step
    # behind) and the large weight apart.
    parts, rest = list(fused._kernels.flat._kept.values())[-1]
    assert [len(positions) for positions, _ in parts] == [2]
    assert len(rest) == 2


def test_parameters_added_later_step_in_a_flat_state_of_their_own() -> None:
    eager_model, eager, fused_model, fused = _pair(lambda m: m.hidden.parameters())
    data = _batches(6)
    for index, batch in enumerate(data):
        if index == 3:
            eager.add_param_group({"params": list(eager_model.out.parameters())})
            fused.add_param_group({"params": list(fused_model.out.parameters())})
        _step(eager_model, eager, batch)
        _step(fused_model, fused, batch)
        _assert_equal(eager_model, eager, fused_model, fused)
    assert fused.state[fused_model.out.bias]["exp_avg"]._base is not None


def test_a_skipped_step_changes_nothing() -> None:
    eager_model, eager, fused_model, fused = _pair(weight_decay=0.01)
    for index, batch in enumerate(_batches(5)):
        tamper = _nan_bias_grad if index == 3 else None
        _step(eager_model, eager, batch, tamper)
        _step(fused_model, fused, batch, tamper)
        _assert_equal(eager_model, eager, fused_model, fused)
    assert fused.skipped_steps.item() == 1


def test_non_contiguous_tensors_take_the_per_tensor_kernel() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(40, 30, dtype=DTYPE).t(), torch.randn(300, 200, dtype=DTYPE).t()]
    eager_params = [nn.Parameter(w.clone().t().contiguous().t()) for w in weights]
    fused_params = [nn.Parameter(w.clone().t().contiguous().t()) for w in weights]
    assert not fused_params[0].is_contiguous()
    eager = MetaOptimize(eager_params, foreach=False, weight_decay=0.01)
    fused = MetaOptimize(fused_params, fused=True, weight_decay=0.01)
    for step in range(4):
        for params, opt in ((eager_params, eager), (fused_params, fused)):
            for index, p in enumerate(params):
                p.grad = torch.sin(p.detach() * (step + index + 1)).t().contiguous().t()
            opt.step()
    for a, b in zip(eager_params, fused_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)


def test_compile_failure_falls_back_with_one_warning() -> None:
    def broken(body: Any, dtype: torch.dtype, with_trace: bool) -> Callable[..., None]:
        def fail(*args: Any) -> None:
            raise RuntimeError("no compiler here")

        return fail

    eager_model, eager, fused_model, fused = _pair(weight_decay=0.01)
    fused._kernels.host_compiled = HostCompiledKernel("adamw", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in _batches(4):
            _step(eager_model, eager, batch)
            _step(fused_model, fused, batch)
            _assert_equal(eager_model, eager, fused_model, fused)
    assert sum("torch.compile failed" in str(w.message) for w in caught) == 1
    assert fused._kernels.compile_failed


def test_a_deep_copy_continues_the_run() -> None:
    """The copy's state entries are views of its own copied buffers; its kernel rebuilds them."""
    model = Net()
    opt = MetaOptimize(model.parameters(), fused=True, weight_decay=0.01)
    data = _batches(6)
    for batch in data[:3]:
        _step(model, opt, batch)
    copied_model, copied = copy.deepcopy((model, opt))
    for batch in data[3:]:
        _step(model, opt, batch)
        _step(copied_model, copied, batch)
    _assert_equal(model, opt, copied_model, copied, rtol=0)
    storage = model.out.bias.data_ptr()
    assert copied_model.out.bias.data_ptr() != storage
