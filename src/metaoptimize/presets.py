"""Named settings: the paper's combinations (App. C, Tables 2-5) and two classic special cases.

Use :func:`make` to build an optimizer, or :func:`get` for the keyword arguments::

    opt = metaoptimize.presets.make(model.parameters(), "cifar10-adamw-adam")
    opt = MetaOptimize(model.parameters(), **metaoptimize.presets.get("idbd"), alpha0=0.05)

Notes on fidelity (docs/math.md, "Presets"):

* The paper's "blockwise" runs used model-specific blocks (e.g. ResNet stages). The
  ``*-blockwise`` presets use ``blocks="tensor"`` as the generic stand-in; pass ``blocks=`` to
  reproduce a particular grouping.
* SGDm and RMSProp presets use ``base_style="paper"`` (lagged EMA momentum; bias-corrected
  RMSProp; decoupled weight decay), as in the paper's experiments.
* Table 2 leaves the SGDm + Adam meta betas blank; the Adam defaults (0.9, 0.999) are used.
* ``idbd`` and ``hypergradient-*`` use the plain SGD meta rule, which is not scale-free:
  ``meta_lr`` should be tuned to the problem's gradient scale.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from torch import Tensor

from metaoptimize.optimizer import MetaOptimize

__all__ = ["PRESETS", "get", "make", "names"]

_ADAMW = {"base": "adamw", "betas": (0.9, 0.999), "weight_decay": 0.1}
_LION = {"base": "lion", "betas": (0.9, 0.99), "weight_decay": 0.1}
_RMSPROP = {"base": "rmsprop", "base_style": "paper", "betas": (0.999,), "weight_decay": 0.1}
_SGDM = {"base": "sgdm", "base_style": "paper", "momentum": 0.9, "weight_decay": 0.1}
_META_ADAM = {"meta": "adam", "meta_betas": (0.9, 0.999), "meta_lr": 1e-3}
_META_LION = {"meta": "lion", "meta_betas": (0.9, 0.99), "meta_lr": 1e-3}
# The paper bounds no step size; the library's default range is removed to keep them verbatim.
_UNBOUNDED = {"alpha_min": 0.0, "alpha_max": math.inf}


def _paper(
    base: dict[str, Any], meta: dict[str, Any], alpha0: float, gamma: float = 1.0
) -> dict[str, dict[str, Any]]:
    scalar = {
        **base,
        **meta,
        **_UNBOUNDED,
        "alpha0": alpha0,
        "gamma": gamma,
        "blocks": "scalar",
    }
    return {"scalar": scalar, "blockwise": {**scalar, "blocks": "tensor"}}


def _build() -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    paper_rows = {
        # Table 2 (CIFAR-10, ResNet-18)
        "cifar10-adamw-adam": _paper(_ADAMW, _META_ADAM, 1e-6),
        "cifar10-lion-lion": _paper(_LION, _META_LION, 1e-6),
        "cifar10-rmsprop-adam": _paper(_RMSPROP, _META_ADAM, 1e-6),
        "cifar10-sgdm-adam": _paper(_SGDM, _META_ADAM, 1e-6),
        # Table 3 (non-stationary CIFAR-100, batch size 1)
        "continual-adamw-adam": _paper(_ADAMW, _META_ADAM, 1e-4, gamma=0.999),
        # Table 4 (ImageNet, ResNet-18)
        "imagenet-adamw-lion": _paper(_ADAMW, _META_LION, 1e-6),
        "imagenet-lion-lion": _paper(_LION, _META_LION, 1e-6),
        "imagenet-sgdm-lion": _paper(_SGDM, _META_LION, 1e-5),
        # Table 5 (TinyStories); Fig. 6 and Table 1 use the Lion meta rule, Table 5 says Adam.
        "tinystories-adamw-lion": _paper(_ADAMW, _META_LION, 1e-6),
        "tinystories-adamw-adam": _paper(_ADAMW, _META_ADAM, 1e-6),
        "tinystories-lion-lion": _paper(_LION, _META_LION, 1e-6),
    }
    for name, variants in paper_rows.items():
        table[name] = variants["scalar"]
        table[name + "-blockwise"] = variants["blockwise"]
    # The paper's general defaults (and this library's before 0.2): AdamW base, Lion meta,
    # alpha0 1e-6, meta_lr 1e-3, gamma 1, no bounds. Meant for runs of 10^4-10^5 steps.
    table["paper"] = _paper({"base": "adamw"}, _META_LION, 1e-6)["scalar"]
    # IDBD-style (Sutton 1992): per-weight step sizes, SGD base, SGD meta, undiscounted trace.
    table["idbd"] = {
        "base": "sgd",
        "meta": "sgd",
        "blocks": "weight",
        "gamma": 1.0,
        "meta_lr": 0.1,
        "alpha0": 1e-2,
    }
    # Hypergradient descent (Baydin et al. 2018) in log space: γ = 0, SGD meta, one step size.
    table["hypergradient-sgd"] = {
        "base": "sgd",
        "meta": "sgd",
        "blocks": "scalar",
        "gamma": 0.0,
        "meta_lr": 0.1,
        "alpha0": 1e-2,
    }
    table["hypergradient-adam"] = {
        "base": "adam",
        "meta": "sgd",
        "blocks": "scalar",
        "gamma": 0.0,
        "meta_lr": 0.1,
        "alpha0": 1e-3,
    }
    return table


PRESETS: dict[str, dict[str, Any]] = _build()


def names() -> list[str]:
    """All preset names, sorted."""
    return sorted(PRESETS)


def get(name: str) -> dict[str, Any]:
    """Keyword arguments of preset ``name`` (a fresh copy).

    Raises:
        ValueError: unknown preset name.
    """
    if name not in PRESETS:
        raise ValueError(f"Invalid preset: {name!r}; choose one of {names()}")
    return dict(PRESETS[name])


def make(
    params: Iterable[Tensor] | Iterable[dict[str, Any]], name: str, **overrides: Any
) -> MetaOptimize:
    """Build a :class:`MetaOptimize` from preset ``name``; keyword arguments override it."""
    return MetaOptimize(params, **{**get(name), **overrides})
