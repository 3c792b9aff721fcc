"""metaoptimize: optimizers that tune their own step sizes online.

The main entry point is :class:`MetaOptimize`, a ``torch.optim.Optimizer`` implementing
Hessian-free MetaOptimize (Sharifnassab, Salehkaleybar, Sutton, ICML 2025).
"""

from metaoptimize import presets
from metaoptimize.base import BASE_RULES
from metaoptimize.blocks import BLOCK_MODES, BlockLayout
from metaoptimize.meta import META_RULES
from metaoptimize.optimizer import MetaOptimize
from metaoptimize.reference import ReferenceMetaOptimize
from metaoptimize.wrap import MetaOptimizeWrapper, wrap

__version__ = "0.1.0.dev0"

__all__ = [
    "BASE_RULES",
    "BLOCK_MODES",
    "META_RULES",
    "BlockLayout",
    "MetaOptimize",
    "MetaOptimizeWrapper",
    "ReferenceMetaOptimize",
    "__version__",
    "presets",
    "wrap",
]
