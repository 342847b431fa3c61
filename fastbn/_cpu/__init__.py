"""Parallel CPU backend (Numba ``prange``)."""
