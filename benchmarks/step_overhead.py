"""Optimizer-step and training-step time and memory: torch AdamW against MetaOptimize.

    python benchmarks/step_overhead.py [--device cpu|cuda] [--model mlp|deep-mlp|many-tensors]
        [--repeats 30] [--rounds 5] [--only SUBSTRING|SUBSTRING] [--json out.json]

CPU: a 6.3M-parameter MLP (three 2M-weight layers: 6 tensors), ``--model deep-mlp`` (24
layers of width 512: 48 tensors, 6.3M parameters), or with ``--model many-tensors`` a
0.6M-parameter transformer with 150 parameter tensors (GPT-2's tensor count at a small width,
where per-tensor overhead dominates). CUDA: GPT-2-small shapes (124M parameters, fp32
weights, bf16 autocast, batch 8x1024). All optimizers are timed side by side in one process; each number is
the median of ``--repeats`` timed steps after warm-up, with torch.cuda.synchronize around timed
regions on CUDA. On CPU the repeats are split into ``--rounds`` (5) interleaved rounds, so the
slow spells of a shared machine fall on every optimizer alike. Prints a table with ratios to
the fastest torch AdamW (on CPU the faster of the for-loop and foreach kernels; torch's fused
CPU kernel is timed as a row of its own) and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from metaoptimize import MetaOptimize


def cpu_model() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 1024), nn.GELU(), nn.Linear(1024, 2048)
    )
    x = torch.randn(64, 1024)

    def loss(m: nn.Module) -> torch.Tensor:
        return m(x).square().mean()

    return model, loss


def deep_mlp_model() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """24 layers of width 512: 48 parameter tensors, 6.3M parameters."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(24):
        layers += [nn.Linear(512, 512), nn.GELU()]
    model = nn.Sequential(*layers)
    x = torch.randn(64, 512)

    def loss(m: nn.Module) -> torch.Tensor:
        return m(x).square().mean()

    return model, loss


def many_tensors_model() -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    """12 pre-norm transformer blocks of width 64: 150 parameter tensors, 0.6M parameters."""
    torch.manual_seed(0)
    layers = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True, norm_first=True),
        num_layers=12,
        enable_nested_tensor=False,
    )
    model = nn.Sequential(nn.Linear(32, 64), layers, nn.LayerNorm(64), nn.Linear(64, 32))
    x = torch.randn(16, 32, 32)

    def loss(m: nn.Module) -> torch.Tensor:
        return m(x).square().mean()

    return model, loss


def gpt2_model(device: torch.device) -> tuple[nn.Module, Callable[[nn.Module], torch.Tensor]]:
    torch.manual_seed(0)
    dim, layers, heads, vocab, context = 768, 12, 12, 50257, 1024

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln1(x)
            mask = torch.ones(x.shape[1], x.shape[1], device=x.device, dtype=torch.bool).triu(1)
            x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    class GPT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            self.position = nn.Parameter(torch.zeros(context, dim))
            self.blocks = nn.ModuleList(Block() for _ in range(layers))
            self.norm = nn.LayerNorm(dim)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embed(tokens) + self.position[: tokens.shape[1]]
            for block in self.blocks:
                x = block(x)
            return self.norm(x) @ self.embed.weight.T

    model = GPT().to(device)
    tokens = torch.randint(0, vocab, (8, context + 1), device=device)

    def loss(m: nn.Module) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m(tokens[:, :-1])
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    return model, loss


def _device_scalars(optimizer: MetaOptimize) -> MetaOptimize:
    optimizer._device_scalars = True
    return optimizer


