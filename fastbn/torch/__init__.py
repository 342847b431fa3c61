"""fastbn for PyTorch (CONTRACT section 7; extra ``fastbn[torch]``).

``import fastbn`` never imports torch; ``import fastbn.torch`` does, and registers the
``fastbn::`` operators with ``torch.library``.

- :func:`batch_norm`, :func:`batch_norm_act`: ``torch.nn.functional.batch_norm`` and its
  fused ReLU/residual form, autograd-aware, ``torch.compile``-able
- :class:`BatchNorm1d`, :class:`BatchNorm2d`, :class:`BatchNorm3d`: subclasses of
  PyTorch's, computed by fastbn
- :func:`convert`: swap a model's batch norm layers in place
- :func:`optimize`: convert, fuse ``bn -> relu`` and ``bn -> add -> relu``, fold into
  convolutions in eval mode
- :func:`stats`, :func:`reset_stats`: how many calls ran on fastbn and how many fell back
  to PyTorch's kernel (and why)
"""

from ._ops import reset_stats, stats
from .functional import batch_norm, batch_norm_act
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert
from .optimize import optimize

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "batch_norm", "batch_norm_act",
           "convert", "optimize", "reset_stats", "stats"]
