"""What the optimizer knows about distribution: the mesh, the reduce group, shard weights.

Three settings (docs/distributed.md): DDP needs nothing (every rank holds every gradient
already averaged); ZeRO-style sharding names the process group the parameters are partitioned
across; FSDP2 parameters are DTensors, whose 1-D device mesh gives the group. All DTensor
knowledge lives here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

try:  # DTensor parameters (FSDP2); torch >= 2.4 has the public module
    from torch.distributed.tensor import DTensor, Replicate, Shard

    _HAS_DTENSOR = True
except ImportError:  # pragma: no cover - older torch: no FSDP2 support
    _HAS_DTENSOR = False

__all__ = ["Sharding", "local"]

_UNSET = object()


def local(tensor: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view sharing its storage), or the tensor itself."""
    if _HAS_DTENSOR and isinstance(tensor, DTensor):
        shard: Tensor = tensor.to_local()
        return shard
    return tensor


def _find_mesh(params: Iterable[Tensor]) -> Any:
    if not _HAS_DTENSOR:
        return None
    meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
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


class Sharding:
    """How the parameters of one optimizer are spread over ranks.

    Args:
        partition_group: ZeRO's process group (each parameter lives on one rank), or None.
        explicit_blocks: whether the step-size blocks are explicit lists of parameters.

    Raises:
        ValueError: explicit blocks with a partition group (each rank holds other parameters).
    """

    def __init__(self, partition_group: Any = None, explicit_blocks: bool = False) -> None:
        if partition_group is not None and explicit_blocks:
            raise ValueError(
                "Invalid blocks: explicit blocks cannot be combined with "
                "partition_group (each rank holds different parameters)"
            )
        self.partition_group = partition_group
        self._mesh: Any = _UNSET

    def reset(self) -> None:
        """Forget the cached mesh (param groups changed)."""
        self._mesh = _UNSET

    def mesh(self, param_groups: list[dict[str, Any]]) -> Any:
        """The 1-D device mesh of DTensor parameters, or None (cached until :meth:`reset`)."""
        if self._mesh is _UNSET:
            self._mesh = _find_mesh(p for g in param_groups for p in g["params"])
        return self._mesh

    def reduce_group(self, param_groups: list[dict[str, Any]]) -> Any:
        """The process group over which block meta-gradients are summed, if any."""
        if self.partition_group is not None:
            return self.partition_group
        mesh = self.mesh(param_groups)
        return None if mesh is None else mesh.get_group()

    def share(self, p: Tensor, mesh: Any) -> float:
        """Weight of this rank's partial sum for ``p`` in the all-reduced meta-gradient."""
        if self.partition_group is not None or mesh is None:
            return 1.0  # ZeRO: each parameter lives on exactly one rank; or not distributed
        if isinstance(p, DTensor):
            (placement,) = p.placements
            if isinstance(placement, Shard):
                return 1.0
            if not isinstance(placement, Replicate):
                raise NotImplementedError(f"MetaOptimize: placement {placement} not supported")
        return 1.0 / float(mesh.size())  # replicated: every rank holds the whole tensor
