"""Step-size blocks: which parameters share one learned step size.

A layout maps every parameter (in param-group order) to a block. Block-level modes keep one
``β`` per block; ``"weight"`` gives every element its own ``β``. The layout holds no optimizer
state; it only says how per-parameter partial meta-gradients are summed into blocks.

Modes:
    ``"scalar"``: one step size for all parameters.
    ``"group"``: one per param group.
    ``"tensor"`` (alias ``"layerwise"``): one per parameter tensor.
    ``"weight"``: one per element.
    a list (or dict ``name -> list``) of parameter lists: explicit blocks that cover every
    parameter exactly once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor

__all__ = ["BLOCK_MODES", "BlockLayout", "BlocksSpec", "build_layout"]

BLOCK_MODES = ("scalar", "group", "tensor", "layerwise", "weight")
BlocksSpec = str | Sequence[Iterable[Tensor]] | Mapping[str, Iterable[Tensor]]


@dataclass(frozen=True)
class BlockLayout:
    """Assignment of parameters to step-size blocks.

    Attributes:
        mode: "scalar", "group", "tensor", "weight" or "explicit".
        names: one name per block (per parameter for "weight").
        block_of_param: block index of each parameter, in param-group order (for "weight",
            the parameter's own index).
    """

    mode: str
    names: tuple[str, ...]
    block_of_param: tuple[int, ...]

    @property
    def per_weight(self) -> bool:
        """Whether every element has its own step size."""
        return self.mode == "weight"

    @property
    def num_blocks(self) -> int:
        """Number of blocks (number of parameters for "weight")."""
        return len(self.names)

    def signature(self) -> dict[str, Any]:
        """A plain description used to reject state dicts saved with another layout."""
        return {
            "mode": self.mode,
            "names": list(self.names),
            "block_of_param": list(self.block_of_param),
        }


def _param_names(param_groups: Sequence[Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for group in param_groups:
        given = group.get("param_names")
        for index, _ in enumerate(group["params"]):
            names.append(given[index] if given else f"param{len(names)}")
    return names


def build_layout(spec: BlocksSpec, param_groups: Sequence[Mapping[str, Any]]) -> BlockLayout:
    """Build the block layout for ``param_groups`` from a ``blocks`` argument.

    Raises:
        ValueError: unknown mode, or explicit blocks that miss, repeat or add parameters.
        TypeError: ``blocks`` is neither a mode name nor a collection of parameter lists.
    """
    params = [p for group in param_groups for p in group["params"]]
    names = _param_names(param_groups)
    if isinstance(spec, str):
        if spec not in BLOCK_MODES:
            raise ValueError(
                f"Invalid blocks: {spec!r}; choose one of {list(BLOCK_MODES)} or pass a list "
                "of parameter lists"
            )
        if spec == "scalar":
            return BlockLayout("scalar", ("all",), (0,) * len(params))
        if spec == "group":
            group_names = tuple(f"group{i}" for i in range(len(param_groups)))
            owner = tuple(i for i, g in enumerate(param_groups) for _ in g["params"])
            return BlockLayout("group", group_names, owner)
        mode = "weight" if spec == "weight" else "tensor"
        return BlockLayout(mode, tuple(names), tuple(range(len(params))))
    return _explicit_layout(spec, params)


def _explicit_layout(spec: object, params: list[Tensor]) -> BlockLayout:
    if isinstance(spec, Mapping):
        block_names = [str(k) for k in spec]
        block_lists = list(spec.values())
    elif isinstance(spec, (list, tuple)):
        block_names = [f"block{i}" for i in range(len(spec))]
        block_lists = list(spec)
    else:
        raise TypeError(
            f"Invalid blocks: {type(spec).__name__}; expected a mode name or a list of "
            "parameter lists"
        )
    index_of = {id(p): i for i, p in enumerate(params)}
    owner: list[int | None] = [None] * len(params)
    for block, members in enumerate(block_lists):
        if isinstance(members, Tensor):
            members = [members]
        count = 0
        for p in members:
            if not isinstance(p, Tensor):
                raise TypeError(f"Invalid blocks: block {block} holds a {type(p).__name__}")
            if id(p) not in index_of:
                raise ValueError(
                    f"Invalid blocks: block {block} holds a parameter that is not in the optimizer"
                )
            if owner[index_of[id(p)]] is not None:
                raise ValueError(
                    f"Invalid blocks: a parameter appears in more than one block (block {block})"
                )
            owner[index_of[id(p)]] = block
            count += 1
        if count == 0:
            raise ValueError(f"Invalid blocks: block {block} is empty")
    missing = [i for i, o in enumerate(owner) if o is None]
    if missing:
        raise ValueError(f"Invalid blocks: parameters {missing} are in no block")
    return BlockLayout("explicit", tuple(block_names), tuple(o for o in owner if o is not None))
