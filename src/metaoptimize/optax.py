"""MetaOptimize for JAX as an ``optax.GradientTransformation`` (optional: needs jax and optax).

Same names, defaults and semantics as the PyTorch :class:`metaoptimize.MetaOptimize`, step for
step (tests/test_optax.py runs both on the same model in float64). Every base rule (sgd, sgdm,
rmsprop, adam, adamw, lion, with ``base_style="paper"``) and meta rule (fixed, sgd, rmsprop,
adam, lion) is supported, with blocks ``"scalar"``, ``"tensor"`` (one per leaf) and ``"weight"``.

Example:
    >>> import jax.numpy as jnp, optax
    >>> from metaoptimize.optax import metaoptimize, step_sizes
    >>> params = {"w": jnp.ones(3)}
    >>> opt = metaoptimize(base="adamw", meta="lion", alpha0=1e-3)
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": jnp.ones(3)}, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> list(step_sizes(state, params))
    ['all']

Sharded parameters need nothing special: under ``jax.jit`` the per-block meta-gradient is a
reduction over the whole (global) array, so XLA inserts the cross-device sum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax  # type: ignore[import-untyped]

from metaoptimize._options import (
    BASE_STYLES,
    DEFAULT_ALPHA0,
    DEFAULT_GAMMA,
    DEFAULT_META,
    log_bounds,
)
from metaoptimize._validation import check_betas, check_number, check_range
from metaoptimize.base import BASE_RULES, is_decoupled
from metaoptimize.meta import get_meta_rule

__all__ = ["MetaOptimizeState", "metaoptimize", "step_sizes"]

Array = jax.Array
_BASE_STATE = {
    "sgd": (),
    "sgdm": ("momentum_buffer",),
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
    "lion": ("exp_avg",),
}
_META_STATE = {
    "fixed": (),
    "sgd": (),
    "rmsprop": ("step", "square_avg"),
    "adam": ("step", "exp_avg", "exp_avg_sq"),
    "lion": ("exp_avg",),
    "auto": ("scale", "sum_sq"),
}


class MetaOptimizeState(NamedTuple):
    """State of :func:`metaoptimize`.

    Attributes:
        steps: base steps taken (skipped steps excluded).
        log_alpha: one array per block: 0-d for "scalar"/"tensor", leaf-shaped for "weight".
        meta: meta-rule state, a dict of per-block lists like ``log_alpha``.
        base: base-rule state, a dict of per-leaf lists (``exp_avg``, ...).
        trace: the trace ``h``, one array per leaf (empty when the meta rule is off).
        skipped: number of steps skipped because a gradient or meta-gradient was not finite.
    """

    steps: Array
    log_alpha: list[Array]
    meta: dict[str, list[Array]]
    base: dict[str, list[Array]]
    trace: list[Array]
    skipped: Array


def _safe_div(numerator: Array, denominator: Array) -> Array:
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), 0.0)


def _decoupled(base: str, style: str) -> bool:
    """Decoupled or L2 weight decay: the same rule as the PyTorch optimizer's."""
    return is_decoupled(BASE_RULES[base](), {"base_style": style})


def _lerp(start: Array, end: Array, weight: Array | float) -> Array:
    return start + weight * (end - start)


def _ema_square(average: Array, value: Array, weight: Array | float) -> Array:
    """``(1-w) a + w x²`` with an overflowing ``x²`` saturating at inf (metaoptimize._math)."""
    return average * (1.0 - weight) + (value * weight) * value


def _bias(beta: float, count: Array) -> Array:
    return 1.0 - beta ** jnp.maximum(count, 1.0)


class _Leaf(NamedTuple):
    """One leaf's inputs to its base rule."""

    style: str
    w: Array
    g: Array
    gt: Array  # g with L2 decay added (g where the decay is decoupled)
    l2: float
    st: dict[str, Array]
    steps_before: Array
    ok: Array
    hp: dict[str, Any]


_Direction = tuple[Array, Array | None, dict[str, Array]]


def _direction(
    base: str,
    style: str,
    w: Array,
    g: Array,
    st: dict[str, Array],
    count: Array,
    ok: Array,
    hp: dict[str, Any],
) -> _Direction:
    """One leaf's base update: (u, ∂u/∂g̃ or None, new state). Mirrors metaoptimize/base/."""
    l2 = 0.0 if _decoupled(base, style) else hp["weight_decay"]
    gt = g + l2 * w if l2 else g
    return _DIRECTIONS[base](_Leaf(style, w, g, gt, l2, st, count, ok, hp))


