"""The kernel plan: which kernel updates each parameter, as a pure function (issue 15).

``step()`` groups its parameters by kernel once per step; the choice depends on the device,
the dtypes, contiguity and the options alone. Every kernel is checked against the eager one
elsewhere (test_reference, test_foreach, test_fused, test_triton); this file checks the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch

from metaoptimize._kernels import (
    COMPILED,
    CPU_FOREACH_MAX_NUMEL,
    CPU_FOREACH_MIN_TENSORS,
    EAGER,
    FOREACH,
    HOST,
    HOST_COMPILED,
    TRITON,
    KernelOptions,
    choose_kernel,
    plan_kernels,
)


@dataclass
class Entry:
    param: torch.Tensor
    grad: torch.Tensor
    state: dict[str, Any] = field(default_factory=dict)
    group: dict[str, Any] = field(default_factory=dict)


CPU = KernelOptions(
    base="adamw",
    foreach=None,
    fused=False,
    fused_backend="auto",
    host_scalars=True,
    learned_weight_decay=False,
    per_weight=False,
)


LARGE = (256, 256)  # above CPU_FOREACH_MAX_NUMEL: per tensor on CPU by default


def _entry(shape: tuple[int, ...] = LARGE, **state: Any) -> Entry:
    param = torch.zeros(shape)
    return Entry(param, torch.zeros(shape), {"exp_avg": torch.zeros(shape), **state})


@pytest.mark.parametrize(
    ("changes", "kernel"),
    [
        ({}, HOST),  # the CPU default for a large tensor: per tensor, Python scalars
        ({"host_scalars": False}, EAGER),  # the sync-free path, forced
        ({"foreach": True}, FOREACH),
        ({"fused": True}, HOST_COMPILED),  # CPU Adam(W): host scalars, few compiled calls
        ({"fused": True, "base": "lion"}, HOST_COMPILED),
        ({"fused": True, "base": "sgd"}, HOST),  # other bases: the eager kernel was faster
        ({"fused": True, "fused_backend": "compile"}, COMPILED),  # forced
        ({"fused": True, "host_scalars": False}, COMPILED),  # off the host path: compiled
        ({"fused": True, "per_weight": True}, COMPILED),  # per-weight: more passes to fuse
        ({"fused": True, "fused_backend": "triton"}, TRITON),  # forced (the interpreter)
        ({"fused": True, "fused_backend": "triton", "per_weight": True}, COMPILED),
        ({"fused": True, "fused_backend": "triton", "triton_failed": True}, COMPILED),
        ({"fused": True, "compile_failed": True}, HOST),
        ({"fused": True, "fused_backend": "compile", "learned_weight_decay": True}, EAGER),
        ({"foreach": True, "learned_weight_decay": True}, HOST),
        ({"foreach": True, "fused": True}, HOST_COMPILED),
        ({"foreach": True, "fused": True, "base": "sgd"}, FOREACH),  # CPU: as without fused
        ({"foreach": True, "fused": True, "fused_backend": "compile"}, COMPILED),
    ],
)
def test_choose_kernel(
    changes: dict[str, Any], kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors may run Triton, interpreted
    assert choose_kernel(_entry(), replace(CPU, **changes), decoupled=True) == kernel


def test_small_cpu_tensors_take_the_multi_tensor_kernel_by_default() -> None:
    small = _entry((CPU_FOREACH_MAX_NUMEL,))
    large = _entry((CPU_FOREACH_MAX_NUMEL + 1,))
    assert choose_kernel(small, CPU, decoupled=True) == FOREACH
    assert choose_kernel(large, CPU, decoupled=True) == HOST
    assert choose_kernel(small, replace(CPU, foreach=False), decoupled=True) == HOST
    assert choose_kernel(large, replace(CPU, foreach=True), decoupled=True) == FOREACH
    # The sync-free path (CUDA, or forced on CPU) keeps per tensor off CUDA.
    assert choose_kernel(small, replace(CPU, host_scalars=False), decoupled=True) == EAGER


def test_fused_on_cpu_takes_the_host_compiled_kernel_for_adam_and_lion() -> None:
    """On CPU fused=True takes the host-compiled kernel for Adam(W) and Lion and keeps the
    default kernels for the other bases; a forced compile takes the large tensors (a compiled call
    per small CPU tensor costs more than the multi-tensor kernel)."""
    small = _entry((CPU_FOREACH_MAX_NUMEL,))
    auto = replace(CPU, fused=True)
    assert choose_kernel(small, auto, decoupled=True) == HOST_COMPILED
    assert choose_kernel(_entry(), auto, decoupled=True) == HOST_COMPILED
    sgd = replace(auto, base="sgd")
    assert choose_kernel(small, sgd, decoupled=True) == FOREACH
    assert choose_kernel(_entry(), sgd, decoupled=True) == HOST
    # Kahan-compensated weights, a bfloat16 trace, a learned weight decay: the default kernels.
    l2 = _entry()
    l2.group = {"weight_decay": 0.01}  # Adam's L2 decay: a body of its own
    assert choose_kernel(l2, replace(auto, base="adam"), decoupled=False) == HOST_COMPILED
    assert choose_kernel(l2, replace(auto, base="rmsprop"), decoupled=False) == HOST
    kahan = _entry(kahan_comp=torch.zeros(LARGE))
    assert choose_kernel(kahan, auto, decoupled=True) == HOST
    bf16_trace = _entry(trace=torch.zeros(LARGE, dtype=torch.bfloat16))
    assert choose_kernel(bf16_trace, auto, decoupled=True) == HOST
    learned = replace(auto, learned_weight_decay=True)
    assert choose_kernel(_entry(), learned, decoupled=True) == HOST
    # DTensor shards: their state is viewed anew every step, no flat state can hold it.
    assert choose_kernel(_entry(), replace(auto, sharded=True), decoupled=True) == HOST
    fused = replace(CPU, fused=True, fused_backend="compile")
    assert choose_kernel(small, fused, decoupled=True) == FOREACH
    assert choose_kernel(_entry(), fused, decoupled=True) == COMPILED
    # An explicit foreach=False keeps the compiled kernel for every tensor.
    assert choose_kernel(small, replace(fused, foreach=False), decoupled=True) == COMPILED
    # Off the host path (CUDA's sync-free form) fused stays fused.
    assert choose_kernel(small, replace(fused, host_scalars=False), decoupled=True) == COMPILED


def test_tensors_a_kernel_cannot_take_go_to_the_next_one() -> None:
    kahan = _entry(kahan_comp=torch.zeros(LARGE))
    assert choose_kernel(kahan, replace(CPU, foreach=True), decoupled=True) == HOST
    strided = _entry()
    strided.param = torch.zeros(LARGE).t()  # not contiguous: no flat views for the fused kernels
    compile_cpu = replace(CPU, fused=True, fused_backend="compile")
    assert choose_kernel(strided, compile_cpu, decoupled=True) == EAGER
    triton = replace(CPU, fused=True, fused_backend="triton")
    assert choose_kernel(_entry(), triton, decoupled=False) == COMPILED  # L2: not a Triton base
    assert choose_kernel(_entry(), triton, decoupled=True) == COMPILED  # CPU, not interpreted


def test_plan_groups_foreach_entries_by_group_device_and_dtype() -> None:
    first, second = {"lr": 1.0}, {"lr": 0.5}
    entries = [_entry(), _entry(), _entry(), _entry((2,))]
    entries[0].group = entries[1].group = first
    entries[2].group = entries[3].group = second
    entries[3].param = entries[3].param.double()
    entries[3].grad = entries[3].grad.double()
    buckets = plan_kernels(entries, replace(CPU, foreach=True), lambda group: True)
    assert [(b.kernel, len(b.entries)) for b in buckets] == [
        (FOREACH, 2),
        (FOREACH, 1),
        (FOREACH, 1),
    ]
    per_tensor = plan_kernels(entries, replace(CPU, foreach=False), lambda group: True)
    assert [(b.kernel, b.entries) for b in per_tensor] == [(HOST, entries)]


def test_a_default_cpu_bucket_of_few_small_tensors_runs_per_tensor() -> None:
    group: dict[str, Any] = {}
    few = [_entry((8,)) for _ in range(CPU_FOREACH_MIN_TENSORS - 1)]
    enough = [_entry((8,)) for _ in range(CPU_FOREACH_MIN_TENSORS)]
    for entry in few + enough:
        entry.group = group
    assert [b.kernel for b in plan_kernels(few, CPU, lambda g: True)] == [HOST]
    assert [b.kernel for b in plan_kernels(enough, CPU, lambda g: True)] == [FOREACH]
    forced = plan_kernels(few, replace(CPU, foreach=True), lambda g: True)
    assert [b.kernel for b in forced] == [FOREACH]  # the user's choice stands
