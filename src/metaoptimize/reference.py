"""A slow, readable reference implementation of Hessian-free MetaOptimize.

This file is the ground truth the fast optimizer is tested against. It is written to be read
next to the paper (Algorithm 3 and Appendix A), not to be fast:

* every base rule is a pure, out-of-place function ``w_{t+1} = step(w_t, g_t, state, α)``;
* the trace's two ingredients are taken from that function by autograd, not derived by hand:
  ``D = ∂w_{t+1}/∂w_t`` with the gradient held fixed (the Hessian-free approximation) and the
  base state held fixed (its traces vanish for decoupled weight decay), and ``∂w_{t+1}/∂β_t``;
* blocks are an index per element of the flattened parameter vector, and ``z`` is an
  ``index_add`` of ``h ⊙ g`` over that index.

It shares no update code with :mod:`metaoptimize.optimizer`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from metaoptimize.base import BASE_RULES
from metaoptimize.meta import META_RULES

__all__ = ["ReferenceMetaOptimize", "reference_base_step"]


def reference_base_step(
    base: str,
    w: Tensor,
    g: Tensor,
    state: dict[str, Tensor],
    t: int,
    alpha: Tensor,
    hp: Mapping[str, Any],
) -> tuple[Tensor, dict[str, Tensor]]:
    """One base step written out of place (differentiable in ``w`` and ``alpha``).

    Args:
        base: base rule name.
        w: weights ``w_t``.
        g: gradient ``∇f_t(w_t)``, treated as a constant (Hessian-free).
        state: base state before the step (missing entries mean zero).
        t: number of steps this parameter has taken before this one.
        alpha: per-element step size.
        hp: hyperparameters (weight_decay, betas, momentum, dampening, nesterov, centered,
            eps, base_style).

    Returns:
        ``(w_{t+1}, new state)``.
    """
    kappa, eps, paper = hp["weight_decay"], hp["eps"], hp["base_style"] == "paper"
    zero = torch.zeros_like(w)
    s = {k: state.get(k, zero) for k in ("m", "v", "gbar", "buf")}
    if base == "sgd":
        return w - alpha * (g + kappa * w), {}
    if base == "sgdm" and paper:
        rho = hp["momentum"]
        # Algorithm 3: the step uses the previous momentum m_t (lagged), then m is updated.
        return w - alpha * (s["m"] + kappa * w), {"m": rho * s["m"] + (1 - rho) * g}
    if base == "sgdm":
        mu, damp = hp["momentum"], hp["dampening"]
        gt = g + kappa * w
        buf = gt if t == 0 else mu * s["buf"] + (1 - damp) * gt
        direction = gt + mu * buf if hp["nesterov"] else buf
        return w - alpha * direction, {"buf": buf}
    if base == "rmsprop" and paper:
        (lam,) = hp["betas"]
        v = lam * s["v"] + (1 - lam) * g**2
        v_hat = v / (1 - lam ** (t + 1))
        return w - alpha * (g / (torch.sqrt(v_hat) + eps) + kappa * w), {"v": v}
    if base == "rmsprop":
        (a,) = hp["betas"]
        gt = g + kappa * w
        v = a * s["v"] + (1 - a) * gt**2
        new: dict[str, Tensor] = {"v": v}
        if hp["centered"]:
            gbar = a * s["gbar"] + (1 - a) * gt
            new["gbar"] = gbar
            rms = torch.sqrt(v - gbar**2)
        else:
            rms = torch.sqrt(v)
        direction = gt / (rms + eps)
        if hp["momentum"] > 0:
            new["buf"] = hp["momentum"] * s["buf"] + direction
            direction = new["buf"]
        return w - alpha * direction, new
    if base in ("adam", "adamw"):
        b1, b2 = hp["betas"]
        gt = g + kappa * w if base == "adam" else g
        m = b1 * s["m"] + (1 - b1) * gt
        v = b2 * s["v"] + (1 - b2) * gt**2
        m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
        direction = m_hat / (torch.sqrt(v_hat) + eps)
        if base == "adamw":
            direction = direction + kappa * w
        return w - alpha * direction, {"m": m, "v": v}
    if base == "lion":
        b1, b2 = hp["betas"]
        direction = torch.sign(b1 * s["m"] + (1 - b1) * g) + kappa * w
        return w - alpha * direction, {"m": b2 * s["m"] + (1 - b2) * g}
    raise ValueError(f"Invalid base: {base!r}")


class ReferenceMetaOptimize:
    """Reference Hessian-free MetaOptimize; same arguments as :class:`MetaOptimize`.

    Not a ``torch.optim.Optimizer``: it reads ``p.grad`` and writes ``p`` in ``step()``, syncs
    with the host freely, and is meant for tests and for reading.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base: str = "adamw",
        meta: str = "lion",
        *,
        blocks: str | Sequence[Sequence[Tensor]] = "scalar",
        meta_lr: float = 1e-3,
        meta_betas: tuple[float, ...] | None = None,
        meta_eps: float = 1e-8,
        alpha_min: float | None = None,
        alpha_max: float | None = None,
        **group_defaults: Any,
    ) -> None:
        given = list(params)
        groups: list[dict[str, Any]] = (
            [{"params": given}] if not isinstance(given[0], dict) else list(given)  # type: ignore[arg-type]
        )
        defaults = {
            "lr": 1.0,
            "alpha0": 1e-6,
            "gamma": 1.0,
            "weight_decay": 0.0,
            "betas": None,
            "momentum": None,
            "dampening": 0.0,
            "nesterov": False,
            "centered": False,
            "eps": 1e-8,
            "base_style": "torch",
            **group_defaults,
        }
        self.groups = [{**defaults, **g, "params": list(g["params"])} for g in groups]
        for g in self.groups:
            # Defaults (not update math) come from the rule registries.
            g["betas"] = g["betas"] or BASE_RULES[base].default_betas
            if g["momentum"] is None:
                g["momentum"] = BASE_RULES[base].default_momentum or 0.0
        self.base, self.meta, self.meta_lr, self.meta_eps = base, meta, meta_lr, meta_eps
        self.meta_betas: tuple[float, ...] = meta_betas or META_RULES[meta].default_betas or ()
        self.log_min = math.log(alpha_min) if alpha_min else -math.inf
        self.log_max = math.log(alpha_max) if alpha_max else math.inf
        self.params = [p for g in self.groups for p in g["params"]]
        self.group_of = [g for g in self.groups for _ in g["params"]]

        # Block id of every element of the flattened parameter vector.
        sizes = [p.numel() for p in self.params]
        if blocks == "scalar":
            block_of_param = [0] * len(self.params)
        elif blocks == "group":
            block_of_param = [i for i, g in enumerate(self.groups) for _ in g["params"]]
        elif blocks in ("tensor", "layerwise", "weight"):
            block_of_param = list(range(len(self.params)))
        else:
            assert not isinstance(blocks, str)
            owner = {id(p): b for b, members in enumerate(blocks) for p in members}
            block_of_param = [owner[id(p)] for p in self.params]
        if blocks == "weight":
            self.element_block = torch.arange(sum(sizes))
        else:
            self.element_block = torch.cat(
                [
                    torch.full((n,), b, dtype=torch.int64)
                    for n, b in zip(sizes, block_of_param, strict=True)
                ]
            )
        num_blocks = int(self.element_block.max()) + 1
        dtype = self.params[0].dtype
        alpha0_elem = torch.cat(
            [torch.full((n,), self.group_of[i]["alpha0"], dtype=dtype) for i, n in enumerate(sizes)]
        )
        # β_b = log alpha0 of the block's parameters (which must agree within a block).
        self.log_alpha = torch.zeros(num_blocks, dtype=dtype).index_copy_(
            0, self.element_block, alpha0_elem.log()
        )
        if not torch.equal(self.log_alpha[self.element_block], alpha0_elem.log()):
            raise ValueError("Invalid alpha0: a block spans groups with different alpha0")
        self.meta_state = {k: torch.zeros(num_blocks, dtype=dtype) for k in ("m", "v", "t")}
        self.trace = [torch.zeros_like(p) for p in self.params]
        self.base_state: list[dict[str, Tensor]] = [{} for _ in self.params]
        self.steps_taken = [0] * len(self.params)
        self.offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        self.skipped_steps = 0

    def step_sizes(self) -> Tensor:
        """``exp(β)`` per block (per element for ``blocks="weight"``)."""
        return self.log_alpha.exp()

    @torch.no_grad()
    def step(self) -> None:
        """One step of Algorithm 3 (Hessian-free, 2×2) over every parameter with a gradient."""
        active = [i for i, p in enumerate(self.params) if p.grad is not None]
        if not active:
            return
        grads = {i: self.params[i].grad.detach().clone() for i in active}
        # z_b = Σ_{i∈b} h_i g_i with the trace from before this step.
        element_ids = torch.cat([self._elements(i) for i in active])
        products = torch.cat([(self.trace[i] * grads[i]).flatten() for i in active])
        z = torch.zeros_like(self.log_alpha).index_add_(
            0, self.element_block[element_ids], products
        )
        if not all(torch.isfinite(g).all() for g in grads.values()) or not torch.isfinite(z).all():
            self.skipped_steps += 1
            return
        for i in active:
            self._base_and_trace(i, grads[i])
        self._meta_update(z, torch.unique(self.element_block[element_ids]))

    def _elements(self, i: int) -> Tensor:
        return torch.arange(self.offsets[i], self.offsets[i + 1])

    def _base_and_trace(self, i: int, g: Tensor) -> None:
        p, group = self.params[i], self.group_of[i]
        log_alpha = self.log_alpha[self.element_block[self._elements(i)]].view_as(p)
        with torch.enable_grad():
            w = p.detach().clone().requires_grad_(True)
            a = log_alpha.clone().requires_grad_(True)
            w_next, new_state = reference_base_step(
                self.base,
                w,
                g,
                self.base_state[i],
                self.steps_taken[i],
                group["lr"] * torch.exp(a),
                group,
            )
            # The map is elementwise, so the gradient of the sum is the Jacobian's diagonal.
            d_w, d_beta = torch.autograd.grad(w_next.sum(), (w, a))
        self.trace[i] = group["gamma"] * d_w * self.trace[i] + d_beta
        p.copy_(w_next.detach())
        self.base_state[i] = {k: v.detach() for k, v in new_state.items()}
        self.steps_taken[i] += 1

    def _meta_update(self, z: Tensor, active_blocks: Tensor) -> None:
        beta, s, eta = self.log_alpha, self.meta_state, self.meta_lr
        new_beta, new_m, new_v, new_t = beta.clone(), s["m"].clone(), s["v"].clone(), s["t"] + 1
        if self.meta == "sgd":
            new_beta = beta - eta * z
        elif self.meta == "lion":
            c, rho = self.meta_betas
            new_beta = beta - eta * torch.sign(c * s["m"] + (1 - c) * z)
            new_m = rho * s["m"] + (1 - rho) * z
        elif self.meta == "adam":
            b1, b2 = self.meta_betas
            new_m = b1 * s["m"] + (1 - b1) * z
            new_v = b2 * s["v"] + (1 - b2) * z**2
            m_hat, v_hat = new_m / (1 - b1**new_t), new_v / (1 - b2**new_t)
            new_beta = beta - eta * m_hat / (torch.sqrt(v_hat) + self.meta_eps)
        elif self.meta == "auto":
            # m: running scale of |z| (jumps up, decays slowly); v: sum of squared z / scale.
            lam, rho = self.meta_betas
            new_m = torch.maximum(z.abs(), lam * s["m"] + (1 - lam) * z.abs())
            z_hat = torch.where(new_m > 0, z / new_m, torch.zeros_like(z))
            new_v = rho * s["v"] + z_hat**2
            new_beta = beta - eta * torch.where(new_v > 0, z_hat / new_v.sqrt(), 0 * z_hat)
        elif self.meta == "rmsprop":
            (lam,) = self.meta_betas
            new_v = lam * s["v"] + (1 - lam) * z**2
            v_hat = new_v / (1 - lam**new_t)
            new_beta = beta - eta * z / (torch.sqrt(v_hat) + self.meta_eps)
        new_beta = new_beta.clamp(self.log_min, self.log_max)
        for current, new in ((beta, new_beta), (s["m"], new_m), (s["v"], new_v), (s["t"], new_t)):
            current[active_blocks] = new[active_blocks]
