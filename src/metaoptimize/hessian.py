r"""Hessian traces: the paper's Algorithm 1 in its L- and 2×2-approximations.

The Hessian-free trace (the default) drops every Hessian term of the step's Jacobian ``G_t``.
``trace="hessian"`` keeps them. The trace is then the tangent of the optimizer's state with
respect to the log step sizes, and one step propagates it exactly as a forward-mode derivative
(docs/math.md §13):

.. math::
    X_{t+1} = G^{xy}_t\,B_t + \gamma\, G^{xx}_t X_t, \qquad
    B_t = \gamma Y_t + (1-\gamma) I

``G^{xx}`` is the base step's Jacobian with respect to its state ``x = (w, m, v, ...)``; the
gradient's own tangent is a Hessian-vector product ``∇²f · γX^w``. ``G^{xy}`` is the step's
derivative with respect to ``β``. Both are taken by forward-mode automatic differentiation
through the same base rule the optimizer runs, so every base rule gets them without
hand-derived Jacobians.

* L-approximation: ``Y_t = I`` (the meta update's dependence on the weights is dropped), so
  ``B_t = I``.
* 2×2-approximation: ``Y`` (``β`` and the meta rule's state, one column per block) follows
  ``Y_{t+1} = G^{yy}_t B_t + G^{yx}_t γ X_t``; ``G^{yx}`` enters through ``z``'s tangent
  ``X_bᵀ ∇²f γX_c``. Lion meta has ``G^{yx} = 0`` (sign), so there 2×2 equals L.

Columns: block-level modes keep one trace column per block (``X`` is ``n × m``; exact within
the approximation; ``m`` Hessian-vector products per step). ``blocks="weight"`` keeps a single
shared column: the trace of a common shift of every ``β`` (Schraudolph's SMD uses the same
vector), and ``z_i = X_i g_i`` as in the Hessian-free trace (L only).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from metaoptimize._math import forward_mode
from metaoptimize.base import BaseRule
from metaoptimize.meta import MetaRule

__all__ = [
    "APPROXIMATIONS",
    "TRACES",
    "base_step_with_tangent",
    "hessian_vector_products",
    "meta_step_tangent",
]

TRACES = ("hessian-free", "hessian")
APPROXIMATIONS = ("L", "2x2")
#: Prefix of the base-state trace keys (``trace_exp_avg`` is the trace of ``exp_avg``).
STATE_TRACE_PREFIX = "trace_"


def _make_dual(primal: Tensor, tangent: Tensor) -> Tensor:
    with warnings.catch_warnings():
        # The first make_dual loads torch's forward-AD decompositions, which call
        # torch.jit.script and warn (torch 2.13) about torch's own internals.
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", DeprecationWarning)
        dual: Tensor = fwAD.make_dual(primal, tangent)  # type: ignore[no-untyped-call]
    return dual


def _unpack_dual(dual: Tensor) -> tuple[Tensor, Tensor | None]:
    unpacked = fwAD.unpack_dual(dual)  # type: ignore[no-untyped-call]
    return unpacked.primal, unpacked.tangent


def traced_state_keys(state: dict[str, Any]) -> list[str]:
    """The base-state tensors that carry a trace (all but the step counter)."""
    return [key for key, value in state.items() if isinstance(value, Tensor) and key != "step"]


def _tangent(dual: Tensor) -> Tensor:
    """The tangent of ``dual`` (zeros where nothing depended on the inputs' tangents)."""
    primal, tangent = _unpack_dual(dual)
    return torch.zeros_like(primal) if tangent is None else tangent


def base_step_with_tangent(
    rule: BaseRule,
    param: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    keys: Sequence[str],
    group: dict[str, Any],
    ok: Tensor,
    alpha: Tensor,
    decoupled: bool,
    tangents: tuple[Tensor, Tensor, Tensor, dict[str, Tensor]],
) -> tuple[Tensor, dict[str, Tensor], Tensor, dict[str, Tensor]]:
    """One base step on dual numbers, out of place.

    Args:
        rule: the base rule.
        param: weights before the step (unchanged).
        grad: gradient at ``param``.
        state: base state before the step (unchanged).
        keys: the state entries that carry a tangent.
        group: the param group.
        ok: 1.0 on a normal step, 0.0 on a skipped one (as for the rules).
        alpha: effective step size (already multiplied by ``ok``).
        decoupled: whether weight decay is decoupled.
        tangents: ``(ẇ, ġ, α̇, {key: ṡ})``.

    Returns:
        ``(w_{t+1}, new state, ẇ_{t+1}, {key: ṡ_{t+1}})``.
    """
    tangent_param, tangent_grad, tangent_alpha, tangent_state = tangents
    with fwAD.dual_level(), forward_mode():
        w = _make_dual(param, tangent_param)
        g = _make_dual(grad, tangent_grad)
        a = _make_dual(alpha, tangent_alpha)
        dual_state = {
            key: _make_dual(value.clone(), tangent_state[key]) if key in keys else value.clone()
            for key, value in state.items()
        }
        u, _ = rule.direction(w, g, dual_state, group, ok)
        kappa = group["weight_decay"]
        if decoupled and kappa:
            u = u + kappa * w
        new_w = w - a * u
        new_state = {key: _unpack_dual(value)[0] for key, value in dual_state.items()}
        state_tangents = {key: _tangent(dual_state[key]) for key in keys}
        return _unpack_dual(new_w)[0], new_state, _tangent(new_w), state_tangents


def hessian_vector_products(
    graph_grads: Sequence[Tensor | None],
    params: Sequence[Tensor],
    vectors: Sequence[Tensor],
    retain_graph: bool,
) -> list[Tensor]:
    """``∇²f · v`` for each parameter, by a second backward pass through ``graph_grads``.

    ``graph_grads`` are the gradients taken with ``create_graph=True``; a gradient that does
    not depend on any parameter (a loss linear in it) contributes nothing.
    """
    pairs = [
        (grad, vector)
        for grad, vector in zip(graph_grads, vectors, strict=True)
        if grad is not None and grad.requires_grad
    ]
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    outputs, grad_outputs = zip(*pairs, strict=True)
    try:
        products: tuple[Tensor | None, ...] = torch.autograd.grad(
            outputs, params, grad_outputs=grad_outputs, retain_graph=retain_graph, allow_unused=True
        )
    except RuntimeError as error:
        raise RuntimeError(
            "MetaOptimize(trace='hessian'): a Hessian-vector product failed; every operation "
            "in the loss must be twice differentiable (for scaled_dot_product_attention use "
            "the math backend: torch.nn.attention.sdpa_kernel(SDPBackend.MATH)). "
            f"PyTorch said: {error}"
        ) from error
    return [
        torch.zeros_like(p) if hv is None else hv.detach()
        for p, hv in zip(params, products, strict=True)
    ]


def meta_step_tangent(
    rule: MetaRule,
    log_alpha: Tensor,
    meta_state: dict[str, Tensor],
    z: Tensor,
    bounds: tuple[float, float],
    tangents: tuple[Tensor, dict[str, Tensor], Tensor],
) -> tuple[Tensor, dict[str, Tensor]]:
    """Tangents of the meta step (``β`` and the meta state) for one trace column.

    Args:
        rule: the meta rule.
        log_alpha: ``β`` before the meta step (unchanged).
        meta_state: the meta rule's state (unchanged).
        z: the meta-gradient.
        bounds: the ``(log alpha_min, log alpha_max)`` clamp.
        tangents: ``(β̇, {key: ṡ}, ż)``.

    Returns:
        ``(β̇_{t+1}, {key: ṡ_{t+1}})``.
    """
    tangent_beta, tangent_state, tangent_z = tangents
    with fwAD.dual_level(), forward_mode():
        beta = _make_dual(log_alpha, tangent_beta)
        state = {
            key: _make_dual(value, tangent_state[key]) if key in tangent_state else value
            for key, value in meta_state.items()
        }
        new_beta, new_state = rule.update(beta, _make_dual(z, tangent_z), state)
        low, high = bounds
        if low > -float("inf") or high < float("inf"):
            new_beta = new_beta.clamp(low, high)
        return _tangent(new_beta), {key: _tangent(new_state[key]) for key in tangent_state}
