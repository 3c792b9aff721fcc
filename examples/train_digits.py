"""Train a small MLP on scikit-learn's bundled digits with MetaOptimize, next to fixed AdamW.

Run:  python examples/train_digits.py  [--steps 1000] [--alpha0 1e-3]

MetaOptimize runs with its defaults (only the weight decay is set, as for AdamW) and learns its
step size from wherever --alpha0 puts it (try 1e-6 or 1e-1); the printout shows the learned
step size and test accuracy as training goes.
"""

from __future__ import annotations

import argparse

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from metaoptimize import MetaOptimize


def data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    return x_train, x_test, y_train, y_test


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train(opt_name: str, steps: int, alpha0: float, seed: int = 0, log_every: int = 200) -> float:
    x_train, x_test, y_train, y_test = data()
    net = model(seed)
    if opt_name == "metaoptimize":
        opt: torch.optim.Optimizer = MetaOptimize(
            net.parameters(), alpha0=alpha0, weight_decay=0.01
        )
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    accuracy = 0.0
    for step in range(1, steps + 1):
        batch = torch.randint(0, len(x_train), (32,), generator=generator)
        loss = nn.functional.cross_entropy(net(x_train[batch]), y_train[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
            extra = ""
            if isinstance(opt, MetaOptimize):
                extra = f"  step size {opt.step_sizes()['all'].item():.2e}"
            print(
                f"{opt_name:>12} step {step:4d}  loss {loss.item():.3f}  "
                f"test acc {accuracy:.3f}{extra}"
            )
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument(
        "--alpha0",
        type=float,
        default=1e-3,
        help="where MetaOptimize's step size starts (AdamW uses lr=1e-3)",
    )
    args = parser.parse_args()
    results = {name: train(name, args.steps, args.alpha0) for name in ("adamw", "metaoptimize")}
    print("final test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
