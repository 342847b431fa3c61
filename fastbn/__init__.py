"""fastbn: fused, parallel batch normalization and data normalization for NumPy.

Public API (see CONTRACT sections 1 and 2 and the README):

- :func:`batch_norm_forward`, :func:`batch_norm_backward`,
  :func:`batch_norm_inference`, :func:`batch_norm`, :func:`batch_stats`
- :class:`BatchNorm`, a layer with PyTorch's semantics
- :func:`standardize`, :func:`minmax_scale`, :class:`StandardScaler`,
  :class:`MinMaxScaler` (CONTRACT section 3), and ``python -m fastbn normalize``
- :func:`warmup`, which compiles (or loads from the disk cache) the kernels
"""

from .api import (
    batch_norm,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    batch_stats,
)
from .module import BatchNorm
from .preprocessing import minmax_scale, standardize
from .scalers import MinMaxScaler, StandardScaler
from ._warmup import warmup

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "MinMaxScaler",
    "StandardScaler",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_stats",
    "minmax_scale",
    "standardize",
    "warmup",
    "__version__",
]
