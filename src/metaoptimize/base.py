"""Base update rules: turn a gradient into an unscaled direction.

A base rule owns its moment state (``exp_avg``, ``momentum_buffer``, ...) and knows nothing
about step sizes, blocks or the meta rule. The optimizer applies the step::

    decoupled decay (AdamW, Lion, paper-style SGDm/RMSProp):  Δw = -α (u + κ w)
    L2 decay (SGD, SGDm, RMSProp, Adam as in torch.optim):    Δw = -α u(g + κ w)

For L2 decay the trace needs ``∂u/∂g̃`` (the ``slope``), because the Hessian-free decay factor
of the trace is ``∂w_{t+1}/∂w_t = 1 - α κ ∂u/∂g̃`` (docs/math.md, section "Decay factors").

Every rule takes ``ok``, a 0-d tensor equal to 1.0 on a normal step and 0.0 on a step whose
gradient was not finite; with ``ok = 0`` the state is left exactly as it was. This is how the
non-finite guard works without a host synchronisation.

On CPU the optimizer passes ``ok`` as the Python float 1.0 instead (a skipped step never
reaches the rules there: reading a CPU tensor is not a device synchronisation). The rules then
take their per-step constants (bias corrections) as Python floats too, which lets torch use
its scalar kernels: division by a 0-d tensor costs twice a multiplication on CPU.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from metaoptimize._math import ema_square_, sqrt

__all__ = ["BASE_RULES", "BaseRule", "get_base_rule"]

Group = dict[str, Any]
# The trace's slope ∂u/∂g̃: a tensor (elementwise), a 0-d tensor or a float (host scalars), or
# None (decoupled decay).
Slope = Tensor | float | None


def state_dtype(param: Tensor) -> torch.dtype:
    """Dtype of optimizer state for ``param``: float32 for half-precision parameters."""
    if param.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return param.dtype


def _safe_div(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` with 0 where the denominator is 0 (a 0/0 limit here)."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), 0.0)


def rmsprop_l2_slope(
    g: Tensor,
    centred_g: Tensor,
    rms: Tensor,
    denom: Tensor,
    smoothing: float,
    *,
    host: bool = False,
) -> Tensor:
    """∂u/∂g̃ of RMSProp, u = g̃/(s+ε), s = sqrt(v - ḡ²): docs/math.md §4."""
    if host:
        return _lean_slope(g, centred_g, 1.0 - smoothing, rms, denom, 1.0)
    return 1.0 / denom - _safe_div((1.0 - smoothing) * g * centred_g, rms * denom * denom)


def adam_l2_slope(
    g: Tensor,
    m_hat: Tensor,
    rms: Tensor,
    denom: Tensor,
    c1: Tensor | float,
    c2: Tensor | float,
) -> Tensor:
    """∂u/∂g̃ of Adam, u = m̂/(√v̂+ε): c1/(√v̂+ε) - c2 m̂ g̃/(√v̂ (√v̂+ε)²), docs/math.md §4."""
    return c1 / denom - _safe_div(c2 * m_hat * g, rms * denom * denom)


def _lean_slope(
    a: Tensor, b: Tensor, c: float, rms: Tensor, denom: Tensor | float, c1: float
) -> Tensor:
    """``(c1 - c a b / (rms denom)) / denom`` in one temporary, 0/0 taken as 0.

    The same slope as the general form (and :func:`_safe_div`'s 0/0 limit) with far fewer
    allocations, for the CPU path, where each large allocation and each comparison costs more
    than the arithmetic.
    """
    ratio = torch.mul(a, b).mul_(c).div_(rms).div_(denom)
    return ratio.nan_to_num_(0.0, 0.0, 0.0).neg_().add_(c1).div_(denom)


def _bias_correction(beta: float, step: Tensor, ok: Tensor | float) -> Tensor | float:
    """``1 - β^t``: a Python float with host scalars (``ok`` a float), else a 0-d tensor."""
    if isinstance(ok, float):
        return 1.0 - beta ** max(step.item(), 1.0)
    # step is clamped to 1 so a step skipped before any real step never divides by zero.
    return 1.0 - torch.pow(beta, step.clamp_min(1.0))


def _sqrt_scalar(value: Tensor | float) -> Tensor | float:
    return math.sqrt(value) if isinstance(value, float) else value.sqrt()


class BaseRule:
    """Interface of a base rule. Subclasses set the class attributes and implement the hooks."""

    name: ClassVar[str]
    #: True when weight decay is applied as ``-α κ w`` outside the direction (AdamW style).
    decoupled_weight_decay: ClassVar[bool]
    #: Default ``betas``; None when the rule takes no betas.
    default_betas: ClassVar[tuple[float, ...] | None] = None
    #: Default ``momentum`` (None: the rule takes no momentum).
    default_momentum: ClassVar[float | None] = None
    #: Default ``(alpha_min, alpha_max)``: the learned step size never leaves this range. A
    #: normalised direction (Adam, RMSProp, Lion) moves each weight by about α, so α above 1
    #: or below 1e-10 is never useful; an SGD step's size depends on the gradient's scale.
    default_alpha_range: ClassVar[tuple[float, float]] = (1e-10, 1.0)
    #: Hyperparameters that must keep their neutral value for this rule.
    unsupported: ClassVar[tuple[str, ...]] = ()

    def check_group(self, group: Group) -> None:
        """Validate the rule's hyperparameters in ``group``; raise ValueError naming them."""
        neutral = {"momentum": 0.0, "dampening": 0.0, "nesterov": False, "centered": False}
        for key in self.unsupported:
            if group[key] not in (neutral[key], None):
                raise ValueError(
                    f"Invalid {key}: {group[key]!r}; base {self.name!r} "
                    f"(base_style={group['base_style']!r}) does not use {key}"
                )

    def init_state(self, param: Tensor, group: Group) -> dict[str, Tensor]:
        """Return the rule's zero-initialised state for ``param``."""
        raise NotImplementedError

    def direction(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[Tensor, Slope]:
        """Update the rule's state in place and return ``(u, ∂u/∂g̃ or None)``."""
        raise NotImplementedError


def _zeros(param: Tensor) -> Tensor:
    return torch.zeros_like(param, dtype=state_dtype(param), memory_format=torch.preserve_format)


def _step(param: Tensor) -> Tensor:
    return torch.zeros((), dtype=state_dtype(param), device=param.device)


def has_decay(weight_decay: float | Tensor) -> bool:
    """Whether weight decay is on; a tensor (a learned weight decay) always counts as on.

    Never reads a tensor's value, so no host synchronisation.
    """
    return isinstance(weight_decay, Tensor) or weight_decay != 0.0


def _l2(grad: Tensor, param: Tensor, weight_decay: float | Tensor) -> Tensor:
    if isinstance(weight_decay, Tensor):
        return grad + weight_decay * param.to(grad.dtype)
    if weight_decay == 0.0:
        return grad
    return grad.add(param.to(grad.dtype), alpha=weight_decay)


class SGD(BaseRule):
    """Plain SGD, ``u = g + κ w`` (torch.optim.SGD with momentum 0)."""

    name = "sgd"
    default_alpha_range = (1e-12, 1e6)
    decoupled_weight_decay = False
    unsupported = ("momentum", "dampening", "nesterov", "centered")

    def init_state(self, param: Tensor, group: Group) -> dict[str, Tensor]:
        return {}

    def direction(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[Tensor, Slope]:
        kappa = group["weight_decay"]
        if not has_decay(kappa):
            return _l2(grad, param, kappa), None
        return _l2(grad, param, kappa), (1.0 if isinstance(ok, float) else ok.new_ones(()))


class SGDMomentum(BaseRule):
    """SGD with heavy-ball or Nesterov momentum.

    ``base_style="torch"`` (default) equals torch.optim.SGD: ``b ← μ b + (1-d) g̃`` with
    ``b₁ = g̃``, L2 weight decay, optional Nesterov. ``base_style="paper"`` is the paper's
    Algorithm 3: an EMA ``m ← ρ m + (1-ρ) g`` whose *previous* value drives the step (lagged by
    one step) and decoupled weight decay.
    """

    name = "sgdm"
    default_alpha_range = (1e-12, 1e6)
    decoupled_weight_decay = False
    default_momentum = 0.9

    def check_group(self, group: Group) -> None:
        momentum, dampening = group["momentum"], group["dampening"]
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"Invalid momentum: {momentum}; base 'sgdm' needs 0 < momentum < 1")
        if group["centered"]:
            raise ValueError("Invalid centered: True; base 'sgdm' has no centered variant")
        if group["base_style"] == "paper":
            if dampening != 0.0 or group["nesterov"]:
                raise ValueError(
                    "Invalid dampening/nesterov: base_style='paper' SGDm is an EMA without "
                    "dampening or Nesterov"
                )
        elif group["nesterov"] and dampening != 0.0:
            raise ValueError("Invalid nesterov: Nesterov momentum requires dampening=0")

    def init_state(self, param: Tensor, group: Group) -> dict[str, Tensor]:
        return {"step": _step(param), "momentum_buffer": _zeros(param)}

    def direction(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[Tensor, Slope]:
        mu, buf = group["momentum"], state["momentum_buffer"]
        if group["base_style"] == "paper":
            lagged = buf.clone()  # the paper steps with m_t, then updates m
            buf.lerp_(grad, ok * (1.0 - mu))
            return lagged, None
        kappa = group["weight_decay"]
        g = _l2(grad, param, kappa)
        step = state["step"]
        # torch.optim.SGD starts the buffer at g̃ (no dampening on the first step).
        coef: Tensor | float
        if isinstance(ok, float):
            host_coef = 1.0 - group["dampening"] * float(step.item() > 0)
            buf.mul_(1.0 + ok * (mu - 1.0)).add_(g, alpha=ok * host_coef)
            coef = host_coef
        else:
            coef = 1.0 - group["dampening"] * (step > 0).to(step.dtype)
            buf.mul_(1.0 + ok * (mu - 1.0)).add_(g * (ok * coef))
        step.add_(ok)
        if group["nesterov"]:
            return g.add(buf, alpha=mu), (1.0 + mu * coef if has_decay(kappa) else None)
        return buf, (coef if has_decay(kappa) else None)


class RMSprop(BaseRule):
    """RMSProp.

    ``base_style="torch"`` (default) equals torch.optim.RMSprop (smoothing ``betas[0]``, eps
    outside the square root, optional ``centered`` and ``momentum``, L2 weight decay).
    ``base_style="paper"`` follows the released code: a bias-corrected average
    ``v̂ = v/(1-λ^t)``, ``u = g/(√v̂ + ε)`` and decoupled weight decay.
    """

    name = "rmsprop"
    decoupled_weight_decay = False
    default_betas = (0.99,)
    default_momentum = 0.0

    def check_group(self, group: Group) -> None:
        if group["momentum"] < 0.0 or group["momentum"] >= 1.0:
            raise ValueError(f"Invalid momentum: {group['momentum']}; need 0 <= momentum < 1")
        if group["nesterov"] or group["dampening"] != 0.0:
            raise ValueError("Invalid nesterov/dampening: base 'rmsprop' does not use them")
        if group["base_style"] == "paper" and (group["momentum"] or group["centered"]):
            raise ValueError(
                "Invalid momentum/centered: base_style='paper' RMSProp has neither momentum "
                "nor a centered variant"
            )

    def init_state(self, param: Tensor, group: Group) -> dict[str, Tensor]:
        state = {"step": _step(param), "square_avg": _zeros(param)}
        if group["centered"]:
            state["grad_avg"] = _zeros(param)
        if group["momentum"] > 0.0:
            state["momentum_buffer"] = _zeros(param)
        return state

    def direction(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[Tensor, Slope]:
        (smoothing,) = group["betas"]
        eps, kappa = group["eps"], group["weight_decay"]
        square_avg, step = state["square_avg"], state["step"]
        step.add_(ok)
        if group["base_style"] == "paper":
            ema_square_(square_avg, grad, ok * (1.0 - smoothing))
            rms = sqrt(square_avg / _bias_correction(smoothing, step, ok), inplace=True)
            return grad / rms.add_(eps), None
        g = _l2(grad, param, kappa)
        ema_square_(square_avg, g, ok * (1.0 - smoothing))
        if group["centered"]:
            grad_avg = state["grad_avg"]
            grad_avg.lerp_(g, ok * (1.0 - smoothing))
            rms = sqrt(square_avg.addcmul(grad_avg, grad_avg, value=-1.0), inplace=True)
        else:
            grad_avg = None
            rms = sqrt(square_avg)
        denom = rms + eps
        u = g / denom
        if group["momentum"] > 0.0:
            buf = state["momentum_buffer"]
            buf.mul_(1.0 + ok * (group["momentum"] - 1.0))
            buf.add_(u, alpha=ok) if isinstance(ok, float) else buf.add_(u * ok)
            u = buf
        if not has_decay(kappa):
            return u, None
        # ∂(g̃/(s+ε))/∂g̃ with s = sqrt(v - ḡ²), ∂s/∂g̃ = (1-a)(g̃ - ḡ)/s.
        centred_g = g if grad_avg is None else g - grad_avg
        host = isinstance(ok, float)
        return u, rmsprop_l2_slope(g, centred_g, rms, denom, smoothing, host=host)


class Adam(BaseRule):
    """Adam with L2 weight decay, equal to torch.optim.Adam (amsgrad=False)."""

    name = "adam"
    decoupled_weight_decay = False
    default_betas = (0.9, 0.999)
    unsupported = ("momentum", "dampening", "nesterov", "centered")

    def init_state(self, param: Tensor, group: Group) -> dict[str, Tensor]:
        return {"step": _step(param), "exp_avg": _zeros(param), "exp_avg_sq": _zeros(param)}

    def direction(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[Tensor, Slope]:
        beta1, beta2 = group["betas"]
        kappa = group["weight_decay"] if not self.decoupled_weight_decay else 0.0
        g = _l2(grad, param, kappa)
        step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
        step.add_(ok)
        exp_avg.lerp_(g, ok * (1.0 - beta1))
        ema_square_(exp_avg_sq, g, ok * (1.0 - beta2))
        bias1 = _bias_correction(beta1, step, ok)
        bias2 = _bias_correction(beta2, step, ok)
        rms = sqrt(exp_avg_sq).div_(_sqrt_scalar(bias2))  # sqrt(v̂), on a fresh tensor
        if not has_decay(kappa):
            # u = m̂/(√v̂+ε) built in that one temporary: on CPU every large allocation costs
            # page faults, more than the arithmetic.
            return rms.add_(group["eps"]).reciprocal_().mul_(exp_avg).div_(bias1), None
        denom = rms + group["eps"]
        # ∂u/∂g̃ = c1/(√v̂+ε) - c2 m̂ g̃ / (√v̂ (√v̂+ε)²), c1 = (1-β1)/bc1, c2 = (1-β2)/bc2.
        c1, c2 = (1.0 - beta1) / bias1, (1.0 - beta2) / bias2
        if isinstance(c1, float) and isinstance(c2, float):
            # Host scalars: the same slope as (c1 - c2 u g̃ / √v̂) / (√v̂+ε), u = m̂/(√v̂+ε),
            # in two temporaries instead of eight.
            u = exp_avg.div(denom).div_(bias1)
            return u, _lean_slope(u, g, c2, rms, 1.0, c1).div_(denom)
        m_hat = exp_avg / bias1
        u = m_hat / denom
        return u, adam_l2_slope(g, m_hat, rms, denom, c1, c2)


class AdamW(Adam):
    """Adam with decoupled weight decay, equal to torch.optim.AdamW (amsgrad=False)."""

    name = "adamw"
    decoupled_weight_decay = True


class Lion(BaseRule):
    """Lion (Chen et al. 2023): ``u = sign(β1 m + (1-β1) g)``, then ``m ← β2 m + (1-β2) g``.

    The paper writes ``c`` for β1 (interpolation) and ``ρ`` for β2 (momentum); defaults
    ``betas=(0.9, 0.99)``. Weight decay is decoupled.
    """

    name = "lion"
    decoupled_weight_decay = True
    default_betas = (0.9, 0.99)
    unsupported = ("momentum", "dampening", "nesterov", "centered")

    def init_state(self, param: Tensor, group: Group) -> dict[str, Tensor]:
        return {"exp_avg": _zeros(param)}

    def direction(
        self,
        param: Tensor,
        grad: Tensor,
        state: dict[str, Tensor],
        group: Group,
        ok: Tensor | float,
    ) -> tuple[Tensor, Slope]:
        beta1, beta2 = group["betas"]
        exp_avg = state["exp_avg"]
        u = exp_avg.lerp(grad, 1.0 - beta1).sign_()
        exp_avg.lerp_(grad, ok * (1.0 - beta2))
        return u, None


BASE_RULES: dict[str, type[BaseRule]] = {
    rule.name: rule for rule in (SGD, SGDMomentum, RMSprop, Adam, AdamW, Lion)
}


def get_base_rule(name: str) -> BaseRule:
    """Return the base rule registered under ``name``.

    Raises:
        ValueError: ``name`` is not a known base rule.
    """
    if name not in BASE_RULES:
        raise ValueError(f"Invalid base: {name!r}; choose one of {sorted(BASE_RULES)}")
    return BASE_RULES[name]()


def is_decoupled(rule: BaseRule, group: Group) -> bool:
    """Whether weight decay is applied outside the direction for this rule and group."""
    if group["base_style"] == "paper" and rule.name in ("sgdm", "rmsprop"):
        return True
    return rule.decoupled_weight_decay
