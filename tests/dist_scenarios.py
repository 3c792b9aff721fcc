"""Two-rank scenarios (gloo, CPU) run by test_distributed.py through torch.multiprocessing.

Every scenario trains the same tiny float64 network on the same data as a single process would
on the full batch (each rank takes half of every batch; DDP and FSDP2 average gradients), and
saves what the test compares: full weights, step sizes, and a checkpoint-and-resume run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metaoptimize import MetaOptimize

STEPS = 12
RESUME_AT = 6
KWARGS: dict[str, Any] = {
    "base": "adamw",
    "meta": "adam",
    "alpha0": 0.01,
    "meta_lr": 0.05,
    "gamma": 0.95,
    "weight_decay": 0.1,
}


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.hidden = nn.Linear(5, 4).double()
        self.out = nn.Linear(4, 1).double()  # one output row: an empty shard on rank 1
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x)))


def data() -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 5, generator=generator, dtype=torch.float64),
            torch.randn(8, 1, generator=generator, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def local_batch(batch: tuple[Tensor, Tensor], rank: int, world: int) -> tuple[Tensor, Tensor]:
    x, y = batch
    rows = x.shape[0] // world
    return x[rank * rows : (rank + 1) * rows], y[rank * rows : (rank + 1) * rows]


def train(model: nn.Module, opt: Any, batches: list[tuple[Tensor, Tensor]]) -> None:
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        (model(x) - y).square().mean().backward()
        opt.step()


def single_process(blocks: str, steps: int = STEPS) -> tuple[list[Tensor], list[Tensor]]:
    model = Net()
    opt = MetaOptimize(model.parameters(), blocks=blocks, **KWARGS)
    train(model, opt, data()[:steps])
    return (
        [p.detach().clone() for p in model.parameters()],
        [v.detach().clone() for v in opt.step_sizes().values()],
    )


def _full(t: Tensor) -> Tensor:
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach().clone()


def _ddp(rank: int, world: int, out: Path, blocks: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    batches = [local_batch(b, rank, world) for b in data()]
    model = DistributedDataParallel(Net())
    opt = MetaOptimize(model.parameters(), blocks=blocks, **KWARGS)
    train(model, opt, batches)
    result = {
        "params": [_full(p) for p in model.parameters()],
        "sizes": [_full(v) for v in opt.step_sizes().values()],
    }
    # checkpoint at RESUME_AT, resume in fresh objects
    first = DistributedDataParallel(Net())
    first_opt = MetaOptimize(first.parameters(), blocks=blocks, **KWARGS)
    train(first, first_opt, batches[:RESUME_AT])
    path = out / f"ddp-{blocks}-ckpt-{rank}.pt"
    torch.save({"model": first.state_dict(), "opt": first_opt.state_dict()}, path)
    checkpoint = torch.load(path, weights_only=True)
    second = DistributedDataParallel(Net())
    second.load_state_dict(checkpoint["model"])
    second_opt = MetaOptimize(second.parameters(), blocks=blocks, **KWARGS)
    second_opt.load_state_dict(checkpoint["opt"])
    train(second, second_opt, batches[RESUME_AT:])
    result["resumed_params"] = [_full(p) for p in second.parameters()]
    result["resumed_sizes"] = [_full(v) for v in second_opt.step_sizes().values()]
    torch.save(result, out / f"ddp-{blocks}-{rank}.pt")


def _fsdp2_model(mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = Net()
    fully_shard(model.hidden, mesh=mesh)
    fully_shard(model.out, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp2(rank: int, world: int, out: Path, blocks: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    batches = [local_batch(b, rank, world) for b in data()]
    model = _fsdp2_model(mesh)
    opt = MetaOptimize(model.parameters(), blocks=blocks, **KWARGS)
    train(model, opt, batches)
    result = {
        "params": [_full(p) for p in model.parameters()],
        "sizes": [_full(v) for v in opt.step_sizes().values()],
        "local_trace_numel": [opt.state[p]["trace"].to_local().numel() for p in model.parameters()],
    }

    first = _fsdp2_model(mesh)
    first_opt = MetaOptimize(first.parameters(), blocks=blocks, **KWARGS)
    train(first, first_opt, batches[:RESUME_AT])
    checkpoint_dir = out / f"fsdp2-{blocks}-dcp"
    dcp.save(
        {"model": get_model_state_dict(first), "optim": get_optimizer_state_dict(first, first_opt)},
        checkpoint_id=checkpoint_dir,
    )
    second = _fsdp2_model(mesh)
    second_opt = MetaOptimize(second.parameters(), blocks=blocks, **KWARGS)
    state = {
        "model": get_model_state_dict(second),
        "optim": get_optimizer_state_dict(second, second_opt),
    }
    dcp.load(state, checkpoint_id=checkpoint_dir)
    set_model_state_dict(second, state["model"])
    set_optimizer_state_dict(second, second_opt, state["optim"])
    train(second, second_opt, batches[RESUME_AT:])
    result["resumed_params"] = [_full(p) for p in second.parameters()]
    result["resumed_sizes"] = [_full(v) for v in second_opt.step_sizes().values()]
    torch.save(result, out / f"fsdp2-{blocks}-{rank}.pt")


def _zero(rank: int, world: int, out: Path, blocks: str, fused: bool = False) -> None:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    name = "zero-fused" if fused else "zero"

    def build() -> tuple[nn.Module, Any]:
        model = DistributedDataParallel(Net())
        opt = ZeroRedundancyOptimizer(
            model.parameters(),
            optimizer_class=MetaOptimize,
            partition_group=dist.group.WORLD,
            blocks=blocks,
            fused=fused,
            **KWARGS,
        )
        return model, opt

    batches = [local_batch(b, rank, world) for b in data()]
    model, opt = build()
    train(model, opt, batches)
    result: dict[str, Any] = {
        "params": [_full(p) for p in model.parameters()],
        "sizes": [_full(v) for v in opt.optim.step_sizes().values()],
    }
    first, first_opt = build()
    train(first, first_opt, batches[:RESUME_AT])
    # A sharded checkpoint: every rank saves and reloads its own partition's optimizer.
    path = out / f"{name}-{blocks}-ckpt-{rank}.pt"
    torch.save({"model": first.state_dict(), "opt": first_opt.optim.state_dict()}, path)
    checkpoint = torch.load(path, weights_only=True)
    second, second_opt = build()
    second.load_state_dict(checkpoint["model"])
    second_opt.optim.load_state_dict(checkpoint["opt"])
    train(second, second_opt, batches[RESUME_AT:])
    result["resumed_params"] = [_full(p) for p in second.parameters()]
    result["resumed_sizes"] = [_full(v) for v in second_opt.optim.step_sizes().values()]
    torch.save(result, out / f"{name}-{blocks}-{rank}.pt")


def _zero_fused(rank: int, world: int, out: Path, blocks: str) -> None:
    """ZeRO with ``fused=True``: on CPU the host-compiled kernel, whose flat meta-gradient
    sums must not be taken where the block sums are reduced across ranks."""
    _zero(rank, world, out, blocks, fused=True)


def _fsdp2_guard(rank: int, world: int, out: Path, blocks: str) -> None:
    """A NaN in rank 0's shard of one gradient: every rank must skip that step."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    batches = [local_batch(b, rank, world) for b in data()]
    model = _fsdp2_model(mesh)
    opt = MetaOptimize(model.parameters(), blocks=blocks, **KWARGS)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad(set_to_none=True)
        (model(x) - y).square().mean().backward()
        if step == 3:
            if rank == 0:
                model.hidden.weight.grad.to_local()[0, 0] = float("nan")
            opt.step()  # the poisoned step
            opt.zero_grad(set_to_none=True)
            (model(x) - y).square().mean().backward()
        opt.step()
    torch.save(
        {
            "params": [_full(p) for p in model.parameters()],
            "sizes": [_full(v) for v in opt.step_sizes().values()],
            "skipped": int(opt.skipped_steps),
        },
        out / f"guard-{blocks}-{rank}.pt",
    )


SCENARIOS = {
    "ddp": (_ddp, ("scalar", "weight")),
    "fsdp2": (_fsdp2, ("scalar", "tensor", "weight")),
    "zero": (_zero, ("scalar", "group", "tensor")),
    "zero-fused": (_zero_fused, ("scalar",)),
    "guard": (_fsdp2_guard, ("scalar", "weight")),
}


def worker(rank: int, world: int, out_dir: str, init_file: str) -> None:
    """Entry point for torch.multiprocessing.spawn."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for name, (scenario, block_modes) in SCENARIOS.items():
            for blocks in block_modes:
                scenario(rank, world, Path(out_dir), blocks)
                dist.barrier()
                if rank == 0:
                    (Path(out_dir) / f"{name}-{blocks}.done").touch()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Every result is on disk. gloo can abort at interpreter exit ("terminate called without
    # an active exception"; seen with the torchrun example, examples/train_ddp.py), which
    # would fail the whole module here: skip the C++ static destructors on success.
    os._exit(0)
