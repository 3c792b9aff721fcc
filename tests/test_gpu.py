"""CUDA checks (skipped without a GPU): fused and foreach kernels against per-tensor eager, and
no host syncs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from metaoptimize import MetaOptimize

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    # A kernel that fails to build falls back with a warning and equal results: make that a
    # failure here, so these tests check the Triton and compiled kernels themselves.
    pytest.mark.filterwarnings(r"error:MetaOptimize\(fused=True\):RuntimeWarning"),
]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 64)
    ).cuda()


def _run(
    fused: bool,
    kwargs: dict[str, Any],
    steps: int = 20,
    foreach: bool = False,
    backend: str = "auto",
) -> tuple[list[torch.Tensor], torch.Tensor]:
    model = _model()
    opt = MetaOptimize(
        model.parameters(), fused=fused, foreach=foreach, fused_backend=backend, **kwargs
    )
    generator = torch.Generator(device="cuda").manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 256, device="cuda", generator=generator)
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    sizes = torch.cat([v.flatten() for v in opt.step_sizes().values()])
    return [p.detach() for p in model.parameters()], sizes


@pytest.mark.parametrize("backend", ["auto", "compile"])  # auto: Triton when installed
@pytest.mark.parametrize("base", ["adamw", "lion"])
def test_fused_cuda_kernel_matches_eager(base: str, backend: str) -> None:
    kwargs = {"base": base, "meta": "lion", "alpha0": 1e-3, "meta_lr": 1e-2, "weight_decay": 0.1}
    eager_params, eager_sizes = _run(False, kwargs)
    fused_params, fused_sizes = _run(True, kwargs, backend=backend)
    for a, b in zip(eager_params, fused_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fused_sizes, eager_sizes, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("base", "blocks"),
    [("adamw", "scalar"), ("adam", "tensor"), ("rmsprop", "weight"), ("sgdm", "scalar")],
)
def test_foreach_cuda_matches_per_tensor(base: str, blocks: str) -> None:
    kwargs = {
        "base": base,
        "meta": "adam",
        "blocks": blocks,
        "alpha0": 1e-3,
        "meta_lr": 1e-2,
        "weight_decay": 0.1,
    }
    loop_params, loop_sizes = _run(False, kwargs)
    foreach_params, foreach_sizes = _run(False, kwargs, foreach=True)
    for a, b in zip(loop_params, foreach_params, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(foreach_sizes, loop_sizes, rtol=1e-5, atol=0)


@pytest.mark.parametrize("path", ["per-tensor", "foreach", "fused", "fused-compile"])
@pytest.mark.parametrize("blocks", ["scalar", "tensor", "weight"])
def test_step_has_no_host_sync_under_cuda_sync_debug_mode(path: str, blocks: str) -> None:
    model = _model()
    opt = MetaOptimize(
        model.parameters(),
        base="adamw",
        meta="adam",
        blocks=blocks,
        fused=path.startswith("fused"),
        fused_backend="compile" if path == "fused-compile" else "auto",
        foreach=path == "foreach",
        alpha0=1e-3,
    )
    x = torch.randn(32, 256, device="cuda")
    for step in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        if step == 0:
            opt.step()  # first step: lazy state, index caches, compilation
            continue
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
