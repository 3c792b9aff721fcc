"""``fused=True`` on CPU for the Adam, AdamW and Lion bases: few compiled calls, host scalars.

Two things made the compiled per-tensor kernel (:mod:`metaoptimize._kernels.compiled`) slower
than torch's AdamW on CPU: every compiled call pays tens of microseconds of guards and
dispatch, and scalars derived inside the graph (``β^t``, ``√(1-β2^t)``) are recomputed in every
iteration of Inductor's loop. Here the step's scalars are computed on the host, once per call,
and go in as one small tensor; the loop is then a handful of loads, multiplies and one square
root per element.

One call per tensor; the small tensors of a bucket come here merged into one flat tensor
(:mod:`metaoptimize._kernels.flat`), so a model's biases and norms take one call together. The
result equals the per-tensor eager kernel up to rounding (tests/test_host_compiled.py, in
float64).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metaoptimize._kernels.compiled import compile_own_copy, supports_fused
from metaoptimize._math import host_constant
from metaoptimize._types import Entry
from metaoptimize.base import has_decay, host_bias_correction

__all__ = [
    "ADAM_L2",
    "HOST_BODIES",
    "HostBody",
    "HostCompiledKernel",
    "adam_l2_step_body",
    "adam_step_body",
    "host_compiled_supports",
    "lion_step_body",
]


def host_compiled_supports(base: str, entry: Entry, decoupled: bool) -> bool:
    """Whether the entry can take this kernel (Adam, AdamW, Lion; every tensor of one dtype)."""
    param, grad, state = entry.param, entry.grad, entry.state
    if base not in HOST_BODIES or "kahan_comp" in state or "wd_trace" in state:
        return False
    if param.dtype not in (torch.float32, torch.float64) or grad.dtype != param.dtype:
        return False
    tensors = [param, grad, *(v for v in state.values() if isinstance(v, Tensor) and v.dim())]
    # Contiguity is checked where the step runs (the plan is kept between steps).
    return all(t.dtype == param.dtype and t.is_cpu for t in tensors)


def adam_step_body(
    param: Tensor,
    grad: Tensor,
    moments: list[Tensor],
    trace: Tensor | None,
    scalars: Tensor,
) -> None:
    """One Adam(W) step with the Hessian-free trace, on flat tensors, in place.

    ``moments`` = ``[m, v]``; ``scalars`` = ``[1-β1, β2, 1-β2, ε√c2, -α√c2/c1, -ακ,
    γ(1-ακ)]`` (``c`` the bias corrections): the step is ``Δ = -α (m̂/(√v̂+ε) + κw)``, written
    as the per-tensor host kernel writes it, ``-α (√c2/c1) m/(√v + ε√c2) - ακ w``; the trace
    becomes ``γ(1-ακ) h + Δ`` and the weights ``w + Δ`` (paper Alg. 3; docs/math.md, "Decay
    factors").
    """
    exp_avg, exp_avg_sq = moments
    exp_avg.lerp_(grad, scalars[0])
    exp_avg_sq.mul_(scalars[1]).addcmul_(grad, grad * scalars[2])
    denominator = exp_avg_sq.sqrt().add_(scalars[3])
    delta = exp_avg.div(denominator).mul_(scalars[4]).add_(param * scalars[5])
    if trace is not None:
        trace.mul_(scalars[6]).add_(delta)
    param.add_(delta)


def lion_step_body(
    param: Tensor,
    grad: Tensor,
    moments: list[Tensor],
    trace: Tensor | None,
    scalars: Tensor,
) -> None:
    """One Lion step with the Hessian-free trace, on flat tensors, in place.

    ``moments`` = ``[m]``; ``scalars`` = ``[1-β1, 1-β2, -α, -ακ, γ(1-ακ)]``: ``u =
    sign(β1 m + (1-β1) g)``, then ``m ← β2 m + (1-β2) g``; ``Δ = -α (u + κw)``; the trace
    becomes ``γ(1-ακ) h + Δ`` (the sign has no slope) and the weights ``w + Δ``.
    """
    (exp_avg,) = moments
    u = exp_avg.lerp(grad, scalars[0]).sign_()
    exp_avg.lerp_(grad, scalars[1])
    delta = u.mul_(scalars[2]).add_(param * scalars[3])
    if trace is not None:
        trace.mul_(scalars[4]).add_(delta)
    param.add_(delta)


def lion_scalars(group: dict[str, Any], count: float, alpha: float, kappa: float) -> list[float]:
    """The ``scalars`` of :func:`lion_step_body` (Lion counts no steps)."""
    beta1, beta2 = group["betas"]
    return [
        1.0 - beta1,
        1.0 - beta2,
        -alpha,
        -alpha * kappa,
        group["gamma"] * (1.0 - alpha * kappa),
    ]


def adam_scalars(group: dict[str, Any], count: float, alpha: float, kappa: float) -> list[float]:
    """The ``scalars`` of :func:`adam_step_body` for step ``count`` (after its increment)."""
    beta1, beta2 = group["betas"]
    bias1, bias2 = host_bias_correction(beta1, count), host_bias_correction(beta2, count)
    root2 = math.sqrt(bias2)
    return [
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        group["eps"] * root2,
        -alpha * root2 / bias1,
        -alpha * kappa,
        group["gamma"] * (1.0 - alpha * kappa),
    ]


def adam_l2_step_body(
    param: Tensor,
    grad: Tensor,
    moments: list[Tensor],
    trace: Tensor | None,
    scalars: Tensor,
) -> None:
    """One Adam step with an L2 decay (torch.optim.Adam's ``weight_decay``) and the trace.

    ``scalars`` = ``[κ, 1-β1, β2, 1-β2, 1/√c2, ε, -α/c1, -(1-β2)/(c2 c1), (1-β1)/c1, γ,
    -γακ]``. With ``g̃ = g + κw`` the moments take ``g̃``, ``Δ = -α m̂/(√v̂+ε)``, and the trace
    decays by ``γ(1 - ακ ∂u/∂g̃)``, ``∂u/∂g̃ = ((1-β1)/c1 - (1-β2)/c2 · m̂ g̃ / (√v̂ (√v̂+ε))) /
    (√v̂+ε)`` (docs/math.md §4), written as the per-tensor host kernel writes it (0/0 taken as
    0 by ``nan_to_num``).
    """
    exp_avg, exp_avg_sq = moments
    g = grad + param * scalars[0]
    exp_avg.lerp_(g, scalars[1])
    exp_avg_sq.mul_(scalars[2]).addcmul_(g, g * scalars[3])
    rms = exp_avg_sq.sqrt() * scalars[4]
    denominator = rms + scalars[5]
    delta = exp_avg / denominator * scalars[6]
    if trace is not None:
        ratio = (g * exp_avg / rms / denominator * scalars[7]).nan_to_num(0.0, 0.0, 0.0)
        slope = (ratio + scalars[8]) / denominator
        trace.mul_(scalars[9] + scalars[10] * slope).add_(delta)
    param.add_(delta)


def adam_l2_scalars(group: dict[str, Any], count: float, alpha: float, kappa: float) -> list[float]:
    """The ``scalars`` of :func:`adam_l2_step_body` (``kappa``: the group's L2 decay)."""
    beta1, beta2 = group["betas"]
    bias1, bias2 = host_bias_correction(beta1, count), host_bias_correction(beta2, count)
    gamma = group["gamma"]
    return [
        kappa,
        1.0 - beta1,
        beta2,
        1.0 - beta2,
        1.0 / math.sqrt(bias2),
        group["eps"],
        -alpha / bias1,
        -((1.0 - beta2) / bias2) / bias1,
        (1.0 - beta1) / bias1,
        gamma,
        -alpha * kappa * gamma,
    ]


@dataclass(frozen=True)
class HostBody:
    """A base rule's step for this kernel.

    Attributes:
        body: the elementwise step (compiled once per process, dtype and trace setting).
        moments: the state keys of its moment tensors, in the order ``body`` takes them.
        counted: whether the rule counts steps (its scalars depend on the count).
        scalars: ``(group, count after this step, α, κ) -> scalars`` on the host.
    """

    body: Callable[..., None]
    moments: tuple[str, ...]
    counted: bool
    scalars: Callable[[dict[str, Any], float, float, float], list[float]]


_ADAM = HostBody(adam_step_body, ("exp_avg", "exp_avg_sq"), True, adam_scalars)
#: Adam with an L2 decay (the group's weight decay goes into the gradient).
ADAM_L2 = HostBody(adam_l2_step_body, ("exp_avg", "exp_avg_sq"), True, adam_l2_scalars)
#: The base rules this kernel runs, by name (Adam with an L2 decay takes :data:`ADAM_L2`).
HOST_BODIES: dict[str, HostBody] = {
    "adam": _ADAM,
    "adamw": _ADAM,
    "lion": HostBody(lion_step_body, ("exp_avg",), False, lion_scalars),
}


#: The compiled bodies, shared by every optimizer of the process: one per body, dtype and
#: trace setting, so that each compiles one graph (two where a tensor of one element appears).
_COMPILED: dict[tuple[Callable[..., None], torch.dtype, bool], Callable[..., None]] = {}


def shared_body(
    body: Callable[..., None], dtype: torch.dtype, with_trace: bool
) -> Callable[..., None]:
    """The compiled ``body`` for ``dtype`` with or without the trace."""
    key = (body, dtype, with_trace)
    if key not in _COMPILED:
        _COMPILED[key] = compile_own_copy(body)
    return _COMPILED[key]


class HostCompiledKernel:
    """Runs buckets of one base rule's entries through its compiled :class:`HostBody`.

    Args:
        base: the base rule's name (a key of :data:`HOST_BODIES`; others never get here).
        compiled_body: gives the compiled body for a body, dtype and trace setting (default
            :func:`shared_body`; the tests swap in a failing one).
    """

    def __init__(
        self,
        base: str,
        compiled_body: Callable[[Callable[..., None], torch.dtype, bool], Callable[..., None]]
        | None = None,
    ) -> None:
        self._base = base
        self._compiled_body = compiled_body or shared_body

    def run(
        self,
        entries: Sequence[Entry],
        alpha: float,
        with_trace: bool,
        decoupled: bool,
        fallback: Callable[[Sequence[Entry]], None],
    ) -> None:
        """One step of ``entries`` (one param group, dtype and step size; a finite step).

        Non-contiguous tensors go to ``fallback``, as do all entries that remain when
        compiling fails (the error is raised after).
        """
        group = entries[0].group
        rule = self._host_rule(group, decoupled)
        # κ: the decoupled decay, or Adam's L2 decay (which its own body applies)
        kappa = group["weight_decay"] if decoupled or rule is ADAM_L2 else 0.0
        done = 0
        try:
            for entry in entries:
                if supports_fused(entry.param, entry.grad, entry.state):
                    self._tensor_step(rule, entry, alpha, kappa, with_trace)
                else:
                    fallback([entry])
                done += 1
        except Exception:
            fallback(entries[done:])  # a failed compilation ran nothing of its entry
            raise

    def _tensor_step(
        self, rule: HostBody, entry: Entry, alpha: float, kappa: float, with_trace: bool
    ) -> None:
        state = entry.state
        step = state["step"] if rule.counted else None
        count = 0.0 if step is None else step.item()
        scalars = rule.scalars(entry.group, count + 1.0, alpha, kappa)
        self._compiled_body(rule.body, entry.param.dtype, with_trace)(
            entry.param.view(-1),
            entry.grad.view(-1),
            [state[key].view(-1) for key in rule.moments],
            state["trace"].view(-1) if with_trace else None,
            torch.tensor(scalars, dtype=entry.param.dtype),
        )
        if step is not None:
            step.add_(host_constant(1.0, step))

    def _host_rule(self, group: dict[str, Any], decoupled: bool) -> HostBody:
        """The body for this base and group (Adam with an L2 decay has its own)."""
        if not decoupled and has_decay(group["weight_decay"]):
            assert self._base == "adam", "only Adam's L2 decay has a body here"
            return ADAM_L2
        return HOST_BODIES[self._base]
