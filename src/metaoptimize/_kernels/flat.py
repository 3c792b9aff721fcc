"""Small CPU tensors stepped as one: flat state buffers and one merged entry per part.

On CPU an elementwise op on a tensor of a few thousand elements costs a couple of
microseconds of dispatch, several times its arithmetic, and a multi-tensor op is the same op
looped in C++: ``_foreach_mul_`` on 150 tensors of 0.6M elements together took 140 us, one
``mul_`` on a flat buffer of the same elements 23 us. So with host scalars the small tensors of
a bucket are stepped as one flat tensor: their state (every parameter-shaped entry: moments,
trace, per-weight step sizes and their meta state) lives in one flat buffer per key, whose
views are the state dict's entries, and their weights and gradients are gathered into two
buffers kept between steps and the weights copied back after the step. The kernels, the
meta-gradient and the meta step see one :class:`~metaoptimize._types.Entry` per part (one
param group, block and step count) and run unchanged; everything elementwise is the same
arithmetic, and sums over a block add in another order (tests/test_flat.py compares with the
unmerged per-tensor kernel in float64).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from metaoptimize._math import host_constant
from metaoptimize._types import Entry

__all__ = ["FLAT_MAX_NUMEL", "FlatMerger", "FlatState", "Merged", "flat_member"]

#: Tensors up to this many elements are merged (larger ones gain nothing: their ops are long).
FLAT_MAX_NUMEL = 32768
#: Sets of merged parameters kept per optimizer (one per set seen with gradients).
_MAX_KEPT = 8
#: Builds of flat states an optimizer may take before it checks how often it builds.
_MAX_REBUILDS = 8
#: State entries that keep an entry out: the Kahan compensation (bfloat16 weights) and the
#: learned weight decay's trace (its kernels run per tensor).
_UNMERGED_KEYS = ("kahan_comp", "wd_trace")


def flat_member(entry: Entry) -> bool:
    """Whether an entry can be merged: small, on the CPU, one float dtype for all.

    Every state tensor but the 0-d step counter has the parameter's shape and dtype.
    """
    param, grad = entry.param, entry.grad
    if param.numel() > FLAT_MAX_NUMEL or not param.is_cpu:
        return False
    if param.dtype not in (torch.float32, torch.float64) or grad.dtype != param.dtype:
        return False
    for key, value in entry.state.items():
        if key in _UNMERGED_KEYS or not isinstance(value, Tensor):
            return False
        if key == "step":
            if value.dim() or not value.is_cpu:
                return False
        elif value.shape != param.shape or value.dtype != param.dtype or not value.is_cpu:
            return False
    return True


class FlatState:
    """The state of a fixed list of small parameters, in flat buffers.

    Each parameter's state entries become views of one buffer per key, and its step counter
    a 0-d view of one buffer of counts; everything that reads or writes the state (the state
    dict, the other kernels) sees ordinary per-parameter tensors. The buffers stay in use
    while every state dict is the one seen here, holds the same keys and still the view
    placed there (a loaded state dict or a replaced entry rebuilds them), and the counts are
    equal (a step that left some parameters out makes them differ; the merger then splits
    the parameters by count).

    Args:
        entries: the parameters (one param group; each :func:`flat_member`).
        block: the block of the merged entry.
    """

    def __init__(self, entries: Sequence[Entry], block: int) -> None:
        first = entries[0]
        keys = [key for key in first.state if key != "step"]
        counted = "step" in first.state
        self.sizes = [e.param.numel() for e in entries]
        self.buffers: dict[str, Tensor] = {}
        for key in keys:
            flat = torch.cat([e.state[key].reshape(-1) for e in entries])
            self.buffers[key] = flat
            for entry, view in zip(entries, _shaped_views(flat, entries, self.sizes), strict=True):
                entry.state[key] = view
        self.steps: Tensor | None = None
        merged_state: dict[str, Any] = dict(self.buffers)
        if counted:
            self.steps = torch.stack([e.state["step"] for e in entries])
            for index, entry in enumerate(entries):
                entry.state["step"] = self.steps[index]
            # The merged entry's counter: set to the shared count before each step.
            merged_state["step"] = self.steps[0].clone()
        # (state dict, key, the view placed there), as three lists for a C-speed check
        states: list[dict[str, Any]] = []
        names: list[str] = []
        views: list[Tensor] = []
        for key in (*keys, "step") if counted else keys:
            states += [e.state for e in entries]
            names += [key] * len(entries)
            views += [e.state[key] for e in entries]
        self._placed = (states, names, views)
        self._states = [e.state for e in entries]
        self._lengths = [len(e.state) for e in entries]
        self._count: float | None = None if counted else 0.0
        self._steps_version = -1
        # The weights and gradients are gathered here, in buffers kept between steps (a fresh
        # buffer of this size page-faults every step on some machines).
        total = sum(self.sizes)
        param, grad = first.param.new_empty(total), first.param.new_empty(total)
        #: the one entry the kernels see for these parameters
        self.entry = Entry(first.group, param, grad, merged_state, block, 1.0)
        # Their parameter-shaped views, made once: a view costs microseconds on CPU, and the
        # copies in and out are one multi-tensor call each.
        self._param_views = _shaped_views(param, entries, self.sizes)
        self._grad_views = _shaped_views(grad, entries, self.sizes)

    def current(self, entries: Sequence[Entry]) -> bool:
        """Whether ``entries`` still hold the state dicts, keys and views placed there."""
        if not all(map(operator.is_, [e.state for e in entries], self._states)):
            return False
        if not all(map(operator.eq, map(len, self._states), self._lengths)):
            return False
        return self.holds_views()

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

    def gather(self, entries: Sequence[Entry]) -> Entry:
        """The merged entry of this step: weights, gradients and step count gathered."""
        merged = self.entry
        torch._foreach_copy_(self._param_views, [e.param for e in entries])
        torch._foreach_copy_(self._grad_views, [e.grad for e in entries])
        if self.steps is not None:
            count = self.count()
            assert count is not None  # the merger split the parameters by count
            merged.state["step"].fill_(count)
        return merged

    def scatter(self, entries: Sequence[Entry]) -> None:
        """After the step: the weights back to the parameters, every count advanced by one."""
        torch._foreach_copy_([e.param for e in entries], self._param_views)
        if self.steps is None:
            return
        self.steps.add_(host_constant(1.0, self.steps))
        assert self._count is not None
        self._count += 1.0
        self._steps_version = self.steps._version


def _shaped_views(flat: Tensor, entries: Sequence[Entry], sizes: list[int]) -> list[Tensor]:
    """``flat`` split into views shaped like the entries' parameters."""
    parts = flat.split_with_sizes(sizes)
    return [part.view_as(e.param) for part, e in zip(parts, entries, strict=True)]


