"""scipy.sparse input to the scalers: column statistics and column scaling, sparsity kept.

scipy is never imported here: a sparse input brings its own module, and the
functions below use only its arrays (``data``, ``indices``, ``indptr``) and methods.
As in scikit-learn, the features are the columns, implicit entries are zeros that
count as samples, and explicit NaN entries are ignored.
"""

import numpy as np

_FLOATS = (np.float16, np.float32, np.float64)

CENTER_ERROR = ("Cannot center sparse matrices: pass `with_mean=False` instead. See docstring "
                "for motivation and alternatives.")


def is_sparse(x):
    """Whether ``x`` is a scipy.sparse matrix or array (without importing scipy)."""
    return type(x).__module__.startswith("scipy.sparse") and hasattr(x, "tocsr")


def as_csr_or_csc(x, name="x"):
    """``x`` in CSR or CSC format (others converted to CSR) with a float dtype: float
    kinds keep theirs, integers and bool become float64."""
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D when sparse, got {x.ndim} dimensions")
    if x.format not in ("csr", "csc"):
        x = x.tocsr()
    if x.dtype.kind not in "biuf":
        raise TypeError(f"{name} has unsupported dtype {x.dtype}")
    if x.dtype.type not in _FLOATS:
        x = x.astype(np.float64)
    if not x.has_canonical_format:  # duplicate entries add up: make each position one entry
        x = x.copy()
        x.sum_duplicates()
    return x


def _column_of_each_entry(x):
    if x.format == "csr":
        return x.indices
    return np.repeat(np.arange(x.shape[1]), np.diff(x.indptr))


def _row_of_each_entry(x):
    if x.format == "csc":
        return x.indices
    return np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))


def column_stats(x, weights=None):
    """Per column of a CSR/CSC ``x``: ``(weight sum, mean, M2)``, float64, implicit zeros
    included and NaN entries ignored; ``weights`` (rows,) float64 or None (all 1)."""
    rows, width = x.shape
    cols = _column_of_each_entry(x)
    values = x.data.astype(np.float64)
    nan = np.isnan(values)
    if weights is None:
        entry_w = np.ones(values.shape)
        total = float(rows)
    else:
        entry_w = weights[_row_of_each_entry(x)]
        total = float(weights.sum())
    count = total - np.bincount(cols, weights=np.where(nan, entry_w, 0.0), minlength=width)
    kept_w = np.where(nan, 0.0, entry_w)
    kept = np.where(nan, 0.0, values)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(cols, weights=kept_w * kept, minlength=width) / count
        # explicit entries about the mean, then the implicit zeros (weight: the rest)
        dev = kept - mean[cols]
        m2 = np.bincount(cols, weights=kept_w * dev * dev, minlength=width)
        implicit = total - np.bincount(cols, weights=entry_w, minlength=width)
        m2 = m2 + np.maximum(implicit, 0.0) * mean * mean
    empty = count <= 0
    return (np.where(empty, 0.0, count), np.where(empty, np.nan, mean),
            np.where(empty, np.nan, m2))


def scale_columns(x, factor, dtype):
    """A copy of the CSR/CSC ``x`` in ``dtype`` with column j multiplied by ``factor[j]``."""
    y = x.astype(dtype, copy=True)
    y.data *= factor[_column_of_each_entry(y)].astype(dtype)
    return y