def _sgd(leaf: _Leaf) -> _Direction:
    return leaf.gt, (jnp.ones_like(leaf.steps_before) if leaf.l2 else None), {}


def _sgdm(leaf: _Leaf) -> _Direction:
    mu, ok, gt = leaf.hp["momentum"], leaf.ok, leaf.gt
    if leaf.style == "paper":
        buf = leaf.st["momentum_buffer"]
        return buf, None, {"momentum_buffer": _lerp(buf, leaf.g, ok * (1.0 - mu))}
    coef = 1.0 - leaf.hp["dampening"] * (leaf.steps_before > 0).astype(leaf.g.dtype)
    buf = leaf.st["momentum_buffer"] * (1.0 + ok * (mu - 1.0)) + gt * (ok * coef)
    if leaf.hp["nesterov"]:
        return gt + mu * buf, (1.0 + mu * coef if leaf.l2 else None), {"momentum_buffer": buf}
    return buf, (coef if leaf.l2 else None), {"momentum_buffer": buf}


def _rmsprop(leaf: _Leaf) -> _Direction:
    (smoothing,) = leaf.hp["betas"]
    eps, mu, ok, gt, st = leaf.hp["eps"], leaf.hp["momentum"], leaf.ok, leaf.gt, leaf.st
    square_avg = _ema_square(st["square_avg"], gt, ok * (1.0 - smoothing))
    new: dict[str, Array] = {"square_avg": square_avg}
    if leaf.style == "paper":
        rms = jnp.sqrt(square_avg / _bias(smoothing, leaf.steps_before + ok))
        return leaf.g / (rms + eps), None, new
    grad_avg = None
    if leaf.hp["centered"]:
        grad_avg = _lerp(st["grad_avg"], gt, ok * (1.0 - smoothing))
        new["grad_avg"] = grad_avg
        rms = jnp.sqrt(square_avg - grad_avg * grad_avg)
    else:
        rms = jnp.sqrt(square_avg)
    denom = rms + eps
    u = gt / denom
    if mu > 0:
        u = st["momentum_buffer"] * (1.0 + ok * (mu - 1.0)) + u * ok
        new["momentum_buffer"] = u
    if not leaf.l2:
        return u, None, new
    centred = gt if grad_avg is None else gt - grad_avg
    slope = 1.0 / denom - _safe_div((1.0 - smoothing) * gt * centred, rms * denom * denom)
    return u, slope, new


