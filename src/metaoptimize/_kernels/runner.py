"""Runs the planned kernels of a step (:func:`metaoptimize._kernels.plan_kernels`).

The runner owns what belongs to the kernels across steps: the compiled-kernel cache and whether
a kernel failed to build. A Triton kernel that fails falls back to the compiled one, and a
compilation that fails to the eager kernel, each with one warning, for good; the user's
``fused``/``fused_backend`` settings are never rewritten.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metaoptimize._kernels import (
    COMPILED,
    CPU_FOREACH_MIN_TENSORS,
    EAGER,
    FOREACH,
    HOST,
    HOST_COMPILED,
    TRITON,
    Bucket,
)
from metaoptimize._kernels.compiled import (
    compile_meta_step,
    compile_parameter_step,
    fused_meta_step,
    fused_parameter_step,
)
from metaoptimize._kernels.eager import meta_step, parameter_step
from metaoptimize._kernels.flat import FlatMerger, Merged
from metaoptimize._kernels.foreach import foreach_parameter_step
from metaoptimize._kernels.host_compiled import HostCompiledKernel
from metaoptimize._kernels.triton import triton_parameter_step
from metaoptimize._types import Entry
from metaoptimize.base import BaseRule, Scalars, is_decoupled, is_one, operand
from metaoptimize.meta import MetaRule

if TYPE_CHECKING:
    from metaoptimize.metaparams import MetaParameter

__all__ = ["KernelRunner", "StepScalars"]


class StepScalars:
    """The per-step values every kernel call of a step shares, each read once.

    Args:
        finite: the step's verdict (a Python bool where it was decided on the host).
        host: the kernels take Python scalars (CPU).
        meta_active: whether the meta rule is active (the traces exist).
        step_sizes: the block step sizes; None with per-weight step sizes.
        weight_decays: the learned weight decays, or None.
    """

    def __init__(
        self,
        finite: Tensor | bool,
        host: bool,
        meta_active: bool,
        step_sizes: MetaParameter | None,
        weight_decays: MetaParameter | None,
    ) -> None:
        self.finite, self.host, self.meta_active = finite, host, meta_active
        self.per_weight = step_sizes is None
        self.learned_weight_decay = weight_decays is not None
        self._step_sizes, self._weight_decays = step_sizes, weight_decays
        # Host scalars: the block step sizes and weight decays as Python floats.
        self.alpha_values = step_sizes.host_exp() if host and step_sizes is not None else []
        self.kappa_values = weight_decays.host_exp() if host and weight_decays is not None else []
        self._flags: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    @cached_property
    def alpha_blocks(self) -> Tensor:
        """The block step sizes as a tensor on the home device (device scalars)."""
        assert self._step_sizes is not None
        return self._step_sizes.exp()

    @cached_property
    def kappa_blocks(self) -> Tensor:
        """The learned block weight decays as a tensor on the home device (device scalars)."""
        assert self._weight_decays is not None
        return self._weight_decays.exp()

    def flags(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The skip verdict on ``device`` as a bool and as 0.0/1.0 in ``dtype`` (cached)."""
        key = (device, dtype)
        if key not in self._flags:
            if isinstance(self.finite, Tensor):
                on_device = self.finite.to(device)
            else:  # decided on the host; the compiled kernels still take it as a tensor
                on_device = torch.full((), self.finite, dtype=torch.bool, device=device)
            self._flags[key] = (on_device, on_device.to(dtype))
        return self._flags[key]