def optimizers(device: torch.device) -> dict[str, Callable[[Any], torch.optim.Optimizer]]:
    table: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
        "torch AdamW (for-loop)": lambda p: torch.optim.AdamW(p, lr=1e-4, foreach=False),
        "torch AdamW (foreach)": lambda p: torch.optim.AdamW(p, lr=1e-4, foreach=True),
    }
    # torch's fused AdamW runs on CPU too (one C++ loop per tensor)
    table["torch AdamW (fused)"] = lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True)
    # What a user gets with no argument but the weight decay (the "auto" meta rule).
    table["MetaOptimize(defaults)"] = lambda p: MetaOptimize(p, weight_decay=0.01)
    table["MetaOptimize(defaults, per-tensor)"] = lambda p: MetaOptimize(
        p, weight_decay=0.01, foreach=False
    )
    table["MetaOptimize(defaults, foreach)"] = lambda p: MetaOptimize(
        p, weight_decay=0.01, foreach=True
    )
    table["MetaOptimize(defaults, fused)"] = lambda p: MetaOptimize(
        p, weight_decay=0.01, fused=True
    )
    table["MetaOptimize(defaults, weight)"] = lambda p: MetaOptimize(
        p, weight_decay=0.01, blocks="weight"
    )
    if device.type == "cpu":  # the sync-free path CUDA takes, forced on CPU for comparison
        table["MetaOptimize(defaults, device scalars)"] = lambda p: _device_scalars(
            MetaOptimize(p, weight_decay=0.01)
        )
    for base in ("adamw", "lion", "adam", "sgdm", "rmsprop", "sgd"):
        table[f"MetaOptimize({base}, lion, scalar)"] = lambda p, base=base: MetaOptimize(
            p, base=base, meta="lion", alpha0=1e-4, weight_decay=0.01
        )
    for base in ("adamw", "lion", "adam", "sgdm", "rmsprop", "sgd"):
        table[f"MetaOptimize({base}, lion, scalar, fused)"] = lambda p, base=base: MetaOptimize(
            p, base=base, meta="lion", alpha0=1e-4, weight_decay=0.01, fused=True
        )
    for base in ("adamw", "lion", "adam", "sgdm", "rmsprop", "sgd"):
        table[f"MetaOptimize({base}, lion, scalar, foreach)"] = lambda p, base=base: MetaOptimize(
            p, base=base, meta="lion", alpha0=1e-4, weight_decay=0.01, foreach=True
        )
    # fused=True runs Triton on CUDA when installed and the default kernels on CPU: time the
    # compiled kernel too.
    table["MetaOptimize(adamw, lion, scalar, fused compile)"] = lambda p: MetaOptimize(
        p,
        base="adamw",
        meta="lion",
        alpha0=1e-4,
        weight_decay=0.01,
        fused=True,
        fused_backend="compile",
    )
    if device.type == "cuda":  # the default there is foreach; time the per-tensor loop too
        table["MetaOptimize(adamw, lion, scalar, per-tensor)"] = lambda p: MetaOptimize(
            p, base="adamw", meta="lion", alpha0=1e-4, weight_decay=0.01, foreach=False
        )
    table["MetaOptimize(adamw, adam, tensor, foreach)"] = lambda p: MetaOptimize(
        p, base="adamw", meta="adam", alpha0=1e-4, weight_decay=0.01, blocks="tensor", foreach=True
    )
    table["MetaOptimize(adamw, lion, weight, foreach)"] = lambda p: MetaOptimize(
        p, base="adamw", meta="lion", alpha0=1e-4, weight_decay=0.01, blocks="weight", foreach=True
    )
    table["MetaOptimize(adamw, adam, tensor)"] = lambda p: MetaOptimize(
        p, base="adamw", meta="adam", alpha0=1e-4, weight_decay=0.01, blocks="tensor"
    )
    table["MetaOptimize(adamw, lion, weight)"] = lambda p: MetaOptimize(
        p, base="adamw", meta="lion", alpha0=1e-4, weight_decay=0.01, blocks="weight"
    )
    table["MetaOptimize(adamw, lion, weight, fused)"] = lambda p: MetaOptimize(
        p, base="adamw", meta="lion", alpha0=1e-4, weight_decay=0.01, blocks="weight", fused=True
    )
    if importlib.util.find_spec("prodigyopt"):
        import prodigyopt

        table["Prodigy"] = lambda p: prodigyopt.Prodigy(p, lr=1.0)
    if importlib.util.find_spec("schedulefree"):
        import schedulefree

        table["Schedule-Free AdamW"] = lambda p: schedulefree.AdamWScheduleFree(p, lr=1e-3)
    return table


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Timed:
    """One optimizer on its own copy of the model, timed a few steps at a time."""

    def __init__(
        self,
        name: str,
        build: Callable[[Any], torch.optim.Optimizer],
        device: torch.device,
        model_name: str,
    ) -> None:
        if device.type == "cuda":
            model, loss_fn = gpt2_model(device)
        elif model_name == "many-tensors":
            model, loss_fn = many_tensors_model()
        elif model_name == "deep-mlp":
            model, loss_fn = deep_mlp_model()
        else:
            model, loss_fn = cpu_model()
        self.name, self.device = name, device
        self.model, self.loss_fn = model.to(device), loss_fn
        self.opt = build(self.model.parameters())
        if callable(getattr(self.opt, "train", None)):
            self.opt.train()
        self.step_times: list[float] = []
        self.train_times: list[float] = []
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.run(5, record=False)  # warm-up: lazy state, allocator, autotuning

    def run(self, steps: int, record: bool = True) -> None:
        device, opt = self.device, self.opt
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            self.loss_fn(self.model).backward()
            _sync(device)
            middle = time.perf_counter()
            opt.step()
            _sync(device)
            end = time.perf_counter()
            if record:
                self.step_times.append(end - middle)
                self.train_times.append(end - start)

    def result(self) -> dict[str, Any]:
        state_bytes = sum(
            v.numel() * v.element_size()
            for s in self.opt.state.values()
            if isinstance(s, dict)
            for v in s.values()
            if isinstance(v, torch.Tensor)
        )
        params = sum(p.numel() for p in self.model.parameters())
        return {
            "optimizer": self.name,
            "params": params,
            "tensors": len(list(self.model.parameters())),
            "step_ms": 1e3 * statistics.median(self.step_times),
            "train_step_ms": 1e3 * statistics.median(self.train_times),
            "state_tensors_per_param": state_bytes / (params * 4),
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20
            if self.device.type == "cuda"
            else None,
        }


