"""The :class:`MetaOptimize` optimizer: Hessian-free MetaOptimize as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from metaoptimize._checkpoint import check_section_tensors, check_state_tensor, restored_bounds
from metaoptimize._kernels import KernelOptions, plan_kernels
from metaoptimize._kernels.eager import meta_step
from metaoptimize._kernels.runner import KernelRunner, StepScalars
from metaoptimize._kernels.triton import (
    triton_available,
)
from metaoptimize._math import as_dtype
from metaoptimize._options import DEFAULT_ALPHA0, DEFAULT_GAMMA, DEFAULT_META, log_bounds
from metaoptimize._types import Entry
from metaoptimize._validation import check_betas, check_number, check_range
from metaoptimize.base import BaseRule, get_base_rule, is_decoupled, state_dtype
from metaoptimize.blocks import BlockLayout, BlocksSpec, build_layout
from metaoptimize.hessian import (
    APPROXIMATIONS,
    STATE_TRACE_PREFIX,
    TRACES,
    hessian_trace_step,
    meta_step_tangent,
    traced_state_keys,
)
from metaoptimize.meta import MetaRule, get_meta_rule
from metaoptimize.metagrad import meta_gradient

try:  # DTensor parameters (FSDP2); torch >= 2.4 has the public module
    from torch.distributed.tensor import DTensor, Replicate, Shard

    _HAS_DTENSOR = True
except ImportError:  # pragma: no cover - older torch: no FSDP2 support
    _HAS_DTENSOR = False

__all__ = ["MetaOptimize"]

FORMAT_VERSION = 1
_UNSET = object()
_BASE_STYLES = ("torch", "paper")
_META_PREFIX = "meta_"


class MetaOptimize(Optimizer):
    r"""A first-order optimizer whose step sizes are learned online (Hessian-free MetaOptimize).

    Per step, for every parameter ``w`` with gradient ``g`` in block ``b``
    (docs/math.md gives the derivations and the symbol table):

    .. math::
        \begin{aligned}
        z_b &= \textstyle\sum_{i \in b} h_i\, g_i
              && \text{meta-gradient, trace before this step}\\
        \alpha &= \text{lr} \cdot e^{\beta_b} && \text{learned step size times the group's lr}\\
        \Delta w &= -\alpha\,(u + \kappa w) \ \text{or}\ -\alpha\, u(g + \kappa w)
              && \text{base step (decoupled or L2 decay)}\\
        h &\leftarrow \gamma\,(1 - \alpha\kappa\,\partial u/\partial \tilde g)\, h + \Delta w
              && \text{Hessian-free trace}\\
        w &\leftarrow w + \Delta w, \qquad \beta_b \leftarrow \text{Meta}(\beta_b, z_b)
        \end{aligned}

    ``u`` is the base rule's direction (SGD, SGDm, RMSProp, Adam, AdamW or Lion). A positive
    ``z`` (the gradient points along past updates: overshooting) lowers the step size.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer (named
            parameters give named blocks in :meth:`step_sizes`).
        base: base rule: ``"sgd"``, ``"sgdm"``, ``"rmsprop"``, ``"adam"``, ``"adamw"``,
            ``"lion"``.
        meta: meta rule on ``β = log α``: ``"auto"`` (default: the tuning-free rule,
            normalised AdaGrad on β, docs/math.md §14), ``"fixed"``, ``"sgd"``,
            ``"rmsprop"``, ``"adam"``, ``"lion"``.
        alpha0: initial step size (per group allowed; default 1e-3). The ``"auto"`` rule
            finds its way from anywhere in 1e-6..1e-1; with ``meta="fixed"`` this is the
            learning rate of the base optimizer.
        meta_lr: meta step size ``η``; 0 freezes the step sizes. Default: the rule's own
            (0.5 for ``"auto"``: no meta step moves ``log α`` by more than 0.5; the paper's
            1e-3 for the others).
        gamma: trace discount ``γ`` in [0, 1] (per group allowed; default 0.999, a horizon
            of about 1000 steps). 0 is hypergradient descent, 1 the paper's.
        blocks: step-size granularity: ``"scalar"``, ``"group"``, ``"tensor"``
            (``"layerwise"``), ``"weight"``, or a list / dict of parameter lists.
        lr: multiplier on the learned step size (default 1.0), for lr schedulers.
        weight_decay: ``κ``; decoupled for adamw/lion (and ``base_style="paper"``), L2 otherwise,
            exactly as the torch.optim counterpart.
        betas: the base rule's betas: adam/adamw ``(0.9, 0.999)``, lion ``(0.9, 0.99)``,
            rmsprop ``(0.99,)`` (torch's ``alpha``). sgd and sgdm take none.
        momentum: sgdm momentum (default 0.9) or rmsprop momentum (default 0).
        dampening: sgdm dampening, as torch.optim.SGD.
        nesterov: sgdm Nesterov momentum, as torch.optim.SGD.
        centered: centered RMSProp, as torch.optim.RMSprop.
        eps: the base rule's epsilon (adam/adamw/rmsprop).
        base_style: ``"torch"`` (default) or ``"paper"``: the paper's lagged EMA momentum for
            sgdm and bias-corrected RMSProp, both with decoupled weight decay.
        meta_betas: meta rule betas: adam ``(0.9, 0.999)``, lion ``(c, ρ) = (0.9, 0.99)``,
            rmsprop ``(0.999,)``.
        meta_eps: epsilon of the adam and rmsprop meta rules.
        alpha_min: lower bound on every learned step size. Default: the base rule's
            (1e-10 for normalised directions: adam, adamw, rmsprop, lion; 1e-12 for sgd and
            sgdm); 0 removes it.
        alpha_max: upper bound on every learned step size. Default: the base rule's (1.0
            for normalised directions, 1e6 for sgd and sgdm); ``math.inf`` removes it.
        partition_group: for ZeRO-style sharding (``ZeroRedundancyOptimizer``), the process
            group across which the parameters are partitioned: block meta-gradients are
            all-reduced over it. FSDP2 (DTensor parameters) needs no argument: the group is
            taken from the parameters' device mesh. DDP needs nothing (docs/distributed.md).
        fused: run each parameter's update through ``torch.compile`` (one fused pass over
            memory, every base rule; tensors must be contiguous, others use the eager path).
            The first step compiles (seconds); see docs/performance.md.
        trace_dtype: dtype of the trace ``h`` (default: the optimizer state dtype). For
            example ``torch.bfloat16`` halves the trace's memory; the meta-gradient is still
            accumulated in the gradient's dtype (docs/performance.md measures the effect).
        kahan_summation: for bfloat16/float16 parameters, keep a compensation buffer (same
            dtype as the parameter) so that updates smaller than the weights' rounding step are
            not lost (pure low-precision training). Ignored for float32/float64 parameters.
        learn_weight_decay: also meta-learn the weight decay, one ``log κ`` per block (as the
            step size), with the same meta rule and its own trace (docs/math.md §12). Needs an
            active meta rule, block-level step sizes and ``weight_decay > 0``; uses the eager
            path.
        weight_decay_meta_lr: meta step size for ``log κ`` (default: ``meta_lr``).
        fused_backend: with ``fused=True``: ``"auto"`` (default) runs the AdamW and Lion bases
            on CUDA through a Triton kernel when Triton is installed and everything else
            through ``torch.compile``; ``"triton"`` also uses Triton off CUDA (its interpreter,
            ``TRITON_INTERPRET=1``, for tests); ``"compile"`` never uses Triton.
        foreach: update the parameters of a param group, device and dtype with multi-tensor
            (``torch._foreach_*``) operations, one launch per operation instead of one per
            tensor. Default None: on for CUDA tensors, off on CPU (docs/performance.md).
            ``fused=True`` takes precedence for the tensors it supports.
        trace: ``"hessian-free"`` (default; paper Algorithm 3) or ``"hessian"``: keep the
            Hessian terms of the trace (paper Algorithm 1) with Hessian-vector products.
            ``"hessian"`` needs ``step(closure)``, where the closure recomputes and *returns*
            the loss without calling ``backward()``; the optimizer takes the gradient and the
            Hessian-vector products itself. Block-level modes keep one trace column per block
            (one Hessian-vector product per block and step); ``blocks="weight"`` keeps one
            shared column. Every base rule; not with ``fused``, ``learn_weight_decay``,
            ``kahan_summation``, ``trace_dtype``, sharding or half-precision parameters
            (docs/math.md §13).
        trace_approximation: with ``trace="hessian"``: ``"L"`` (default; the meta update's
            dependence on the weights is dropped) or ``"2x2"`` (kept; block-level modes and one
            ``gamma`` for all groups).

    A step whose gradient or meta-gradient is not finite changes nothing (weights, step sizes,
    any state) and is counted in :attr:`skipped_steps`; this is decided on the device, and
    ``step()`` never synchronises with the host.

    Example:
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = MetaOptimize(model.parameters(), base="adamw", meta="lion", alpha0=1e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> _ = opt.step()
        >>> sorted(opt.step_sizes())
        ['all']

    References:
        Sharifnassab, Salehkaleybar, Sutton, "MetaOptimize: A Framework for Optimizing Step
        Sizes and Other Meta-parameters", ICML 2025. https://arxiv.org/abs/2402.02342
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]],
        base: str = "adamw",
        meta: str = DEFAULT_META,
        *,
        alpha0: float = DEFAULT_ALPHA0,
        meta_lr: float | None = None,
        gamma: float = DEFAULT_GAMMA,
        blocks: BlocksSpec = "scalar",
        lr: float = 1.0,
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
        partition_group: Any = None,
        fused: bool = False,
        trace_dtype: torch.dtype | str | None = None,
        kahan_summation: bool = False,
        learn_weight_decay: bool = False,
        weight_decay_meta_lr: float | None = None,
        trace: str = "hessian-free",
        trace_approximation: str = "L",
        foreach: bool | None = None,
        fused_backend: str = "auto",
    ) -> None:
        if not isinstance(base, str):
            raise TypeError(f"Invalid base: {base!r}; expected a rule name")
        if not isinstance(meta, str):
            raise TypeError(f"Invalid meta: {meta!r}; expected a rule name")
        self._base: BaseRule = get_base_rule(base)
        self._meta: MetaRule = get_meta_rule(meta, meta_lr, meta_betas, meta_eps)
        if not isinstance(learn_weight_decay, bool):
            raise TypeError(f"Invalid learn_weight_decay: {learn_weight_decay!r}; expected a bool")
        self._learn_wd = learn_weight_decay
        wd_meta_lr = (
            self._meta.meta_lr
            if weight_decay_meta_lr is None
            else check_number(weight_decay_meta_lr, "weight_decay_meta_lr")
        )
        if wd_meta_lr < 0.0:
            raise ValueError(f"Invalid weight_decay_meta_lr: {wd_meta_lr}; need >= 0")
        self._wd_meta: MetaRule = get_meta_rule(meta, wd_meta_lr, meta_betas, meta_eps)
        if learn_weight_decay and not self._meta.active:
            raise ValueError(
                "Invalid learn_weight_decay: it needs an active meta rule "
                "(meta != 'fixed' and meta_lr > 0)"
            )
        if learn_weight_decay and blocks == "weight":
            raise ValueError("Invalid learn_weight_decay: not supported with blocks='weight'")
        self._log_bounds = log_bounds(alpha_min, alpha_max, self._base.default_alpha_range)
        self._blocks_spec = blocks
        if partition_group is not None and not isinstance(blocks, str):
            raise ValueError(
                "Invalid blocks: explicit blocks cannot be combined with "
                "partition_group (each rank holds different parameters)"
            )
        self._partition_group = partition_group
        if not isinstance(fused, bool):
            raise TypeError(f"Invalid fused: {fused!r}; expected a bool")
        self._fused = fused
        if fused_backend not in ("auto", "triton", "compile"):
            raise ValueError(
                f"Invalid fused_backend: {fused_backend!r}; choose 'auto', 'triton' or 'compile'"
            )
        if fused_backend == "triton" and not triton_available():
            raise ValueError("Invalid fused_backend: 'triton' needs Triton (pip install triton)")
        self._fused_backend = fused_backend
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"Invalid foreach: {foreach!r}; expected a bool or None")
        self._foreach = foreach
        # Tests set this to run the sync-free device-scalar path on CPU too.
        self._device_scalars = False
        self._trace_dtype = _check_trace_dtype(trace_dtype)
        if not isinstance(kahan_summation, bool):
            raise TypeError(f"Invalid kahan_summation: {kahan_summation!r}; expected a bool")
        self._kahan = kahan_summation
        self._trace, self._approximation = _check_trace(
            trace,
            trace_approximation,
            meta_active=self._meta.active,
            blocks=blocks,
            conflicts={
                "fused": fused,
                "learn_weight_decay": learn_weight_decay,
                "kahan_summation": kahan_summation,
                "trace_dtype": trace_dtype is not None,
                "partition_group": partition_group is not None,
            },
        )
        self._meta_trace: dict[str, Tensor] = {}
        self._mesh_cache: Any = _UNSET
        self._layout: BlockLayout | None = None
        defaults = {
            "lr": lr,
            "alpha0": alpha0,
            "gamma": gamma,
            "weight_decay": weight_decay,
            "betas": betas,
            "momentum": momentum,
            "dampening": dampening,
            "nesterov": nesterov,
            "centered": centered,
            "eps": eps,
            "base_style": base_style,
        }
        super().__init__(params, defaults)
        # Empty groups are allowed (as in torch.optim); the home device is the first parameter's.
        first = next(p for group in self.param_groups for p in group["params"])
        self._home = first.device
        self._beta_dtype = _promoted_state_dtype(self.param_groups)
        self._log_alpha = torch.empty(0, dtype=self._beta_dtype, device=self._home)
        self._meta_state = self._meta.init_state(self._log_alpha)
        self._log_wd = torch.empty(0, dtype=self._beta_dtype, device=self._home)
        self._wd_meta_state = self._wd_meta.init_state(self._log_wd)
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._home)
        self._index_cache: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}
        self._kernels = KernelRunner(self._base, self._block_indices)
        self._grow_blocks()

    # ------------------------------------------------------------------ param groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group; its hyperparameters are validated and completed.

        With ``blocks`` "group", "tensor" or "weight" the new parameters get new blocks
        (initialised at the group's ``alpha0``); with "scalar" they join the single block.

        Raises:
            ValueError: a hyperparameter is invalid, or ``blocks`` was an explicit list.
        """
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._complete_group(group)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise
        if self._layout is not None:
            if not isinstance(self._blocks_spec, str):
                self.param_groups.pop()
                raise ValueError(
                    "Invalid blocks: explicit blocks cannot grow; pass every parameter at "
                    "construction or use a mode name"
                )
            try:
                self._grow_blocks()  # checks everything before it changes anything
            except ValueError:
                self.param_groups.pop()  # a rejected group must not stay and be trained
                raise

    def _complete_group(
        self, group: dict[str, Any], bounds: tuple[float, float] | None = None
    ) -> None:
        """Validate and complete a group's hyperparameters.

        ``bounds`` is the log step-size range ``alpha0`` must lie in (default: this
        optimizer's).
        """
        base = self._base
        for p in group["params"]:
            if p.is_complex():
                raise TypeError(
                    "Invalid params: complex parameters are not supported; optimize "
                    "torch.view_as_real(p) as a real parameter instead"
                )
        # ZeroRedundancyOptimizer copies every constructor keyword into its groups; the
        # process group is optimizer-wide and must not be serialised with them.
        group.pop("partition_group", None)
        group["lr"] = check_number(group["lr"], "lr")
        if group["lr"] < 0.0:
            raise ValueError(f"Invalid lr: {group['lr']}; need lr >= 0")
        group["alpha0"] = check_range(
            group["alpha0"], "alpha0", 0.0, math.inf, low_open=True, high_open=True
        )
        group["gamma"] = check_range(group["gamma"], "gamma", 0.0, 1.0)
        group["weight_decay"] = check_number(group["weight_decay"], "weight_decay")
        if group["weight_decay"] < 0.0:
            raise ValueError(f"Invalid weight_decay: {group['weight_decay']}; need >= 0")
        group["eps"] = check_number(group["eps"], "eps")
        if group["eps"] < 0.0:
            raise ValueError(f"Invalid eps: {group['eps']}; need eps >= 0")
        if group["base_style"] not in _BASE_STYLES:
            raise ValueError(
                f"Invalid base_style: {group['base_style']!r}; choose one of {list(_BASE_STYLES)}"
            )
        if base.default_betas is None:
            if group["betas"] is not None:
                raise ValueError(
                    f"Invalid betas: {group['betas']!r}; base {base.name!r} takes "
                    "no betas (use momentum)"
                )
        elif group["betas"] is None:
            group["betas"] = base.default_betas
        else:
            group["betas"] = check_betas(group["betas"], len(base.default_betas), "betas")
        if group["momentum"] is None:
            group["momentum"] = base.default_momentum if base.default_momentum is not None else 0.0
        group["momentum"] = check_number(group["momentum"], "momentum")
        group["dampening"] = check_number(group["dampening"], "dampening")
        for flag in ("nesterov", "centered"):
            if not isinstance(group[flag], bool):
                raise TypeError(f"Invalid {flag}: {group[flag]!r}; expected a bool")
        base.check_group(group)
        if self._trace == "hessian":
            _check_hessian_group(group, self.param_groups[0], self._approximation)
        if self._learn_wd and not group["weight_decay"] > 0.0:
            raise ValueError(
                f"Invalid weight_decay: {group['weight_decay']}; "
                "learn_weight_decay needs weight_decay > 0 in every group"
            )
        bounds = bounds or self._log_bounds
        log_alpha0 = math.log(group["alpha0"])
        if not bounds[0] <= log_alpha0 <= bounds[1]:
            raise ValueError(f"Invalid alpha0: {group['alpha0']}; outside [alpha_min, alpha_max]")

    def _grow_blocks(self) -> None:
        """(Re)build the layout and give new blocks their initial step sizes."""
        layout = build_layout(self._blocks_spec, self.param_groups)
        self._mesh_cache = _UNSET
        old = self._layout
        if (
            old is not None
            and old.block_of_param != layout.block_of_param[: len(old.block_of_param)]
        ):
            raise ValueError("Invalid blocks: the new param group changes existing blocks")
        if layout.per_weight:
            self._layout = layout
            return
        alpha0_of_block: dict[int, float] = {}
        params_group = [g for g in self.param_groups for _ in g["params"]]
        for block, group in zip(layout.block_of_param, params_group, strict=True):
            seen = alpha0_of_block.setdefault(block, group["alpha0"])
            if seen != group["alpha0"]:
                raise ValueError(
                    f"Invalid alpha0: block {layout.names[block]!r} spans param groups with "
                    f"different alpha0 ({seen} and {group['alpha0']}); use blocks='group' or "
                    "'tensor', or one alpha0 with a different lr multiplier per group"
                )
        wd_of_block: dict[int, float] = {}
        if self._learn_wd:
            for block, group in zip(layout.block_of_param, params_group, strict=True):
                seen = wd_of_block.setdefault(block, group["weight_decay"])
                if seen != group["weight_decay"]:
                    raise ValueError(
                        f"Invalid weight_decay: block {layout.names[block]!r} "
                        "spans param groups with different weight_decay"
                    )
        if layout.mode == "group":  # an empty group still has its block
            for index, group in enumerate(self.param_groups):
                alpha0_of_block.setdefault(index, group["alpha0"])
                wd_of_block.setdefault(index, group["weight_decay"])
        self._layout = layout  # every check passed: from here on nothing raises
        current = self._log_alpha.numel()
        new = [math.log(alpha0_of_block[b]) for b in range(current, layout.num_blocks)]
        if not new:
            return
        extra = torch.tensor(new, dtype=self._beta_dtype, device=self._home)
        self._log_alpha = torch.cat([self._log_alpha, extra])
        fresh = self._meta.init_state(extra)
        self._meta_state = {key: torch.cat([self._meta_state[key], fresh[key]]) for key in fresh}
        if self._trace == "hessian":
            self._pad_trace_columns()
            if self._approximation == "2x2":
                self._grow_meta_trace(layout.num_blocks)
        if self._learn_wd:
            wd_extra = torch.tensor(
                [math.log(wd_of_block[b]) for b in range(current, layout.num_blocks)],
                dtype=self._beta_dtype,
                device=self._home,
            )
            self._log_wd = torch.cat([self._log_wd, wd_extra])
            wd_fresh = self._wd_meta.init_state(wd_extra)
            self._wd_meta_state = {
                key: torch.cat([self._wd_meta_state[key], wd_fresh[key]]) for key in wd_fresh
            }
        self._index_cache.clear()

    # ------------------------------------------------------------------ public helpers

    @property
    def layout(self) -> BlockLayout:
        """The step-size block layout."""
        assert self._layout is not None
        return self._layout

    @property
    def requires_closure(self) -> bool:
        """Whether :meth:`step` needs a closure that returns the loss (``trace="hessian"``)."""
        return self._trace == "hessian"

    @property
    def skipped_steps(self) -> Tensor:
        """Number of steps skipped because a gradient or meta-gradient was not finite.

        A 0-d device tensor, so that reading it never forces a synchronisation; see
        :attr:`skipped_step_count` for a plain int.
        """
        return self._skipped

    @property
    def skipped_step_count(self) -> int:
        """:attr:`skipped_steps` as an int (reads the device value: a synchronisation)."""
        return int(self._skipped.item())

    @property
    def meta_lr(self) -> float:
        """The meta step size η of the step-size meta rule.

        Restored by :meth:`load_state_dict`; set it after loading to continue with another
        (for example to turn meta-learning on for a run saved with ``meta_lr=0``).
        """
        return self._meta.meta_lr

    @meta_lr.setter
    def meta_lr(self, value: float) -> None:
        rule = get_meta_rule(self._meta.name, value, self._meta.betas, self._meta.eps)
        if not rule.active and (self._learn_wd or self._trace == "hessian"):
            raise ValueError(
                f"Invalid meta_lr: {value}; learn_weight_decay and trace='hessian' need "
                "an active meta rule"
            )
        self._meta = rule

    def weight_decays(self) -> dict[str, Tensor]:
        """Current weight decay by block (learned with ``learn_weight_decay=True``).

        Raises:
            RuntimeError: the weight decay is not learned.
        """
        if not self._learn_wd:
            raise RuntimeError(
                "weight_decays(): the weight decay is not learned; pass learn_weight_decay=True"
            )
        kappa = self._log_wd.exp()
        return {name: kappa[index] for index, name in enumerate(self.layout.names)}

    def step_sizes(self) -> dict[str, Tensor]:
        """Current learned step sizes ``α = exp(β)`` by block, in block order.

        Block-level modes give 0-d tensors; ``blocks="weight"`` gives parameter-shaped tensors.
        The group's ``lr`` multiplier is not included. Reading the values (``.item()``) is the
        caller's choice; this method itself does not synchronise.
        """
        layout = self.layout
        if not layout.per_weight:
            alpha = self._log_alpha.exp()
            return {name: alpha[index] for index, name in enumerate(layout.names)}
        result: dict[str, Tensor] = {}
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for name, (p, group) in zip(layout.names, params, strict=True):
            state = self.state.get(p)
            if state and "log_alpha" in state:
                result[name] = state["log_alpha"].exp()
            else:
                result[name] = torch.full_like(p, group["alpha0"], dtype=state_dtype(p))
        return result

    # ------------------------------------------------------------------ the step

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        base_state = self._base.init_state(p, group)
        state.update(base_state)
        if self._trace == "hessian":
            # One trace column per block, for the weights and every base-state tensor.
            shape = (self._trace_columns(), *p.shape)
            state["trace"] = p.new_zeros(shape, dtype=state_dtype(p))
            for key in traced_state_keys(base_state):
                state[STATE_TRACE_PREFIX + key] = p.new_zeros(shape, dtype=state_dtype(p))
        elif self._meta.active:
            state["trace"] = self._new_trace(p)
        if self._learn_wd:
            state["wd_trace"] = self._new_trace(p)
        if self._kahan and p.dtype in (torch.bfloat16, torch.float16):
            state["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self.layout.per_weight:
            log_alpha = torch.full_like(p, math.log(group["alpha0"]), dtype=state_dtype(p))
            state["log_alpha"] = log_alpha
            for key, value in self._meta.init_state(log_alpha).items():
                state[_META_PREFIX + key] = value

    def _new_trace(self, p: Tensor) -> Tensor:
        dtype = self._trace_dtype or state_dtype(p)
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _block_indices(self, blocks: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Device tensors for the active params' block ids and the active-block mask (cached)."""
        cached = self._index_cache.get(blocks)
        if cached is None:
            index = torch.tensor(blocks, dtype=torch.int64, device=self._home)
            mask = torch.zeros(self.layout.num_blocks, dtype=torch.bool, device=self._home)
            mask[index] = True
            cached = (index, mask)
            self._index_cache[blocks] = cached
        return cached

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it is
                run with gradients enabled.

        Returns:
            The closure's loss, or None.
        """
        if self._trace == "hessian":
            return cast("float | None", self._hessian_step(closure))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        layout = self.layout
        entries = self._gather_entries()
        reduce_group = self._reduce_group()
        if not entries and reduce_group is None:
            return loss

        # 1. Meta-gradient with the trace from before this step (paper Alg. 3, line 6).
        meta_active = self._meta.active
        grads = meta_gradient(
            entries,
            num_blocks=len(self._log_alpha),
            block_index=self._block_indices(tuple(e.block for e in entries))[0]
            if entries
            else None,
            per_weight=layout.per_weight,
            meta_active=meta_active,
            learn_weight_decay=self._learn_wd,
            home=self._home,
            dtype=self._beta_dtype,
            reduce_group=reduce_group,
            reduce_blocks=self._partition_group is None or layout.mode in ("scalar", "group"),
        )
        z_block, z_weight, finite = grads.block, grads.weight, grads.finite
        # On CPU, reading a value is not a device synchronisation: a non-finite step is
        # skipped right here, and the per-tensor kernel gets Python scalars (torch's scalar
        # fast paths, no per-tensor 0-d arithmetic). CUDA keeps the sync-free device path.
        host_scalars = self._home.type == "cpu" and not self._device_scalars
        if host_scalars and not bool(finite):
            self._skipped.add_(1)
            return loss

        # 2. Base step and trace update, all with α_t: one kernel per bucket.
        scalars = StepScalars(
            finite=finite,
            host=host_scalars,
            meta_active=meta_active,
            alpha_blocks=None if layout.per_weight else self._log_alpha.exp(),
            kappa_blocks=self._log_wd.exp() if self._learn_wd else None,
        )
        options = self._kernel_options(host_scalars)
        for bucket in plan_kernels(entries, options, self._decoupled):
            self._kernels.run(bucket, scalars)

        # 3. Meta step on β = log α (after the weight step, as in the paper).
        if meta_active:
            if z_block is not None:
                if entries:
                    _, active = self._block_indices(tuple(e.block for e in entries))
                    n = len(self._log_alpha)
                    self._meta_step(self._log_alpha, z_block[:n], self._meta_state, active & finite)
                    if self._learn_wd:
                        self._meta_step(
                            self._log_wd,
                            z_block[n:],
                            self._wd_meta_state,
                            active & finite,
                            rule=self._wd_meta,
                            bounded=False,
                        )
            else:
                self._weight_meta_steps(entries, z_weight, finite)
        self._skipped.add_((~finite).to(torch.int64))
        return loss

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return is_decoupled(self._base, group)

    def _kernel_options(self, host_scalars: bool) -> KernelOptions:
        return KernelOptions(
            base=self._base.name,
            foreach=self._foreach,
            fused=self._fused,
            fused_backend=self._fused_backend,
            host_scalars=host_scalars,
            learned_weight_decay=self._learn_wd,
            per_weight=self.layout.per_weight,
            triton_failed=self._kernels.triton_failed,
            compile_failed=self._kernels.compile_failed,
        )

    def _weight_meta_steps(self, entries: list[Entry], z: list[Tensor], finite: Tensor) -> None:
        """Meta steps of per-weight step sizes, stored in each parameter's state."""
        for entry, z_entry in zip(entries, z, strict=True):
            meta_state = _weight_meta_state(entry.state)
            self._weight_meta_step(entry.state["log_alpha"], z_entry, meta_state, finite)

    def _weight_meta_step(
        self, log_alpha: Tensor, z: Tensor, meta_state: dict[str, Tensor], finite: Tensor
    ) -> None:
        """The meta step of one parameter's per-weight step sizes (compiled with ``fused``)."""
        keep = finite.to(z.device)
        bounds = self._log_bounds
        self._kernels.weight_meta_step(
            self._meta, log_alpha, z, meta_state, keep, bounds, self._fused
        )

    def _trace_columns(self) -> int:
        """Trace columns of ``trace="hessian"``: one per block, one shared for "weight"."""
        return 1 if self.layout.per_weight else self.layout.num_blocks

    def _grow_meta_trace(self, num_blocks: int) -> None:
        """Extend the 2×2 meta trace Y to new blocks: Y₀ = I for β, 0 for the meta state."""
        old = self._meta_trace
        current = old["log_alpha"].shape[0] if old else 0
        eye = torch.eye(num_blocks, dtype=self._beta_dtype, device=self._home)
        new = {"log_alpha": eye}
        for key in traced_state_keys(self._meta_state):
            new[key] = torch.zeros_like(eye)
        for key, value in old.items():
            new[key][:current, :current] = value
        self._meta_trace = new

    def _pad_trace_columns(self) -> None:
        """Give existing Hessian traces a zero column for each block added since."""
        columns = self._trace_columns()
        for state in self.state.values():
            for key, value in list(state.items()):
                if key == "trace" or key.startswith(STATE_TRACE_PREFIX):
                    missing = columns - value.shape[0]
                    if missing > 0:
                        state[key] = torch.cat([value, value.new_zeros(missing, *value.shape[1:])])

    def _hessian_step(self, closure: Callable[[], Any] | None) -> Any:
        """One step with the Hessian trace (docs/math.md §13, :mod:`metaoptimize.hessian`)."""
        if closure is None:
            raise RuntimeError(
                "MetaOptimize(trace='hessian') needs step(closure): the closure recomputes and "
                "returns the loss, without calling backward()"
            )
        if self._mesh() is not None:
            raise NotImplementedError("MetaOptimize: trace='hessian' does not support DTensor")
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        with torch.enable_grad():
            loss = closure()
            if not isinstance(loss, Tensor) or not loss.requires_grad:
                raise RuntimeError(
                    "MetaOptimize(trace='hessian'): the closure must return the loss as a "
                    "tensor that requires grad (and must not call backward())"
                )
            graph_grads: tuple[Tensor | None, ...] = torch.autograd.grad(
                loss, params, create_graph=True, allow_unused=True
            )
        for p, g in zip(params, graph_grads, strict=True):
            p.grad = None if g is None else g.detach()
        graph_grad_of = {id(p): g for p, g in zip(params, graph_grads, strict=True)}
        del graph_grads
        entries = self._gather_entries()
        if not entries:
            return loss
        outcome = hessian_trace_step(
            entries,
            [graph_grad_of[id(e.param)] for e in entries],
            self._base,
            columns=self._trace_columns(),
            per_weight=self.layout.per_weight,
            log_alpha=self._log_alpha,
            meta_trace=self._meta_trace["log_alpha"] if self._approximation == "2x2" else None,
        )
        del graph_grad_of
        finite, z_block, z_weight = outcome.finite, outcome.z_block, outcome.z_weight
        mixing, z_tangent = outcome.mixing, outcome.z_tangent

        # 5. Meta step (and, for 2×2, its tangents Y) with the pre-step β and meta state.
        if z_block is not None:
            _, active = self._block_indices(tuple(e.block for e in entries))
            keep = active & finite
            if mixing is not None and z_tangent is not None:
                gamma = float(entries[0].group["gamma"])  # one gamma: 2x2 requires it
                self._update_meta_trace(z_block, z_tangent, mixing, gamma, keep, finite)
            self._meta_step(self._log_alpha, z_block, self._meta_state, keep)
        else:
            self._weight_meta_steps(entries, z_weight, finite)
        self._skipped.add_((~finite).to(torch.int64))
        return loss

    def _update_meta_trace(
        self,
        z: Tensor,
        z_tangent: Tensor,
        mixing: Tensor,
        gamma: float,
        keep: Tensor,
        finite: Tensor,
    ) -> None:
        """Y_{t+1} = G^{yy} B + G^{yx} γX, column by column (2×2 approximation)."""
        trace = self._meta_trace
        keys = [k for k in trace if k != "log_alpha"]
        new_beta: list[Tensor] = []
        new_state: dict[str, list[Tensor]] = {k: [] for k in keys}
        for c in range(mixing.shape[0]):
            tangent_beta = mixing[:, c]
            tangent_state = {k: gamma * trace[k][:, c] for k in keys}
            beta_dot, state_dot = meta_step_tangent(
                self._meta,
                self._log_alpha,
                self._meta_state,
                z,
                self._log_bounds,
                (tangent_beta, tangent_state, z_tangent[:, c]),
            )
            # A block that does not step keeps β and its meta state: tangents pass through.
            new_beta.append(torch.where(keep, beta_dot, tangent_beta))
            for k in keys:
                new_state[k].append(torch.where(keep, state_dot[k], tangent_state[k]))
        trace["log_alpha"].copy_(torch.where(finite, torch.stack(new_beta, 1), trace["log_alpha"]))
        for k in keys:
            trace[k].copy_(torch.where(finite, torch.stack(new_state[k], 1), trace[k]))

    def _gather_entries(self) -> list[Entry]:
        """Parameters with a gradient, as local tensors (DTensor shards are viewed locally)."""
        layout = self.layout
        entries: list[Entry] = []
        position = 0
        sharded = self._mesh() is not None
        for group in self.param_groups:
            for p in group["params"]:
                block = layout.block_of_param[position]
                position += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("MetaOptimize does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, group, state)
                elif self._meta.active and "trace" not in state:
                    # Loaded from a run whose meta rule was off: start the trace at zero.
                    state["trace"] = self._new_trace(p)
                local_state = state
                if sharded:  # DTensor state is viewed as this rank's shard
                    local_state = {
                        k: _local(v) if isinstance(v, Tensor) else v for k, v in state.items()
                    }
                entries.append(
                    Entry(
                        group,
                        _local(p),
                        as_dtype(_local(p.grad), state_dtype(p)),
                        local_state,
                        block,
                        self._share(p),
                    )
                )
        return entries

    def _reduce_group(self) -> Any:
        """The process group over which block meta-gradients are summed, if any."""
        if self._partition_group is not None:
            return self._partition_group
        mesh = self._mesh()
        return None if mesh is None else mesh.get_group()

    def _mesh(self) -> Any:
        """The device mesh of the DTensor parameters (cached; reset when groups change)."""
        if self._mesh_cache is _UNSET:
            self._mesh_cache = self._find_mesh()
        return self._mesh_cache

    def _find_mesh(self) -> Any:
        if not _HAS_DTENSOR:
            return None
        meshes = {
            p.device_mesh for g in self.param_groups for p in g["params"] if isinstance(p, DTensor)
        }
        if not meshes:
            return None
        if len(meshes) > 1:
            raise NotImplementedError(
                "MetaOptimize: DTensor parameters on different device meshes are not supported"
            )
        (mesh,) = meshes
        if mesh.ndim != 1:
            raise NotImplementedError(
                "MetaOptimize: only 1-D device meshes (FSDP2) are "
                "supported; HSDP and tensor parallelism are not yet"
            )
        return mesh

    def _share(self, p: Tensor) -> float:
        """Weight of this rank's partial sum for ``p`` in the all-reduced meta-gradient."""
        if self._partition_group is not None:
            return 1.0  # ZeRO: each parameter lives on exactly one rank
        mesh = self._mesh()
        if mesh is None:
            return 1.0
        if isinstance(p, DTensor):
            (placement,) = p.placements
            if isinstance(placement, Shard):
                return 1.0
            if not isinstance(placement, Replicate):
                raise NotImplementedError(f"MetaOptimize: placement {placement} not supported")
        return 1.0 / float(mesh.size())  # replicated: every rank holds the whole tensor

    def _meta_step(
        self,
        log_alpha: Tensor,
        z: Tensor,
        meta_state: dict[str, Tensor],
        keep_new: Tensor,
        rule: MetaRule | None = None,
        bounded: bool = True,
    ) -> None:
        """Apply the meta rule where ``keep_new`` holds; update tensors in place."""
        low, high = self._log_bounds if bounded else (-math.inf, math.inf)
        meta_step(rule or self._meta, log_alpha, z, meta_state, keep_new, low, high)

    # ------------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """Return the state as in ``torch.optim``, with a ``"metaoptimize"`` entry in group 0.

        That entry holds the format version, the base and meta rule names, the block layout,
        the block-level log step sizes and meta state, and the skipped-step count. It lives in
        ``param_groups[0]`` because ``torch.distributed.checkpoint`` keeps only ``state`` and
        ``param_groups`` (docs/distributed.md).
        """
        state_dict = super().state_dict()
        for group in state_dict["param_groups"]:
            group.pop("partition_group", None)  # re-copied by ZeroRedundancyOptimizer
        state_dict["param_groups"][0]["metaoptimize"] = {
            "format_version": FORMAT_VERSION,
            "base": self._base.name,
            "meta": self._meta.name,
            "blocks": self.layout.signature(),
            "log_alpha": self._log_alpha.clone(),
            "meta_state": {k: v.clone() for k, v in self._meta_state.items()},
            "skipped_steps": self._skipped.clone(),
            "learn_weight_decay": self._learn_wd,
            "log_weight_decay": self._log_wd.clone(),
            "weight_decay_meta_state": {k: v.clone() for k, v in self._wd_meta_state.items()},
            "trace": self._trace,
            "trace_approximation": self._approximation,
            "meta_trace": {k: v.clone() for k, v in self._meta_trace.items()},
            # Settings held outside param_groups, restored by load_state_dict as torch.optim
            # restores every hyperparameter.
            "hyperparameters": {
                "meta_lr": self._meta.meta_lr,
                "meta_betas": self._meta.betas,
                "meta_eps": self._meta.eps,
                "weight_decay_meta_lr": self._wd_meta.meta_lr,
                "log_alpha_bounds": self._log_bounds,
            },
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`; tensors keep their saved dtype.

        Raises:
            ValueError: the state dict is not a MetaOptimize one, or was saved with another
                base rule, meta rule or block layout.
        """
        state_dict = dict(state_dict)
        groups = [dict(g) for g in state_dict.get("param_groups", [])]
        state_dict["param_groups"] = groups
        section = groups[0].pop("metaoptimize", None) if groups else None
        for group in groups[1:]:
            group.pop("metaoptimize", None)
        if section is None:
            raise ValueError(
                "Invalid state_dict: no 'metaoptimize' entry; it was not saved by MetaOptimize"
            )
        version = section.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"Invalid state_dict: format_version {version!r} is not supported "
                f"(expected {FORMAT_VERSION})"
            )
        for what, mine in (("base", self._base.name), ("meta", self._meta.name)):
            if section[what] != mine:
                raise ValueError(
                    f"Invalid state_dict: saved with {what}={section[what]!r}, but "
                    f"this optimizer uses {what}={mine!r}"
                )
        if section.get("learn_weight_decay", False) != self._learn_wd:
            raise ValueError(
                f"Invalid state_dict: saved with learn_weight_decay="
                f"{section.get('learn_weight_decay', False)}, but this optimizer uses "
                f"learn_weight_decay={self._learn_wd}"
            )
        saved_trace = (
            section.get("trace", "hessian-free"),
            section.get("trace_approximation", "L"),
        )
        own_trace = (self._trace, self._approximation)
        if saved_trace[0] != own_trace[0] or (
            own_trace[0] == "hessian" and saved_trace != own_trace
        ):
            raise ValueError(
                f"Invalid state_dict: saved with trace={saved_trace[0]!r} "
                f"(trace_approximation={saved_trace[1]!r}), but this optimizer uses "
                f"trace={own_trace[0]!r} (trace_approximation={own_trace[1]!r})"
            )
        if section["blocks"] != self.layout.signature():
            raise ValueError(
                f"Invalid state_dict: saved with block layout {section['blocks']!r}"
                f", but this optimizer has {self.layout.signature()!r}"
            )
        meta, wd_meta, bounds = self._restored_rules(section.get("hyperparameters"))
        for group in groups:
            self._complete_group({**group, "params": []}, bounds)  # validate, change nothing
        check_section_tensors(section, self._section_tensors())
        state = self._restored_state(state_dict["state"], groups)
        super().load_state_dict(state_dict)
        # Every check passed: from here on nothing raises.
        self.state.clear()
        self.state.update(state)
        self._meta, self._wd_meta, self._log_bounds = meta, wd_meta, bounds
        self._log_alpha.copy_(section["log_alpha"])
        for key, value in self._meta_state.items():
            value.copy_(section["meta_state"][key])
        self._skipped.copy_(section["skipped_steps"])
        self._log_wd.copy_(section["log_weight_decay"])
        for key, value in self._wd_meta_state.items():
            value.copy_(section["weight_decay_meta_state"][key])
        for key, value in self._meta_trace.items():
            value.copy_(section["meta_trace"][key])

    def _restored_rules(self, saved: object) -> tuple[MetaRule, MetaRule, tuple[float, float]]:
        """The meta rules and step-size bounds a state dict was saved with (validated).

        State dicts from before these were saved keep this optimizer's own.
        """
        if saved is None:
            return self._meta, self._wd_meta, self._log_bounds
        if not isinstance(saved, dict):
            raise TypeError(f"Invalid state_dict: hyperparameters {saved!r} is not a dict")
        name, betas = self._meta.name, saved.get("meta_betas")
        eps = cast(float, saved.get("meta_eps"))  # get_meta_rule checks it
        meta = get_meta_rule(name, saved.get("meta_lr"), betas, eps)
        wd_meta = get_meta_rule(name, saved.get("weight_decay_meta_lr"), betas, eps)
        return meta, wd_meta, restored_bounds(saved.get("log_alpha_bounds"))

    def _section_tensors(self) -> dict[str, Tensor | dict[str, Tensor]]:
        """The optimizer-wide tensors a saved section must match (shapes, by name)."""
        return {
            "log_alpha": self._log_alpha,
            "meta_state": self._meta_state,
            "skipped_steps": self._skipped,
            "log_weight_decay": self._log_wd,
            "weight_decay_meta_state": self._wd_meta_state,
            "meta_trace": self._meta_trace,
        }

    def _restored_state(
        self, saved_state: dict[Any, Any], groups: list[dict[str, Any]]
    ) -> dict[Tensor, dict[str, Any]]:
        """Checked copies of the saved per-parameter state.

        Each copy is on its parameter's device and in the dtype this optimizer creates (as
        torch.optim casts loaded state).

        Saved keys map to parameters as in torch: the saved groups' "params" lists, in order
        (integer ids from state_dict(), parameter names from distributed checkpoint).
        """
        saved_keys = [key for group in groups for key in group["params"]]
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        if len(saved_keys) != len(params):
            raise ValueError(
                f"Invalid state_dict: it holds {len(saved_keys)} parameters, this optimizer "
                f"has {len(params)}"
            )
        param_of = dict(zip(saved_keys, params, strict=True))
        restored: dict[Tensor, dict[str, Any]] = {}
        for key, values in saved_state.items():
            if key not in param_of:
                raise ValueError(f"Invalid state_dict: state[{key!r}] names no parameter")
            p, group = param_of[key]
            expected: dict[str, Any] = {}
            self._init_state(torch.empty(p.shape, dtype=p.dtype, device="meta"), group, expected)
            state: dict[str, Any] = {}
            for name, value in values.items():
                check_state_tensor(f"state[{key!r}]", name, value, expected.get(name), _local)
                if isinstance(value, Tensor):
                    dtype = expected[name].dtype if name in expected else value.dtype
                    value = value.to(device=p.device, dtype=dtype, copy=True)
                state[name] = value
            restored[p] = state
        return restored


def _check_trace(
    trace: object,
    approximation: object,
    meta_active: bool,
    blocks: object,
    conflicts: dict[str, bool],
) -> tuple[str, str]:
    """Validate ``trace`` and ``trace_approximation`` and what ``trace="hessian"`` excludes."""
    if trace not in TRACES:
        raise ValueError(f"Invalid trace: {trace!r}; choose one of {list(TRACES)}")
    if approximation not in APPROXIMATIONS:
        raise ValueError(
            f"Invalid trace_approximation: {approximation!r}; choose one of {list(APPROXIMATIONS)}"
        )
    assert isinstance(trace, str)
    assert isinstance(approximation, str)
    if trace == "hessian":
        if not meta_active:
            raise ValueError(
                "Invalid trace: 'hessian' needs an active meta rule (meta != 'fixed', meta_lr > 0)"
            )
        for name, given in conflicts.items():
            if given:
                raise ValueError(f"Invalid {name}: not supported with trace='hessian'")
        if approximation == "2x2" and blocks == "weight":
            raise ValueError(
                "Invalid trace_approximation: '2x2' with blocks='weight' would need an n×n meta "
                "trace; use 'L' or a block-level mode"
            )
    return trace, approximation


def _check_hessian_group(group: dict[str, Any], first: dict[str, Any], approximation: str) -> None:
    """Parameters and γ that ``trace="hessian"`` supports."""
    for p in group["params"]:
        if p.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"Invalid parameter dtype {p.dtype}: trace='hessian' needs float32 or float64"
            )
    if approximation == "2x2" and group["gamma"] != first["gamma"]:
        raise ValueError(
            f"Invalid gamma: {group['gamma']}; trace_approximation='2x2' needs one gamma for "
            f"all param groups (the first has {first['gamma']})"
        )


def _check_trace_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None:
        return None
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(
            f"Invalid trace_dtype: {value!r}; expected a floating dtype such as torch.bfloat16"
        )
    return dtype


def _promoted_state_dtype(param_groups: list[dict[str, Any]]) -> torch.dtype:
    dtype = torch.float32
    for group in param_groups:
        for p in group["params"]:
            dtype = torch.promote_types(dtype, state_dtype(p))
    return dtype


def _weight_meta_state(state: dict[str, Any]) -> dict[str, Tensor]:
    """The meta rule's state of per-weight step sizes, stored in the parameter's state."""
    return {k[len(_META_PREFIX) :]: v for k, v in state.items() if k.startswith(_META_PREFIX)}


def _local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view sharing its storage), or the tensor itself."""
    if _HAS_DTENSOR and isinstance(tensor, DTensor):
        local: Tensor = tensor.to_local()
        return local
    return tensor
