"""``fused=True`` off Triton: :mod:`metaoptimize._kernels.eager` compiled with ``torch.compile``.

The compiled copy of :func:`~metaoptimize._kernels.eager.parameter_step` runs on flat views of
the tensors, so Inductor fuses the elementwise body into one loop (CPU) or kernel (CUDA) for
every base rule. Per-step scalars are 0-d tensors; one compiled graph (dynamic shapes) serves
every parameter shape of a given dtype and group.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor

from metaoptimize._kernels.eager import meta_step, parameter_step
from metaoptimize.base import BaseRule
from metaoptimize.meta import MetaRule

__all__ = [
    "compile_meta_step",
    "compile_own_copy",
    "compile_parameter_step",
    "fused_meta_step",
    "fused_parameter_step",
    "supports_fused",
]


def supports_fused(param: Tensor, grad: Tensor, state: dict[str, Any]) -> bool:
    """The fused kernel works on flat views: every tensor must be contiguous."""
    return (
        param.is_contiguous()
        and grad.is_contiguous()
        and all(v.is_contiguous() for v in state.values() if isinstance(v, Tensor))
    )


def compile_own_copy(function: Callable[..., None], **options: Any) -> Callable[..., None]:
    """``torch.compile`` of a fresh copy of ``function``'s code, with a compile cache of its own.

    torch.compile keeps one cache per code object, with a small recompile limit; every
    optimizer gets its own copy of the code so that one process can run many optimizers
    (the benchmark harness does) without exhausting a shared cache.
    """
    code = function.__code__
    copy = types.FunctionType(
        code.replace(), function.__globals__, code.co_name, function.__defaults__
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    return cast(Callable[..., None], torch.compile(copy, fullgraph=True, dynamic=True, **options))


def compile_parameter_step() -> Callable[..., None]:
    """A compiled :func:`parameter_step` (see :func:`compile_own_copy`)."""
    # emulate_precision_casts: keep the rounding of low-precision casts (the Kahan update
    # measures what rounding to bfloat16 lost; without it Inductor skips the round trip).
    return compile_own_copy(parameter_step, options={"emulate_precision_casts": True})


def fused_parameter_step(
    compiled: Callable[..., None],
    rule: BaseRule,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: dict[str, Any],
    finite: Tensor,
    ok: Tensor,
    alpha: Tensor,
    with_trace: bool,
    decoupled: bool,
) -> None:
    """Run ``compiled`` (from :func:`compile_parameter_step`) on flat views of the tensors."""
    # 0-d state (step counters) goes in as a shape-[1] view too: under torch.compile with
    # dynamic shapes (torch 2.13) an in-place update of a 0-d input is lost, while the
    # update of a one-element view reaches the same storage (tests/test_fused.py).
    flat_state = {k: v.view(-1) if isinstance(v, Tensor) else v for k, v in state.items()}
    flat_alpha = alpha.view(-1) if alpha.dim() else alpha
    compiled(
        rule,
        param.view(-1),
        grad.view(-1),
        flat_state,
        group,
        finite,
        ok,
        flat_alpha,
        with_trace,
        decoupled,
    )


def compile_meta_step() -> Callable[..., None]:
    """A compiled :func:`meta_step`, for per-weight step sizes (see :func:`compile_own_copy`)."""
    return compile_own_copy(meta_step)


def fused_meta_step(
    compiled: Callable[..., None],
    rule: MetaRule,
    log_alpha: Tensor,
    z: Tensor,
    meta_state: dict[str, Tensor],
    keep: Tensor,
    low: float,
    high: float,
) -> None:
    """Run ``compiled`` (from :func:`compile_meta_step`) on flat views (see above for why)."""
    flat_state = {key: value.view(-1) for key, value in meta_state.items()}
    compiled(rule, log_alpha.view(-1), z.reshape(-1), flat_state, keep, low, high)
