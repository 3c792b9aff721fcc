"""The fused (torch.compile) kernels equal the eager path in float64."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from cases import ONE_PER_BASE, Case
from helpers import (
    TinyNet,
    batches,
    clone_model,
    flat_step_sizes,
    loss_fn,
    nan_out_bias,
    step_together,
)
from metaoptimize import MetaOptimize

#: Compile on CPU too (fused=True alone keeps the default CPU kernels).
COMPILE = {"fused_backend": "compile"}


@pytest.mark.parametrize("case", ONE_PER_BASE, ids=str)
def test_fused_equals_eager(case: Case) -> None:
    eager_model = TinyNet()
    fused_model = clone_model(eager_model)
    eager_groups, blocks = case.groups(eager_model)
    fused_groups, fused_blocks = case.groups(fused_model)
    eager = MetaOptimize(eager_groups, blocks=blocks, **case.kwargs())
    # On CPU fused=True keeps the default kernels unless "compile" forces compiling, and the
    # default sends TinyNet's small tensors to the multi-tensor kernel (test_kernel_plan):
    # fused_backend="compile" and foreach=False make every tensor take the compiled one.
    fused = MetaOptimize(
        fused_groups, blocks=fused_blocks, fused=True, foreach=False, **COMPILE, **case.kwargs()
    )
    for step, batch in enumerate(batches(15)):
        pairs = ((eager_model, eager), (fused_model, fused))
        # A skipped step (step 7) must be skipped by both.
        step_together(pairs, batch, nan_out_bias if step == 7 else None)
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


def test_non_contiguous_parameters_use_the_eager_path() -> None:
    weight = torch.randn(6, 4, dtype=torch.float64).t()  # a transposed (non-contiguous) view
    eager_param = torch.nn.Parameter(weight.clone().t().contiguous().t())
    fused_param = torch.nn.Parameter(weight.clone().t().contiguous().t())
    assert not fused_param.is_contiguous()
    eager = MetaOptimize([eager_param], base="adam", meta="adam", alpha0=0.01)
    fused = MetaOptimize(
        [fused_param], base="adam", meta="adam", alpha0=0.01, fused=True, foreach=False, **COMPILE
    )
    for step in range(5):
        for param, opt in ((eager_param, eager), (fused_param, fused)):
            param.grad = (param.detach() * (step + 1)).clone()
            opt.step()
    assert torch.equal(eager_param, fused_param)


def test_fused_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match=r"Invalid fused: 'yes'"):
        MetaOptimize(TinyNet().parameters(), fused="yes")  # type: ignore[arg-type]


def test_compile_failure_falls_back_to_eager_with_a_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> Any:
        def fail(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("no compiler")

        return fail

    monkeypatch.setattr("metaoptimize._kernels.runner.compile_parameter_step", broken)
    model = TinyNet()
    twin = clone_model(model)
    # Per tensor on both sides: the fallback is the per-tensor kernel, bit for bit.
    eager = MetaOptimize(model.parameters(), base="adamw", meta="lion", alpha0=0.01, foreach=False)
    fused = MetaOptimize(
        twin.parameters(),
        base="adamw",
        meta="lion",
        alpha0=0.01,
        fused=True,
        foreach=False,
        **COMPILE,
    )
    for step, batch in enumerate(batches(3)):
        for m, o in ((model, eager), (twin, fused)):
            o.zero_grad()
            loss_fn(m, batch).backward()
            if o is fused and step == 0:
                with pytest.warns(RuntimeWarning, match=r"torch.compile failed .*no compiler"):
                    o.step()
            else:
                o.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b)


def test_per_weight_fused_on_cpu_compiles_the_large_tensors_only() -> None:
    """fused=True with per-weight step sizes on CPU: a large tensor's weight step and meta step
    are compiled, the small tensors take the multi-tensor kernels; both equal the eager run."""
    from metaoptimize._kernels import COMPILED, FOREACH

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(200, 200), torch.nn.Tanh(), torch.nn.Linear(200, 3)
    ).double()
    twin = clone_model(model)
    settings: dict[str, Any] = {"blocks": "weight", "meta": "lion", "alpha0": 0.01}
    eager = MetaOptimize(model.parameters(), weight_decay=0.01, **settings)
    fused = MetaOptimize(twin.parameters(), weight_decay=0.01, fused=True, **settings)
    x = torch.randn(16, 200, dtype=torch.float64)
    for _ in range(6):
        for m, opt in ((model, eager), (twin, fused)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    kernels = [b.kernel for b in fused._plan(fused._gather_entries(), True)]
    assert sorted(kernels) == [COMPILED, FOREACH]  # the 200x200 weight; the three others
    assert fused._kernels._compiled_meta is not None
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat_step_sizes(fused), flat_step_sizes(eager), rtol=1e-10, atol=0)
    assert (flat_step_sizes(fused) != 0.01).any()
