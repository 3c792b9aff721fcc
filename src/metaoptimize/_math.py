"""Elementwise helpers shared by the base and meta rules.

:func:`sqrt` is ``torch.sqrt`` except inside :func:`forward_mode` (the Hessian trace's
forward-mode derivatives), where its derivative at 0 is taken as 0 instead of 0/0 = NaN. A
second moment is exactly 0 only where every past input was exactly 0; its tangent is then 0
too, and so is the derivative of the step in that direction (docs/math.md §13).
"""

from __future__ import annotations

import contextlib
import functools
import math
from array import array
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "as_dtype",
    "ema_square",
    "ema_square_",
    "forward_mode",
    "host_constant",
    "sqrt",
    "takes_tensor_operands",
]

_FORWARD_MODE = False


#: Dtypes whose Python-scalar operands :func:`host_constant` turns into tensors.
_TENSOR_OPERAND_DTYPES = (torch.float32, torch.float64)


def host_constant(value: float, like: Tensor) -> Tensor | float:
    """``value`` as the scalar operand of an in-place op on the CPU tensor ``like``.

    On CPU an in-place op with a Python scalar (``mul_(0.999)``) wraps it into a new tensor
    every call, 2-3x the time of the same op with a tensor operand on a small tensor. A 0-d
    tensor of ``like``'s dtype computes the same values (the scalar forms compute in that dtype
    too); it is cached per value, so fixed hyperparameters are built once. Other devices and
    dtypes keep the Python scalar.
    """
    if not takes_tensor_operands(like):
        return value
    # 0.0 == -0.0 as cache keys; the sign of a zero operand can show in a result.
    return _cpu_scalar(value, math.copysign(1.0, value), like.dtype)


def takes_tensor_operands(like: Tensor) -> bool:
    """Whether scalar operands of ops on ``like`` go in as 0-d tensors (CPU float32/float64)."""
    return like.is_cpu and like.dtype in _TENSOR_OPERAND_DTYPES


@functools.lru_cache(maxsize=256)
def _cpu_scalar(value: float, sign: float, dtype: torch.dtype) -> Tensor:
    return torch.tensor(value, dtype=dtype)


@contextlib.contextmanager
def forward_mode() -> Iterator[None]:
    """Within this block :func:`sqrt` has a finite derivative at 0."""
    global _FORWARD_MODE
    previous, _FORWARD_MODE = _FORWARD_MODE, True
    try:
        yield
    finally:
        _FORWARD_MODE = previous


def sqrt(x: Tensor, inplace: bool = False) -> Tensor:
    """``√x`` for ``x >= 0`` (in place on a temporary if ``inplace``).

    Under :func:`forward_mode` it is computed out of place with a derivative of 0 at 0.
    """
    if not _FORWARD_MODE:
        return x.sqrt_() if inplace else x.sqrt()
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1.0).sqrt(), 0.0)


def ema_square_(average: Tensor, value: Tensor, weight: Tensor | float) -> Tensor:
    """``a ← (1-w) a + w x²`` in place, written as torch.optim writes its second moments.

    An ``x²`` that overflows saturates ``a`` at ``inf`` (the step it divides then goes to 0),
    where ``lerp`` would turn the next step's ``inf - inf`` into NaN; ``(w x) x`` keeps
    ``w = 0`` (a skipped step) exact even when ``x²`` alone would overflow. A Python float
    ``w`` (host scalars: never a skipped step) takes torch.optim's exact form.
    """
    if isinstance(weight, float):
        keep = host_constant(1.0 - weight, average)
        return average.mul_(keep).addcmul_(value, value, value=weight)
    return average.mul_(1.0 - weight).addcmul_(value * weight, value)


def ema_square(average: Tensor, value: Tensor, weight: Tensor | float) -> Tensor:
    """Out-of-place :func:`ema_square_`."""
    return average * (1.0 - weight) + (value * weight) * value


def as_dtype(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor.to(dtype)``, skipping the call when the dtype already matches.

    Per-tensor loops run this several times per parameter and step; a no-op ``to()`` still
    costs a dispatch, which on small tensors is a measurable share of the step.
    """
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def round_floats(values: list[float], dtype: torch.dtype) -> list[float]:
    """``values`` rounded to ``dtype``, as storing them in a tensor of it would round them.

    Host-side arithmetic runs in double precision; rounding its results keeps them equal to
    what the tensor form computes and stores (a value past ``dtype``'s range becomes inf).
    """
    if dtype == torch.float64:
        return values
    if dtype == torch.float32:
        return array("f", values).tolist()  # C rounding, no tensor built
    return torch.tensor(values, dtype=dtype).tolist()
