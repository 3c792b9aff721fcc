"""Reading learned step sizes for logging (the caller's choice: this synchronises).

``step()`` never reads values back to the host; these helpers do, so call them at your
logging interval, not every step.

Example:
    >>> import torch
    >>> from metaoptimize import MetaOptimize
    >>> opt = MetaOptimize([torch.nn.Parameter(torch.zeros(3))], alpha0=1e-3)
    >>> {tag: round(value, 9) for tag, value in step_size_scalars(opt).items()}
    {'step_size/all': 0.001}
"""

from __future__ import annotations

from typing import Any, Protocol

from metaoptimize.optimizer import MetaOptimize
from metaoptimize.wrap import MetaOptimizeWrapper

__all__ = ["log_step_sizes", "step_size_scalars"]


class ScalarWriter(Protocol):
    """Anything with TensorBoard's ``add_scalar`` (``torch.utils.tensorboard.SummaryWriter``)."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> Any:
        """Record one scalar."""


def step_size_scalars(optimizer: Any, prefix: str = "step_size/") -> dict[str, float]:
    """Learned step sizes as plain floats, one per block.

    Accepts a :class:`MetaOptimize`, a :func:`~metaoptimize.wrap` wrapper, or a wrapper that
    holds either as ``.optimizer`` (Accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``). Per-weight step sizes are
    summarised by their geometric mean. The group ``lr`` multiplier is not included.

    Raises:
        TypeError: no MetaOptimize inside ``optimizer``.
    """
    learned = (MetaOptimize, MetaOptimizeWrapper)
    inner = optimizer
    while not isinstance(inner, learned) and hasattr(inner, "optimizer"):
        inner = inner.optimizer
    if not isinstance(inner, learned):
        raise TypeError(f"Invalid optimizer: {type(optimizer).__name__} holds no MetaOptimize")
    scalars = {}
    for name, value in inner.step_sizes().items():
        mean = value.float().log().mean().exp() if value.dim() else value
        scalars[prefix + name] = float(mean)
    return scalars


def log_step_sizes(
    writer: ScalarWriter, optimizer: Any, step: int, prefix: str = "step_size/"
) -> dict[str, float]:
    """Write every block's step size to ``writer`` (e.g. a TensorBoard SummaryWriter)."""
    scalars = step_size_scalars(optimizer, prefix)
    for tag, value in scalars.items():
        writer.add_scalar(tag, value, step)
    return scalars
