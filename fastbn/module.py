"""``BatchNorm``: a stateful layer with the semantics of ``torch.nn.BatchNorm{1,2,3}d``."""

from typing import NamedTuple

import numpy as np

from . import _moments
from . import _validate as v
from ._dispatch import backend_for
from .api import batch_norm_backward, batch_norm_forward, batch_norm_inference

_STATE_KEYS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class IncompatibleKeys(NamedTuple):
    """What ``BatchNorm.load_state_dict`` did not load, as PyTorch's named tuple."""

    missing_keys: list
    unexpected_keys: list


class BatchNorm:
    """Batch normalization layer with learnable affine parameters and running statistics.

    Parameters
    ----------
    num_features : int
        Number of channels C.
    eps : float, default 1e-5
    momentum : float or None, default 0.1
        Running-average factor; None gives the cumulative moving average
        (factor ``1 / num_batches_tracked``), as in PyTorch.
    affine : bool, default True
        Learn ``weight`` (ones) and ``bias`` (zeros); otherwise both are None.
    track_running_stats : bool, default True
        Keep ``running_mean`` / ``running_var``; otherwise batch statistics are
        used in eval mode too and the running attributes are None.  As in
        PyTorch, switching it off later stops the updates, and eval mode keeps
        normalizing with the existing running statistics.
    axis : int, default 1
        The channel axis of the inputs.
    bias : bool, default True
        With ``affine``, learn ``bias`` too; ``bias=False`` leaves it None (no
        ``bias`` key in the state), as PyTorch 2's ``bias=False``.
    dtype : dtype, default float32
        dtype of the parameters and running statistics.
    activation : {None, "relu"}
        Fused after the normalization and the optional residual of ``bn(x, residual)``
        (contract section 6): ``y = relu(bn(x) + residual)`` in one pass, and a
        ``backward`` through both.

    The first five parameters take PyTorch's positions
    (``BatchNorm(C, eps, momentum, affine, track_running_stats)``).

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> bn = fastbn.BatchNorm(3)
    >>> x = np.random.default_rng(0).normal(size=(16, 3, 8, 8)).astype(np.float32)
    >>> y = bn(x)                       # training mode: batch stats, running stats updated
    >>> dx = bn.backward(np.ones_like(y))
    >>> bn.eval(); y_eval = bn(x)       # inference with the running statistics

    ResNet's ``relu(bn(conv(x)) + shortcut)`` in one pass, forward and backward:

    >>> block = fastbn.BatchNorm(3, activation="relu")
    >>> shortcut = np.ones_like(x)
    >>> y = block(x, residual=shortcut)
    >>> dx = block.backward(np.ones_like(y))
    >>> block.grad_residual.shape       # the gradient reaching the shortcut
    (16, 3, 8, 8)
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, *, axis=1, bias=True, dtype=np.float32,
                 activation=None):
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        if momentum is not None:
            v.real_scalar(momentum, "momentum", low=0.0, high=1.0)
        v.activation_relu(activation)
        self.num_features = int(num_features)
        self.axis = axis
        self.eps = v.real_scalar(eps, "eps", low=0.0)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.dtype = dtype
        self.activation = activation
        self.weight = np.empty(num_features, dtype) if affine else None
        self.bias = np.empty(num_features, dtype) if affine and bias else None
        self.grad_weight = None
        self.grad_bias = None
        self.grad_residual = None
        if track_running_stats:
            self.running_mean = np.empty(num_features, dtype)
            self.running_var = np.empty(num_features, dtype)
            self.num_batches_tracked = np.array(0, dtype=np.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.training = True
        self._saved = None
        self.reset_parameters()

    def reset_running_stats(self):
        """Running mean 0, running variance 1, ``num_batches_tracked`` 0 (in place)."""
        if self.running_mean is not None:
            self.running_mean[...] = 0.0
        if self.running_var is not None:
            self.running_var[...] = 1.0
        if self.num_batches_tracked is not None:
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        """``reset_running_stats()``, weight 1 and bias 0 (in place)."""
        self.reset_running_stats()
        if self.weight is not None:
            self.weight[...] = 1.0
        if self.bias is not None:
            self.bias[...] = 0.0

    # ---------------------------------------------------------------- modes
    def train(self, mode=True):
        """Switch to training mode (``mode=False``: eval).  Returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Switch to eval (inference) mode.  Returns self."""
        return self.train(False)

    def _uses_batch_stats(self):
        # PyTorch's rule: eval mode uses the running statistics whenever they exist
        return self.training or (self.running_mean is None and self.running_var is None)

    # ---------------------------------------------------------------- passes
    def forward(self, x, residual=None):
        """Normalize ``x``, add ``residual`` (optional, ``x``'s shape) and apply the layer's
        activation, in one pass; in training mode also update the running statistics.

        With an activation, ``backward`` reads the returned ``y``: do not modify it in
        place before then.
        """
        if self._uses_batch_stats():
            update = self.training and self.track_running_stats
            counted = update and self.num_batches_tracked is not None
            factor = 0.0 if self.momentum is None else self.momentum
            if counted:
                tracked = int(self.num_batches_tracked) + 1
                if self.momentum is None:
                    factor = 1.0 / tracked
            y, mean, invstd = batch_norm_forward(
                x, self.weight, self.bias, axis=self.axis, eps=self.eps,
                running_mean=self.running_mean if update else None,
                running_var=self.running_var if update else None, momentum=factor,
                residual=residual, activation=self.activation)
            if counted:
                self.num_batches_tracked[...] = tracked
            self._saved = ("batch", x, mean, invstd, y, residual is not None)
        else:
            y = batch_norm_inference(x, self.running_mean, self.running_var, self.weight,
                                     self.bias, axis=self.axis, eps=self.eps,
                                     residual=residual, activation=self.activation)
            self._saved = ("running", x, self.running_mean.copy(),
                           _moments.invstd(self.running_var, self.eps), y,
                           residual is not None)
        return y

    __call__ = forward

    def backward(self, dy):
        """Gradient with respect to the last forward's input; sets ``grad_weight``,
        ``grad_bias`` and, after a forward with a residual, ``grad_residual``.

        After a training-mode forward this is the full batch-norm gradient; in
        eval mode the statistics are constants and ``dx = g * weight * invstd``.  ``g``
        is ``dy`` through the activation (ReLU: where the output was > 0), which is also
        the residual's gradient.
        """
        if self._saved is None:
            raise RuntimeError("backward() needs a forward() first")
        mode, x, mean, invstd, y, with_residual = self._saved
        dres = None
        if mode == "batch":
            grads = batch_norm_backward(dy, x, mean, invstd, self.weight, axis=self.axis,
                                        activation=self.activation, y=y,
                                        residual_grad=with_residual)
            dx, dweight, dbias = grads[:3]
            if with_residual:
                dres = grads[3]
        else:
            if self.activation == "relu":
                dy = np.where(np.asarray(y) > 0, dy, np.zeros((), np.asarray(dy).dtype))
            dx, dweight, dbias = _eval_backward(dy, x, mean, invstd, self.weight, self.axis)
            if with_residual:
                dres = np.array(dy, dtype=dx.dtype, copy=True)
        self.grad_residual = dres
        if self.weight is not None:
            self.grad_weight = dweight.astype(self.dtype)
        if self.bias is not None:
            self.grad_bias = dbias.astype(self.dtype)
        return dx

    # ---------------------------------------------------------------- state
    def state_dict(self):
        """PyTorch's keys, NumPy copies (``weight``/``bias`` only when affine)."""
        state = {}
        for key in _STATE_KEYS:
            value = getattr(self, key)
            if value is not None:
                state[key] = np.array(value, copy=True)
        return state

    def load_state_dict(self, state, strict=True):
        """Load a ``state_dict`` (from fastbn or a PyTorch BatchNorm: tensors are accepted).

        Parameters
        ----------
        state : mapping
            PyTorch's keys.  A missing ``num_batches_tracked`` keeps its current
            value (checkpoints from before PyTorch 0.4.1 have none), as PyTorch does.
        strict : bool, default True
            Require exactly this layer's keys (``RuntimeError`` listing the
            missing and unexpected ones, as PyTorch); with ``strict=False`` the
            keys present are loaded and the others reported.

        Returns
        -------
        IncompatibleKeys
            ``(missing_keys, unexpected_keys)``, as PyTorch's ``load_state_dict``.

        Every entry is checked before any is assigned.
        """
        wanted = [k for k in _STATE_KEYS if getattr(self, k) is not None]
        optional = {"num_batches_tracked"}
        missing = [k for k in wanted if k not in state and k not in optional]
        unexpected = [k for k in state if k not in wanted]
        if strict and (missing or unexpected):
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}: "
                               f"missing keys {missing}, unexpected keys {unexpected}")
        values = {}
        for key in wanted:
            if key not in state:
                continue
            value = state[key]
            if hasattr(value, "detach"):  # a torch tensor
                value = value.detach().cpu().numpy()
            value = np.asarray(value)
            target = getattr(self, key)
            if value.shape != target.shape:
                raise ValueError(f"{key} must have shape {target.shape}, got {value.shape}")
            kinds = "biu" if key == "num_batches_tracked" else "biuf"
            if value.dtype.kind not in kinds:
                raise TypeError(f"{key} must be a real {'integer ' if kinds == 'biu' else ''}"
                                f"array, got dtype {value.dtype}")
            values[key] = value
        for key, value in values.items():
            getattr(self, key)[...] = value
        return IncompatibleKeys(missing, unexpected)

    def __repr__(self):
        bias = "" if not self.affine or self.bias is not None else ", bias=False"
        act = "" if self.activation is None else f", activation={self.activation!r}"
        return (f"BatchNorm({self.num_features}, axis={self.axis}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}{bias}{act})")


