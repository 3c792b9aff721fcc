"""The tuning-free defaults: the "auto" meta rule, its guarantees, and the pinned defaults."""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from metaoptimize import MetaOptimize, presets, wrap
from metaoptimize._options import DEFAULT_ALPHA0, DEFAULT_GAMMA
from metaoptimize.meta import get_meta_rule


def test_the_defaults_are_pinned() -> None:
    """A change of default is a change of the product: CHANGELOG and docs/results.md first."""
    assert (DEFAULT_ALPHA0, DEFAULT_GAMMA) == (1e-3, 0.999)
    opt = MetaOptimize(nn.Linear(3, 2).parameters())
    group = opt.param_groups[0]
    assert (group["alpha0"], group["gamma"], group["lr"], group["weight_decay"]) == (
        1e-3,
        0.999,
        1.0,
        0.0,
    )
    assert opt._base.name == "adamw"
    assert (opt._step_size.rule.name, opt._step_size.rule.meta_lr, opt._step_size.rule.betas) == (
        "auto",
        0.5,
        (0.999, 1.0),
    )
    assert opt.layout.mode == "scalar"
    assert opt._step_size.bounds == (math.log(1e-10), math.log(1.0))
    sgd = MetaOptimize(nn.Linear(3, 2).parameters(), base="sgd")
    assert sgd._step_size.bounds == (math.log(1e-12), math.log(1e6))
    unbounded = MetaOptimize(nn.Linear(3, 2).parameters(), alpha_min=0.0, alpha_max=math.inf)
    assert unbounded._step_size.bounds == (-math.inf, math.inf)
    wrapped = wrap(torch.optim.AdamW(nn.Linear(3, 2).parameters()))
    assert (wrapped.meta_rule.name, wrapped.meta_rule.meta_lr, wrapped.gamma) == (
        "auto",
        0.5,
        0.999,
    )
    # The paper's rules keep the paper's meta step size when asked for by name.
    assert MetaOptimize(nn.Linear(3, 2).parameters(), meta="lion").meta_lr == 1e-3


def test_optax_port_has_the_same_defaults() -> None:
    pytest.importorskip("optax")
    from metaoptimize.optax import metaoptimize

    ours = inspect.signature(MetaOptimize).parameters
    theirs = inspect.signature(metaoptimize).parameters
    for name in ("base", "meta", "alpha0", "meta_lr", "gamma", "alpha_min", "alpha_max"):
        assert theirs[name].default == ours[name].default, name


def _run_rule(z_values: list[float], meta_lr: float = 0.5) -> list[float]:
    rule = get_meta_rule("auto", meta_lr, None, 1e-8)
    beta = torch.zeros((), dtype=torch.float64)
    state = rule.init_state(beta)
    betas = []
    for z in z_values:
        beta, state = rule.update(beta, torch.tensor(z, dtype=torch.float64), state)
        betas.append(float(beta))
    return betas


