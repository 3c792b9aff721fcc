"""A training script that checkpoints atomically and resumes; driven by test_kill_resume.py.

python tests/checkpointed_training.py WORKDIR STEPS [SLEEP_PER_STEP]
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from metaoptimize import MetaOptimize


def main() -> None:
    workdir, steps = Path(sys.argv[1]), int(sys.argv[2])
    pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1)).double()
    opt = MetaOptimize(
        model.parameters(),
        base="adamw",
        meta="lion",
        alpha0=1e-3,
        meta_lr=1e-2,
        gamma=0.99,
        weight_decay=0.01,
        blocks="tensor",
    )
    checkpoint = workdir / "checkpoint.pt"
    start = 0
    if checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    for step in range(start, steps):
        generator = torch.Generator().manual_seed(step)  # data depend only on the step
        x = torch.randn(16, 6, generator=generator, dtype=torch.float64)
        y = x[:, :1] * 2.0 - x[:, 1:2]
        opt.zero_grad()
        (model(x) - y).square().mean().backward()
        opt.step()
        if (step + 1) % 5 == 0:
            temporary = workdir / "checkpoint.tmp"
            torch.save(
                {"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, temporary
            )
            os.replace(temporary, checkpoint)  # atomic: a kill never leaves half a file
        time.sleep(pause)
    torch.save([p.detach() for p in model.parameters()], workdir / "final.pt")


if __name__ == "__main__":
    main()
