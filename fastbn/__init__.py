"""fastbn: fused, parallel batch normalization and data normalization for NumPy.

Public API (see CONTRACT sections 1 and 2 and the README):

- :func:`batch_norm_forward`, :func:`batch_norm_backward`,
  :func:`batch_norm_inference`, :func:`batch_norm`, :func:`batch_stats`
- :class:`BatchNorm`, a layer with PyTorch's semantics
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
from ._warmup import warmup

__version__ = "0.1.0"

__all__ = [
    "BatchNorm",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_stats",
    "warmup",
    "__version__",
]
