"""The optax port matches the PyTorch optimizer step for step (float64), under jax.jit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from cases import BASES

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp

from metaoptimize import MetaOptimize
from metaoptimize.optax import metaoptimize, step_sizes

STEPS = 50
METAS = ["fixed", "sgd", "rmsprop", "adam", "lion", "auto"]


def _init() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shapes = [(4, 5), (4,), (1, 4), (1,)]
    return [torch.randn(s, generator=generator, dtype=torch.float64) * 0.5 for s in shapes]


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(8, 5, generator=generator, dtype=torch.float64),
            torch.randn(8, 1, generator=generator, dtype=torch.float64),
        )
        for _ in range(STEPS)
    ]


def _torch_run(kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = [torch.nn.Parameter(t.clone()) for t in _init()]
    opt = MetaOptimize(params, **kwargs)
    for x, y in _data():
        w1, b1, w2, b2 = params
        loss = ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach() for p in params], [v.detach() for v in opt.step_sizes().values()]


def _jax_loss(params: list[Any], x: Any, y: Any) -> Any:
    w1, b1, w2, b2 = params
    return jnp.mean((jnp.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2)


def _jax_run(kwargs: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    params = [jnp.asarray(t.numpy()) for t in _init()]
    opt = metaoptimize(**kwargs)
    state = opt.init(params)

    @jax.jit
    def train_step(params: list[Any], state: Any, x: Any, y: Any) -> tuple[list[Any], Any]:
        grads = jax.grad(_jax_loss)(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for x, y in _data():
        params, state = train_step(params, state, jnp.asarray(x.numpy()), jnp.asarray(y.numpy()))
    return params, list(step_sizes(state, params).values())


def _compare(kwargs: dict[str, Any]) -> None:
    torch_params, torch_sizes = _torch_run(kwargs)
    jax_params, jax_sizes = _jax_run(kwargs)
    for a, b in zip(torch_params, jax_params, strict=True):
        torch.testing.assert_close(
            torch.from_numpy(jax.device_get(b).copy()), a, rtol=1e-9, atol=1e-11
        )
    assert len(torch_sizes) == len(jax_sizes)
    for a, b in zip(torch_sizes, jax_sizes, strict=True):
        torch.testing.assert_close(
            torch.from_numpy(jax.device_get(b).copy()).reshape(a.shape), a, rtol=1e-9, atol=0
        )


@pytest.mark.parametrize("meta", METAS)
@pytest.mark.parametrize(("base", "extra"), BASES, ids=lambda x: str(x))
def test_every_base_and_meta_match_pytorch(base: str, extra: dict[str, Any], meta: str) -> None:
    _compare(
        {
            "base": base,
            "meta": meta,
            "alpha0": 0.02,
            "gamma": 0.9,
            "weight_decay": 0.1,
            "meta_lr": 0.5 if meta == "sgd" else 0.02,
            **extra,
        }
    )


def test_the_defaults_match_pytorch_step_for_step() -> None:
    """No argument at all: the optax port and MetaOptimize share the tuning-free defaults."""
    _compare({})
    _compare({"base": "sgd"})  # the SGD bases' own step-size range


@pytest.mark.parametrize("blocks", ["tensor", "weight"])
@pytest.mark.parametrize(
    ("base", "meta"), [("adamw", "lion"), ("adam", "adam"), ("sgdm", "rmsprop")]
)
def test_block_modes_match_pytorch(base: str, meta: str, blocks: str) -> None:
    _compare(
        {
            "base": base,
            "meta": meta,
            "alpha0": 0.02,
            "gamma": 1.0,
            "weight_decay": 0.05,
            "meta_lr": 0.02,
            "blocks": blocks,
            "alpha_max": 0.05,
        }
    )


def test_weight_decay_mask_and_errors() -> None:
    params = [jnp.ones(3), jnp.ones(2)]
    opt = metaoptimize(base="adamw", meta="fixed", alpha0=0.1, weight_decay=0.5, mask=[True, False])
    state = opt.init(params)
    zero_grads = [jnp.zeros(3), jnp.zeros(2)]
    updates, _ = opt.update(zero_grads, state, params)
    assert float(updates[0][0]) == pytest.approx(-0.05)  # -alpha * kappa * w
    assert float(updates[1][0]) == 0.0
    with pytest.raises(ValueError, match=r"Invalid base: 'adagrad'"):
        metaoptimize(base="adagrad")
    with pytest.raises(ValueError, match=r"Invalid alpha0"):
        metaoptimize(alpha0=0.0)
    with pytest.raises(ValueError, match=r"Invalid blocks"):
        metaoptimize(blocks="group")
    with pytest.raises(ValueError, match=r"needs params"):
        opt.update(zero_grads, state)


def test_non_finite_gradient_is_skipped() -> None:
    params = [jnp.ones(3)]
    opt = metaoptimize(base="adamw", meta="adam", alpha0=0.1, meta_lr=0.1)
    state = opt.init(params)
    updates, state = opt.update([jnp.array([1.0, 2.0, 3.0])], state, params)
    params = optax.apply_updates(params, updates)
    updates, skipped = opt.update([jnp.array([1.0, jnp.nan, 3.0])], state, params)
    assert all(float(u) == 0.0 for u in updates[0])
    assert int(skipped.skipped) == 1
    for before, after in zip(
        jax.tree.leaves(state.base), jax.tree.leaves(skipped.base), strict=True
    ):
        assert jnp.array_equal(before, after)


@pytest.mark.slow
def test_sharded_parameters_give_the_global_meta_gradient(tmp_path: Path) -> None:
    script = Path(__file__).with_name("optax_sharding.py")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "devices 8" in result.stdout
    assert "sharded == single-device: True" in result.stdout


def test_the_documented_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "jax.md").read_text()
    match = re.search(r"```python\n(.*?)```", text, re.DOTALL)
    assert match is not None
    exec(compile(match.group(1), "docs/jax.md", "exec"), {})  # noqa: S102 - our own docs
    assert "['w']" in capsys.readouterr().out


@pytest.mark.parametrize("base", ["sgd", "adam", "adamw", "lion"])
def test_paper_style_changes_nothing_for_bases_without_a_paper_variant(base: str) -> None:
    """base_style="paper" only changes sgdm and rmsprop, in JAX exactly as in PyTorch."""
    _compare(
        {
            "base": base,
            "meta": "adam",
            "alpha0": 0.02,
            "gamma": 0.9,
            "weight_decay": 0.1,
            "meta_lr": 0.02,
            "base_style": "paper",
        }
    )
