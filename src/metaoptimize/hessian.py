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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from metaoptimize._math import forward_mode
from metaoptimize._types import Entry
from metaoptimize.base import BaseRule, is_decoupled, state_dtype
from metaoptimize.blocks import BlockLayout
from metaoptimize.meta import MetaRule
from metaoptimize.metagrad import MetaGradient
from metaoptimize.metaparams import MetaParameter

__all__ = [
    "APPROXIMATIONS",
    "TRACES",
    "HessianStep",
    "HessianTrace",
    "base_step_with_tangent",
    "graph_gradients",
    "hessian_trace_step",
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
        assert isinstance(u, Tensor)  # ok is a tensor: no host-scalar quotient
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


@dataclass
class HessianStep:
    """What one Hessian-trace step leaves for the meta step.

    Attributes:
        finite: 0-d bool: False when the step was skipped (``z`` or a product not finite).
        z_block: the block meta-gradients ``Xᵀ g`` (None with per-weight step sizes).
        z_weight: per entry, ``X g`` (per-weight step sizes).
        z_tangent: 2×2 only, ``M[b, c] = X_bᵀ ∇²f γX_c``.
        mixing: 2×2 only, ``B = γY + (1-γ)I``.
    """

    finite: Tensor
    z_block: Tensor | None
    z_weight: list[Tensor]
    z_tangent: Tensor | None
    mixing: Tensor | None


def hessian_trace_step(
    entries: Sequence[Entry],
    graph_grads: Sequence[Tensor | None],
    base: BaseRule,
    *,
    columns: int,
    per_weight: bool,
    log_alpha: Tensor,
    meta_trace: Tensor | None,
) -> HessianStep:
    """Meta-gradient, Hessian-vector products, and the base step with its trace columns.

    Args:
        entries: the parameters with a gradient (``optimizer`` entries), in step order.
        graph_grads: each entry's gradient with its graph (``create_graph=True``).
        base: the base rule.
        columns: trace columns (one per block; one shared column for per-weight step sizes).
        per_weight: one step size per weight.
        log_alpha: the block log step sizes (unused with per-weight step sizes).
        meta_trace: 2×2 only, the meta trace ``Y`` of ``β`` (None for the L-approximation).
    """
    gammas = [float(e.group["gamma"]) for e in entries]
    home, dtype = log_alpha.device, log_alpha.dtype
    # 1. Meta-gradient z = X^T g with the trace from before this step.
    z_block: Tensor | None = None
    z_weight: list[Tensor] = []
    if per_weight:
        z_weight = [e.state["trace"][0] * e.grad for e in entries]
        checked = list(z_weight)
    else:
        z_block = torch.stack(
            [e.state["trace"].reshape(columns, -1) @ e.grad.reshape(-1) for e in entries]
        ).sum(0)
        checked = [z_block]
    # 2. Hessian-vector products ∇²f · γX_c, one per column (the gradient's tangent).
    products = _column_products(entries, graph_grads, gammas, columns)
    checked += [hv for column in products for hv in column]
    finite = torch.stack([(~torch.isfinite(t)).sum().to(home) for t in checked]).sum() == 0
    # 3. 2×2 only: z's tangent M[b, c] = X_bᵀ ∇²f γX_c, and B = γY + (1-γ)I.
    mixing: Tensor | None = None
    z_tangent: Tensor | None = None
    if meta_trace is not None:
        z_tangent = torch.stack(
            [
                e.state["trace"].reshape(columns, -1)
                @ torch.stack([products[c][i] for c in range(columns)]).reshape(columns, -1).T
                for i, e in enumerate(entries)
            ]
        ).sum(0)
        eye = torch.eye(columns, dtype=dtype, device=home)
        mixing = gammas[0] * meta_trace + (1.0 - gammas[0]) * eye
    # 4. Base step and trace columns: X_{t+1} = G^{xy} B + γ G^{xx} X (forward mode).
    alpha_blocks = None if per_weight else log_alpha.exp()
    for i, (entry, gamma) in enumerate(zip(entries, gammas, strict=True)):
        column_products = [products[c][i] for c in range(columns)]
        _step_entry(base, entry, gamma, column_products, finite, alpha_blocks, mixing, per_weight)
    return HessianStep(finite, z_block, z_weight, z_tangent, mixing)


def _column_products(
    entries: Sequence[Entry],
    graph_grads: Sequence[Tensor | None],
    gammas: list[float],
    columns: int,
) -> list[list[Tensor]]:
    """``∇²f · γX_c`` for every column ``c``, as one list of per-entry products per column."""
    params = [e.param for e in entries]
    products: list[list[Tensor]] = []
    for c in range(columns):
        if any(gammas):
            vectors = [
                gamma * e.state["trace"][c] for gamma, e in zip(gammas, entries, strict=True)
            ]
            retain = c < columns - 1
            products.append(hessian_vector_products(graph_grads, params, vectors, retain))
        else:
            products.append([torch.zeros_like(e.grad) for e in entries])
    return products


def _step_entry(
    base: BaseRule,
    entry: Entry,
    gamma: float,
    products: list[Tensor],
    finite: Tensor,
    alpha_blocks: Tensor | None,
    mixing: Tensor | None,
    per_weight: bool,
) -> None:
    """One parameter's base step and new trace columns (in place; kept on a skipped step)."""
    state, group = entry.state, entry.group
    ok = finite.to(entry.grad.dtype)
    if alpha_blocks is None:
        alpha = state["log_alpha"].exp() * (ok * group["lr"])
    else:
        alpha = alpha_blocks[entry.block].to(entry.grad.dtype) * (ok * group["lr"])
    keys = [k[len(STATE_TRACE_PREFIX) :] for k in state if k.startswith(STATE_TRACE_PREFIX)]
    base_state = {k: state[k] for k in (*keys, "step") if k in state}
    grad = torch.where(finite, entry.grad, 0.0)
    decoupled = is_decoupled(base, group)
    new_param: Tensor | None = None
    new_state: dict[str, Tensor] = {}
    columns_w: list[Tensor] = []
    columns_s: dict[str, list[Tensor]] = {k: [] for k in keys}
    for c, product in enumerate(products):
        if mixing is not None:
            tangent_alpha = alpha * mixing[entry.block, c].to(alpha.dtype)
        elif per_weight or entry.block == c:
            tangent_alpha = alpha
        else:
            tangent_alpha = torch.zeros_like(alpha)
        tangents = (
            gamma * state["trace"][c],
            torch.where(finite, product, 0.0),
            tangent_alpha,
            {k: gamma * state[STATE_TRACE_PREFIX + k][c] for k in keys},
        )
        stepped, stepped_state, trace_w, trace_s = base_step_with_tangent(
            base, entry.param, grad, base_state, keys, group, ok, alpha, decoupled, tangents
        )
        if new_param is None:
            new_param, new_state = stepped, stepped_state
        columns_w.append(trace_w)
        for k in keys:
            columns_s[k].append(trace_s[k])
    assert new_param is not None
    state["trace"].copy_(torch.where(finite, torch.stack(columns_w), state["trace"]))
    for k in keys:
        old = state[STATE_TRACE_PREFIX + k]
        old.copy_(torch.where(finite, torch.stack(columns_s[k]), old))
    for k, value in new_state.items():
        base_state[k].copy_(value)
    entry.param.copy_(new_param)


def graph_gradients(
    closure: Callable[[], Any], params: list[Tensor]
) -> tuple[Tensor, dict[int, Tensor | None]]:
    """Run the closure and take the gradients with their graph; ``p.grad`` gets their values.

    Returns:
        The loss and each parameter's graph gradient, by ``id(p)``.
    """
    with torch.enable_grad():
        loss = closure()
        if not isinstance(loss, Tensor) or not loss.requires_grad:
            raise RuntimeError(
                "MetaOptimize(trace='hessian'): the closure must return the loss as a "
                "tensor that requires grad (and must not call backward())"
            )
        grads: tuple[Tensor | None, ...] = torch.autograd.grad(
            loss, params, create_graph=True, allow_unused=True
        )
    for p, g in zip(params, grads, strict=True):
        p.grad = None if g is None else g.detach()
    return loss, {id(p): g for p, g in zip(params, grads, strict=True)}


class HessianTrace:
    """The Hessian variant's own state: trace columns per parameter and the 2×2 meta trace.

    It receives the entries, the layout and the step sizes as arguments; the meta step itself
    is the optimizer's, shared with the Hessian-free trace.

    Args:
        approximation: ``"L"`` or ``"2x2"``.
    """

    def __init__(self, approximation: str) -> None:
        self.approximation = approximation
        #: 2×2 only: ``Y``, the tangents of ``β`` (key ``"log_alpha"``) and of the meta
        #: rule's state, one column per block.
        self.meta_trace: dict[str, Tensor] = {}

    @staticmethod
    def columns(layout: BlockLayout) -> int:
        """Trace columns: one per block, one shared column for per-weight step sizes."""
        return 1 if layout.per_weight else layout.num_blocks

    def init_state(
        self, p: Tensor, base_state: dict[str, Any], state: dict[str, Any], columns: int
    ) -> None:
        """One trace column per block, for the weights and every base-state tensor."""
        shape = (columns, *p.shape)
        state["trace"] = p.new_zeros(shape, dtype=state_dtype(p))
        for key in traced_state_keys(base_state):
            state[STATE_TRACE_PREFIX + key] = p.new_zeros(shape, dtype=state_dtype(p))

    def grow(
        self, layout: BlockLayout, states: Iterable[dict[str, Any]], step_size: MetaParameter
    ) -> None:
        """New blocks: existing traces get zero columns; ``Y`` starts at ``I`` for their β."""
        columns = self.columns(layout)
        for state in states:
            for key, value in list(state.items()):
                if key == "trace" or key.startswith(STATE_TRACE_PREFIX):
                    missing = columns - value.shape[0]
                    if missing > 0:
                        state[key] = torch.cat([value, value.new_zeros(missing, *value.shape[1:])])
        if self.approximation != "2x2":
            return
        old = self.meta_trace
        current = old["log_alpha"].shape[0] if old else 0
        values = step_size.values
        eye = torch.eye(layout.num_blocks, dtype=values.dtype, device=values.device)
        new = {"log_alpha": eye}
        for key in traced_state_keys(step_size.state):
            new[key] = torch.zeros_like(eye)
        for key, value in old.items():
            new[key][:current, :current] = value
        self.meta_trace = new

    def step(
        self,
        entries: Sequence[Entry],
        graph_grads: Sequence[Tensor | None],
        base: BaseRule,
        layout: BlockLayout,
        step_size: MetaParameter,
        active: Tensor | None,
    ) -> MetaGradient:
        """The base step with its trace columns, and (2×2) the meta trace's own step.

        Args:
            entries: the parameters with a gradient, in step order.
            graph_grads: each entry's gradient with its graph (``create_graph=True``).
            base: the base rule.
            layout: the block layout.
            step_size: the log step sizes with their meta rule, state and bounds.
            active: per block, whether it has a parameter with a gradient (block modes).

        Returns:
            The meta-gradient for the meta step, taken with the pre-step β and meta state.
        """
        two_by_two = self.approximation == "2x2"
        outcome = hessian_trace_step(
            entries,
            graph_grads,
            base,
            columns=self.columns(layout),
            per_weight=layout.per_weight,
            log_alpha=step_size.values,
            meta_trace=self.meta_trace["log_alpha"] if two_by_two else None,
        )
        finite = outcome.finite
        z, z_tangent, mixing = outcome.z_block, outcome.z_tangent, outcome.mixing
        if z is not None and z_tangent is not None and mixing is not None and active is not None:
            gamma = float(entries[0].group["gamma"])  # one gamma: 2x2 requires it
            self._update_meta_trace(step_size, z, z_tangent, mixing, gamma, active & finite, finite)
        return MetaGradient(finite, z, outcome.z_weight)

    def _update_meta_trace(
        self,
        step_size: MetaParameter,
        z: Tensor,
        z_tangent: Tensor,
        mixing: Tensor,
        gamma: float,
        keep: Tensor,
        finite: Tensor,
    ) -> None:
        """Y_{t+1} = G^{yy} B + G^{yx} γX, column by column (2×2 approximation)."""
        trace = self.meta_trace
        keys = [k for k in trace if k != "log_alpha"]
        new_beta: list[Tensor] = []
        new_state: dict[str, list[Tensor]] = {k: [] for k in keys}
        for c in range(mixing.shape[0]):
            tangent_beta = mixing[:, c]
            tangent_state = {k: gamma * trace[k][:, c] for k in keys}
            beta_dot, state_dot = meta_step_tangent(
                step_size.rule,
                step_size.values,
                step_size.state,
                z,
                step_size.bounds,
                (tangent_beta, tangent_state, z_tangent[:, c]),
            )
            # A block that does not step keeps β and its meta state: tangents pass through.
            new_beta.append(torch.where(keep, beta_dot, tangent_beta))
            for k in keys:
                new_state[k].append(torch.where(keep, state_dot[k], tangent_state[k]))
        trace["log_alpha"].copy_(torch.where(finite, torch.stack(new_beta, 1), trace["log_alpha"]))
        for k in keys:
            trace[k].copy_(torch.where(finite, torch.stack(new_state[k], 1), trace[k]))