class KernelRunner:
    """Runs buckets of entries through their kernels for one optimizer."""

    def __init__(
        self, base: BaseRule, block_indices: Callable[[tuple[int, ...]], tuple[Tensor, Tensor]]
    ) -> None:
        self.base = base
        self.block_indices = block_indices
        self.triton_failed = False
        self.compile_failed = False
        self._compiled: Callable[..., None] | None = None
        self._compiled_meta: Callable[..., None] | None = None
        self.host_compiled = HostCompiledKernel(base.name)
        self.flat = FlatMerger()

    def __getstate__(self) -> dict[str, Any]:
        """For copies and pickles: compiled functions are rebuilt when next needed."""
        state = dict(self.__dict__)
        state["_compiled"] = state["_compiled_meta"] = None
        return state

    def compiled_step(self) -> Callable[..., None]:
        if self._compiled is None:
            self._compiled = compile_parameter_step()
        return self._compiled

    def run(self, bucket: Bucket, scalars: StepScalars) -> None:
        """Run one bucket's kernel; a compiled kernel that fails falls back for good."""
        if bucket.kernel == FOREACH:
            self._foreach_bucket(bucket.entries, scalars)
            return
        if bucket.kernel == HOST_COMPILED:
            self._host_compiled_bucket(bucket.entries, scalars)
            return
        for entry in bucket.entries:
            kernel = bucket.kernel
            if kernel == TRITON:
                if self._ran(self._triton_entry, entry, scalars, "triton"):
                    continue
                kernel = EAGER if self.compile_failed else COMPILED
            if kernel == COMPILED:
                if self._ran(self._compiled_entry, entry, scalars, "compile"):
                    continue
                kernel = HOST if scalars.host else EAGER
            if kernel == HOST:
                self._host_entry(entry, scalars)
            else:
                self._eager_entry(entry, scalars)

    def _ran(
        self,
        kernel: Callable[[Entry, StepScalars], None],
        entry: Entry,
        scalars: StepScalars,
        which: str,
    ) -> bool:
        """Run a compiled kernel; False (after one warning) when it failed to build."""
        try:
            kernel(entry, scalars)
        except Exception as error:  # noqa: BLE001 - the kernel failed to build; nothing ran
            if which == "triton":
                self.triton_failed = True
                warnings.warn(
                    f"MetaOptimize(fused=True): the Triton kernel failed ({error!r:.200}); "
                    "continuing with the torch.compile kernel",
                    RuntimeWarning,
                    stacklevel=5,
                )
            else:
                self.compile_failure(error)
            return False
        return True

    def _host_entry(self, entry: Entry, scalars: StepScalars) -> None:
        """:func:`parameter_step` of one CPU parameter with Python scalars (a finite step)."""
        group = entry.group
        alpha: Tensor | float
        if not scalars.per_weight:
            alpha = scalars.alpha_values[entry.block] * group["lr"]
        else:
            weight_alphas = entry.state["log_alpha"].exp()
            if not is_one(group["lr"]):  # lr 1: exp(β) is α (one pass fewer)
                weight_alphas.mul_(group["lr"])
            alpha = weight_alphas
        parameter_step(
            self.base,
            entry.param,
            entry.grad,
            entry.state,
            group,
            True,
            1.0,
            alpha,
            scalars.meta_active,
            is_decoupled(self.base, group),
            weight_decay=(
                scalars.kappa_values[entry.block] if scalars.learned_weight_decay else None
            ),
        )

    def merge(
        self, buckets: list[Bucket], per_weight: bool, chosen_kernels: bool
    ) -> tuple[list[Bucket], list[Merged]]:
        """The buckets with their small CPU tensors merged into flat entries (host scalars).

        The multi-tensor and host-compiled buckets merge theirs (:mod:`.flat`), and so do the
        per-tensor ones where the kernels are the optimizer's choice (``chosen_kernels``:
        ``foreach=None``; ``foreach=False`` asks for one step per tensor). There, too, a
        multi-tensor bucket left with fewer than :data:`CPU_FOREACH_MIN_TENSORS` entries runs
        per tensor, as the plan decides for few tensors: on one merged tensor the per-tensor
        kernel's fewer passes and temporaries measured 1.4-2.5x faster; with per-weight step
        sizes 1.7x slower, so those stay. Call :meth:`Merged.scatter` on each part after the
        kernels.
        """
        merged: list[Merged] = []
        planned: list[Bucket] = []
        mergeable = (FOREACH, HOST_COMPILED, HOST) if chosen_kernels else (FOREACH, HOST_COMPILED)
        for bucket in buckets:
            if bucket.kernel in mergeable:
                entries, part = self.flat.merge(bucket.entries, by_block=not per_weight)
                if part is not None:
                    merged.append(part)
                    kernel = bucket.kernel
                    few = len(entries) < CPU_FOREACH_MIN_TENSORS
                    if kernel == FOREACH and chosen_kernels and few and not per_weight:
                        kernel = HOST
                    bucket = Bucket(kernel, entries)
            planned.append(bucket)
        return planned, merged

    def _host_compiled_bucket(self, entries: list[Entry], scalars: StepScalars) -> None:
        """One (param group, dtype, block) bucket with ``fused=True`` on CPU (Adam(W), Lion)."""
        group = entries[0].group

        def per_tensor(rest: Sequence[Entry]) -> None:
            for entry in rest:
                self._host_entry(entry, scalars)

        try:
            self.host_compiled.run(
                entries,
                scalars.alpha_values[entries[0].block] * group["lr"],
                scalars.meta_active,
                is_decoupled(self.base, group),
                fallback=per_tensor,
            )
        except Exception as error:  # noqa: BLE001 - compiling failed; the rest ran per tensor
            self.compile_failure(error)

    def _device_arguments(
        self, entry: Entry, scalars: StepScalars
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The skip flags and step size of one entry, as device tensors."""
        grad = entry.grad
        finite_here, ok = scalars.flags(grad.device, grad.dtype)
        scale = ok * entry.group["lr"]
        if scalars.per_weight:
            alpha = entry.state["log_alpha"].exp().mul_(scale)
        else:
            alpha = scalars.alpha_blocks[entry.block].to(grad.device, grad.dtype) * scale
        return finite_here, ok, alpha

    def _parameter_step_arguments(self, entry: Entry, scalars: StepScalars) -> tuple[Any, ...]:
        """:func:`parameter_step`'s arguments for one entry, with device scalars."""
        finite_here, ok, alpha = self._device_arguments(entry, scalars)
        return (
            self.base,
            entry.param,
            entry.grad,
            entry.state,
            entry.group,
            finite_here,
            ok,
            alpha,
            scalars.meta_active,
            is_decoupled(self.base, entry.group),
        )

    def _eager_entry(self, entry: Entry, scalars: StepScalars) -> None:
        kappa = None
        if scalars.learned_weight_decay:  # the learned weight decay: eager kernels only
            kappa = scalars.kappa_blocks[entry.block].to(entry.grad.device, entry.grad.dtype)
        parameter_step(*self._parameter_step_arguments(entry, scalars), weight_decay=kappa)

    def _compiled_entry(self, entry: Entry, scalars: StepScalars) -> None:
        fused_parameter_step(self.compiled_step(), *self._parameter_step_arguments(entry, scalars))

    def _triton_entry(self, entry: Entry, scalars: StepScalars) -> None:
        _, ok, alpha = self._device_arguments(entry, scalars)
        triton_parameter_step(
            self.base.name,
            entry.param,
            entry.grad,
            entry.state,
            entry.group,
            ok,
            alpha,
            scalars.meta_active,
        )

    def _foreach_bucket(self, bucket: list[Entry], scalars: StepScalars) -> None:
        """One param group's parameters on one device and dtype, by the multi-tensor kernel."""
        group = bucket[0].group
        device, dtype = bucket[0].grad.device, bucket[0].grad.dtype
        finite_here: Tensor | None = None
        ok: Tensor | float = 1.0  # host scalars: a skipped step never gets here
        if not scalars.host:
            finite_here, ok = scalars.flags(device, dtype)
        scale = ok * group["lr"]
        alphas: Scalars
        if scalars.per_weight:
            alphas = torch._foreach_exp([e.state["log_alpha"] for e in bucket])
            if not is_one(scale):  # lr 1: exp(β) is α
                torch._foreach_mul_(alphas, operand(scale, alphas))
        elif scalars.host:
            alphas = [scalars.alpha_values[e.block] * group["lr"] for e in bucket]
        else:
            index, _ = self.block_indices(tuple(e.block for e in bucket))
            alphas = list((scalars.alpha_blocks[index].to(device, dtype) * scale).unbind())
        foreach_parameter_step(
            self.base,
            [e.param for e in bucket],
            [e.grad for e in bucket],
            [e.state for e in bucket],
            group,
            finite_here,
            ok,
            alphas,
            scalars.meta_active,
            is_decoupled(self.base, group),
        )

    def compile_failure(self, error: Exception) -> None:
        """Stop compiling for good, with one warning, after a failed compilation.

        The user's ``fused`` setting is left as it was.
        """
        self.compile_failed = True
        warnings.warn(
            f"MetaOptimize(fused=True): torch.compile failed ({error!r:.200}); continuing "
            "with the eager path",
            RuntimeWarning,
            stacklevel=4,
        )

    def weight_meta_steps(
        self,
        rule: MetaRule,
        log_alphas: list[Tensor],
        zs: list[Tensor],
        states: dict[str, list[Tensor]],
        finite: Tensor | None,
        bounds: tuple[float, float],
        compiled: Sequence[bool],
    ) -> None:
        """The meta steps of per-weight step sizes (meta state lists by key), in place.

        ``compiled[i]``: parameter ``i``'s weight step ran the compiled kernel; its meta step
        is compiled too. The others take one multi-tensor update when the rule has one and the
        tensors share a device and dtype, else one update per parameter. ``finite=None``: the
        step is known to be finite (decided on the host), so the update is made in place and
        ``zs`` are overwritten.
        """
        if any(compiled) and not all(compiled):
            for fused_part in (False, True):
                part = [i for i, flag in enumerate(compiled) if flag == fused_part]
                self.weight_meta_steps(
                    rule,
                    [log_alphas[i] for i in part],
                    [zs[i] for i in part],
                    {key: [tensors[i] for i in part] for key, tensors in states.items()},
                    finite,
                    bounds,
                    [fused_part] * len(part),
                )
            return
        fused = bool(compiled) and compiled[0]
        places = {(t.device, t.dtype) for t in (*log_alphas, *zs)}
        if rule.multi_tensor and not fused and len(places) == 1:
            if finite is None:
                rule.foreach_update_(log_alphas, zs, states)
                _clamp_(log_alphas, bounds)
                return
            result = rule.foreach_update(log_alphas, zs, states)
            assert result is not None
            _write_weight_meta_step(log_alphas, states, result, finite, bounds)
            return
        for index, (log_alpha, z) in enumerate(zip(log_alphas, zs, strict=True)):
            state = {key: tensors[index] for key, tensors in states.items()}
            if finite is None:  # the compiled meta step takes the flag as a tensor
                keep = torch.ones((), dtype=torch.bool, device=z.device)
            else:
                keep = finite.to(z.device)
            self.weight_meta_step(rule, log_alpha, z, state, keep, bounds, fused)

    def weight_meta_step(
        self,
        rule: MetaRule,
        log_alpha: Tensor,
        z: Tensor,
        meta_state: dict[str, Tensor],
        keep: Tensor,
        bounds: tuple[float, float],
        fused: bool,
    ) -> None:
        """The meta step of one parameter's per-weight step sizes (compiled with ``fused``)."""
        contiguous = log_alpha.is_contiguous() and all(
            v.is_contiguous() for v in meta_state.values()
        )
        low, high = bounds
        if fused and not self.compile_failed and contiguous:
            try:
                if self._compiled_meta is None:
                    self._compiled_meta = compile_meta_step()
                fused_meta_step(
                    self._compiled_meta, rule, log_alpha, z, meta_state, keep, low, high
                )
                return
            except Exception as error:  # noqa: BLE001 - compilation failed; nothing ran
                self.compile_failure(error)
        meta_step(rule, log_alpha, z, meta_state, keep, low, high)


def _write_weight_meta_step(
    log_alphas: list[Tensor],
    states: dict[str, list[Tensor]],
    result: tuple[list[Tensor], dict[str, list[Tensor]]],
    finite: Tensor,
    bounds: tuple[float, float],
) -> None:
    """Clamp the new log step sizes and write them and the meta state where the step counts."""
    new_betas, new_states = result
    _clamp_(new_betas, bounds)
    pairs = [(log_alphas, new_betas), *((states[key], new_states[key]) for key in new_states)]
    for old, new in pairs:
        keep = finite.to(old[0].device)
        for target, value in zip(old, new, strict=True):
            target.copy_(torch.where(keep, value, target))


def _clamp_(log_alphas: list[Tensor], bounds: tuple[float, float]) -> None:
    """Clamp log step sizes into ``bounds`` in place (infinite bounds: untouched)."""
    low, high = bounds
    if low > float("-inf"):
        torch._foreach_clamp_min_(log_alphas, low)
    if high < float("inf"):
        torch._foreach_clamp_max_(log_alphas, high)
