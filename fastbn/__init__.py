"""fastbn: fused, parallel batch normalization and data normalization for NumPy.

Public API (see docs/contract.md sections 1 and 2 and the README):

- :func:`batch_norm_forward`, :func:`batch_norm_backward`,
  :func:`batch_norm_inference`, :func:`batch_norm`, :func:`batch_stats`
- :class:`BatchNorm`, a layer with PyTorch's semantics
- :func:`fold_batch_norm`: inference batch norm folded into the layer before it
- :func:`standardize`, :func:`minmax_scale`, :class:`StandardScaler`,
  :class:`MinMaxScaler` (docs/contract.md section 3), and ``python -m fastbn normalize``
- :func:`warmup`, which compiles (or loads from the disk cache) the kernels
- :func:`set_num_threads`, :func:`get_num_threads` and :func:`threads`: fastbn's own
  thread count (README, "Processes, threads and caches")
"""

from .api import (
    batch_norm,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    batch_stats,
)
from .folding import fold_batch_norm
from .module import BatchNorm
from .preprocessing import minmax_scale, standardize
from .scalers import MinMaxScaler, NotFittedError, StandardScaler
from ._threads import get_num_threads, set_num_threads, threads
from ._warmup import warmup

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "MinMaxScaler",
    "NotFittedError",
    "StandardScaler",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_stats",
    "fold_batch_norm",
    "get_num_threads",
    "minmax_scale",
    "set_num_threads",
    "standardize",
    "threads",
    "warmup",
    "__version__",
]
