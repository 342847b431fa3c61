"""The host backends' ops on validated calls (``fastbn._validate``'s call descriptions):
the same names, taking the same descriptions, as the CUDA backend's."""

import numpy as np

from .. import _moments
from .. import _validate as v


class HostCalls:
    """Mixed into the host backends, whose ``forward_train``, ``affine``, ``moments`` and
    the rest do the arithmetic."""

    arrays = v.HOST

    def batch_norm_forward(self, a, n):
        """``(y, mean, invstd)`` of a training forward over ``n`` values per channel; the
        running statistics updated."""
        y, mean, var, invstd = self.forward_train(a.x, a.axis, a.weight, a.bias, a.eps, a.out,
                                                  a.out_dtype, a.residual, a.relu)
        _moments.update_running_stats(a.running_mean, a.running_var, mean, var, n, a.momentum)
        return y, mean.astype(a.stats_dtype), invstd.astype(a.stats_dtype)

    def batch_norm_inference(self, a):
        if a.x.size == 0:
            return a.out if a.out is not None else np.empty(a.x.shape, a.out_dtype)
        scale = self.inference_scale(a.running_var, a.eps, a.weight)
        return self.affine(a.x, a.axis, a.running_mean, scale, a.bias, a.out, a.out_dtype,
                           a.residual, a.relu)

    def batch_norm_backward(self, a, n):
        """``(dx, dweight, dbias)``, and ``dresidual`` with ``a.residual_grad``."""
        dx, sum_dy, sum_dy_xmu, dres = self.backward_train(
            a.dy, a.x, a.axis, a.mean, a.invstd, a.weight, a.out, a.out_dtype, a.y,
            a.residual_grad, a.residual_out)
        grads = dx, (sum_dy_xmu * a.invstd).astype(a.stats_dtype), sum_dy.astype(a.stats_dtype)
        return grads + (dres,) if a.residual_grad else grads

    def batch_stats(self, a):
        """``(count, mean, var)``; NaN statistics for an empty batch."""
        if a.count == 0:
            nan = np.full(a.channels, np.nan, dtype=a.stats_dtype)
            return 0, nan, nan.copy()
        if a.channels == 0:
            empty = np.empty(0, dtype=a.stats_dtype)
            return a.count, empty, empty.copy()
        _, mean, m2 = self.moments(a.x, a.axis, v.output_dtype(a.x.dtype))
        dof = max(a.count - a.ddof, 0)
        with np.errstate(divide="warn", invalid="warn"):
            var = m2 / np.float64(dof)
        return a.count, mean.astype(a.stats_dtype), var.astype(a.stats_dtype)
