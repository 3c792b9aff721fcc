"""The base-rule interface and the helpers its rules share, in both dialects.

A rule's per-tensor form (:meth:`BaseRule.direction`) is the ground truth; its multi-tensor
form (:meth:`BaseRule.foreach_direction`) repeats it operation by operation on lists of
tensors with ``torch._foreach_*`` ops (``tests/test_foreach.py`` checks the two in float64).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from metaoptimize._math import host_constant, takes_tensor_operands

__all__ = [
    "BaseRule",
    "Group",
    "Quotient",
    "Scalars",
    "Slope",
    "TensorList",
    "has_decay",
    "host_bias_correction",
    "is_decoupled",
    "is_one",
    "operand",
    "state_dtype",
]

Group = dict[str, Any]
# The trace's slope ∂u/∂g̃: a tensor (elementwise), a 0-d tensor or a float (host scalars), or
# None (decoupled decay).
Slope = Tensor | float | None
TensorList = list[Tensor] | tuple[Tensor, ...]
#: Per-tensor scalars of the multi-tensor form: 0-d tensors, or Python floats (host scalars).
Scalars = TensorList | list[float]


def operand(value: float | Tensor | Scalars, like: TensorList) -> Any:
    """A Python scalar, or one per tensor, as the operand of a ``_foreach_*`` op on ``like``.

    On CPU the multi-tensor ops wrap a Python scalar into a new tensor for every tensor of the
    list, which costs 2-4x the same op with a tensor operand (torch.optim wraps its step
    increment once for the same reason). There the scalars become 0-d tensors of the list's
    dtype (:func:`~metaoptimize._math.host_constant`), which is the precision the scalar forms
    compute in, so no value changes. Other devices (fused multi-tensor kernels) and dtypes keep
    the Python scalars, and tensors are returned as they are.
    """
    if not like or isinstance(value, Tensor):
        return value
    if isinstance(value, list | tuple):
        if not value or isinstance(value[0], Tensor):
            return value
        if any(v != value[0] for v in value):
            if not takes_tensor_operands(like[0]):
                return value
            return list(torch.tensor(value, dtype=like[0].dtype).unbind())
        value = value[0]
    scalar = host_constant(float(value), like[0])
    return value if isinstance(scalar, float) else [scalar] * len(like)


def is_one(factor: Tensor | float) -> bool:
    """Whether ``factor`` is the float 1.0 (a multiplication by it can be skipped)."""
    return isinstance(factor, float) and factor == 1.0


class Quotient(NamedTuple):
    """A direction left unformed: ``u = scale · numerator / denominator``, per tensor.

    Host scalars only (from :meth:`BaseRule.foreach_direction`, or one tensor long from
    :meth:`BaseRule.direction`). The optimizer forms the whole update ``-α (u + κ w)`` from it
    with ``addcdiv`` (whose ``value`` takes the scale), where forming ``u`` first would cost
    two more passes over every tensor. The denominators are the rule's own temporaries.
    """

    numerators: TensorList
    denominators: TensorList
    scales: list[float]


def state_dtype(param: Tensor) -> torch.dtype:
    """Dtype of optimizer state for ``param``: float32 for half-precision parameters."""
    if param.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return param.dtype


def safe_div(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` with 0 where the denominator is 0 (a 0/0 limit here)."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), 0.0)


def lean_slope(a: Tensor, b: Tensor, c: float, rms: Tensor, denom: Tensor, c1: float) -> Tensor:
    """``(c1 - c a b / (rms denom)) / denom`` in one temporary, 0/0 taken as 0.

    The same slope as the general form (and :func:`safe_div`'s 0/0 limit) with far fewer
    allocations, for the CPU path, where each large allocation and each comparison costs more
    than the arithmetic.
    """
    ratio = torch.mul(a, b).mul_(c).div_(rms).div_(denom)
    return ratio.nan_to_num_(0.0, 0.0, 0.0).neg_().add_(c1).div_(denom)


def bias_correction(beta: float, step: Tensor, ok: Tensor | float) -> Tensor | float:
    """``1 - β^t``: a Python float with host scalars (``ok`` a float), else a 0-d tensor."""
    return bias_corrections((beta,), step, ok)[0]


def bias_corrections(
    betas: tuple[float, ...], step: Tensor, ok: Tensor | float
) -> list[Tensor] | list[float]:
    """:func:`bias_correction` for several betas, reading the step counter once."""
    if isinstance(ok, float):
        count = step.item()
        return [host_bias_correction(beta, count) for beta in betas]
    # step is clamped to 1 so a step skipped before any real step never divides by zero.
    clamped = step.clamp_min(1.0)
    return [1.0 - torch.pow(beta, clamped) for beta in betas]


def host_bias_correction(beta: float, step: float) -> float:
    """``1 - β^max(t, 1)`` on a step count read on the host."""
    return 1.0 - float(beta ** max(step, 1.0))


def sqrt_scalar(value: Tensor | float) -> Tensor | float:
    return math.sqrt(value) if isinstance(value, float) else value.sqrt()


def zeros_state(param: Tensor) -> Tensor:
    return torch.zeros_like(param, dtype=state_dtype(param), memory_format=torch.preserve_format)


def step_state(param: Tensor) -> Tensor:
    return torch.zeros((), dtype=state_dtype(param), device=param.device)


def has_decay(weight_decay: float | Tensor) -> bool:
    """Whether weight decay is on; a tensor (a learned weight decay) always counts as on.

    Never reads a tensor's value, so no host synchronisation.
    """
    return isinstance(weight_decay, Tensor) or weight_decay != 0.0


def l2(grad: Tensor, param: Tensor, weight_decay: float | Tensor) -> Tensor:
    if isinstance(weight_decay, Tensor):
        return grad + weight_decay * param.to(grad.dtype)
    if weight_decay == 0.0:
        return grad
    return grad.add(param.to(grad.dtype), alpha=weight_decay)


# ---------------------------------------------------------------- multi-tensor helpers


def foreach_l2(grads: TensorList, params: TensorList, kappa: float) -> TensorList:
    return torch._foreach_add(grads, params, alpha=kappa) if kappa else grads


def foreach_ema_(averages: TensorList, inputs: TensorList, weight: Tensor | float) -> None:
    """``a ← (1-w) a + w x`` in place, for a 0-d tensor or float ``w``.

    ``lerp_`` with a tensor weight would read it on the host; the multiply and add overloads
    that take a 0-d tensor do not (rounding differs from ``lerp_`` in the last bits). A float
    ``w`` (host scalars) takes ``lerp_``, as the per-tensor host path.
    """
    if isinstance(weight, float):
        torch._foreach_lerp_(averages, inputs, weight)
        return
    torch._foreach_mul_(averages, 1.0 - weight)
    torch._foreach_add_(averages, torch._foreach_mul(inputs, weight))


def foreach_ema_square_(averages: TensorList, inputs: TensorList, weight: Tensor | float) -> None:
    """``a ← (1-w) a + w x²`` in place, as :func:`metaoptimize._math.ema_square_` (overflow-safe)."""
    if isinstance(weight, float):
        torch._foreach_mul_(averages, operand(1.0 - weight, averages))
        torch._foreach_addcmul_(averages, inputs, inputs, value=weight)
        return
    torch._foreach_mul_(averages, 1.0 - weight)
    torch._foreach_addcmul_(averages, torch._foreach_mul(inputs, weight), inputs)


def foreach_add_(tensors: TensorList, value: Tensor | float) -> None:
    """``t += value`` for a 0-d tensor or a float ``value``.

    With a list of 0-d tensors, ``_foreach_add_(list, value)`` takes the Scalar overload (a host
    read), so a tensor ``value`` goes in as a list.
    """
    if isinstance(value, float):
        torch._foreach_add_(tensors, operand(value, tensors))
    else:
        torch._foreach_add_(tensors, [value] * len(tensors))


def step_counts(steps: TensorList, ok: Tensor | float) -> Scalars:
    """The step counters, read once as Python floats with host scalars (``ok`` a float)."""
    if isinstance(ok, float):
        values: list[float] = torch.stack(list(steps)).tolist()
        return values
    return steps


def foreach_bias_corrections(beta: float, counts: Scalars) -> Scalars:
    """``1 - β^max(t, 1)`` per tensor (as :func:`bias_correction`), floats for float counts."""
    if counts and isinstance(counts[0], float):
        # The tensors of a group have mostly one step count: one power per distinct count.
        corrections = {t: host_bias_correction(beta, float(t)) for t in set(counts)}
        return [corrections[t] for t in counts]
    powers = torch._foreach_pow(beta, torch._foreach_clamp_min(counts, 1.0))  # type: ignore[arg-type]
    return torch._foreach_add(torch._foreach_neg(powers), 1.0)


def foreach_sqrt_scalars(values: Scalars) -> Scalars:
    if values and isinstance(values[0], float):
        return [math.sqrt(float(v)) for v in values]
    return torch._foreach_sqrt(values)  # type: ignore[arg-type]


def foreach_safe_div(numerators: TensorList, denominators: TensorList) -> TensorList:
    """Elementwise ``n / d`` with 0 where ``d`` is 0 (as :func:`safe_div`)."""
    return [safe_div(n, d) for n, d in zip(numerators, denominators, strict=True)]


class BaseRule:
    """Interface of a base rule. Subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str]
    #: True when weight decay is applied as ``-α κ w`` outside the direction (AdamW style).
    decoupled_weight_decay: ClassVar[bool]
    #: True when ``base_style="paper"`` decouples the weight decay (SGDm, RMSProp).
    decoupled_in_paper_style: ClassVar[bool] = False
    #: Default ``betas``; None when the rule takes no betas.
    default_betas: ClassVar[tuple[float, ...] | None] = None
    #: Default ``momentum`` (None: the rule takes no momentum).
    default_momentum: ClassVar[float | None] = None
    #: Default ``(alpha_min, alpha_max)``: the learned step size never leaves this range. A
    #: normalised direction (Adam, RMSProp, Lion) moves each weight by about α, so α above 1
    #: or below 1e-10 is never useful; an SGD step's size depends on the gradient's scale.
    default_alpha_range: ClassVar[tuple[float, float]] = (1e-10, 1.0)
    #: Hyperparameters that must keep their neutral value for this rule.
    unsupported: ClassVar[tuple[str, ...]] = ()

    def check_group(self, group: Group) -> None:
        """Validate the rule's hyperparameters in ``group``; raise ValueError naming them."""
        neutral = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "centered": False}
        for key in self.unsupported:
            if group[key] not in (neutral[key], None):
                raise ValueError(
                    f"Invalid {key}: {group[key]!r}; base {self.name!r} "
                    f"(base_style={group['base_style']!r}) does not use {key}"
                )

    def init_state(self, param: Tensor, group: Group) -> dict[str, Tensor]:
        """Return the rule's zero-initialised state for ``param``."""
        raise NotImplementedError

    def direction(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[Tensor | Quotient, Slope]:
        """Update the rule's state in place and return ``(u, ∂u/∂g̃ or None)``.

        With host scalars (``ok`` a float) and no slope, ``u`` may come as a one-tensor
        :class:`Quotient`.
        """
        raise NotImplementedError

    def foreach_direction(
        self,
        params: TensorList,
        grads: TensorList,
        states: list[dict[str, Tensor]],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[TensorList | Quotient, Scalars | None]:
        """:meth:`direction` for a list of parameters of one group, device and dtype.

        ``ok`` is a 0-d tensor (device scalars: nothing is read on the host) or, with host
        scalars on CPU, the float 1.0; per-tensor constants are then Python floats, the
        slopes may be a list of floats and the direction may come as a :class:`Quotient`.
        """
        raise NotImplementedError


def is_decoupled(rule: BaseRule, group: Group) -> bool:
    """Whether weight decay is applied outside the direction for this rule and group."""
    if group["base_style"] == "paper" and rule.decoupled_in_paper_style:
        return True
    return rule.decoupled_weight_decay
