"""One-call data normalization (CONTRACT section 3): ``standardize`` and ``minmax_scale``.

Each is a scaler fitted on ``x`` and applied to it: one statistics pass and
one fused multiply-add pass, NaN ignored in the statistics and kept in the
output, constant features scaled by 1, as ``sklearn.preprocessing.scale`` and
``minmax_scale`` do (on any feature axis, in the input's float dtype).  Device
arrays are normalized on the GPU (``fastbn._cuda``) with the same semantics.
"""

from ._dispatch import backend_for
from .scalers import MinMaxScaler, StandardScaler, _feature_range

__all__ = ["standardize", "minmax_scale"]


def standardize(x, *, axis=-1, out=None):
    """Per feature: subtract the mean and divide by the standard deviation.

    Parameters
    ----------
    x : array_like
        Data; float16/32/64 keep their dtype, integers become float64.
    axis : int, default -1
        The feature axis (kept); statistics reduce over every other axis.
    out : ndarray, optional
        Where to write the result (may be ``x``).

    Returns
    -------
    ndarray
        ``(x - mean) / std`` per feature; a constant feature is only centered.

    Examples
    --------
    >>> import numpy as np, fastbn
    >>> y = fastbn.standardize(np.array([[1.0, 10.0], [3.0, 10.0]]))
    >>> y.tolist()
    [[-1.0, 0.0], [1.0, 0.0]]
    """
    backend = backend_for(x=x, out=out)
    if backend.device:
        return backend.standardize(x, axis, out)
    return StandardScaler(axis=axis).fit(x).transform(x, out=out)


def minmax_scale(x, *, axis=-1, feature_range=(0.0, 1.0), out=None):
    """Per feature: map ``[min, max]`` linearly onto ``feature_range``.

    Parameters
    ----------
    x : array_like
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
    backend = backend_for(x=x, out=out)
    if backend.device:
        return backend.minmax_scale(x, axis, _feature_range(feature_range), out)
    return MinMaxScaler(feature_range, axis=axis).fit(x).transform(x, out=out)
