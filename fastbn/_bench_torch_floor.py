"""Bounds for ``python -m fastbn bench --torch``: what any batch norm library could reach.

The profiler's share of batch norm, ReLU and add in PyTorch's step says how much time
those kernels take, not how much of it a replacement could save: whatever replaces them
still reads and writes the activations, right after a convolution has filled the caches
with its own work.  Two variants of ``fastbn.torch.optimize(model)`` measure that
directly, in the same step:

- **copy floor**: every fastbn call is one parallel pass over the fewest bytes a fused
  batch norm must touch, on PyTorch's own element-wise kernels and threads.  Forward:
  read ``x`` (and the residual), write ``y`` (``x + residual``, or a copy of ``x``,
  through ReLU where the fused call has it, so that what follows sees data like a batch
  norm's);
  backward: read ``dy``, ``x`` and ``y``, write ``dx`` (``dy + x * y``), the residual's
  gradient being that same tensor.  A real batch norm reads ``x`` twice (statistics,
  then normalization) and ``dy`` twice (sums, then ``dx``), so no implementation is
  faster than this inside the step.
- **without batch norm**: batch norm and ReLU removed (the shortcut's ``add`` kept, so
  the graph and its backward keep their shape): the whole of what there is to gain, as
  the profiler's share counts it.

Neither computes a batch norm's gradients, and trained on theirs both diverged to NaN
within two steps, which changed PyTorch's own kernels' speed (its max pool took 7 ms of
ResNet-18's step at 112x112 instead of 20), so the benchmark steps them at learning rate
0: the same SGD work, on weights that stay as they start.
"""

import copy

from .torch.modules import _FastBatchNorm
from .torch.optimize import _set_submodule


def _floor_function(torch):
    class FloorPass(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, residual, relu):
            if residual is None:
                y = torch.relu(x) if relu else x.clone()
            else:  # aten::_add_relu: one vectorized pass, as fast as the add alone
                y = torch.ops.aten._add_relu(x, residual) if relu else x + residual
            ctx.save_for_backward(x, y)
            ctx.has_residual = residual is not None
            return y

        @staticmethod
        def backward(ctx, dy):
            x, y = ctx.saved_tensors
            dx = torch.addcmul(dy, x, y)
            return dx, (dx if ctx.has_residual else None), None

    return FloorPass


def _replacement(torch, kind):
    floor = _floor_function(torch) if kind == "floor" else None

    class Replacement(torch.nn.Module):
        def forward(self, x, residual=None, activation=None):
            if floor is not None:
                return floor.apply(x, residual, activation == "relu")
            return x if residual is None else x + residual

    return Replacement


def bound_models(torch, model):
    """``{"copy floor": ..., "without batch norm": ...}``: ``fastbn.torch.optimize`` of
    copies of ``model`` (in training mode) with every fastbn batch norm call replaced as
    the module docstring says."""
    import fastbn.torch as fbt

    out = {}
    for name, kind in (("copy floor", "floor"), ("without batch norm", "none")):
        gm = fbt.optimize(copy.deepcopy(model).train())
        targets = [n for n, m in gm.named_modules() if isinstance(m, _FastBatchNorm)]
        replacement = _replacement(torch, kind)
        for target in targets:
            _set_submodule(gm, target, replacement())
        out[name] = gm
    return out
