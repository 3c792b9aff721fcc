"""The kernels that apply one step: eager (the ground truth), multi-tensor, compiled, Triton.

* :mod:`~metaoptimize._kernels.eager`: one parameter at a time, readable; every other kernel
  is tested against it in float64.
* :mod:`~metaoptimize._kernels.foreach`: a param group's tensors at once (the CUDA default,
  and on CPU the default for small tensors).
* :mod:`~metaoptimize._kernels.compiled`: the eager kernel compiled by ``torch.compile``
  (``fused=True``).
* :mod:`~metaoptimize._kernels.host_compiled`: ``fused=True`` on CPU for the Adam, AdamW and
  Lion bases: scalars from the host, one compiled call per tensor.
* :mod:`~metaoptimize._kernels.flat`: on CPU the small tensors of a bucket (not with
  ``foreach=False``) step as one flat tensor (state in flat buffers), for every kernel.
* :mod:`~metaoptimize._kernels.triton`: hand-written Triton kernels for the AdamW and Lion
  bases (``fused=True`` on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from metaoptimize._kernels.compiled import supports_fused
from metaoptimize._kernels.host_compiled import host_compiled_supports
from metaoptimize._kernels.triton import triton_supports
from metaoptimize._types import Entry

__all__ = [
    "COMPILED",
    "CPU_FOREACH_MAX_NUMEL",
    "CPU_FOREACH_MIN_TENSORS",
    "EAGER",
    "FOREACH",
    "HOST",
    "HOST_COMPILED",
    "TRITON",
    "Bucket",
    "KernelOptions",
    "choose_kernel",
    "layout_sensitive",
    "plan_kernels",
]

#: The per-tensor eager kernel with Python scalars (CPU; a skipped step never reaches it).
HOST = "host"
#: The per-tensor eager kernel with device scalars (sync-free; CUDA, or forced in tests).
EAGER = "eager"
FOREACH = "foreach"
COMPILED = "compiled"
#: ``fused=True`` on CPU for Adam, AdamW, Lion: :mod:`metaoptimize._kernels.host_compiled`.
HOST_COMPILED = "host compiled"
TRITON = "triton"
#: On CPU, tensors up to this size default to the multi-tensor kernel: below it the per-tensor
#: kernel's fixed cost (about 15 calls) dominates, above it the multi-tensor kernel's extra
#: temporaries do (docs/performance.md, "CPU: small tensors take the multi-tensor kernel").
CPU_FOREACH_MAX_NUMEL = 32768
#: ... and only when a bucket holds at least this many of them (fewer run faster per tensor).
CPU_FOREACH_MIN_TENSORS = 3


@dataclass(frozen=True)
class KernelOptions:
    """What decides the kernel of a parameter, besides the parameter itself.

    Attributes:
        base: the base rule's name.
        foreach: the user's ``foreach`` (None: multi-tensor on CUDA and for CPU tensors of at
            most :data:`CPU_FOREACH_MAX_NUMEL` elements, per tensor otherwise).
        fused: the user's ``fused`` (with host scalars and block step sizes it compiles only
            with ``fused_backend="compile"``; with ``foreach=None`` CPU tensors of at most
            :data:`CPU_FOREACH_MAX_NUMEL` elements take the multi-tensor kernel even then).
        fused_backend: ``"auto"``, ``"triton"`` or ``"compile"``.
        host_scalars: the step runs with Python scalars (CPU).
        learned_weight_decay: the weight decay is learned (only the per-tensor eager kernels
            take it).
        per_weight: one step size per weight (the Triton kernels take one per tensor).
        triton_failed: a Triton kernel failed to build earlier in this optimizer's life.
        compile_failed: ``torch.compile`` failed earlier in this optimizer's life.
        sharded: the parameters are DTensor shards (their state is viewed anew every step;
            neither the flat merge nor the host-compiled kernel takes them).
    """

    base: str
    foreach: bool | None
    fused: bool
    fused_backend: str
    host_scalars: bool
    learned_weight_decay: bool
    per_weight: bool
    triton_failed: bool = False
    compile_failed: bool = False
    sharded: bool = False


@dataclass
class Bucket:
    """Entries that one kernel updates.

    For ``FOREACH``: one param group on one device and dtype, in one call; for the other
    kernels, one call per entry.
    """

    kernel: str
    entries: list[Entry] = field(default_factory=list)


def choose_kernel(entry: Entry, options: KernelOptions, decoupled: bool) -> str:
    """The kernel for one parameter (a pure function of the entry and the options)."""
    param, grad, state = entry.param, entry.grad, entry.state
    fused = options.fused and not options.compile_failed
    if options.host_scalars and options.fused_backend == "auto" and not options.per_weight:
        # On CPU with block step sizes, fused=True compiles the Adam(W)/Lion step with host
        # scalars (small tensors merged into one flat tensor); for the other bases the eager
        # kernels with Python scalars beat the compiled one on every model measured
        # (docs/performance.md).
        # "compile" forces the general compiled kernel. Per-weight step sizes have more
        # passes to fuse.
        if (
            fused
            and not options.learned_weight_decay
            and not options.sharded
            and host_compiled_supports(options.base, entry, decoupled)
        ):
            return HOST_COMPILED
        fused = False
    foreach = options.foreach
    if foreach is None:
        small_on_host = options.host_scalars and param.numel() <= CPU_FOREACH_MAX_NUMEL
        foreach = grad.device.type == "cuda" or small_on_host
        # On CPU a compiled call per small tensor costs more than the multi-tensor kernel's
        # share of it (docs/performance.md): a forced compile takes the large tensors only.
        fused = fused and not small_on_host
    if (
        foreach
        and not (fused and supports_fused(param, grad, state))
        and not options.learned_weight_decay
        and param.dtype == grad.dtype
        and "kahan_comp" not in state
    ):
        return FOREACH
    if options.host_scalars and not fused:
        return HOST
    if not fused or options.learned_weight_decay:
        return EAGER
    backend = options.fused_backend
    if (
        (backend == "triton" or (backend == "auto" and param.is_cuda))
        and not options.triton_failed
        and not options.per_weight
        and triton_supports(options.base, param, grad, state, decoupled)
    ):
        return TRITON
    return COMPILED if supports_fused(param, grad, state) else EAGER


def layout_sensitive(options: KernelOptions) -> bool:
    """Whether a plan depends on the tensors' memory layout, so it cannot be kept.

    The compiled and Triton kernels take contiguous tensors only; the host-compiled kernel
    checks contiguity where it runs.
    """
    host_compiled = options.host_scalars and options.fused_backend == "auto"
    return options.fused and not (host_compiled and not options.per_weight)


def plan_kernels(
    entries: Sequence[Entry],
    options: KernelOptions,
    decoupled: Callable[[dict[str, Any]], bool],
) -> list[Bucket]:
    """Group the entries by kernel, once per step.

    ``FOREACH`` gets a bucket per (param group, device, dtype), ``HOST_COMPILED`` one per
    (param group, dtype, block); every other kernel one bucket of its entries. Entry order is
    kept within each bucket. A CPU bucket the default put on the multi-tensor kernel runs per
    tensor when it holds fewer than :data:`CPU_FOREACH_MIN_TENSORS` tensors.
    """
    buckets: dict[tuple[Any, ...], Bucket] = {}
    for entry in entries:
        kernel = choose_kernel(entry, options, decoupled(entry.group))
        key: tuple[Any, ...] = (kernel,)
        if kernel == FOREACH:
            key = (kernel, id(entry.group), entry.grad.device, entry.grad.dtype)
        elif kernel == HOST_COMPILED:
            key = (kernel, id(entry.group), entry.grad.dtype, entry.block)
        buckets.setdefault(key, Bucket(kernel)).entries.append(entry)
    planned = list(buckets.values())
    if options.foreach is None and options.host_scalars:
        for bucket in planned:
            if bucket.kernel == FOREACH and len(bucket.entries) < CPU_FOREACH_MIN_TENSORS:
                bucket.kernel = HOST  # the default chose it for small CPU tensors
    return planned