def _adam(leaf: _Leaf) -> _Direction:
    beta1, beta2 = leaf.hp["betas"]
    ok, gt, after = leaf.ok, leaf.gt, leaf.steps_before + leaf.ok
    exp_avg = _lerp(leaf.st["exp_avg"], gt, ok * (1.0 - beta1))
    exp_avg_sq = _ema_square(leaf.st["exp_avg_sq"], gt, ok * (1.0 - beta2))
    bias1, bias2 = _bias(beta1, after), _bias(beta2, after)
    rms = jnp.sqrt(exp_avg_sq) / jnp.sqrt(bias2)
    denom = rms + leaf.hp["eps"]
    m_hat = exp_avg / bias1
    new = {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if not leaf.l2:
        return m_hat / denom, None, new
    c1, c2 = (1.0 - beta1) / bias1, (1.0 - beta2) / bias2
    return m_hat / denom, c1 / denom - _safe_div(c2 * m_hat * gt, rms * denom * denom), new


def _lion(leaf: _Leaf) -> _Direction:
    beta1, beta2 = leaf.hp["betas"]
    exp_avg = leaf.st["exp_avg"]
    u = jnp.sign(_lerp(exp_avg, leaf.g, 1.0 - beta1))
    return u, None, {"exp_avg": _lerp(exp_avg, leaf.g, leaf.ok * (1.0 - beta2))}


#: The JAX form of each base rule of :mod:`metaoptimize.base`, by name.
_DIRECTIONS: dict[str, Callable[[_Leaf], _Direction]] = {
    "sgd": _sgd,
    "sgdm": _sgdm,
    "rmsprop": _rmsprop,
    "adam": _adam,
    "adamw": _adam,
    "lion": _lion,
}


def _meta_update(
    meta: str,
    beta: Array,
    z: Array,
    st: dict[str, Array],
    eta: float,
    betas: tuple[float, ...] | None,
    eps: float,
) -> tuple[Array, dict[str, Array]]:
    """One block's meta update (mirrors metaoptimize/meta.py)."""
    if meta == "sgd":
        return beta - eta * z, st
    if meta == "lion":
        assert betas is not None
        c, rho = betas
        return (
            beta - eta * jnp.sign(_lerp(st["exp_avg"], z, 1.0 - c)),
            {"exp_avg": _lerp(st["exp_avg"], z, 1.0 - rho)},
        )
    if meta == "adam":
        assert betas is not None
        beta1, beta2 = betas
        step = st["step"] + 1.0
        exp_avg = _lerp(st["exp_avg"], z, 1.0 - beta1)
        exp_avg_sq = _ema_square(st["exp_avg_sq"], z, 1.0 - beta2)
        m_hat = exp_avg / (1.0 - beta1**step)
        rms = jnp.sqrt(exp_avg_sq / (1.0 - beta2**step))
        return (
            beta - eta * m_hat / (rms + eps),
            {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq},
        )
    if meta == "rmsprop":
        assert betas is not None
        (smoothing,) = betas
        step = st["step"] + 1.0
        square_avg = _ema_square(st["square_avg"], z, 1.0 - smoothing)
        rms = jnp.sqrt(square_avg / (1.0 - smoothing**step))
        return beta - eta * z / (rms + eps), {"step": step, "square_avg": square_avg}
    if meta == "auto":
        assert betas is not None
        decay, keep = betas
        size = jnp.abs(z)
        scale = jnp.maximum(size, _lerp(st["scale"], size, 1.0 - decay))
        z_hat = jnp.where(scale > 0, z / jnp.where(scale > 0, scale, 1.0), 0.0)
        sum_sq = keep * st["sum_sq"] + z_hat * z_hat
        step = jnp.where(sum_sq > 0, z_hat / jnp.sqrt(jnp.where(sum_sq > 0, sum_sq, 1.0)), 0.0)
        return beta - eta * step, {"scale": scale, "sum_sq": sum_sq}
    return beta, st  # fixed


@dataclass(frozen=True)
class _Config:
    """The validated settings of one :func:`metaoptimize` transformation."""

    base: str
    base_style: str
    meta: str
    meta_lr: float
    meta_betas: tuple[float, ...] | None
    meta_eps: float
    blocks: str
    alpha0: float
    gamma: float
    lr: float | Callable[[Array], Array]
    hp: dict[str, Any]
    bounds: tuple[float, float]
    mask: Any

    @property
    def per_weight(self) -> bool:
        return self.blocks == "weight"

    @property
    def meta_active(self) -> bool:
        return self.meta != "fixed" and self.meta_lr > 0

    def state_keys(self) -> tuple[str, ...]:
        """The base rule's state entries for these settings."""
        if self.base != "rmsprop":
            return _BASE_STATE[self.base]
        keys = ["square_avg"]
        if self.hp["centered"] and self.base_style == "torch":
            keys.append("grad_avg")
        if self.hp["momentum"] > 0 and self.base_style == "torch":
            keys.append("momentum_buffer")
        return tuple(keys)


def metaoptimize(
    base: str = "adamw",
    meta: str = DEFAULT_META,
    *,
    alpha0: float = DEFAULT_ALPHA0,
    meta_lr: float | None = None,
    gamma: float = DEFAULT_GAMMA,
    blocks: str = "scalar",
    lr: float | Callable[[Array], Array] = 1.0,
    weight_decay: float = 0.0,
    betas: tuple[float, ...] | None = None,
    momentum: float | None = None,
    dampening: float = 0.0,
    nesterov: bool = False,
    centered: bool = False,
    eps: float = 1e-8,
    base_style: str = "torch",
    meta_betas: tuple[float, ...] | None = None,
    meta_eps: float = 1e-8,
    alpha_min: float | None = None,
    alpha_max: float | None = None,
    mask: Any = None,
) -> optax.GradientTransformation:
    """Hessian-free MetaOptimize as an optax transformation; arguments as in MetaOptimize.

    ``lr`` is the multiplier on the learned step size (a float or an optax schedule of the
    step count). ``mask`` (a pytree of bools, or a callable returning one) selects the leaves
    that get weight decay, as in ``optax.adamw``. Updates are the applied changes ``Δw``: use
    ``optax.apply_updates``.

    Raises:
        ValueError: an invalid argument, named in the message.
    """
    if base not in BASE_RULES:
        raise ValueError(f"Invalid base: {base!r}; choose one of {sorted(BASE_RULES)}")
    if blocks not in ("scalar", "tensor", "layerwise", "weight"):
        raise ValueError(f"Invalid blocks: {blocks!r}; choose 'scalar', 'tensor' or 'weight'")
    if base_style not in BASE_STYLES:
        raise ValueError(f"Invalid base_style: {base_style!r}; choose one of {list(BASE_STYLES)}")
    rule = get_meta_rule(meta, meta_lr, meta_betas, meta_eps)  # the shared meta checks
    expected = BASE_RULES[base].default_betas
    if expected is None:
        if betas is not None:
            raise ValueError(f"Invalid betas: {betas!r}; base {base!r} takes no betas")
    else:
        betas = expected if betas is None else check_betas(betas, len(expected), "betas")
    default_momentum = BASE_RULES[base].default_momentum or 0.0
    config = _Config(
        base=base,
        base_style=base_style,
        meta=meta,
        meta_lr=rule.meta_lr,
        meta_betas=rule.betas,
        meta_eps=rule.eps,
        blocks=blocks,
        alpha0=check_range(alpha0, "alpha0", 0.0, math.inf, low_open=True, high_open=True),
        gamma=check_range(gamma, "gamma", 0.0, 1.0),
        lr=lr,
        hp={
            "weight_decay": check_number(weight_decay, "weight_decay"),
            "eps": eps,
            "betas": betas,
            "dampening": dampening,
            "nesterov": nesterov,
            "centered": centered,
            "momentum": default_momentum if momentum is None else momentum,
        },
        bounds=log_bounds(alpha_min, alpha_max, BASE_RULES[base].default_alpha_range),
        mask=mask,
    )
    return optax.GradientTransformation(
        functools.partial(_init, config), functools.partial(_update, config)
    )


def _init(config: _Config, params: Any) -> MetaOptimizeState:
    leaves = jax.tree.leaves(params)
    dtype = jnp.result_type(*leaves) if leaves else jnp.float32
    start = math.log(config.alpha0)
    if config.per_weight:
        log_alpha = [jnp.full_like(p, start) for p in leaves]
    elif config.blocks == "scalar":
        log_alpha = [jnp.asarray(start, dtype)]
    else:
        log_alpha = [jnp.asarray(start, p.dtype) for p in leaves]
    return MetaOptimizeState(
        steps=jnp.zeros((), dtype),
        log_alpha=log_alpha,
        meta={k: [jnp.zeros_like(b) for b in log_alpha] for k in _META_STATE[config.meta]},
        base={k: [jnp.zeros_like(p) for p in leaves] for k in config.state_keys()},
        trace=[jnp.zeros_like(p) for p in leaves] if config.meta_active else [],
        skipped=jnp.zeros((), jnp.int32),
    )


def _update(
    config: _Config, updates: Any, state: MetaOptimizeState, params: Any = None
) -> tuple[Any, MetaOptimizeState]:
    if params is None:
        raise ValueError("metaoptimize needs params: call update(grads, state, params)")
    grads, treedef = jax.tree.flatten(updates)
    weights = jax.tree.leaves(params)
    # 1. meta-gradient with the trace from before this step
    z, finite = _meta_gradient(config, state, grads)
    ok = finite.astype(state.steps.dtype)
    # 2. base step and trace, with alpha_t
    deltas, new_base, new_trace = _base_steps(config, state, params, weights, grads, finite)
    # 3. meta step on log(alpha), kept only on a finite step
    log_alpha, meta_state = _meta_steps(config, state, z, finite)
    new_state = MetaOptimizeState(
        steps=state.steps + ok,
        log_alpha=log_alpha,
        meta=meta_state,
        base=new_base,
        trace=new_trace,
        skipped=state.skipped + (1 - finite.astype(jnp.int32)),
    )
    return jax.tree.unflatten(treedef, deltas), new_state


def _meta_gradient(
    config: _Config, state: MetaOptimizeState, grads: list[Array]
) -> tuple[list[Array], Array]:
    """``z`` per block (or per weight) and whether the step is finite."""
    if not config.meta_active:
        return [], jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in grads]))
    products = [h * g for h, g in zip(state.trace, grads, strict=True)]
    if config.per_weight:
        z = products
    elif config.blocks == "scalar":
        z = [cast(Array, sum(jnp.sum(p) for p in products))]
    else:
        z = [jnp.sum(p) for p in products]
    return z, jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in z]))


