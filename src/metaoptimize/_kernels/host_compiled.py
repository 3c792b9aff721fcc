"""``fused=True`` on CPU for the Adam, AdamW and Lion bases: few compiled calls, host scalars.

Two things made the compiled per-tensor kernel (:mod:`metaoptimize._kernels.compiled`) slower
than torch's AdamW on CPU: every compiled call pays tens of microseconds of guards and
dispatch, and scalars derived inside the graph (``β^t``, ``√(1-β2^t)``) are recomputed in every
iteration of Inductor's loop. Here the step's scalars are computed on the host, once per call,
and go in as one small tensor; the loop is then a handful of loads, multiplies and one square
root per element.

Tensors of at most :data:`FLAT_MAX_NUMEL` elements are updated together, in one call: their
state lives in one flat buffer per key (:class:`FlatState`), whose views are the state dict's
entries, so only their weights and gradients are gathered (and the weights scattered back).
Larger tensors take one call each on their own storage. The result equals the per-tensor eager
kernel up to rounding (tests/test_host_compiled.py, in float64).
"""

from __future__ import annotations

import math
import operator
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
    "FLAT_MAX_NUMEL",
    "HOST_BODIES",
    "FlatState",
    "HostBody",
    "HostCompiledKernel",
    "adam_l2_step_body",
    "adam_step_body",
    "host_compiled_supports",
    "lion_step_body",
]

#: Tensors up to this many elements share flat state buffers and one compiled call.
FLAT_MAX_NUMEL = 32768
#: Flat states kept per optimizer (one per set of small parameters seen with gradients).
_MAX_FLAT_STATES = 8


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


def _flat_member(entry: Entry) -> bool:
    """Small tensors whose weights and gradients can be viewed flat share the flat state."""
    param = entry.param
    return param.numel() <= FLAT_MAX_NUMEL and param.is_contiguous() and entry.grad.is_contiguous()


