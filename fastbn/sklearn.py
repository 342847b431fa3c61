"""scikit-learn estimators that compute with fastbn's kernels (extra ``fastbn[sklearn]``).

``fastbn.sklearn.StandardScaler`` and ``fastbn.sklearn.MinMaxScaler`` are
scikit-learn's own classes (subclasses of ``sklearn.preprocessing``'s, so
``BaseEstimator``, ``TransformerMixin`` and ``OneToOneFeatureMixin``: parameters,
tags, ``get_feature_names_out``, ``feature_names_in_``, ``set_output``, input
validation and error messages are scikit-learn's), whose statistics and
transforms run in fastbn's parallel kernels instead of NumPy: one statistics pass
and one fused multiply-add pass.  They pass ``check_estimator``
(tests/test_sklearn_estimators.py).  Fitted attributes are float64, as fastbn's
accumulators are (scikit-learn keeps MinMaxScaler's in the input's dtype).

Importing this module imports scikit-learn; ``import fastbn`` does not.
"""

import numpy as np
from sklearn import preprocessing as _sk
from sklearn.utils.validation import FLOAT_DTYPES, check_array, check_is_fitted, validate_data

from . import _sparse
from . import scalers as _core

__all__ = ["StandardScaler", "MinMaxScaler"]

_FITTED = ("n_samples_seen_", "mean_", "var_", "scale_", "data_min_", "data_max_",
           "data_range_", "min_", "_fastbn")


def _forget(estimator):
    for name in _FITTED:
        estimator.__dict__.pop(name, None)


def _out_for(validated, copy):
    """Where the transform writes: into the validated array itself when the caller
    allows it (``copy=False``) and it may be written, else a new array."""
    if copy or not isinstance(validated, np.ndarray) or not validated.flags.writeable:
        return None
    return validated


class StandardScaler(_sk.StandardScaler):
    """scikit-learn's ``StandardScaler``, computed by fastbn.

    Same parameters (``copy``, ``with_mean``, ``with_std``), attributes and
    behaviour as ``sklearn.preprocessing.StandardScaler``, including
    ``sample_weight`` and sparse input with ``with_mean=False``.
    """

    def fit(self, X, y=None, sample_weight=None):
        """Compute the mean and std to be used for later scaling.  Returns ``self``."""
        _forget(self)
        self._fit_validated(X, sample_weight)
        return self

    def partial_fit(self, X, y=None, sample_weight=None):
        """Online computation of mean and std on ``X`` (Chan's merge).  Returns ``self``."""
        self._fit_validated(X, sample_weight)
        return self

    def fit_transform(self, X, y=None, sample_weight=None):
        """``fit(X)`` then ``transform(X)``, validating ``X`` once."""
        _forget(self)
        Xv = self._fit_validated(X, sample_weight)
        return self._transform(Xv, self.copy, inverse=False)

    def _fit_validated(self, X, sample_weight):
        self._validate_params()  # scikit-learn's checks, which its own fit runs first
        first = not hasattr(self, "n_samples_seen_")
        Xv = validate_data(self, X, accept_sparse=("csr", "csc"), dtype=FLOAT_DTYPES,
                           ensure_all_finite=False, reset=first)
        core = _core.StandardScaler(with_mean=bool(self.with_mean),
                                    with_std=bool(self.with_std))
        if not first:
            core = self._fastbn
            core.with_mean, core.with_std = bool(self.with_mean), bool(self.with_std)
        core._merge(*_finite_statistics(core, Xv, sample_weight))
        self._fastbn = core
        self.mean_, self.var_, self.scale_ = core.mean_, core.var_, core.scale_
        self.n_samples_seen_ = _n_samples_seen(core.n_samples_seen_, Xv.dtype, core._weighted)
        return Xv

    def transform(self, X, copy=None):
        """Perform standardization by centering and scaling."""
        check_is_fitted(self)
        copy = self.copy if copy is None else copy
        Xv = validate_data(self, X, reset=False, accept_sparse=("csr", "csc"),
                           dtype=FLOAT_DTYPES, ensure_all_finite="allow-nan")
        return self._transform(Xv, copy, inverse=False)

    def inverse_transform(self, X, copy=None):
        """Scale back the data to the original representation."""
        check_is_fitted(self)
        copy = self.copy if copy is None else copy
        Xv = check_array(X, accept_sparse=("csr", "csc"), dtype=FLOAT_DTYPES,
                         ensure_all_finite="allow-nan")
        return self._transform(Xv, copy, inverse=True)

    def _transform(self, Xv, copy, inverse):
        core = self._fastbn
        core.with_mean, core.with_std = bool(self.with_mean), bool(self.with_std)
        if _sparse.is_sparse(Xv):
            result = core.inverse_transform(Xv) if inverse else core.transform(Xv)
            if copy:
                return result
            Xv.data[...] = result.data  # in place, as scikit-learn's copy=False
            return Xv
        out = _out_for(Xv, copy)
        return core.inverse_transform(Xv, out=out) if inverse else core.transform(Xv, out=out)


