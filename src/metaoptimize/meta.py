"""Meta update rules: update log step sizes ``β = log α`` from the meta-gradient ``z``.

A meta rule works elementwise on ``β`` (one entry per block, or parameter-shaped for per-weight
step sizes) and never touches parameters. ``z > 0`` means the gradient is aligned with past
updates (overshooting), so every rule lowers ``β`` when ``z > 0``.

``update`` is functional: it returns the new ``β`` and new state tensors, and the optimizer
keeps the old values wherever a block was not active or the step was not finite.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from metaoptimize._math import ema_square, sqrt
from metaoptimize._validation import check_betas, check_number

__all__ = ["META_RULES", "MetaRule", "get_meta_rule"]

MetaState = dict[str, Tensor]


class MetaRule:
    """Interface of a meta rule."""

    name: ClassVar[str]
    #: Default ``meta_betas``; None when the rule takes none.
    default_betas: ClassVar[tuple[float, ...] | None] = None
    #: Per beta, whether 1 is allowed (a factor that keeps everything, not an average).
    betas_one_allowed: ClassVar[tuple[bool, ...]] = ()
    #: Default ``meta_lr`` (the paper's 1e-3 for the paper's rules).
    default_lr: ClassVar[float] = 1e-3
    #: Whether :meth:`foreach_update_` is provided (else callers loop over :meth:`update`).
    multi_tensor: ClassVar[bool] = False

    def __init__(self, meta_lr: float, betas: tuple[float, ...] | None, eps: float) -> None:
        self.meta_lr = meta_lr
        self.betas = betas
        self.eps = eps

    @property
    def active(self) -> bool:
        """Whether this rule can ever move β (False for "fixed" or a zero meta step size)."""
        return self.meta_lr > 0.0

    def init_state(self, beta: Tensor) -> MetaState:
        """Zero state shaped like ``beta``."""
        return {}

    def update(self, beta: Tensor, z: Tensor, state: MetaState) -> tuple[Tensor, MetaState]:
        """Return ``(new β, new state)``; inputs are not modified."""
        raise NotImplementedError

    def update_floats(
        self, beta: list[float], z: list[float], state: dict[str, list[float]]
    ) -> tuple[list[float], dict[str, list[float]]] | None:
        """:meth:`update` on Python floats, for a few blocks on CPU; None: not provided.

        A CPU step decides its verdict on the host, and there a handful of floats costs far
        less than a dozen tensor operations on a one-element tensor. The result equals
        :meth:`update` in float64 (computed in double precision, then stored).
        """
        return None

    def foreach_update_(
        self, betas: list[Tensor], zs: list[Tensor], states: dict[str, list[Tensor]]
    ) -> None:
        """:meth:`update` on lists of tensors, in place (per-weight step sizes, a finite step).

        One ``torch._foreach_*`` call per operation instead of one call per tensor, and as
        few new parameter-sized tensors as the rule allows. ``betas`` and ``states`` are
        updated; ``zs`` is scratch (overwritten). Provided where :attr:`multi_tensor` is True.
        """
        raise NotImplementedError(f"meta {self.name!r} has no multi-tensor form")

    def foreach_update(
        self, betas: list[Tensor], zs: list[Tensor], states: dict[str, list[Tensor]]
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]] | None:
        """:meth:`foreach_update_` on copies (inputs are not modified); None: not provided."""
        if not self.multi_tensor:
            return None
        new_betas = [beta.clone() for beta in betas]
        new_states = {key: [t.clone() for t in tensors] for key, tensors in states.items()}
        self.foreach_update_(new_betas, [z.clone() for z in zs], new_states)
        return new_betas, new_states


class Fixed(MetaRule):
    """No meta update: the step sizes stay at ``alpha0`` (times the group's ``lr``)."""

    name = "fixed"

    @property
    def active(self) -> bool:
        return False

    def update(self, beta: Tensor, z: Tensor, state: MetaState) -> tuple[Tensor, MetaState]:
        return beta, state


class SGD(MetaRule):
    """``β ← β - η z`` (paper eq. 24)."""

    name = "sgd"
    multi_tensor = True

    def update(self, beta: Tensor, z: Tensor, state: MetaState) -> tuple[Tensor, MetaState]:
        return beta - self.meta_lr * z, state

    def foreach_update_(
        self, betas: list[Tensor], zs: list[Tensor], states: dict[str, list[Tensor]]
    ) -> None:
        torch._foreach_add_(betas, zs, alpha=-self.meta_lr)


class RMSprop(MetaRule):
    """``v ← λ v + (1-λ) z²``, ``β ← β - η z / (sqrt(v/(1-λ^t)) + ε)`` (released code's form)."""

    name = "rmsprop"
    default_betas = (0.999,)

    def init_state(self, beta: Tensor) -> MetaState:
        return {"step": torch.zeros_like(beta), "square_avg": torch.zeros_like(beta)}

    def update(self, beta: Tensor, z: Tensor, state: MetaState) -> tuple[Tensor, MetaState]:
        assert self.betas is not None
        (smoothing,) = self.betas
        step = state["step"] + 1.0
        square_avg = ema_square(state["square_avg"], z, 1.0 - smoothing)
        rms = sqrt(square_avg / (1.0 - torch.pow(smoothing, step)))
        new_beta = beta - self.meta_lr * z / (rms + self.eps)
        return new_beta, {"step": step, "square_avg": square_avg}


class Adam(MetaRule):
    """Standard bias-corrected Adam on β (paper eq. 27 with EMA moments)."""

    name = "adam"
    default_betas = (0.9, 0.999)

    def init_state(self, beta: Tensor) -> MetaState:
        zeros = torch.zeros_like(beta)
        return {"step": zeros, "exp_avg": zeros.clone(), "exp_avg_sq": zeros.clone()}

    def update(self, beta: Tensor, z: Tensor, state: MetaState) -> tuple[Tensor, MetaState]:
        assert self.betas is not None
        beta1, beta2 = self.betas
        step = state["step"] + 1.0
        exp_avg = state["exp_avg"].lerp(z, 1.0 - beta1)
        exp_avg_sq = ema_square(state["exp_avg_sq"], z, 1.0 - beta2)
        m_hat = exp_avg / (1.0 - torch.pow(beta1, step))
        rms = sqrt(exp_avg_sq / (1.0 - torch.pow(beta2, step)))
        new_beta = beta - self.meta_lr * m_hat / (rms + self.eps)
        return new_beta, {"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


class Lion(MetaRule):
    """``β ← β - η sign(c m + (1-c) z)``, then ``m ← ρ m + (1-ρ) z`` (paper eq. 36-37).

    ``meta_betas = (c, ρ)``, default ``(0.9, 0.99)``: the same order as Lion's own betas.
    """

    name = "lion"
    default_betas = (0.9, 0.99)
    multi_tensor = True

    def init_state(self, beta: Tensor) -> MetaState:
        return {"exp_avg": torch.zeros_like(beta)}

    def update(self, beta: Tensor, z: Tensor, state: MetaState) -> tuple[Tensor, MetaState]:
        assert self.betas is not None
        c, rho = self.betas
        exp_avg = state["exp_avg"]
        new_beta = beta - self.meta_lr * exp_avg.lerp(z, 1.0 - c).sign()
        return new_beta, {"exp_avg": exp_avg.lerp(z, 1.0 - rho)}

    def foreach_update_(
        self, betas: list[Tensor], zs: list[Tensor], states: dict[str, list[Tensor]]
    ) -> None:
        assert self.betas is not None
        c, rho = self.betas
        exp_avgs = states["exp_avg"]
        signs = torch._foreach_lerp(exp_avgs, zs, 1.0 - c)
        torch._foreach_sign_(signs)
        torch._foreach_add_(betas, signs, alpha=-self.meta_lr)
        torch._foreach_lerp_(exp_avgs, zs, 1.0 - rho)


class Auto(MetaRule):
    r"""The tuning-free default: AdaGrad on β driven by a normalised meta-gradient.

    Per block (docs/math.md §14 derives it):

    .. math::
        s \leftarrow \max(|z|,\ s + (1-\lambda)(|z| - s)), \quad
        \hat z = z / s \in [-1, 1], \quad
        G \leftarrow \rho\,G + \hat z^2, \quad
        \beta \leftarrow \beta - \eta\,\hat z / \sqrt{G}.

    ``s`` is Autostep's running scale of the meta-gradient (it jumps up at once and decays
    slowly), so the rule does not depend on the scale of the loss or of the gradients. The
    AdaGrad sum ``G`` makes the movement follow the meta-gradient's signal: while ``ẑ`` keeps
    its sign, ``β`` moves by about ``2η√t`` in ``t`` steps (fast, geometric growth of α); when
    its sign is random the expected drift grows only like ``η√(log t)``. No single step moves
    ``β`` by more than ``η``, and ``z = 0`` moves nothing.

    ``meta_betas = (λ, ρ)``, default ``(0.999, 1.0)``: the decay of the scale, and the
    forgetting of the squared sum (1: plain AdaGrad).
    """

    name = "auto"
    default_betas = (0.999, 1.0)
    betas_one_allowed = (False, True)
    default_lr = 0.5
    multi_tensor = True

    def init_state(self, beta: Tensor) -> MetaState:
        zeros = torch.zeros_like(beta)
        return {"scale": zeros, "sum_sq": zeros.clone()}

    def update(self, beta: Tensor, z: Tensor, state: MetaState) -> tuple[Tensor, MetaState]:
        assert self.betas is not None
        decay, keep = self.betas
        size = z.abs()
        scale = torch.maximum(size, state["scale"].lerp(size, 1.0 - decay))
        positive = scale > 0
        z_hat = torch.where(positive, z / torch.where(positive, scale, 1.0), 0.0)
        sum_sq = state["sum_sq"] * keep + z_hat * z_hat
        nonzero = sum_sq > 0
        step = torch.where(nonzero, z_hat / sqrt(torch.where(nonzero, sum_sq, 1.0)), 0.0)
        return beta - self.meta_lr * step, {"scale": scale, "sum_sq": sum_sq}

    def update_floats(
        self, beta: list[float], z: list[float], state: dict[str, list[float]]
    ) -> tuple[list[float], dict[str, list[float]]]:
        assert self.betas is not None
        decay, keep = self.betas
        weight = 1.0 - decay
        new_beta, new_scale, new_sum = [], [], []
        for b, g, s, total in zip(beta, z, state["scale"], state["sum_sq"], strict=True):
            size = abs(g)
            scale = max(size, _lerp(s, size, weight))
            z_hat = g / scale if scale > 0.0 else 0.0
            total = total * keep + z_hat * z_hat
            step = z_hat / math.sqrt(total) if total > 0.0 else 0.0
            new_beta.append(b - self.meta_lr * step)
            new_scale.append(scale)
            new_sum.append(total)
        return new_beta, {"scale": new_scale, "sum_sq": new_sum}

    def foreach_update_(
        self, betas: list[Tensor], zs: list[Tensor], states: dict[str, list[Tensor]]
    ) -> None:
        assert self.betas is not None
        decay, keep = self.betas
        tiny = _smallest_positive(zs[0].dtype)
        scales, sums = states["scale"], states["sum_sq"]
        work = torch._foreach_abs(zs)  # |z|: the one new tensor per parameter
        torch._foreach_lerp_(scales, work, 1.0 - decay)
        torch._foreach_maximum_(scales, work)
        # The guards of update() as exact arithmetic: s >= |z|, so s = 0 only where z = 0,
        # and every positive s is >= tiny; likewise G >= ẑ², and sign(G) zeroes the step
        # where G = 0 (as the where does, also when ẑ² underflowed).
        torch._foreach_copy_(work, scales)
        torch._foreach_clamp_min_(work, tiny)
        torch._foreach_div_(zs, work)  # ẑ
        if keep != 1.0:
            torch._foreach_mul_(sums, keep)
        torch._foreach_addcmul_(sums, zs, zs)
        torch._foreach_copy_(work, sums)
        torch._foreach_sign_(work)
        torch._foreach_mul_(zs, work)
        torch._foreach_copy_(work, sums)
        torch._foreach_clamp_min_(work, tiny)
        torch._foreach_sqrt_(work)
        torch._foreach_div_(zs, work)  # ẑ / √G, 0 where G = 0
        torch._foreach_add_(betas, zs, alpha=-self.meta_lr)


def _smallest_positive(dtype: torch.dtype) -> float:
    """The smallest positive (subnormal) number of ``dtype``: every positive value is >= it."""
    info = torch.finfo(dtype)
    return float(info.tiny) * float(info.eps)  # 2^(min exponent - mantissa bits)


def _lerp(start: float, end: float, weight: float) -> float:
    """``torch.lerp`` on floats, in its operation order."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


META_RULES: dict[str, type[MetaRule]] = {
    rule.name: rule for rule in (Fixed, SGD, RMSprop, Adam, Lion, Auto)
}


def get_meta_rule(
    name: str, meta_lr: float | None, betas: tuple[float, ...] | None, eps: float
) -> MetaRule:
    """Build the meta rule ``name`` with validated hyperparameters.

    ``meta_lr=None`` takes the rule's own default (:attr:`MetaRule.default_lr`). This is
    the one check of ``meta_lr``, ``meta_betas`` and ``meta_eps`` for every entry point
    (MetaOptimize, its load_state_dict, wrap, optax).

    Raises:
        ValueError: unknown ``name``, a negative or non-finite ``meta_lr`` or ``eps``, or
            wrong ``meta_betas``.
        TypeError: ``meta_lr`` or ``eps`` is not a number.
    """
    if not isinstance(name, str):
        raise TypeError(f"Invalid meta: {name!r}; expected a rule name")
    if name not in META_RULES:
        raise ValueError(f"Invalid meta: {name!r}; choose one of {sorted(META_RULES)}")
    rule_cls = META_RULES[name]
    if meta_lr is None:
        meta_lr = rule_cls.default_lr
    meta_lr = check_number(meta_lr, "meta_lr")
    if meta_lr < 0.0:
        raise ValueError(f"Invalid meta_lr: {meta_lr}; need meta_lr >= 0")
    expected = rule_cls.default_betas
    if betas is None:
        betas = expected
    elif expected is None:
        raise ValueError(f"Invalid meta_betas: {betas!r}; meta {name!r} takes no betas")
    else:
        betas = check_betas(betas, len(expected), "meta_betas", rule_cls.betas_one_allowed)
    eps = check_number(eps, "meta_eps")
    if eps < 0.0:
        raise ValueError(f"Invalid meta_eps: {eps}; need meta_eps >= 0")
    return rule_cls(meta_lr, betas, eps)
