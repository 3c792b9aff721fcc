"""MetaOptimize around any ``torch.optim.Optimizer`` instance: :func:`wrap`.

The wrapped optimizer takes its own step at its own learning rate; the wrapper observes the
update it applied, ``Δ = w_after - w_before``, and rescales it per block by ``α_b / α0``,
where ``α0`` is the inner group's learning rate at wrap time and ``α_b`` the learned step size.
For optimizers whose update is proportional to the learning rate and whose state does not
depend on it (SGD, SGD with momentum, Adam, AdamW, RMSprop, Lion-style rules), this is
exactly MetaOptimize with that base rule. The trace and the meta rule are the same as in
:class:`metaoptimize.MetaOptimize` (docs/math.md).

Trace decay factor ``∂w_{t+1}/∂w_t`` (weight decay κ): torch.optim.SGD, Adam, AdamW and RMSprop
get the exact Hessian-free factor of docs/math.md §4, read from the inner optimizer's own state.
Any other optimizer gets ``1 - α κ`` when its group has a ``weight_decay`` (the decoupled form),
and 1 otherwise: an approximation, documented in docs/math.md §10.

Exact for: torch.optim.SGD (with or without momentum and Nesterov), Adam and AdamW (without
amsgrad) and RMSprop (any options). Any other optimizer (Adagrad, Adadelta, Adamax, NAdam, RAdam,
Rprop, ASGD, LBFGS, SparseAdam, third-party rules) is wrapped with a warning that its trace is
approximate (docs/math.md §10).

Limits: the inner step cannot be skipped without a host synchronisation, so on a non-finite
meta-gradient the wrapper keeps the step sizes, meta state and trace unchanged but the inner
optimizer still steps (use a GradScaler for overflow). The wrapper keeps one copy of the
weights during the step.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from metaoptimize._options import DEFAULT_GAMMA, DEFAULT_META, WRAP_ALPHA_RANGE, log_bounds
from metaoptimize._types import Entry
from metaoptimize._validation import check_range
from metaoptimize.base import adam_l2_slope, rmsprop_l2_slope
from metaoptimize.blocks import BlockLayout, BlocksSpec, build_layout
from metaoptimize.meta import MetaRule, get_meta_rule
from metaoptimize.metagrad import meta_gradient
from metaoptimize.metaparams import MetaParameter, block_start_values

__all__ = ["MetaOptimizeWrapper", "reproduced_exactly", "wrap"]


def reproduced_exactly(optimizer: Optimizer) -> bool:
    """Whether wrap() is exactly MetaOptimize for ``optimizer``.

    It is where the update is linear in the lr and the trace's decay factor is known
    (docs/math.md §10).
    """
    exact = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)
    if type(optimizer) not in exact:
        return False
    return not any(g.get("amsgrad", False) for g in optimizer.param_groups)


def _l2_slope(
    inner: Optimizer,
    group: dict[str, Any],
    state: dict[str, Any],
    grad: Tensor,
    param_before: Tensor,
    first_step: bool,
) -> Tensor | float | None:
    """∂u/∂g̃ of the inner step just taken, for torch's L2-decay optimizers (math.md §4)."""
    kappa = group.get("weight_decay", 0.0)
    g = grad + kappa * param_before
    if isinstance(inner, torch.optim.SGD):
        mu, damp = group["momentum"], group["dampening"]
        if mu == 0:
            return 1.0
        coef = 1.0 if first_step else 1.0 - damp
        return 1.0 + mu * coef if group["nesterov"] else coef
    if isinstance(inner, torch.optim.Adam) and not isinstance(inner, torch.optim.AdamW):
        beta1, beta2 = group["betas"]
        step = float(state["step"])
        bias1, bias2 = 1.0 - beta1**step, 1.0 - beta2**step
        rms = state["exp_avg_sq"].sqrt() / math.sqrt(bias2)
        denom = rms + group["eps"]
        m_hat = state["exp_avg"] / bias1
        c1, c2 = (1.0 - beta1) / bias1, (1.0 - beta2) / bias2
        return adam_l2_slope(g, m_hat, rms, denom, c1, c2)
    if isinstance(inner, torch.optim.RMSprop):
        smoothing = group["alpha"]
        square_avg = state["square_avg"]
        if group["centered"]:
            grad_avg = state["grad_avg"]
            rms = (square_avg - grad_avg * grad_avg).sqrt()
            centred = g - grad_avg
        else:
            rms, centred = square_avg.sqrt(), g
        denom = rms + group["eps"]
        return rmsprop_l2_slope(g, centred, rms, denom, smoothing)
    return None


def _meta_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class _Entry(NamedTuple):
    """A parameter with a gradient in one wrapper step."""

    group: dict[str, Any]
    param: Tensor
    grad: Tensor
    before: Tensor
    trace: Tensor
    block: int
    first_step: bool


