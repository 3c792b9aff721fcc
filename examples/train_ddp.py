"""Data-parallel training with MetaOptimize: launch with torchrun.

    torchrun --standalone --nproc_per_node 2 examples/train_ddp.py [--steps 300]

Gradients are averaged by DDP, so every rank computes the same meta-gradient and keeps the
same step sizes without any extra communication (docs/distributed.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from metaoptimize import MetaOptimize


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    )
    torch.manual_seed(0)  # identical initial weights on every rank
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1)).to(device)
    )
    opt = MetaOptimize(model.parameters(), weight_decay=0.01)  # the tuning-free defaults
    target = torch.randn(32, 1, generator=torch.Generator().manual_seed(1)).to(device)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    for step in range(1, args.steps + 1):
        x = torch.randn(64, 32, generator=generator).to(device)
        loss = (model(x) - x @ target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.steps:
            alpha = opt.step_sizes()["all"]
            gathered = [torch.zeros_like(alpha) for _ in range(world)]
            dist.all_gather(gathered, alpha)  # a check for the example: every rank agrees
            if rank == 0:
                same = all(torch.equal(g, alpha) for g in gathered)
                print(
                    f"step {step}  loss {loss.item():.4f}  step size {alpha.item():.3e}  "
                    f"ranks agree: {same}"
                )
    # Release DDP's reducer and let every rank finish before tearing the group down (gloo can
    # abort with "terminate called without an active exception" otherwise).
    dist.barrier()
    del model, opt
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo can still abort at interpreter exit ("terminate called without an active
    # exception", about 1 launch in 7 on torch 2.13 CPU) after a clean destroy_process_group;
    # everything is done and flushed, so skip the C++ static destructors.
    sys.stdout.flush()
    os._exit(0)
