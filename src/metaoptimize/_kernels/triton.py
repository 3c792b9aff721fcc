"""Triton kernels for the AdamW and Lion base rules (``fused=True`` on CUDA; optional).

One kernel per parameter tensor does the base update, the Hessian-free trace update and the
weight step in one pass over memory: it reads ``g, w, m, (v,) h`` and writes ``w, m, (v,) h``
once. The meta-gradient ``<h, g>`` is taken before it, by one ``dot`` per tensor, because a step
whose meta-gradient is not finite must change nothing. The per-step scalars (step size, the
skip flag, bias corrections) are read from device memory, so no value reaches the host.

Triton is an optional dependency. Without it, or off CUDA, ``fused=True`` uses the
``torch.compile`` kernel (:mod:`metaoptimize._kernels.compiled`). The tests run these kernels on CPU
through Triton's interpreter (``TRITON_INTERPRET=1``); ``benchmarks/gpu_check.sh`` runs them on
a GPU.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
from torch import Tensor

__all__ = ["TRITON_BASES", "triton_available", "triton_parameter_step", "triton_supports"]

TRITON_BASES = ("adamw", "lion")
_BLOCK = 1024


def triton_available() -> bool:
    """Whether Triton is installed (the kernels are compiled on first use)."""
    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_supports(
    base: str, param: Tensor, grad: Tensor, state: dict[str, Any], decoupled: bool
) -> bool:
    """Whether the Triton kernel can update this parameter."""
    return (
        base in TRITON_BASES
        and decoupled
        and (param.is_cuda or _interpreting())
        and param.dtype in (torch.float32, torch.float64)
        and grad.dtype == param.dtype
        and param.is_contiguous()
        and grad.is_contiguous()
        and "kahan_comp" not in state
        and all(
            v.is_contiguous() and v.dtype == param.dtype
            for k, v in state.items()
            if isinstance(v, Tensor) and k != "step"
        )
    )


_KERNELS: dict[str, Any] = {}


def _kernels() -> dict[str, Any]:
    """Define the kernels on first use, so that importing this module does not need Triton."""
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit  # type: ignore[untyped-decorator]
    def adamw_kernel(
        w_ptr: Any,
        g_ptr: Any,
        m_ptr: Any,
        v_ptr: Any,
        h_ptr: Any,
        scalars_ptr: Any,
        n: Any,
        HAS_TRACE: tl.constexpr,
        BLOCK: tl.constexpr,
    ) -> None:
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        alpha = tl.load(scalars_ptr)
        ok = tl.load(scalars_ptr + 1)
        bias1 = tl.load(scalars_ptr + 2)
        bias2_sqrt = tl.load(scalars_ptr + 3)
        gamma = tl.load(scalars_ptr + 4)
        weight1 = tl.load(scalars_ptr + 5)
        weight2 = tl.load(scalars_ptr + 6)
        eps = tl.load(scalars_ptr + 7)
        kappa = tl.load(scalars_ptr + 8)
        w = tl.load(w_ptr + offsets, mask=mask)
        g = tl.load(g_ptr + offsets, mask=mask)
        g = tl.where(ok > 0, g, 0.0)
        m = tl.load(m_ptr + offsets, mask=mask)
        v = tl.load(v_ptr + offsets, mask=mask)
        m = m + weight1 * (g - m)
        # (w g) g, as torch.optim: an overflowing g² saturates v at inf instead of NaN.
        v = v * (1.0 - weight2) + (g * weight2) * g
        denom = tl.sqrt(v) / bias2_sqrt + eps
        delta = -alpha * ((m / bias1) / denom + kappa * w)
        if HAS_TRACE:
            h = tl.load(h_ptr + offsets, mask=mask)
            h = h * (gamma * (1.0 - alpha * kappa)) + delta
            tl.store(h_ptr + offsets, h, mask=mask)
        tl.store(m_ptr + offsets, m, mask=mask)
        tl.store(v_ptr + offsets, v, mask=mask)
        tl.store(w_ptr + offsets, w + delta, mask=mask)

    @triton.jit  # type: ignore[untyped-decorator]
    def lion_kernel(
        w_ptr: Any,
        g_ptr: Any,
        m_ptr: Any,
        h_ptr: Any,
        scalars_ptr: Any,
        n: Any,
        HAS_TRACE: tl.constexpr,
        BLOCK: tl.constexpr,
    ) -> None:
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        alpha = tl.load(scalars_ptr)
        ok = tl.load(scalars_ptr + 1)
        gamma = tl.load(scalars_ptr + 4)
        interpolation = tl.load(scalars_ptr + 5)
        weight2 = tl.load(scalars_ptr + 6)
        kappa = tl.load(scalars_ptr + 8)
        w = tl.load(w_ptr + offsets, mask=mask)
        g = tl.load(g_ptr + offsets, mask=mask)
        g = tl.where(ok > 0, g, 0.0)
        m = tl.load(m_ptr + offsets, mask=mask)
        c = m + interpolation * (g - m)
        u = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))
        delta = -alpha * (u + kappa * w)
        if HAS_TRACE:
            h = tl.load(h_ptr + offsets, mask=mask)
            h = h * (gamma * (1.0 - alpha * kappa)) + delta
            tl.store(h_ptr + offsets, h, mask=mask)
        tl.store(m_ptr + offsets, m + weight2 * (g - m), mask=mask)
        tl.store(w_ptr + offsets, w + delta, mask=mask)

    _KERNELS.update(adamw=adamw_kernel, lion=lion_kernel)
    return _KERNELS


def triton_parameter_step(
    base: str,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    group: dict[str, Any],
    ok: Tensor,
    alpha: Tensor,
    with_trace: bool,
) -> None:
    """:func:`metaoptimize._kernels.eager.parameter_step` for AdamW and Lion, as one Triton kernel.

    Args:
        base: "adamw" or "lion".
        param: the weights (contiguous, float32 or float64).
        grad: the gradient, same dtype.
        state: the parameter's optimizer state.
        group: its param group (a float weight decay).
        ok: 0-d, 1.0 on a normal step and 0.0 on a skipped one.
        alpha: effective step size ``lr * exp(β) * ok`` (0-d).
        with_trace: whether the trace exists (the meta rule is active).
    """
    kernels = _kernels()
    beta1, beta2 = group["betas"]
    gamma = 1.0 + ok * (group["gamma"] - 1.0)
    # Every per-step scalar goes in as one small device tensor in the parameter's dtype:
    # α, skip flag, 1-β1^t, sqrt(1-β2^t), γ', EMA weights, ε, κ (no host reads, full precision).
    eps = torch.full_like(ok, group["eps"])
    kappa = torch.full_like(ok, group["weight_decay"])
    n = param.numel()
    grid = ((n + _BLOCK - 1) // _BLOCK,)
    trace = state["trace"] if with_trace else param  # not read without a trace
    if base == "adamw":
        step = state["step"]
        exponent = (step + ok).clamp_min(1.0)
        bias1 = 1.0 - torch.pow(beta1, exponent)
        bias2_sqrt = (1.0 - torch.pow(beta2, exponent)).sqrt()
        weights = (ok * (1.0 - beta1), ok * (1.0 - beta2))
        scalars = torch.stack([alpha, ok, bias1, bias2_sqrt, gamma, *weights, eps, kappa])
        kernels["adamw"][grid](
            param,
            grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            trace,
            scalars.to(param.dtype),
            n,
            HAS_TRACE=with_trace,
            BLOCK=_BLOCK,
        )
        step.add_(ok)  # after the launch: a kernel that failed to compile changed nothing
    else:
        interpolation = torch.full_like(ok, 1.0 - beta1)
        weights = (interpolation, ok * (1.0 - beta2))
        scalars = torch.stack([alpha, ok, ok, ok, gamma, *weights, eps, kappa])
        kernels["lion"][grid](
            param,
            grad,
            state["exp_avg"],
            trace,
            scalars.to(param.dtype),
            n,
            HAS_TRACE=with_trace,
            BLOCK=_BLOCK,
        )
