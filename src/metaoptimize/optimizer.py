"""The :class:`MetaOptimize` optimizer: Hessian-free MetaOptimize as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
from torch import Tensor
from torch.optim import Optimizer

from metaoptimize._checkpoint import (
    check_section,
    check_section_tensors,
    check_state_tensor,
    restored_bounds,
)
from metaoptimize._kernels import (
    COMPILED,
    Bucket,
    KernelOptions,
    layout_sensitive,
    plan_kernels,
)
from metaoptimize._kernels.flat import Merged
from metaoptimize._kernels.runner import KernelRunner, StepScalars
from metaoptimize._kernels.triton import triton_available
from metaoptimize._math import as_dtype
from metaoptimize._options import (
    DEFAULT_ALPHA0,
    DEFAULT_GAMMA,
    DEFAULT_META,
    FUSED_BACKENDS,
    check_alpha0_in_bounds,
    check_bool,
    check_trace_dtype,
    complete_group,
    log_bounds,
)
from metaoptimize._types import Entry
from metaoptimize._validation import check_number
from metaoptimize.base import BaseRule, get_base_rule, is_decoupled, state_dtype
from metaoptimize.blocks import BlockLayout, BlocksSpec, build_layout
from metaoptimize.distributed import Sharding, local
from metaoptimize.hessian import APPROXIMATIONS, TRACES, HessianTrace, graph_gradients
from metaoptimize.meta import MetaRule, get_meta_rule
from metaoptimize.metagrad import MetaGradient, meta_gradient
from metaoptimize.metaparams import UNBOUNDED, MetaParameter, block_start_values

__all__ = ["MetaOptimize"]

FORMAT_VERSION = 1
_META_PREFIX = "meta_"
#: Kernel plans kept per optimizer (one per set of parameters with gradients).
_PLAN_CACHE_SIZE = 8
_ALPHA0_ADVICE = (
    "; use blocks='group' or 'tensor', or one alpha0 with a different lr multiplier per group"
)


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
            The first step compiles (seconds). On CPU with block step sizes, the Adam,
            AdamW and Lion bases compile a step with host scalars (one call per tensor, the
            small tensors merged into one, as ``foreach`` describes); the other bases keep
            the default kernels, which measured faster than the general compiled one, unless
            ``fused_backend="compile"``; per-weight step sizes compile their large tensors
            (docs/performance.md).
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
            on CUDA through a Triton kernel when Triton is installed, everything else on CUDA
            through ``torch.compile``, and on CPU the Adam(W)/Lion host-compiled step, other bases
            through the default kernels (but for per-weight step sizes);
            ``"triton"`` also uses Triton off CUDA (its interpreter, ``TRITON_INTERPRET=1``,
            for tests); ``"compile"`` never uses Triton and compiles on CPU too.
        foreach: update the parameters of a param group, device and dtype with multi-tensor
            (``torch._foreach_*``) operations, one launch per operation instead of one per
            tensor. Default None: on for CUDA tensors and for CPU tensors of at most 32768
            elements, where the per-tensor kernel's fixed cost dominates (docs/performance.md).
            ``fused=True`` takes precedence for the tensors it supports. On CPU (not with
            ``foreach=False``) the small tensors of a param group and block, two or more,
            step as one flat tensor: their state entries become views of one flat buffer per
            key, and two buffers the size of those tensors together hold their gathered
            weights and gradients.
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
    any state) and is counted in :attr:`skipped_steps`. On CUDA this is decided on the device
    and ``step()`` never synchronises with the host; on CPU, where reading a value is not a
    synchronisation, it is decided on the host and the kernels take Python scalars.

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
        self._base: BaseRule = get_base_rule(base)
        meta_rule = get_meta_rule(meta, meta_lr, meta_betas, meta_eps)
        self._learn_wd = check_bool(learn_weight_decay, "learn_weight_decay")
        wd_rule = _weight_decay_rule(meta_rule, weight_decay_meta_lr, learn_weight_decay, blocks)
        bounds = log_bounds(alpha_min, alpha_max, self._base.default_alpha_range)
        self._blocks_spec = blocks
        self._sharding = Sharding(partition_group, explicit_blocks=not isinstance(blocks, str))
        self._fused = check_bool(fused, "fused")
        self._fused_backend = _check_fused_backend(fused_backend)
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"Invalid foreach: {foreach!r}; expected a bool or None")
        self._foreach = foreach
        # Tests set this to run the sync-free device-scalar path on CPU too.
        self._device_scalars = False
        self._trace_dtype = check_trace_dtype(trace_dtype)
        self._kahan = check_bool(kahan_summation, "kahan_summation")
        self._hessian = _hessian_trace(
            trace,
            trace_approximation,
            meta_active=meta_rule.active,
            blocks=blocks,
            conflicts={
                "fused": fused,
                "learn_weight_decay": learn_weight_decay,
                "kahan_summation": kahan_summation,
                "trace_dtype": trace_dtype is not None,
                "partition_group": partition_group is not None,
            },
        )
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
        beta_dtype = _promoted_state_dtype(self.param_groups)
        # Plain tensors on the home device, even when the parameters are DTensors.
        no_blocks = torch.empty(0, dtype=beta_dtype, device=self._home)
        self._step_size = MetaParameter(meta_rule, bounds, no_blocks)
        self._weight_decay = MetaParameter(wd_rule, UNBOUNDED, no_blocks.clone())
        self._skipped = torch.zeros((), dtype=torch.int64, device=self._home)
        self._index_cache: dict[tuple[int, ...], tuple[Tensor, Tensor, bool]] = {}
        self._options_cache: dict[tuple[bool, bool, bool, bool], KernelOptions] = {}
        self._plan_cache: dict[tuple[Any, ...], list[tuple[str, list[int]]]] = {}
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

    def _complete_group(self, group: dict[str, Any]) -> None:
        """Validate and complete a group's hyperparameters (``alpha0``'s range: at growth)."""
        complete_group(group, self._base)
        if self._hessian is not None:
            _check_hessian_group(group, self.param_groups[0], self._hessian.approximation)
        if self._learn_wd and not group["weight_decay"] > 0.0:
            raise ValueError(
                f"Invalid weight_decay: {group['weight_decay']}; "
                "learn_weight_decay needs weight_decay > 0 in every group"
            )

    def _grow_blocks(self) -> None:
        """(Re)build the layout and give new blocks their initial step sizes (and decays)."""
        layout = build_layout(self._blocks_spec, self.param_groups)
        self._sharding.reset()
        old = self._layout
        if (
            old is not None
            and old.block_of_param != layout.block_of_param[: len(old.block_of_param)]
        ):
            raise ValueError("Invalid blocks: the new param group changes existing blocks")
        check_alpha0_in_bounds(self.param_groups, self._step_size.bounds)
        if layout.per_weight:
            self._layout = layout
            return
        alpha0 = block_start_values(layout, self.param_groups, "alpha0", _ALPHA0_ADVICE)
        decay = (
            block_start_values(layout, self.param_groups, "weight_decay") if self._learn_wd else {}
        )
        self._layout = layout  # every check passed: from here on nothing raises
        new_blocks = range(len(self._step_size), layout.num_blocks)
        if not new_blocks:
            return
        self._step_size.grow([math.log(alpha0[b]) for b in new_blocks])
        if self._learn_wd:
            self._weight_decay.grow([math.log(decay[b]) for b in new_blocks])
        if self._hessian is not None:
            self._hessian.grow(layout, self.state.values(), self._step_size)
        self._index_cache.clear()
        self._plan_cache.clear()

    # ------------------------------------------------------------------ public helpers

    @property
    def layout(self) -> BlockLayout:
        """The step-size block layout."""
        assert self._layout is not None
        return self._layout

    @property
    def requires_closure(self) -> bool:
        """Whether :meth:`step` needs a closure that returns the loss (``trace="hessian"``)."""
        return self._hessian is not None

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
        return self._step_size.rule.meta_lr

    @meta_lr.setter
    def meta_lr(self, value: float) -> None:
        old = self._step_size.rule
        rule = get_meta_rule(old.name, value, old.betas, old.eps)
        if not rule.active and (self._learn_wd or self._hessian is not None):
            raise ValueError(
                f"Invalid meta_lr: {value}; learn_weight_decay and trace='hessian' need "
                "an active meta rule"
            )
        self._step_size.rule = rule

    def weight_decays(self) -> dict[str, Tensor]:
        """Current weight decay by block (learned with ``learn_weight_decay=True``).

        Raises:
            RuntimeError: the weight decay is not learned.
        """
        if not self._learn_wd:
            raise RuntimeError(
                "weight_decays(): the weight decay is not learned; pass learn_weight_decay=True"
            )
        kappa = self._weight_decay.exp()
        return {name: kappa[index] for index, name in enumerate(self.layout.names)}

    def step_sizes(self) -> dict[str, Tensor]:
        """Current learned step sizes ``α = exp(β)`` by block, in block order.

        Block-level modes give 0-d tensors; ``blocks="weight"`` gives parameter-shaped tensors.
        The group's ``lr`` multiplier is not included. Reading the values (``.item()``) is the
        caller's choice; this method itself does not synchronise.
        """
        layout = self.layout
        if not layout.per_weight:
            alpha = self._step_size.exp()
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

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one optimisation step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss; it is
                run with gradients enabled.

        Returns:
            The closure's loss, or None.
        """
        if self._hessian is not None:
            return cast("float | None", self._hessian_step(closure))
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        entries = self._gather_entries()
        reduce_group = self._sharding.reduce_group(self.param_groups)
        if not entries and reduce_group is None:
            return loss

        # On CPU, reading a value is not a device synchronisation: a non-finite step is
        # skipped right here, and the kernels get Python scalars (torch's scalar fast paths,
        # no per-tensor 0-d arithmetic). CUDA keeps the sync-free device path.
        host_scalars = self._home.type == "cpu" and not self._device_scalars

        # The kernel of each parameter; on CPU the small tensors of a bucket step as one flat
        # tensor from here on (meta-gradient, kernels, meta step), their weights gathered.
        buckets = self._plan(entries, host_scalars)
        merged: list[Merged] = []
        if host_scalars and self._sharding.mesh(self.param_groups) is None:
            buckets, merged = self._kernels.merge(
                buckets, self.layout.per_weight, chosen_kernels=self._foreach is None
            )
            entries = [e for bucket in buckets for e in bucket.entries]

        # 1. Meta-gradient with the trace from before this step (paper Alg. 3, line 6).
        meta_active = self._step_size.rule.active
        blocks = tuple(e.block for e in entries)
        grads = self._meta_gradient(entries, blocks, reduce_group, host_scalars)
        if host_scalars and not bool(grads.finite):
            self._skipped.add_(1)  # the gathered weights are dropped
            return loss

        # 2. Base step and trace update, all with α_t: one kernel per bucket.
        scalars = StepScalars(
            finite=grads.finite,
            host=host_scalars,
            meta_active=meta_active,
            step_sizes=None if self.layout.per_weight else self._step_size,
            weight_decays=self._weight_decay if self._learn_wd else None,
        )
        for bucket in buckets:
            self._kernels.run(bucket, scalars)
        for part in merged:
            part.scatter()

        # 3. Meta steps on β = log α (after the weight step, as in the paper); per-weight
        # step sizes are compiled where the weight step was.
        compiled = None
        if self.layout.per_weight:
            compiled = {id(e.param) for b in buckets if b.kernel == COMPILED for e in b.entries}
        self._meta_steps(entries, blocks, grads, compiled)
        return loss

    def _gather_entries(self) -> list[Entry]:
        """Parameters with a gradient, as local tensors (DTensor shards are viewed locally)."""
        block_of_param = self.layout.block_of_param
        entries: list[Entry] = []
        position = 0
        mesh = self._sharding.mesh(self.param_groups)
        needs_trace = self._step_size.rule.active
        for group in self.param_groups:
            for p in group["params"]:
                block = block_of_param[position]
                position += 1
                grad = p.grad
                if grad is None:
                    continue
                if grad.is_sparse:
                    raise RuntimeError("MetaOptimize does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(p, group, state)
                elif needs_trace and "trace" not in state:
                    # Loaded from a run whose meta rule was off: start the trace at zero.
                    state["trace"] = self._new_trace(p)
                if mesh is None:
                    entries.append(
                        Entry(group, p, as_dtype(grad, state_dtype(p)), state, block, 1.0)
                    )
                    continue
                # DTensor state is viewed as this rank's shard
                state = {k: local(v) if isinstance(v, Tensor) else v for k, v in state.items()}
                grad = as_dtype(local(grad), state_dtype(p))
                share = self._sharding.share(p, mesh)
                entries.append(Entry(group, local(p), grad, state, block, share))
        return entries

    def _init_state(self, p: Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        base_state = self._base.init_state(p, group)
        state.update(base_state)
        if self._hessian is not None:
            self._hessian.init_state(p, base_state, state, self._hessian.columns(self.layout))
        elif self._step_size.rule.active:
            state["trace"] = self._new_trace(p)
        if self._learn_wd:
            state["wd_trace"] = self._new_trace(p)
        if self._kahan and p.dtype in (torch.bfloat16, torch.float16):
            state["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if self.layout.per_weight:
            log_alpha = torch.full_like(p, math.log(group["alpha0"]), dtype=state_dtype(p))
            state["log_alpha"] = log_alpha
            for key, value in self._step_size.rule.init_state(log_alpha).items():
                state[_META_PREFIX + key] = value

    def _new_trace(self, p: Tensor) -> Tensor:
        dtype = self._trace_dtype or state_dtype(p)
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)

    def _block_indices(self, blocks: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Device tensors for the active params' block ids and the active-block mask (cached)."""
        index, mask, _ = self._block_info(blocks)
        return index, mask

    def _block_info(self, blocks: tuple[int, ...]) -> tuple[Tensor, Tensor, bool]:
        """:meth:`_block_indices` and whether every block is active (cached per block tuple)."""
        cached = self._index_cache.get(blocks)
        if cached is None:
            index = torch.tensor(blocks, dtype=torch.int64, device=self._home)
            mask = torch.zeros(self.layout.num_blocks, dtype=torch.bool, device=self._home)
            mask[index] = True
            cached = (index, mask, len(set(blocks)) == self.layout.num_blocks)
            self._index_cache[blocks] = cached
        return cached

    def _meta_gradient(
        self,
        entries: list[Entry],
        blocks: tuple[int, ...],
        reduce_group: Any,
        host: bool,
    ) -> MetaGradient:
        layout = self.layout
        block_index = self._block_indices(blocks)[0] if entries else None
        return meta_gradient(
            entries,
            num_blocks=len(self._step_size),
            block_index=block_index,
            per_weight=layout.per_weight,
            meta_active=self._step_size.rule.active,
            learn_weight_decay=self._learn_wd,
            home=self._home,
            dtype=self._step_size.dtype,
            reduce_group=reduce_group,
            reduce_blocks=self._sharding.partition_group is None
            or layout.mode in ("scalar", "group"),
            host=host,
        )

    def _decoupled(self, group: dict[str, Any]) -> bool:
        return is_decoupled(self._base, group)

    def _plan(self, entries: list[Entry], host_scalars: bool) -> list[Bucket]:
        """:func:`plan_kernels` of this step, reused while the same parameters have gradients.

        A kernel's choice depends on the options and on what a parameter is (size, dtype,
        device, state kind), which a parameter keeps; contiguity (the fused kernels) and
        DTensor shards (viewed anew every step) are checked every step instead.
        """
        sharded = self._sharding.mesh(self.param_groups) is not None
        options = self._kernel_options(host_scalars, sharded)
        if layout_sensitive(options) or sharded:
            return plan_kernels(entries, options, self._decoupled)
        key = (options, *(id(e.param) for e in entries))
        cached = self._plan_cache.get(key)
        if cached is None:
            position = {id(e): i for i, e in enumerate(entries)}
            planned = plan_kernels(entries, options, self._decoupled)
            cached = [(b.kernel, [position[id(e)] for e in b.entries]) for b in planned]
            if len(self._plan_cache) >= _PLAN_CACHE_SIZE:
                self._plan_cache.clear()  # gradients on ever-changing subsets: start over
            self._plan_cache[key] = cached
        return [Bucket(kernel, [entries[i] for i in indices]) for kernel, indices in cached]

    def _kernel_options(self, host_scalars: bool, sharded: bool) -> KernelOptions:
        """The kernel options of this step (built once per combination of what can change)."""
        key = (host_scalars, self._kernels.triton_failed, self._kernels.compile_failed, sharded)
        options = self._options_cache.get(key)
        if options is None:
            options = KernelOptions(
                base=self._base.name,
                foreach=self._foreach,
                fused=self._fused,
                fused_backend=self._fused_backend,
                host_scalars=host_scalars,
                learned_weight_decay=self._learn_wd,
                per_weight=self.layout.per_weight,
                triton_failed=key[1],
                compile_failed=key[2],
                sharded=sharded,
            )
            self._options_cache[key] = options
        return options

    def _meta_steps(
        self,
        entries: list[Entry],
        blocks: tuple[int, ...],
        grads: MetaGradient,
        compiled: set[int] | None = None,
    ) -> None:
        """The meta steps of this step where it was finite; a skipped step is counted.

        A verdict read on the host (a Python bool, on CPU) reaches here only for a finite step.
        ``compiled``: ids of the parameters whose weight step was compiled (None: all, with
        ``fused``).
        """
        finite = grads.finite
        if self._step_size.rule.active and entries:
            if grads.block is not None:
                _, active, all_active = self._block_info(blocks)
                keep = _keep(active, finite, all_active)
                n = len(self._step_size)
                self._step_size.step(grads.block[:n], keep)
                if self._learn_wd:
                    self._weight_decay.step(grads.block[n:], keep)
            else:  # per-weight step sizes live in each parameter's state
                self._kernels.weight_meta_steps(
                    self._step_size.rule,
                    [entry.state["log_alpha"] for entry in entries],
                    grads.weight,
                    _weight_meta_states(entries),
                    finite if isinstance(finite, Tensor) else None,
                    self._step_size.bounds,
                    [
                        self._fused if compiled is None else id(entry.param) in compiled
                        for entry in entries
                    ],
                )
        if isinstance(finite, Tensor):
            self._skipped.add_((~finite).to(torch.int64))

    def _hessian_step(self, closure: Callable[[], Any] | None) -> Any:
        """One step with the Hessian trace (docs/math.md §13, :mod:`metaoptimize.hessian`)."""
        assert self._hessian is not None
        if closure is None:
            raise RuntimeError(
                "MetaOptimize(trace='hessian') needs step(closure): the closure recomputes and "
                "returns the loss, without calling backward()"
            )
        if self._sharding.mesh(self.param_groups) is not None:
            raise NotImplementedError("MetaOptimize: trace='hessian' does not support DTensor")
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        loss, graph_grad_of = graph_gradients(closure, params)
        entries = self._gather_entries()
        if not entries:
            return loss
        layout = self.layout
        blocks = tuple(e.block for e in entries)
        active = None if layout.per_weight else self._block_indices(blocks)[1]
        graph_grads = [graph_grad_of.pop(id(e.param)) for e in entries]
        del graph_grad_of
        grads = self._hessian.step(
            entries, graph_grads, self._base, layout, self._step_size, active
        )
        del graph_grads  # frees the graph before the meta step
        self._meta_steps(entries, blocks, grads)
        return loss

    # ------------------------------------------------------------------ state dict

    def __getstate__(self) -> dict[str, Any]:
        """Everything, for ``copy.deepcopy`` and pickling.

        torch.optim's own keeps only ``defaults``, ``state`` and ``param_groups``; the meta
        parameters, rules and kernels live in other attributes. The kernel plans are keyed by
        parameter ids, which a copy does not share: they are left out.
        """
        state = dict(self.__dict__)
        state["_plan_cache"] = {}
        return state

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
        saved = state_dict["state"]
        for index, state in saved.items():
            # The CPU kernels keep small tensors' state as views of flat buffers: saved as
            # copies, each entry is its own tensor (a file holds what it names; tools that
            # refuse shared storage, such as safetensors, take it). The live dicts are
            # torch.optim's packed entries: new dicts, not edits.
            if any(isinstance(v, Tensor) and v._is_view() for v in state.values()):
                saved[index] = {
                    key: value.clone() if isinstance(value, Tensor) and value._is_view() else value
                    for key, value in state.items()
                }
        log_alpha, meta_state = self._step_size.saved()
        log_wd, wd_meta_state = self._weight_decay.saved()
        rule = self._step_size.rule
        trace, approximation = self._trace_kind()
        meta_trace = {} if self._hessian is None else self._hessian.meta_trace
        state_dict["param_groups"][0]["metaoptimize"] = {
            "format_version": FORMAT_VERSION,
            "base": self._base.name,
            "meta": rule.name,
            "blocks": self.layout.signature(),
            "log_alpha": log_alpha,
            "meta_state": meta_state,
            "skipped_steps": self._skipped.clone(),
            "learn_weight_decay": self._learn_wd,
            "log_weight_decay": log_wd,
            "weight_decay_meta_state": wd_meta_state,
            "trace": trace,
            "trace_approximation": approximation,
            "meta_trace": {k: v.clone() for k, v in meta_trace.items()},
            # Settings held outside param_groups, restored by load_state_dict as torch.optim
            # restores every hyperparameter.
            "hyperparameters": {
                "meta_lr": rule.meta_lr,
                "meta_betas": rule.betas,
                "meta_eps": rule.eps,
                "weight_decay_meta_lr": self._weight_decay.rule.meta_lr,
                "log_alpha_bounds": self._step_size.bounds,
            },
        }
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`; nothing changes unless all of it loads.

        Per-parameter state is cast to the dtype and device this optimizer creates.

        Raises:
            ValueError: the state dict is not a MetaOptimize one, was saved with another
                base rule, meta rule, trace or block layout, or holds unusable values.
        """
        state_dict = dict(state_dict)
        groups = [dict(g) for g in state_dict.get("param_groups", [])]
        state_dict["param_groups"] = groups
        section = groups[0].pop("metaoptimize", None) if groups else None
        for group in groups[1:]:
            group.pop("metaoptimize", None)
        check_section(
            section,
            format_version=FORMAT_VERSION,
            rules={"base": self._base.name, "meta": self._step_size.rule.name},
            learn_weight_decay=self._learn_wd,
            trace=self._trace_kind(),
            blocks=self.layout.signature(),
        )
        assert section is not None
        meta, wd_meta, bounds = self._restored_rules(section.get("hyperparameters"))
        for group in groups:
            self._complete_group({**group, "params": []})  # validate, change nothing
        check_alpha0_in_bounds(groups, bounds)
        check_section_tensors(section, self._section_tensors())
        state = self._restored_state(state_dict["state"], groups)
        super().load_state_dict(state_dict)
        # Every check passed: from here on nothing raises.
        self._plan_cache.clear()
        self.state.clear()
        self.state.update(state)
        self._step_size.rule, self._step_size.bounds = meta, bounds
        self._weight_decay.rule = wd_meta
        self._step_size.restore(section["log_alpha"], section["meta_state"])
        self._weight_decay.restore(section["log_weight_decay"], section["weight_decay_meta_state"])
        self._skipped.copy_(section["skipped_steps"])
        if self._hessian is not None:
            for key, value in self._hessian.meta_trace.items():
                value.copy_(section["meta_trace"][key])

    def _trace_kind(self) -> tuple[str, str]:
        """``(trace, trace_approximation)`` as saved in a state dict."""
        if self._hessian is None:
            return "hessian-free", "L"
        return "hessian", self._hessian.approximation

    def _restored_rules(self, saved: object) -> tuple[MetaRule, MetaRule, tuple[float, float]]:
        """The meta rules and step-size bounds a state dict was saved with (validated).

        State dicts from before these were saved keep this optimizer's own.
        """
        if saved is None:
            return self._step_size.rule, self._weight_decay.rule, self._step_size.bounds
        if not isinstance(saved, dict):
            raise TypeError(f"Invalid state_dict: hyperparameters {saved!r} is not a dict")
        name, betas = self._step_size.rule.name, saved.get("meta_betas")
        eps = cast(float, saved.get("meta_eps"))  # get_meta_rule checks it
        meta = get_meta_rule(name, saved.get("meta_lr"), betas, eps)
        wd_meta = get_meta_rule(name, saved.get("weight_decay_meta_lr"), betas, eps)
        return meta, wd_meta, restored_bounds(saved.get("log_alpha_bounds"))

    def _section_tensors(self) -> dict[str, Tensor | dict[str, Tensor]]:
        """The optimizer-wide tensors a saved section must match (shapes, by name)."""
        return {
            "log_alpha": self._step_size.values,
            "meta_state": self._step_size.state,
            "skipped_steps": self._skipped,
            "log_weight_decay": self._weight_decay.values,
            "weight_decay_meta_state": self._weight_decay.state,
            "meta_trace": {} if self._hessian is None else self._hessian.meta_trace,
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
                check_state_tensor(f"state[{key!r}]", name, value, expected.get(name), local)
                if isinstance(value, Tensor):
                    dtype = expected[name].dtype if name in expected else value.dtype
                    value = value.to(device=p.device, dtype=dtype, copy=True)
                state[name] = value
            restored[p] = state
        return restored


def _weight_decay_rule(
    meta_rule: MetaRule, meta_lr: float | None, learn: bool, blocks: BlocksSpec
) -> MetaRule:
    """The meta rule of the learned weight decay: the step sizes' with its own meta step size."""
    wd_meta_lr = (
        meta_rule.meta_lr if meta_lr is None else check_number(meta_lr, "weight_decay_meta_lr")
    )
    if wd_meta_lr < 0.0:
        raise ValueError(f"Invalid weight_decay_meta_lr: {wd_meta_lr}; need >= 0")
    if learn and not meta_rule.active:
        raise ValueError(
            "Invalid learn_weight_decay: it needs an active meta rule "
            "(meta != 'fixed' and meta_lr > 0)"
        )
    if learn and blocks == "weight":
        raise ValueError("Invalid learn_weight_decay: not supported with blocks='weight'")
    return get_meta_rule(meta_rule.name, wd_meta_lr, meta_rule.betas, meta_rule.eps)


def _check_fused_backend(value: object) -> str:
    if value not in FUSED_BACKENDS:
        raise ValueError(f"Invalid fused_backend: {value!r}; choose 'auto', 'triton' or 'compile'")
    if value == "triton" and not triton_available():
        raise ValueError("Invalid fused_backend: 'triton' needs Triton (pip install triton)")
    return str(value)


def _hessian_trace(
    trace: object,
    approximation: object,
    meta_active: bool,
    blocks: object,
    conflicts: dict[str, bool],
) -> HessianTrace | None:
    """The Hessian variant's state for ``trace="hessian"`` (None for the Hessian-free trace).

    Validates ``trace``, ``trace_approximation`` and what ``trace="hessian"`` excludes.
    """
    if trace not in TRACES:
        raise ValueError(f"Invalid trace: {trace!r}; choose one of {list(TRACES)}")
    if approximation not in APPROXIMATIONS:
        raise ValueError(
            f"Invalid trace_approximation: {approximation!r}; choose one of {list(APPROXIMATIONS)}"
        )
    if trace != "hessian":
        return None
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
    return HessianTrace(str(approximation))


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


def _promoted_state_dtype(param_groups: list[dict[str, Any]]) -> torch.dtype:
    dtype = torch.float32
    for group in param_groups:
        for p in group["params"]:
            dtype = torch.promote_types(dtype, state_dtype(p))
    return dtype


def _keep(active: Tensor, finite: Tensor | bool, all_active: bool) -> Tensor | None:
    """Where the block meta step applies; None when it applies everywhere.

    A Python bool verdict was decided on the host (CPU): the step is finite.
    """
    if isinstance(finite, Tensor):
        return active & finite
    return None if all_active else active


def _weight_meta_states(entries: list[Entry]) -> dict[str, list[Tensor]]:
    """The meta rule's state of per-weight step sizes (kept in each parameter's state), by key."""
    keys = [k for k in entries[0].state if k.startswith(_META_PREFIX)]
    return {k[len(_META_PREFIX) :]: [e.state[k] for e in entries] for k in keys}
