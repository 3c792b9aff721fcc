"""Fully sharded training (FSDP2) with MetaOptimize and a distributed checkpoint.

    torchrun --standalone --nproc_per_node 2 examples/train_fsdp2.py [--steps 200] [--ckpt DIR]

Each rank holds a shard of the weights, moments and trace; the per-block meta-gradient is a sum
of per-rank partial sums, all-reduced in one collective per step (docs/distributed.md). The
checkpoint is written and read back with torch.distributed.checkpoint.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from metaoptimize import MetaOptimize


def build(mesh: object) -> tuple[nn.Module, MetaOptimize]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # The tuning-free defaults, one learned step size per tensor.
    opt = MetaOptimize(model.named_parameters(), weight_decay=0.01, blocks="tensor")
    return model, opt


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--ckpt", default=None, help="checkpoint directory (default: a temp dir)")
    args = parser.parse_args()
    dist.init_process_group("gloo")  # CPU; use "nccl" and init_device_mesh("cuda", ...) on GPUs
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    model, opt = build(mesh)
    target = torch.randn(32, 1, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(100 + rank)
    for step in range(1, args.steps + 1):
        x = torch.randn(64, 32, generator=generator)
        loss = (model(x) - x @ target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 100 == 0 or step == args.steps):
            sizes = {k: f"{v.item():.2e}" for k, v in opt.step_sizes().items()}
            print(f"step {step}  loss {loss.item():.4f}  step sizes {sizes}")

    checkpoint = (args.ckpt or tempfile.mkdtemp()) if rank == 0 else None
    shared = [checkpoint]
    dist.broadcast_object_list(shared)
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
        checkpoint_id=shared[0],
    )
    restored, restored_opt = build(mesh)
    state = {
        "model": get_model_state_dict(restored),
        "optim": get_optimizer_state_dict(restored, restored_opt),
    }
    dcp.load(state, checkpoint_id=shared[0])
    set_model_state_dict(restored, state["model"])
    set_optimizer_state_dict(restored, restored_opt, state["optim"])
    same = all(
        torch.equal(a, b)
        for a, b in zip(opt.step_sizes().values(), restored_opt.step_sizes().values(), strict=True)
    )
    if rank == 0:
        print(f"checkpoint {shared[0]}: step sizes restored exactly: {same}")
    dist.barrier()  # every rank done before the group is torn down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