class Merged:
    """The parts of one bucket that were merged: ``(real entries, flat state)`` each."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[tuple[list[Entry], FlatState]]) -> None:
        self.parts = parts

    def scatter(self) -> None:
        """After the kernels ran: every part's weights back, its counts advanced."""
        for entries, flat in self.parts:
            flat.scatter(entries)


class FlatMerger:
    """Merges the small entries of a bucket, keeping their flat states between steps.

    Building the flat states costs a copy of the state; where the parameters with gradients
    change from step to step (a mixture of experts, say) they would be rebuilt on every step,
    which costs more than merging saves. So merging stops for good, and the entries step as
    they are, once more than :data:`_MAX_REBUILDS` builds have come on more than a quarter of
    the calls.
    """

    def __init__(self) -> None:
        # Per bucket (its parameters' ids and blocks): the positions and flat state of each
        # part, and the positions left as they are.
        self._kept: dict[tuple[Any, ...], tuple[list[tuple[list[int], FlatState]], list[int]]] = {}
        self._calls = 0
        self._builds = 0
        #: False once merging stopped (see the class docstring)
        self.enabled = True

    def __getstate__(self) -> dict[str, Any]:
        """For copies and pickles: no flat states (keyed by parameter ids).

        They are rebuilt from the copied state entries when next needed.
        """
        return {**self.__dict__, "_kept": {}}

    def merge(self, entries: list[Entry], by_block: bool) -> tuple[list[Entry], Merged | None]:
        """``entries`` with each part of two or more small ones replaced by its merged entry.

        A part is a block (``by_block``; per-weight step sizes need none) and a step count.
        Call :meth:`Merged.scatter` after the kernels ran, and only then.
        """
        if not self.enabled:
            return entries, None
        self._calls += 1
        key = (*map(id, [e.param for e in entries]), *[e.block for e in entries])
        kept = self._kept.get(key)
        if kept is None or not all(
            flat.current([entries[i] for i in positions]) and flat.count() is not None
            for positions, flat in kept[0]
        ):
            self._builds += 1
            if self._builds > _MAX_REBUILDS and 4 * self._builds > self._calls:
                self.enabled, self._kept = False, {}
                return entries, None
            kept = self._build(entries, by_block)
            if len(self._kept) >= _MAX_KEPT:
                self._kept.clear()  # gradients on ever-changing subsets: start over
            # Flat states whose views were just replaced are dropped with their buffers.
            self._kept = {
                k: v for k, v in self._kept.items() if all(f.holds_views() for _, f in v[0])
            }
            self._kept[key] = kept
        parts, rest = kept
        if not parts:
            return entries, None
        real = [([entries[i] for i in positions], flat) for positions, flat in parts]
        merged = [flat.gather(part) for part, flat in real]
        return merged + [entries[i] for i in rest], Merged(real)

    @staticmethod
    def _build(
        entries: list[Entry], by_block: bool
    ) -> tuple[list[tuple[list[int], FlatState]], list[int]]:
        """Split the entries into parts (block, step count, state keys) and the rest."""
        by_part: dict[tuple[Any, ...], list[int]] = {}
        rest: list[int] = []
        for position, entry in enumerate(entries):
            if not flat_member(entry):
                rest.append(position)
                continue
            state = entry.state
            count = state["step"].item() if "step" in state else 0.0
            part = (id(entry.group), entry.block if by_block else 0, count, tuple(state))
            by_part.setdefault(part, []).append(position)
        parts = []
        for positions in by_part.values():
            if len(positions) < 2:  # nothing to merge
                rest += positions
                continue
            block = entries[positions[0]].block
            parts.append((positions, FlatState([entries[i] for i in positions], block)))
        return parts, sorted(rest)