class FlatState:
    """The state (moments and trace) of a fixed list of small parameters, in flat buffers.

    Each parameter's state entries become views of one buffer per key, and its step counter
    (``counted``) a 0-d view of one buffer of counts; everything that reads or writes the
    state (the state dict, the other kernels) sees ordinary per-parameter tensors. The buffers
    stay in use while every entry is still the view placed there (a loaded state dict or a new
    trace replaces them) and the counts are equal (a step that left some parameters out makes
    them differ; the kernel then splits the parameters by count).
    """

    def __init__(self, entries: Sequence[Entry], keys: Sequence[str], counted: bool) -> None:
        self.sizes = [e.param.numel() for e in entries]
        self.buffers: dict[str, Tensor] = {}
        # (state dict, key, the view placed there), as three lists for a C-speed check
        states: list[dict[str, Any]] = []
        names: list[str] = []
        views: list[Tensor] = []
        for key in keys:
            flat = torch.cat([e.state[key].reshape(-1) for e in entries])
            self.buffers[key] = flat
            for entry, view in zip(entries, flat.split_with_sizes(self.sizes), strict=True):
                entry.state[key] = view.view_as(entry.param)
        self.steps: Tensor | None = None
        if counted:
            self.steps = torch.stack([e.state["step"] for e in entries])
            for index, entry in enumerate(entries):
                entry.state["step"] = self.steps[index]
        for key in (*keys, "step") if counted else keys:
            states += [e.state for e in entries]
            names += [key] * len(entries)
            views += [e.state[key] for e in entries]
        self._placed = (states, names, views)
        self._states = [e.state for e in entries]
        self._count: float | None = None if counted else 0.0
        self._steps_version = -1
        #: this step's gradients, flat (from :meth:`HostCompiledKernel.prepare`)
        self.grad: Tensor | None = None
        # Where the weights and gradients are gathered, kept between steps: a fresh buffer
        # of this size page-faults on every step (measured 1.5 ms of a 6 ms step on 150
        # tensors), more than the update itself.
        total = sum(self.sizes)
        like = self.buffers[keys[0]]
        self.gathered = (like.new_empty(total), like.new_empty(total))

    def current(self, entries: Sequence[Entry]) -> bool:
        """Whether ``entries`` still hold the state dicts and views placed there.

        A loaded state dict brings new dicts (the old ones still hold the views).
        """
        states, names, views = self._placed
        if not all(map(operator.is_, [e.state for e in entries], self._states)):
            return False
        return all(map(operator.is_, map(dict.get, states, names), views))

    def holds_views(self) -> bool:
        """Whether the state dicts it filled still hold its views (else it can be dropped)."""
        states, names, views = self._placed
        return all(map(operator.is_, map(dict.get, states, names), views))

    def count(self) -> float | None:
        """The step count every parameter shares, or None when they differ (0: not counted)."""
        if self.steps is not None and self.steps._version != self._steps_version:
            counts = self.steps.tolist()
            self._count = counts[0] if all(c == counts[0] for c in counts) else None
            self._steps_version = self.steps._version
        return self._count

    def advance(self) -> None:
        """Count one step for every parameter."""
        if self.steps is None:
            return
        self.steps.add_(host_constant(1.0, self.steps))
        assert self._count is not None
        self._count += 1.0
        self._steps_version = self.steps._version


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
        # Per set of small parameters (their ids): the positions and flat state of each part.
        self._flat: dict[tuple[int, ...], list[tuple[list[int], FlatState]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        """For copies and pickles: no flat states (keyed by parameter ids).

        They are rebuilt from the copied state entries when next needed.
        """
        state = dict(self.__dict__)
        state["_flat"] = {}
        return state

    def prepare(
        self, entries: Sequence[Entry], with_trace: bool
    ) -> list[tuple[list[Entry], Tensor]]:
        """Gather this step's flat gradients of the small entries, before the meta-gradient.

        Returns ``(entries, <h, g>)`` for each part of the entries whose trace is one flat
        buffer: their meta-gradient in one dot (the entries share a block: the plan's buckets
        do). The gradients are kept for :meth:`run` of this step.
        """
        small = [e for e in entries if _flat_member(e)]
        sums = []
        for part, flat in self._flat_parts(small, with_trace) if small else []:
            flat.grad = torch.cat([e.grad.view(-1) for e in part], out=flat.gathered[1])
            if with_trace:
                sums.append((part, torch.dot(flat.buffers["trace"], flat.grad)))
        return sums

    def discard(self) -> None:
        """Drop the gradients :meth:`prepare` gathered (a step that was skipped)."""
        for parts in self._flat.values():
            for _, flat in parts:
                flat.grad = None

    def run(
        self,
        entries: Sequence[Entry],
        alpha: float,
        with_trace: bool,
        decoupled: bool,
        fallback: Callable[[Sequence[Entry]], None],
    ) -> None:
        """One step of ``entries`` (one param group, dtype and step size; a finite step).

        Non-contiguous large tensors go to ``fallback``, as do all entries that remain when
        compiling fails (the error is raised after).
        """
        group = entries[0].group
        rule = self._host_rule(group, decoupled)
        # κ: the decoupled decay, or Adam's L2 decay (which its own body applies)
        kappa = group["weight_decay"] if decoupled or rule is ADAM_L2 else 0.0
        small: list[Entry] = []
        large: list[Entry] = []
        for entry in entries:
            (small if _flat_member(entry) else large).append(entry)
        done: list[Entry] = []
        try:
            for part, flat in self._flat_parts(small, with_trace) if small else []:
                self._flat_step(rule, part, flat, alpha, kappa, with_trace)
                done += part
            for entry in large:
                if supports_fused(entry.param, entry.grad, entry.state):  # flat views
                    self._tensor_step(rule, entry, alpha, kappa, with_trace)
                else:
                    fallback([entry])
                done.append(entry)
        except Exception:
            fallback([e for e in entries if all(e is not d for d in done)])
            raise

    def _flat_parts(
        self, small: Sequence[Entry], with_trace: bool
    ) -> list[tuple[list[Entry], FlatState]]:
        """The small entries in parts of one step count, each with its flat state."""
        key = tuple(id(e.param) for e in small)
        kept = self._flat.get(key)
        if kept is not None:
            parts = [([small[i] for i in positions], flat) for positions, flat in kept]
            if all(flat.current(part) and flat.count() is not None for part, flat in parts):
                return parts
        # (Re)build: one flat state per step count. Parameters added to the optimizer later,
        # or left out of some steps, count differently; each part steps on its own count.
        by_count: dict[float, list[int]] = {}
        for position, entry in enumerate(small):
            count = entry.state["step"].item() if "step" in entry.state else 0.0
            by_count.setdefault(count, []).append(position)
        if len(self._flat) >= _MAX_FLAT_STATES:
            self._flat.clear()  # gradients on ever-changing subsets: start over
        rule = HOST_BODIES[self._base]  # every body of a base keeps the same state
        keys = (*rule.moments, "trace") if with_trace else rule.moments
        built = [
            (p, FlatState([small[i] for i in p], keys, rule.counted)) for p in by_count.values()
        ]
        # Flat states whose views were just replaced are dropped with their buffers (any
        # other is rebuilt where it is used next, if it is not current then).
        self._flat = {
            k: v for k, v in self._flat.items() if all(flat.holds_views() for _, flat in v)
        }
        self._flat[key] = built
        return [([small[i] for i in positions], flat) for positions, flat in built]

    def _flat_step(
        self,
        rule: HostBody,
        small: Sequence[Entry],
        flat: FlatState,
        alpha: float,
        kappa: float,
        with_trace: bool,
    ) -> None:
        count = flat.count()
        assert count is not None  # _flat_parts checked it
        weights = [e.param.view(-1) for e in small]
        param = torch.cat(weights, out=flat.gathered[0])
        grad, flat.grad = flat.grad, None
        if grad is None:  # not prepared this step
            grad = torch.cat([e.grad.view(-1) for e in small], out=flat.gathered[1])
        scalars = rule.scalars(small[0].group, count + 1.0, alpha, kappa)
        buffers = flat.buffers
        self._compiled_body(rule.body, param.dtype, with_trace)(
            param,
            grad,
            [buffers[key] for key in rule.moments],
            buffers["trace"] if with_trace else None,
            torch.tensor(scalars, dtype=param.dtype),
        )
        torch._foreach_copy_(weights, list(param.split_with_sizes(flat.sizes)))
        flat.advance()

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
