"""Dot products in the order spec/patterns.md states, compiled.

``x . y = ((x_0 y_0 + x_1 y_1) + x_2 y_2) + ...``: every product and every sum rounded,
in increasing ``d``, no fused multiply-add (Numba without ``fastmath`` neither contracts
nor reorders float arithmetic). Several pairs are computed side by side, each in its own
accumulator, which changes no pair's order of operations, only how many are in flight.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _all_pairs(x, y, out):  # pragma: no cover - compiled
    """``out[i, j] = x[i] . y[j]``, four keys at a time."""
    n, D = x.shape
    m = y.shape[0]
    for i in range(n):
        j = 0
        while j + 4 <= m:
            s0 = 0.0
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            for d in range(D):
                a = x[i, d]
                s0 += a * y[j, d]
                s1 += a * y[j + 1, d]
                s2 += a * y[j + 2, d]
                s3 += a * y[j + 3, d]
            out[i, j] = s0
            out[i, j + 1] = s1
            out[i, j + 2] = s2
            out[i, j + 3] = s3
            j += 4
        while j < m:
            s = 0.0
            for d in range(D):
                s += x[i, d] * y[j, d]
            out[i, j] = s
            j += 1


@numba.njit(cache=True, nogil=True)
def _listed_pairs(x, y, rows, cols, out):  # pragma: no cover - compiled
    """``out[e] = x[rows[e]] . y[cols[e]]``."""
    D = x.shape[1]
    for e in range(rows.shape[0]):
        r = rows[e]
        c = cols[e]
        s = 0.0
        for d in range(D):
            s += x[r, d] * y[c, d]
        out[e] = s


def all_pairs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x @ y.T`` for float64 ``x (n, D)``, ``y (m, D)``, in the stated order."""
    out = np.empty((x.shape[0], y.shape[0]))
    _all_pairs(np.ascontiguousarray(x, np.float64), np.ascontiguousarray(y, np.float64), out)
    return out


def listed_pairs(x: np.ndarray, y: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``x[rows[e]] . y[cols[e]]`` for every pair ``e``, in the stated order."""
    out = np.empty(rows.shape[0])
    _listed_pairs(np.ascontiguousarray(x, np.float64), np.ascontiguousarray(y, np.float64),
                  np.asarray(rows, np.int64), np.asarray(cols, np.int64), out)
    return out