def test_auto_rule_equals_its_formula_in_plain_python() -> None:
    """An oracle written with floats, independent of the tensor code (docs/math.md §14)."""
    zs = [3.0, -0.5, 0.0, 2.0, 7.0, -1e-3, 0.25]
    scale, total, beta, expected = 0.0, 0.0, 0.0, []
    for z in zs:
        scale = max(abs(z), scale + (1 - 0.999) * (abs(z) - scale))
        z_hat = z / scale if scale > 0 else 0.0
        total += z_hat * z_hat
        beta -= 0.5 * z_hat / math.sqrt(total) if total > 0 else 0.0
        expected.append(beta)
    assert _run_rule(zs) == pytest.approx(expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("betas", [(0.999, 1.0), (0.3, 0.9)])
def test_auto_rule_float_form_equals_the_tensor_form(betas: tuple[float, float]) -> None:
    """The CPU host path's Python-float meta step is the tensor rule, in float64."""
    rule = get_meta_rule("auto", 0.5, betas, 1e-8)
    generator = torch.Generator().manual_seed(0)
    n = 9
    beta = torch.randn(n, generator=generator, dtype=torch.float64)
    state = rule.init_state(beta)
    for step in range(40):
        z = torch.randn(n, generator=generator, dtype=torch.float64) * 10.0 ** (step % 7 - 3)
        z[step % n] = 0.0  # no signal for one block each step (and zero scale at first)
        floats = rule.update_floats(
            beta.tolist(), z.tolist(), {k: v.tolist() for k, v in state.items()}
        )
        assert floats is not None
        beta, state = rule.update(beta, z, state)
        torch.testing.assert_close(
            torch.tensor(floats[0], dtype=torch.float64), beta, rtol=1e-15, atol=0
        )
        for key, value in state.items():
            expected = torch.tensor(floats[1][key], dtype=torch.float64)
            torch.testing.assert_close(expected, value, rtol=1e-15, atol=0)


@pytest.mark.parametrize("betas", [(0.999, 1.0), (0.3, 0.9)])
def test_auto_rule_multi_tensor_form_equals_the_tensor_form(betas: tuple[float, float]) -> None:
    """The per-weight multi-tensor meta step is the tensor rule, guards included, in float64."""
    rule = get_meta_rule("auto", 0.5, betas, 1e-8)
    generator = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (5,), (2, 2)]
    beta = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    state = {k: [v.clone() for v in vs] for k, vs in _stacked_init(rule, beta).items()}
    for step in range(30):
        z = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
        z[0].view(-1)[step % 12] = 0.0  # no signal (and zero scale at first)
        z[1] *= 10.0 ** (step % 9 - 4)
        result = rule.foreach_update(beta, z, state)
        assert result is not None
        expected = [
            rule.update(b, g, {k: v[i] for k, v in state.items()})
            for i, (b, g) in enumerate(zip(beta, z, strict=True))
        ]
        for i, (new_beta, new_state) in enumerate(expected):
            torch.testing.assert_close(result[0][i], new_beta, rtol=1e-15, atol=0)
            for key, value in new_state.items():
                torch.testing.assert_close(result[1][key][i], value, rtol=1e-15, atol=0)
        beta, state = result
    # ẑ² underflows to 0 while ẑ does not: the tensor form's where gives no step; so must this.
    tiny_state = {
        "scale": [torch.tensor([1e300], dtype=torch.float64)],
        "sum_sq": [torch.zeros(1, dtype=torch.float64)],
    }
    z_small = [torch.tensor([1e130], dtype=torch.float64)]
    start = [torch.zeros(1, dtype=torch.float64)]
    result = rule.foreach_update(start, z_small, tiny_state)
    assert result is not None
    reference, _ = rule.update(start[0], z_small[0], {k: v[0] for k, v in tiny_state.items()})
    assert result[0][0].item() == reference.item() == 0.0


@pytest.mark.parametrize("meta", ["sgd", "lion", "auto"])
def test_in_place_multi_tensor_meta_steps_equal_the_tensor_rule(meta: str) -> None:
    """The CPU per-weight meta step updates β and the meta state in place, as update() would."""
    rule = get_meta_rule(meta, 0.3, None, 1e-8)
    assert rule.multi_tensor
    generator = torch.Generator().manual_seed(2)
    shapes = [(3, 4), (5,), ()]
    betas = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    states = _stacked_init(rule, betas)
    tensors = [*betas, *(t for ts in states.values() for t in ts)]
    for step in range(20):
        zs = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
        zs[0].view(-1)[step % 12] = 0.0
        expected = [
            rule.update(b.clone(), z, {k: v[i].clone() for k, v in states.items()})
            for i, (b, z) in enumerate(zip(betas, zs, strict=True))
        ]
        rule.foreach_update_(betas, [z.clone() for z in zs], states)
        # β - η z and β + (-η) z (add's alpha, fused on some CPUs) may differ in the last bit.
        for i, (new_beta, new_state) in enumerate(expected):
            torch.testing.assert_close(betas[i], new_beta, rtol=1e-14, atol=1e-16)
            for key, value in new_state.items():
                torch.testing.assert_close(states[key][i], value, rtol=1e-15, atol=0)
    # In place: the same tensors as before.
    assert all(
        a is b
        for a, b in zip(tensors, [*betas, *(t for ts in states.values() for t in ts)], strict=True)
    )


