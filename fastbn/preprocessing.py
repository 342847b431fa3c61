"""One-call data normalization (docs/contract.md section 3): ``standardize`` and ``minmax_scale``.

Each is a scaler fitted on ``x`` and applied to it: one statistics pass and
one fused multiply-add pass, NaN ignored in the statistics and kept in the
output, constant features scaled by 1, as ``sklearn.preprocessing.scale`` and
``minmax_scale`` do (on any feature axis, in the input's float dtype).  Device
arrays are normalized on the GPU (``fastbn._cuda``) with the same semantics.
"""

import numpy as np

from . import _sparse
from . import _validate as v
from ._dispatch import backend_for
from .scalers import MinMaxScaler, StandardScaler, _feature_range

__all__ = ["standardize", "minmax_scale"]


def _one_feature(x, axis, out):
    """A 1-D ``x`` is one feature (as in ``sklearn.preprocessing.scale``): ``(x, out,
    shape)`` as (n, 1) views and the shape to give the result back, or ``shape`` None
    when ``x`` is not 1-D."""
    if _sparse.is_sparse(x):
        return x, out, None
    if not hasattr(x, "ndim") or not hasattr(x, "reshape"):
        x = np.asarray(x)
    if x.ndim != 1:
        return x, out, None
    v.channel_axis(axis, 1)
    shape = x.shape
    if out is not None:
        if getattr(out, "shape", None) != shape:
            raise ValueError(f"out must have shape {shape}, got {getattr(out, 'shape', None)}")
        out = out.reshape(-1, 1)  # a view: (n,) to (n, 1) never copies
    return x.reshape(-1, 1), out, shape


def _as_shape(y, shape, out):
    """The result in the caller's shape: ``out`` itself when one was given."""
    if shape is None:
        return y
    return out if out is not None else y.reshape(shape)


def standardize(x, *, axis=-1, with_mean=True, with_std=True, out=None):
    """Per feature: subtract the mean and divide by the standard deviation.

    Parameters
    ----------
    x : array_like or scipy.sparse matrix
        Data; float16/32/64 keep their dtype, integers become float64.  A 1-D
        ``x`` is one feature (as ``sklearn.preprocessing.scale``).  Sparse
        input (CSR/CSC, features along the columns) needs ``with_mean=False``
        and keeps its sparsity.
    axis : int, default -1
        The feature axis (kept); statistics reduce over every other axis.
    with_mean, with_std : bool, default True
        Center, and scale to unit variance.
    out : ndarray, optional
        Where to write the result (may be ``x``).

    Returns
    -------
    ndarray or scipy.sparse matrix
        ``(x - mean) / std`` per feature; a constant feature is only centered.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> y = fastbn.standardize(np.array([[1.0, 10.0], [3.0, 10.0]]))
    >>> y.tolist()
    [[-1.0, 0.0], [1.0, 0.0]]
    """
    given = out
    x, out, shape = _one_feature(x, axis, out)
    if shape is not None:
        axis = -1
    backend = backend_for(x=x, out=out)
    if backend.device:
        if not (with_mean is True and with_std is True):
            raise TypeError("with_mean=False and with_std=False are computed on the host: "
                            "copy the device array to the host first")
        return _as_shape(backend.standardize(x, axis, out), shape, given)
    scaler = StandardScaler(axis=axis, with_mean=with_mean, with_std=with_std)
    return _as_shape(scaler.fit(x).transform(x, out=out), shape, given)


def minmax_scale(x, *, axis=-1, feature_range=(0.0, 1.0), out=None):
    """Per feature: map ``[min, max]`` linearly onto ``feature_range``.

    Parameters
    ----------
    x : array_like
        A 1-D ``x`` is one feature (as ``sklearn.preprocessing.minmax_scale``).
    axis : int, default -1
        The feature axis (kept).
    feature_range : (min, max), default (0.0, 1.0)
    out : ndarray, optional
        Where to write the result (may be ``x``).

    Returns
    -------
    ndarray
        ``x * scale + min`` per feature; a constant feature maps to ``feature_range[0]``.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> fastbn.minmax_scale(np.array([[0.0], [5.0], [10.0]])).ravel().tolist()
    [0.0, 0.5, 1.0]
    """
    given = out
    x, out, shape = _one_feature(x, axis, out)
    if shape is not None:
        axis = -1
    backend = backend_for(x=x, out=out)
    if backend.device:
        return _as_shape(backend.minmax_scale(x, axis, _feature_range(feature_range), out),
                         shape, given)
    return _as_shape(MinMaxScaler(feature_range, axis=axis).fit(x).transform(x, out=out),
                     shape, given)
