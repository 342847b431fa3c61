"""Per-channel helpers shared by the API and every backend (NumPy, float64)."""

import numpy as np


def invstd(var, eps):
    """``1 / sqrt(var + eps)``, 0 where ``var + eps == 0`` (CONTRACT section 2)."""
    v = np.asarray(var, dtype=np.float64) + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 / np.sqrt(v)
    return np.where(v == 0.0, 0.0, out)