class MinMaxScaler(_sk.MinMaxScaler):
    """scikit-learn's ``MinMaxScaler``, computed by fastbn.

    Same parameters (``feature_range``, ``copy``, ``clip``), attributes and
    behaviour as ``sklearn.preprocessing.MinMaxScaler``.
    """

    def fit(self, X, y=None):
        """Compute the minimum and maximum to be used for later scaling.  Returns ``self``."""
        _forget(self)
        self._fit_validated(X)
        return self

    def partial_fit(self, X, y=None):
        """Online computation of min and max on ``X``.  Returns ``self``."""
        self._fit_validated(X)
        return self

    def fit_transform(self, X, y=None):
        """``fit(X)`` then ``transform(X)``, validating ``X`` once."""
        _forget(self)
        Xv = self._fit_validated(X)
        return self._fastbn.transform(Xv, out=_out_for(Xv, self.copy))

    def _fit_validated(self, X):
        self._validate_params()  # scikit-learn's checks, which its own fit runs first
        _core._feature_range(self.feature_range)
        if _sparse.is_sparse(X):
            raise TypeError("MinMaxScaler does not support sparse input. "
                            "Consider using MaxAbsScaler instead.")
        first = not hasattr(self, "n_samples_seen_")
        Xv = validate_data(self, X, reset=first, dtype=FLOAT_DTYPES, ensure_all_finite=False)
        core = None if first else self._fastbn
        if core is None:
            core = _core.MinMaxScaler(self.feature_range, clip=bool(self.clip))
        core.feature_range, core.clip = self.feature_range, bool(self.clip)
        core._merge(*_finite_statistics(core, Xv, None))
        self._fastbn = core
        for name in ("data_min_", "data_max_", "data_range_", "scale_", "min_"):
            setattr(self, name, getattr(core, name))
        self.n_samples_seen_ = core.n_samples_seen_
        return Xv

    def transform(self, X):
        """Scale features of ``X`` according to ``feature_range``."""
        check_is_fitted(self)
        Xv = validate_data(self, X, reset=False, dtype=FLOAT_DTYPES,
                           ensure_all_finite="allow-nan")
        core = self._fastbn
        # clipped to the current parameters, as scikit-learn's transform does
        core.feature_range, core.clip = self.feature_range, bool(self.clip)
        return core.transform(Xv, out=_out_for(Xv, self.copy))

    def inverse_transform(self, X):
        """Undo the scaling of ``X`` according to ``feature_range``."""
        check_is_fitted(self)
        Xv = check_array(X, dtype=FLOAT_DTYPES, ensure_all_finite="allow-nan")
        return self._fastbn.inverse_transform(Xv, out=_out_for(Xv, self.copy))


def _n_samples_seen(value, dtype, weighted):
    """scikit-learn's types: int64 counts, or weight sums in the input's float dtype."""
    if weighted:
        return np.asarray(value, dtype=dtype)[()]
    return np.asarray(value, dtype=np.int64)[()]


def _finite_statistics(core, Xv, sample_weight):
    """The statistics of ``Xv`` for ``core``'s merge, with scikit-learn's refusal of
    infinite values (NaN is allowed).  Instead of its separate pass over the data before
    the fit, the statistics tell: an infinity makes them non-finite, and only then does
    scikit-learn's check run, to raise its error (or to pass, when finite values overflowed
    the statistics, which scikit-learn computes the same way)."""
    stats = core._statistics(Xv, sample_weight)
    count, mean, m2, vmin, vmax = stats[2:7]
    seen = count > 0
    values = [mean, m2] + ([vmin, vmax] if vmin is not None else [])
    if not all(np.isfinite(a[seen]).all() for a in values):
        check_array(Xv, accept_sparse=True, dtype=None, ensure_all_finite="allow-nan",
                    ensure_2d=False, input_name="X")
    return stats
