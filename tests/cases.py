"""One table of optimizer cases drives the reference, resume and no-sync tests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

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