def _base_steps(
    config: _Config,
    state: MetaOptimizeState,
    params: Any,
    weights: list[Array],
    grads: list[Array],
    finite: Array,
) -> tuple[list[Array], dict[str, list[Array]], list[Array]]:
    """Every leaf's step ``Δw`` with the learned step size, its base state and its trace."""
    decay_mask = config.mask(params) if callable(config.mask) else config.mask
    masked = (
        [True] * len(weights)
        if decay_mask is None
        else [bool(m) for m in jax.tree.leaves(decay_mask)]
    )
    ok = finite.astype(state.steps.dtype)
    scale = (config.lr(state.steps) if callable(config.lr) else config.lr) * ok
    decoupled = _decoupled(config.base, config.base_style)
    new_base: dict[str, list[Array]] = {k: [] for k in state.base}
    new_trace, deltas = [], []
    for i, (w, g) in enumerate(zip(weights, grads, strict=True)):
        g = jnp.where(finite, g, 0.0)
        kappa = config.hp["weight_decay"] if masked[i] else 0.0
        leaf_state = {k: v[i] for k, v in state.base.items()}
        u, slope, leaf_new = _direction(
            config.base,
            config.base_style,
            w,
            g,
            leaf_state,
            state.steps,
            ok,
            {**config.hp, "weight_decay": kappa},
        )
        for key, values in new_base.items():
            values.append(leaf_new.get(key, leaf_state[key]))
        alpha = jnp.exp(state.log_alpha[0 if config.blocks == "scalar" else i]) * scale
        delta = -(u + kappa * w) * alpha if decoupled and kappa else -u * alpha
        if config.meta_active:
            gamma = 1.0 + ok * (config.gamma - 1.0)
            if kappa:
                decay = 1.0 - alpha * (kappa if decoupled else kappa * cast(Array, slope))
                new_trace.append(state.trace[i] * (gamma * decay) + delta)
            else:
                new_trace.append(state.trace[i] * gamma + delta)
        deltas.append(delta.astype(w.dtype))
    return deltas, new_base, new_trace


