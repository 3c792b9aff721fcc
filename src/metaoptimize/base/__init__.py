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

from metaoptimize.base._rule import (
    BaseRule,
    Group,
    Quotient,
    Scalars,
    Slope,
    TensorList,
    has_decay,
    host_bias_correction,
    is_decoupled,
    is_one,
    operand,
    state_dtype,
)
from metaoptimize.base.adam import Adam, AdamW, adam_l2_slope
from metaoptimize.base.lion import Lion
from metaoptimize.base.rmsprop import RMSprop, rmsprop_l2_slope
from metaoptimize.base.sgd import SGD, SGDMomentum

__all__ = [
    "BASE_RULES",
    "BaseRule",
    "Group",
    "Quotient",
    "Scalars",
    "Slope",
    "TensorList",
    "adam_l2_slope",
    "get_base_rule",
    "has_decay",
    "host_bias_correction",
    "is_decoupled",
    "is_one",
    "operand",
    "rmsprop_l2_slope",
    "state_dtype",
]

BASE_RULES: dict[str, type[BaseRule]] = {
    rule.name: rule for rule in (SGD, SGDMomentum, RMSprop, Adam, AdamW, Lion)
}


def get_base_rule(name: str) -> BaseRule:
    """Return the base rule registered under ``name``.

    Raises:
        ValueError: ``name`` is not a known base rule.
    """
    if not isinstance(name, str):
        raise TypeError(f"Invalid base: {name!r}; expected a rule name")
    if name not in BASE_RULES:
        raise ValueError(f"Invalid base: {name!r}; choose one of {sorted(BASE_RULES)}")
    return BASE_RULES[name]()