def measure_all(
    builds: dict[str, Callable[[Any], torch.optim.Optimizer]],
    device: torch.device,
    repeats: int,
    model_name: str,
    rounds: int,
) -> list[dict[str, Any]]:
    """Every optimizer's median step, over ``rounds`` interleaved rounds of its repeats.

    With one round, each optimizer is built, timed and freed in turn (GPU memory); with more,
    all are built first and take turns, so a slow spell of a shared machine falls on all.
    """
    if rounds == 1:
        rows = []
        for name, build in builds.items():
            try:
                timed = Timed(name, build, device, model_name)
                timed.run(repeats)
                rows.append(timed.result())
                del timed
            except Exception as error:  # noqa: BLE001 - one broken row must not end the run
                print(f"{name}: failed: {error!r:.300}", flush=True)
                rows.append({"optimizer": name, "error": repr(error)})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return rows
    everyone = [Timed(name, build, device, model_name) for name, build in builds.items()]
    per_round = max(1, repeats // rounds)
    for _ in range(rounds):
        for timed in everyone:
            timed.run(per_round)
    return [timed.result() for timed in everyone]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=("mlp", "deep-mlp", "many-tensors"), default="mlp")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--rounds",
        type=int,
        help="interleaved rounds the repeats are split into (default 5 on CPU, 1 on CUDA)",
    )
    parser.add_argument(
        "--only", help="substring filter on optimizer names; '|' separates alternatives"
    )
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    builds = {
        name: build
        for name, build in optimizers(device).items()
        if not args.only
        or any(part in name for part in args.only.split("|"))
        or name.startswith("torch AdamW")
    }
    rounds = args.rounds or (1 if device.type == "cuda" else 5)
    rows = measure_all(builds, device, args.repeats, args.model, rounds)
    # CUDA: the ratios are to the fastest of torch's three AdamW kernels. CPU: to the faster
    # of the for-loop and foreach ones (the yardstick); the fused one is a row.
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    baselines = [
        r
        for r in rows
        if r["optimizer"].startswith("torch AdamW")
        and (device.type == "cuda" or "fused" not in r["optimizer"])
    ]
    baseline = min(r["step_ms"] for r in baselines)
    train_baseline = min(r["train_step_ms"] for r in baselines)
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{rows[0]['params'] / 1e6:.1f}M parameters in {rows[0]['tensors']} tensors; "
        "ratios to the fastest torch AdamW"
        + (" (for-loop or foreach)" if device.type != "cuda" else "")
    )
    print(
        f"{'optimizer':<36} {'step ms':>9} {'ratio':>6} {'train ms':>9} {'ratio':>6} "
        f"{'state/param':>11}"
    )
    for row in rows:
        row["step_ratio"] = row["step_ms"] / baseline
        row["train_ratio"] = row["train_step_ms"] / train_baseline
        print(
            f"{row['optimizer']:<36} {row['step_ms']:9.2f} {row['step_ratio']:6.2f} "
            f"{row['train_step_ms']:9.2f} {row['train_ratio']:6.2f} "
            f"{row['state_tensors_per_param']:11.2f}"
            + (f" {row['peak_cuda_mb']:9.0f} MB peak" if row["peak_cuda_mb"] is not None else "")
        )
    for row in failed:
        print(f"{row['optimizer']:<36} failed: {row['error']:.200}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(
                {
                    "device": str(device),
                    "model": args.model if device.type == "cpu" else "gpt2-small",
                    "torch": torch.__version__,
                    "platform": platform.platform(),
                    "threads": torch.get_num_threads(),
                    "rows": rows,
                    "failed": failed,
                },
                handle,
                indent=1,
            )


if __name__ == "__main__":
    main()