def _meta_steps(
    config: _Config, state: MetaOptimizeState, z: list[Array], finite: Array
) -> tuple[list[Array], dict[str, list[Array]]]:
    """The meta rule on every block's ``log α``, kept only on a finite step."""
    log_alpha, meta_state = list(state.log_alpha), {k: list(v) for k, v in state.meta.items()}
    low, high = config.bounds
    for b, zb in enumerate(z):
        old = {k: v[b] for k, v in state.meta.items()}
        new_beta, new_st = _meta_update(
            config.meta,
            state.log_alpha[b],
            zb,
            old,
            config.meta_lr,
            config.meta_betas,
            config.meta_eps,
        )
        new_beta = jnp.clip(new_beta, low, high)
        log_alpha[b] = jnp.where(finite, new_beta, state.log_alpha[b])
        for k, values in meta_state.items():
            values[b] = jnp.where(finite, new_st[k], old[k])
    return log_alpha, meta_state


def step_sizes(state: MetaOptimizeState, params: Any) -> dict[str, Array]:
    """Learned step sizes by block: ``{"all": α}`` for a single block, else by leaf path.

    (With ``blocks="tensor"`` and a single-leaf model the one block is also called "all".)
    """
    if len(state.log_alpha) == 1 and state.log_alpha[0].ndim == 0:
        return {"all": jnp.exp(state.log_alpha[0])}
    paths = [
        jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
    ]
    return {path: jnp.exp(beta) for path, beta in zip(paths, state.log_alpha, strict=True)}
