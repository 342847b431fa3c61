"""Drop-in ``BatchNorm1d/2d/3d`` (subclasses of PyTorch's) and :func:`convert`."""

import torch

from .functional import batch_norm_act

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]


class _FastBatchNorm:
    """The forward of ``torch.nn.modules.batchnorm._BatchNorm`` on fastbn's operators.

    Everything else (parameters, buffers, ``state_dict``, ``reset_running_stats``,
    ``extra_repr``, input checks) is PyTorch's own, inherited.  ``forward`` also takes the
    fused epilogue, ``residual`` and ``activation`` (:func:`fastbn.torch.optimize` uses
    them); without them it is PyTorch's module.
    """

    def forward(self, input, residual=None, activation=None):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        counting = self.training and self.track_running_stats and (
            self.num_batches_tracked is not None)
        if counting and self.momentum is None:  # cumulative moving average
            factor = 1.0 / float(self.num_batches_tracked + 1)
        use_batch_stats = self.training or (self.running_mean is None
                                            and self.running_var is None)
        track = not self.training or self.track_running_stats
        y = batch_norm_act(input, self.running_mean if track else None,
                           self.running_var if track else None, self.weight, self.bias,
                           use_batch_stats, factor, self.eps, residual=residual,
                           activation=activation)
        if counting:  # after the call, so that a refused input changes nothing
            self.num_batches_tracked.add_(1)
        return y


class BatchNorm1d(_FastBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by fastbn: (N, C) or (N, C, L) input."""


class BatchNorm2d(_FastBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by fastbn: (N, C, H, W), contiguous or
    channels_last."""


class BatchNorm3d(_FastBatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by fastbn: (N, C, D, H, W)."""


_SWAPS = ((torch.nn.BatchNorm1d, BatchNorm1d), (torch.nn.BatchNorm2d, BatchNorm2d),
          (torch.nn.BatchNorm3d, BatchNorm3d))


def _fast_class(module):
    if isinstance(module, _FastBatchNorm):
        return None
    for theirs, ours in _SWAPS:
        if type(module) is theirs:  # subclasses of torch's may change forward: left alone
            return ours
    return None


def convert(model):
    """Swap every PyTorch ``BatchNorm1d/2d/3d`` in ``model`` for fastbn's, in place.

    The new modules take over the old ones' parameters and buffers (the same tensor
    objects), training mode and hooks, so optimizers built before the swap keep working.

    Parameters
    ----------
    model : torch.nn.Module
        A module or a bare batch norm layer.

    Returns
    -------
    torch.nn.Module
        ``model``, or the fastbn layer when ``model`` itself is a batch norm layer.
    """
    cls = _fast_class(model)
    if cls is not None:
        return _swapped(model, cls)
    for name, child in list(model.named_children()):
        new = convert(child)
        if new is not child:
            setattr(model, name, new)
    return model


def _swapped(module, cls):
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)  # parameters, buffers, hooks, mode: shared
    return new
