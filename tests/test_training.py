"""End-to-end: MetaOptimize learns a useful step size from far below on real (bundled) data."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from metaoptimize import MetaOptimize

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_digits"] = module
    spec.loader.exec_module(module)
    return module


def _accuracy(example: ModuleType, meta: str, steps: int = 600) -> tuple[float, float]:
    x_train, x_test, y_train, y_test = example.data()
    net = example.model(0)
    opt = MetaOptimize(
        net.parameters(),
        base="adamw",
        meta=meta,
        alpha0=1e-4,
        meta_lr=1e-2,
        gamma=0.99,
        weight_decay=0.01,
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = torch.randint(0, len(x_train), (32,), generator=generator)
        loss = nn.functional.cross_entropy(net(x_train[batch]), y_train[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (net(x_test).argmax(1) == y_test).float().mean().item()
    return accuracy, opt.step_sizes()["all"].item()


@pytest.mark.slow
def test_learned_step_size_beats_the_frozen_initial_one() -> None:
    pytest.importorskip("sklearn")
    example = _load_example()
    frozen_accuracy, frozen_size = _accuracy(example, "fixed")
    learned_accuracy, learned_size = _accuracy(example, "lion")
    assert frozen_size == pytest.approx(1e-4)
    assert learned_size > 1e-3  # it climbed more than tenfold from alpha0
    assert learned_accuracy > frozen_accuracy + 0.05
    assert learned_accuracy > 0.93


@pytest.mark.slow
def test_example_script_runs(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sklearn")
    example = _load_example()
    accuracy = example.train("metaoptimize", steps=200, alpha0=1e-4)
    assert 0.0 <= accuracy <= 1.0
    assert "step size" in capsys.readouterr().out