def _stacked_init(rule: Any, beta: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    states = [rule.init_state(b) for b in beta]
    return {key: [s[key] for s in states] for key in states[0]}


def test_auto_rule_climbs_fast_under_a_consistent_signal() -> None:
    betas = _run_rule([-1e-9] * 100)
    # Each step moves η/√t: the sum is at least 2η(√(t+1) − 1).
    assert betas[0] == pytest.approx(0.5)
    assert betas[-1] >= 2 * 0.5 * (math.sqrt(101) - 1)
    assert betas[-1] > math.log(1e-2 / 1e-6)  # 1e-6 -> 1e-2 within 100 steps


def test_auto_rule_never_moves_more_than_meta_lr_and_not_without_signal() -> None:
    generator = torch.Generator().manual_seed(0)
    zs = (torch.randn(500, generator=generator, dtype=torch.float64) * 10.0**6).tolist()
    betas = [0.0, *_run_rule(zs, meta_lr=0.3)]
    assert max(abs(b - a) for a, b in itertools.pairwise(betas)) <= 0.3 + 1e-12
    assert _run_rule([0.0] * 50) == [0.0] * 50
    # Scale-free: the same sequence times 1e-12 gives the same step sizes.
    assert _run_rule([z * 1e-12 for z in zs], meta_lr=0.3) == pytest.approx(betas[1:], rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_noise_meta_gradient_leaves_the_step_size_in_a_band(seed: int) -> None:
    """Loss <w, ξ_t> with fresh noise ξ_t: the gradient carries no information about α.

    Over 4,000 steps the default step size stays within a factor e^3 (about 20) of where it
    started, and moves by less than e^1 over the last 2,000 steps (the AdaGrad sum slows it
    like 1/√t). The Lion meta rule at the old README's meta_lr=1e-2 left a factor e^4.6 within
    5,000 steps on seed 0 (docs/results.md).
    """
    generator = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.zeros(50))
    opt = MetaOptimize([w])
    log_alpha = []
    for _ in range(4000):
        noise = torch.randn(50, generator=generator)
        opt.zero_grad()
        (w @ noise).backward()
        opt.step()
        log_alpha.append(math.log(float(opt.step_sizes()["all"]) / 1e-3))
    assert max(abs(b) for b in log_alpha) < 3.0
    late = log_alpha[2000:]
    assert max(late) - min(late) < 1.0


def _train_into_interpolation(opt_factory: str, steps: int = 3000) -> tuple[float, float, float]:
    """A small MLP on 256 digits, batch 32, far past interpolation (375 epochs)."""
    sklearn = pytest.importorskip("sklearn.datasets")
    inputs, labels = sklearn.load_digits(return_X_y=True)
    x = torch.tensor(inputs[:256], dtype=torch.float32) / 16.0
    y = torch.tensor(labels[:256])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
    if opt_factory == "default":
        opt = MetaOptimize(model.parameters(), alpha0=0.1)
    else:  # the first release's README settings (Lion meta, 1e-2 per step), undiscounted
        opt = presets.make(model.parameters(), "paper", alpha0=0.1, meta_lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    first, worst, largest_alpha = math.nan, 0.0, 0.0
    for step in range(steps):
        index = torch.randint(0, 256, (32,), generator=generator)
        loss = nn.functional.cross_entropy(model(x[index]), y[index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 0:
            first = loss.item()
        elif step >= steps // 10:
            worst = max(worst, loss.item())
        largest_alpha = max(largest_alpha, float(opt.step_sizes()["all"]))
    return first, worst, largest_alpha


@pytest.mark.slow
def test_no_runaway_once_the_training_loss_nears_zero() -> None:
    first, worst, largest_alpha = _train_into_interpolation("default")
    assert worst < first  # the loss never comes back above where it started
    assert worst < 0.05
    assert largest_alpha <= 1.0  # the default bound, never reached in practice here


@pytest.mark.slow
def test_the_interpolation_check_fails_for_the_old_settings() -> None:
    """The same run with the first release's settings blows up, so the check above can fail."""
    first, worst, largest_alpha = _train_into_interpolation("paper")
    assert worst > first
    assert largest_alpha > 1.0


@pytest.mark.slow
def test_the_readme_quick_start_runs_as_pasted() -> None:
    """The quick start is the product's first impression: it must run without edits."""
    pytest.importorskip("sklearn")
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    code = readme.split("## Quick start", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    namespace: dict[str, Any] = {}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert "'all'" in printed.getvalue()
    assert isinstance(namespace["opt"], MetaOptimize)