def _eval_backward(dy, x, mean, invstd, weight, axis):
    """Backward of inference-mode batch norm: the statistics are constants."""
    backend = backend_for(dy=dy, x=x)
    xa = v.as_input(x, "x")
    dya = v.as_input(dy, "dy")
    v.same_shape(dya, xa, "dy", "x")
    ax = v.channel_axis(axis, xa.ndim)
    out_dtype = np.result_type(v.output_dtype(dya.dtype), v.output_dtype(xa.dtype))
    stats_dtype = v.stats_dtype(out_dtype)
    mean = np.asarray(mean, dtype=np.float64)
    invstd = np.asarray(invstd, dtype=np.float64)
    w = np.ones_like(invstd) if weight is None else np.asarray(weight, dtype=np.float64)
    if xa.size == 0:
        zeros = np.zeros(xa.shape[ax], stats_dtype)
        return np.empty(xa.shape, out_dtype), zeros, zeros.copy()
    sum_dy, sum_dy_xmu = backend.grad_sums(dya, xa, ax, mean, out_dtype)
    dx = backend.affine(dya, ax, np.zeros_like(mean), w * invstd, np.zeros_like(mean), None,
                        out_dtype)
    return dx, (sum_dy_xmu * invstd).astype(stats_dtype), sum_dy.astype(stats_dtype)
