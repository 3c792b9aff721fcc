"""One table of optimizer cases drives the reference, resume, no-sync and kernel tests.

Each kernel test takes the cases its kernel supports from the same table, by capability
(:attr:`Case.triton`) or as one case per base rule (:data:`ONE_PER_BASE`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

# (base, extra group hyperparameters) covering every base rule and style.
BASES: list[tuple[str, dict[str, Any]]] = [
    ("sgd", {}),
    ("sgdm", {"momentum": 0.8}),
    ("sgdm", {"momentum": 0.9, "nesterov": True}),
    ("sgdm", {"momentum": 0.9, "dampening": 0.3}),
    ("sgdm", {"base_style": "paper", "momentum": 0.9}),
    ("rmsprop", {"betas": (0.9,)}),
    ("rmsprop", {"betas": (0.95,), "centered": True, "momentum": 0.5}),
    ("rmsprop", {"base_style": "paper", "betas": (0.99,)}),
    ("adam", {"betas": (0.8, 0.95)}),
    ("adamw", {}),
    ("lion", {"betas": (0.9, 0.99)}),
]
METAS = ["fixed", "sgd", "rmsprop", "adam", "lion", "auto"]
BLOCKS = ["scalar", "group", "tensor", "weight", "explicit"]
GAMMAS = [0.0, 0.9, 1.0]
WEIGHT_DECAYS = [0.0, 0.1]
#: Base rules with a Triton kernel (``fused=True`` on CUDA).
TRITON_BASES = ("adamw", "lion")


@dataclass(frozen=True)
class Case:
    base: str
    meta: str
    blocks: str
    gamma: float
    weight_decay: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def meta_lr(self) -> float:
        # SGD's meta-gradient is not normalised: give it a larger step so β visibly moves.
        return 0.5 if self.meta == "sgd" else 0.02

    def kwargs(self) -> dict[str, Any]:
        return {
            "base": self.base,
            "meta": self.meta,
            "alpha0": 0.02,
            "meta_lr": self.meta_lr,
            "gamma": self.gamma,
            "weight_decay": self.weight_decay,
            **self.extra,
        }

    @property
    def triton(self) -> bool:
        """Whether the Triton kernel runs this case (block-level step sizes, its bases)."""
        return self.base in TRITON_BASES and self.blocks != "weight"

    def groups(self, model: nn.Module) -> tuple[list[dict[str, Any]], Any]:
        """Two param groups of a ``TinyNet`` (one with an lr multiplier) and the blocks."""
        hidden, out = model.hidden, model.out
        groups = [
            {"params": list(hidden.parameters())},
            {"params": list(out.parameters()), "lr": 0.5},
        ]
        if self.blocks == "explicit":
            explicit: list[list[Tensor]] = [[hidden.weight, out.bias], [hidden.bias, out.weight]]
            return groups, explicit
        return groups, self.blocks

    def __str__(self) -> str:
        extra = ",".join(f"{k}={v}" for k, v in self.extra.items())
        return f"{self.base}[{extra}]-{self.meta}-{self.blocks}-g{self.gamma}-wd{self.weight_decay}"


def _cases() -> list[Case]:
    cases = []
    # Every base (and style) with every meta rule; blocks, gamma and weight decay rotate.
    rotation = itertools.cycle(itertools.product(BLOCKS, GAMMAS, WEIGHT_DECAYS))
    for (base, extra), meta in itertools.product(BASES, METAS):
        blocks, gamma, wd = next(rotation)
        cases.append(Case(base, meta, blocks, gamma, wd, extra))
    # Every block mode x gamma x weight decay for a decoupled and an L2 base.
    for base, meta in (("adamw", "lion"), ("adam", "adam")):
        for blocks, gamma, wd in itertools.product(BLOCKS, GAMMAS, WEIGHT_DECAYS):
            cases.append(Case(base, meta, blocks, gamma, wd))
    return cases


CASES = _cases()
#: Every base rule and style once, with meta rule, blocks, gamma and weight decay rotating.
ONE_PER_BASE = [CASES[i * len(METAS) + i % len(METAS)] for i in range(len(BASES))]
