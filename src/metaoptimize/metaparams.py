"""Learned meta-parameters: a log-quantity per block, moved by a meta rule.

The paper learns "step sizes and other meta-parameters" the same way: a value ``β = log q`` per
block, a meta rule with its own state, optional bounds, and growth when param groups are added.
:class:`MetaParameter` is that one thing; :class:`~metaoptimize.MetaOptimize` holds two of them
(log step sizes and, with ``learn_weight_decay``, log weight decays) and ``wrap()`` one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from metaoptimize._kernels.eager import meta_step
from metaoptimize._math import round_floats
from metaoptimize.blocks import BlockLayout
from metaoptimize.meta import MetaRule

__all__ = ["UNBOUNDED", "MetaParameter", "block_start_values"]

UNBOUNDED = (-math.inf, math.inf)
#: Up to this many blocks, a CPU meta step runs on Python floats when its rule allows.
HOST_META_MAX_BLOCKS = 64


class MetaParameter:
    """One learned log-quantity: ``values`` (a tensor, one entry per block), rule and state.

    Args:
        rule: the meta rule that moves the values.
        bounds: the range the values are clamped to after every meta step (log scale).
        initial: the starting values (log scale); :meth:`grow` appends more.
    """

    def __init__(self, rule: MetaRule, bounds: tuple[float, float], initial: Tensor) -> None:
        self.rule = rule
        self.bounds = bounds
        self._values = initial
        self._state: dict[str, Tensor] = rule.init_state(initial)
        # Python floats of values and state for the CPU meta step (see _floats).
        self._mirror: tuple[list[float], dict[str, list[float]]] | None = None
        self._mirror_versions: list[tuple[Tensor, int]] = []
        # Rows of floats a CPU meta step computed and the tensors do not hold yet (_flush).
        self._pending: list[list[float]] | None = None

    @property
    def values(self) -> Tensor:
        """The log values, one per block (current: a pending CPU meta step is written first)."""
        self._flush()
        return self._values

    @values.setter
    def values(self, values: Tensor) -> None:
        self._flush()
        self._values = values

    @property
    def state(self) -> dict[str, Tensor]:
        """The meta rule's state, by key (current, as :attr:`values`)."""
        self._flush()
        return self._state

    @state.setter
    def state(self, state: dict[str, Tensor]) -> None:
        self._flush()
        self._state = state

    def __len__(self) -> int:
        return self._values.numel()

    @property
    def dtype(self) -> torch.dtype:
        """The values' dtype (reading it writes nothing)."""
        return self._values.dtype

    def exp(self) -> Tensor:
        """The meta-parameters themselves (``e^β``)."""
        return self.values.exp()

    def grow(self, start: Sequence[float]) -> None:
        """Append blocks starting at the log values ``start``, with fresh meta state."""
        if not start:
            return
        extra = torch.tensor(start, dtype=self.values.dtype, device=self.values.device)
        fresh = self.rule.init_state(extra)
        self.values = torch.cat([self.values, extra])
        self.state = {key: torch.cat([self.state[key], fresh[key]]) for key in fresh}

    def step(self, z: Tensor | list[float], keep: Tensor | None) -> None:
        """One meta step with meta-gradient ``z`` where ``keep`` holds.

        ``keep=None``: every block steps, as decided on the host (a finite CPU step); a few
        blocks then take the rule's float form when it has one. ``z`` as Python floats comes
        from a verdict read on the host.
        """
        host = keep is None and len(self) <= HOST_META_MAX_BLOCKS
        if host and self._host_step(z if isinstance(z, list) else z.tolist()):
            return
        values = self.values
        if isinstance(z, list):
            z = torch.tensor(z, dtype=values.dtype, device=values.device)
        low, high = self.bounds
        meta_step(self.rule, values, z.to(values.dtype), self.state, keep, low, high)

    def host_exp(self) -> list[float]:
        """:meth:`exp` as Python floats in the values' precision (CPU; read once per change)."""
        return round_floats([math.exp(v) for v in self._floats()[0]], self._values.dtype)

    def _floats(self) -> tuple[list[float], dict[str, list[float]]]:
        """The values and the meta state as floats, from the mirror while it is current.

        The mirror is current while a CPU meta step's floats wait to be written, or while
        every tensor is the one it was read from, unmodified since (``_version`` counts
        in-place writes, from anyone: ``load_state_dict``, a test).
        """
        if self._pending is not None:
            assert self._mirror is not None
            return self._mirror
        tensors = (self._values, *self._state.values())
        seen = self._mirror_versions
        if (
            self._mirror is None
            or len(tensors) != len(seen)
            or any(
                t is not old or t._version != version
                for t, (old, version) in zip(tensors, seen, strict=True)
            )
        ):
            self._mirror = (
                self._values.tolist(),
                {key: value.tolist() for key, value in self._state.items()},
            )
            self._mirror_versions = [(t, t._version) for t in tensors]
        return self._mirror

    def _host_step(self, z: list[float]) -> bool:
        """The meta step on Python floats (CPU); False when the rule has no float form.

        The new floats become the mirror at once; the tensors are written when next read
        (:meth:`_flush`), so a run of CPU steps writes nothing.
        """
        values, state = self._floats()
        result = self.rule.update_floats(values, z, state)
        if result is None:
            return False
        new_values, new_state = result
        low, high = self.bounds
        dtype = self._values.dtype
        rows = [
            round_floats([min(max(v, low), high) for v in new_values], dtype),
            *(round_floats(new_state[key], dtype) for key in self._state),
        ]
        self._mirror = (rows[0], dict(zip(self._state, rows[1:], strict=True)))
        self._pending = rows
        return True

    def _flush(self) -> None:
        """Write a pending CPU meta step into the tensors."""
        rows, self._pending = self._pending, None
        if rows is None:
            return
        targets = [self._values, *self._state.values()]
        if len(self) == 1:  # fill_ takes the float directly: no tensor to build
            for target, row in zip(targets, rows, strict=True):
                target.fill_(row[0])
        else:
            written = torch.tensor(rows, dtype=self._values.dtype)
            for target, row_values in zip(targets, written, strict=True):
                target.copy_(row_values)
        # The floats just written are the tensors' values: the mirror stays current.
        self._mirror_versions = [(t, t._version) for t in targets]

    def saved(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Copies of the values and the meta state, for a state dict."""
        return self.values.clone(), {key: value.clone() for key, value in self.state.items()}

    def restore(self, values: Tensor, state: dict[str, Any]) -> None:
        """Copy saved values and meta state in (shapes were checked by the caller)."""
        self.values.copy_(values)
        for key, value in self.state.items():
            value.copy_(state[key])


def block_start_values(
    layout: BlockLayout,
    param_groups: list[dict[str, Any]],
    key: str,
    advice: str = "",
    *,
    arg: str | None = None,
    label: str | None = None,
) -> dict[int, float]:
    """The starting value of every block: its param groups' ``group[key]``, which must agree.

    Args:
        layout: the block layout of ``param_groups``.
        param_groups: the param groups.
        key: the group entry the blocks start from.
        advice: appended to the error message.
        arg: the argument the error names (default ``key``).
        label: what the error calls the values (default ``key``).

    Raises:
        ValueError: a block spans param groups with different values of ``key``.
    """
    start: dict[int, float] = {}
    groups_of_params = [g for g in param_groups for _ in g["params"]]
    for block, group in zip(layout.block_of_param, groups_of_params, strict=True):
        seen = start.setdefault(block, group[key])
        if seen != group[key]:
            raise ValueError(
                f"Invalid {arg or key}: block {layout.names[block]!r} spans param groups with "
                f"different {label or key} ({seen:g} and {group[key]:g}){advice}"
            )
    if layout.mode == "group":  # an empty group still has its block
        for index, group in enumerate(param_groups):
            start.setdefault(index, group[key])
    return start