class MetaOptimizeWrapper(Optimizer):
    """MetaOptimize around an existing optimizer; build it with :func:`wrap`.

    ``param_groups`` and ``state`` are the inner optimizer's own (so lr schedulers, hooks and
    ``zero_grad`` act on it); a scheduled ``lr`` multiplies the learned step size, as in
    MetaOptimize. Traces are kept by the wrapper (inner optimizers such as Adam initialise
    their state only when it is empty) and saved in its state dict.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        meta: str = DEFAULT_META,
        *,
        meta_lr: float | None = None,
        gamma: float = DEFAULT_GAMMA,
        blocks: BlocksSpec = "scalar",
        meta_betas: tuple[float, ...] | None = None,
        meta_eps: float = 1e-8,
        alpha_min: float | None = None,
        alpha_max: float | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"Invalid optimizer: {type(optimizer).__name__}; expected a torch.optim.Optimizer"
            )
        gamma = check_range(gamma, "gamma", 0.0, 1.0)
        if not reproduced_exactly(optimizer):
            warnings.warn(
                f"wrap(): the trace is approximate for {type(optimizer).__name__}; wrap() is "
                "exact for torch.optim SGD, Adam, AdamW (without amsgrad) and RMSprop "
                "(docs/math.md §10)",
                stacklevel=3,
            )
        # Any optimizer can be wrapped, so the range is wide: it only keeps α off 0 and ∞.
        bounds = log_bounds(alpha_min, alpha_max, WRAP_ALPHA_RANGE)
        self.inner = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = optimizer._optimizer_step_pre_hooks
        self._optimizer_step_post_hooks = optimizer._optimizer_step_post_hooks
        self._patch_step_function()  # profiling name and hook plumbing of torch.optim
        self._traces: dict[Tensor, Tensor] = {}
        rule = get_meta_rule(meta, meta_lr, meta_betas, meta_eps)
        self.gamma = gamma
        self.layout: BlockLayout = build_layout(blocks, self.param_groups)
        for group in self.param_groups:
            if "lr" not in group or not float(group["lr"]) > 0:
                raise ValueError(
                    "Invalid optimizer: every param group needs a positive lr (it becomes alpha0)"
                )
            group.setdefault("metaoptimize_alpha0", float(group["lr"]))
        if any(p.is_complex() for p in self._params()):
            raise TypeError(
                "Invalid optimizer: complex parameters are not supported; optimize "
                "torch.view_as_real(p) as a real parameter instead"
            )
        #: The learned log step sizes: one per parameter (per-weight) or one for all blocks.
        self._step_sizes = [MetaParameter(rule, bounds, start) for start in self._start_values()]

    def _start_values(self) -> list[Tensor]:
        """The initial log step sizes: each group's ``log lr``, per weight or per block."""
        # Empty groups are allowed (as in torch.optim); the home device is the first parameter's.
        first = next(iter(self._params()))
        alpha0 = [g["metaoptimize_alpha0"] for g in self.param_groups for _ in g["params"]]
        if self.layout.per_weight:
            return [
                torch.full_like(p, math.log(a), dtype=_meta_dtype(p))
                for p, a in zip(self._params(), alpha0, strict=True)
            ]
        alpha0_of_block = block_start_values(
            self.layout,
            self.param_groups,
            "metaoptimize_alpha0",
            "; one step size cannot start at both: use blocks='group' or 'tensor'",
            arg="blocks",
            label="lr",
        )
        # A block without a parameter (none in practice) starts at α = 1, as before.
        start = [math.log(alpha0_of_block.get(b, 1.0)) for b in range(self.layout.num_blocks)]
        return [torch.tensor(start, dtype=_meta_dtype(first), device=first.device)]

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def step_sizes(self) -> dict[str, Tensor]:
        """Learned step sizes by block (without the lr-schedule multiplier)."""
        if self.layout.per_weight:
            return {n: b.exp() for n, b in zip(self.layout.names, self._step_sizes, strict=True)}
        alpha = self._step_sizes[0].exp()
        return {name: alpha[i] for i, name in enumerate(self.layout.names)}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step the inner optimizer, rescale its update per block, update trace and α."""
        entries = self._entries()
        z, finite = self._meta_gradient(entries)  # with the trace from before this step
        loss = self.inner.step(closure)
        if not entries:
            return loss
        assert finite is not None
        ok = finite.to(entries[0].param.dtype)
        for i, entry in enumerate(entries):
            self._rescale(entry, i, finite, ok)
        if self.meta_rule.active:
            if self.layout.per_weight:
                for step_size, z_param in zip(self._step_sizes, z, strict=True):
                    step_size.step(z_param, finite)
            else:
                active = torch.zeros_like(self._step_sizes[0].values, dtype=torch.bool)
                active[[e.block for e in entries]] = True
                self._step_sizes[0].step(z[0], active & finite)
        return loss

    def _entries(self) -> list[_Entry]:
        """The parameters with a gradient, with copies of the gradient and weights."""
        entries = []
        position = 0
        for group in self.param_groups:
            for p in group["params"]:
                block = self.layout.block_of_param[position]
                position += 1
                if p.grad is None:
                    continue
                state = self.state[p]
                first_step = "momentum_buffer" not in state and "step" not in state
                if p not in self._traces:
                    self._traces[p] = torch.zeros_like(p)
                trace = self._traces[p]
                before = p.detach().clone()
                entries.append(_Entry(group, p, p.grad.clone(), before, trace, block, first_step))
        return entries

    def _meta_gradient(self, entries: list[_Entry]) -> tuple[list[Tensor], Tensor | None]:
        """``z`` (per parameter, or one block vector) and whether it is finite.

        The same computation as MetaOptimize's (:func:`metaoptimize.metagrad.meta_gradient`).
        """
        if not entries:
            return [], None
        values = self._step_sizes[0].values
        grads = meta_gradient(
            [Entry(e.group, e.param, e.grad, {"trace": e.trace}, e.block, 1.0) for e in entries],
            num_blocks=self.layout.num_blocks,
            block_index=torch.tensor([e.block for e in entries], device=values.device),
            per_weight=self.layout.per_weight,
            meta_active=True,
            learn_weight_decay=False,
            home=values.device,
            dtype=values.dtype,
            reduce_group=None,
            reduce_blocks=False,
        )
        assert isinstance(grads.finite, Tensor)  # decided on the device
        if grads.block is None:
            return grads.weight, grads.finite
        assert isinstance(grads.block, Tensor)  # summed on the device
        return [grads.block], grads.finite

    def _rescale(self, entry: _Entry, index: int, finite: Tensor, ok: Tensor) -> None:
        """Rescale the inner step of one parameter to the learned step size; update its trace."""
        group, p, trace = entry.group, entry.param, entry.trace
        if self.layout.per_weight:
            log_alpha = self._step_sizes[index].values
        else:
            log_alpha = self._step_sizes[0].values[entry.block]
        lr0 = group["metaoptimize_alpha0"]
        learned = log_alpha.exp().to(p.dtype)
        alpha = learned * (group["lr"] / lr0)  # schedule multiplier
        # The inner step moved by lr·u; the wanted step is α·u = (lr·u)·e^β/lr0. Written
        # without dividing by lr, so an lr of 0 (warm-up from 0) gives a zero step, not NaN.
        delta = (p.detach() - entry.before) * (learned / lr0)
        p.copy_(entry.before + delta)
        kappa = group.get("weight_decay", 0.0)
        gamma = 1.0 + ok * (self.gamma - 1.0)
        if kappa:
            state = self.state[p]
            slope = _l2_slope(self.inner, group, state, entry.grad, entry.before, entry.first_step)
            decay = 1.0 - alpha * kappa * (1.0 if slope is None else slope)
            trace.mul_(gamma * torch.where(finite, decay, 1.0))
        else:
            trace.mul_(gamma)
        trace.add_(delta * ok)

    @property
    def meta_rule(self) -> MetaRule:
        """The meta rule of the step sizes."""
        return self._step_sizes[0].rule

    def __getstate__(self) -> dict[str, Any]:
        """Everything, for ``copy.deepcopy`` and pickling.

        torch.optim's keeps three attributes; the inner optimizer, the traces and the step
        sizes live in others.
        """
        return dict(self.__dict__)

    def state_dict(self) -> dict[str, Any]:
        """The inner state dict, with the wrapper's step sizes and meta state in group 0."""
        state_dict = self.inner.state_dict()
        state_dict["param_groups"][0]["metaoptimize_wrapper"] = {
            "traces": [
                self._traces[p].clone() if p in self._traces else None for p in self._params()
            ],
            "log_alpha": [s.saved()[0] for s in self._step_sizes],
            "meta_state": [s.saved()[1] for s in self._step_sizes],
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`."""
        state_dict = dict(state_dict)
        groups = [dict(g) for g in state_dict["param_groups"]]
        state_dict["param_groups"] = groups
        section = groups[0].pop("metaoptimize_wrapper", None)
        if section is None:
            raise ValueError("Invalid state_dict: not saved by a MetaOptimize wrapper")
        self.inner.load_state_dict(state_dict)
        # torch.optim replaces param_groups and state on load: share the new ones again, or a
        # scheduler on the wrapper would stop reaching the inner optimizer.
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state
        self._traces = {
            p: t.to(p.device, copy=True)
            for p, t in zip(self._params(), section["traces"], strict=True)
            if t is not None
        }
        saved = zip(section["log_alpha"], section["meta_state"], strict=True)
        for step_size, (values, meta_state) in zip(self._step_sizes, saved, strict=True):
            step_size.restore(values, meta_state)


def wrap(optimizer: Optimizer, meta: str = DEFAULT_META, **kwargs: Any) -> MetaOptimizeWrapper:
    """MetaOptimize around an existing optimizer; its lr becomes alpha0.

    Keyword arguments are those of :class:`MetaOptimizeWrapper` (``meta_lr``, ``gamma``,
    ``blocks``, ``meta_betas``, ``meta_eps``, ``alpha_min``, ``alpha_max``).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = wrap(torch.optim.Adam(model.parameters(), lr=1e-3), meta="lion")
        >>> model(torch.ones(2, 3)).sum().backward()
        >>> _ = opt.step()
        >>> sorted(opt.step_sizes())
        ['all']
    """
    return MetaOptimizeWrapper(optimizer, meta, **kwargs)
