"""refattn's seeded draw without replacement, specified so any language can reproduce it.

spec/patterns.md ("The random draw") defines it in ten lines of integer arithmetic:
SplitMix64 hashes of ``(seed, head, row, step)`` drive Floyd's algorithm, which picks
``k`` distinct positions out of ``0 .. n - 1`` in ``k`` steps. Only 64-bit wrapping
integer operations are used, so the result is the same on every platform, in NumPy,
in C, in Rust or in a GPU kernel; no library generator (whose streams differ between
libraries and versions) is involved.
"""

from __future__ import annotations

import numba
import numpy as np

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)


@numba.njit(cache=True, nogil=True)
def splitmix64(x):  # pragma: no cover - compiled
    """SplitMix64's output function of ``x + golden gamma`` (uint64 in, uint64 out)."""
    z = x + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MUL1
    z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _below(seed, head, row, step, bound):  # pragma: no cover - compiled
    """An integer in ``[0, bound)`` from the hash of ``(seed, head, row, step)``:
    the top 32 bits of the hash, scaled by ``bound`` (``bound <= 2**32``)."""
    u = splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ head) ^ row) ^ step)
    return np.int64(((u >> np.uint64(32)) * np.uint64(bound)) >> np.uint64(32))


@numba.njit(cache=True, nogil=True)
def draw_rows(seed, head, first_row, n, k, indptr, out):  # pragma: no cover - compiled
    """For each row ``first_row + r``, ``k[r]`` distinct positions out of ``0 .. n[r] - 1``
    by Floyd's algorithm, written sorted to ``out[indptr[r]:indptr[r + 1]]`` (``k[r] <= n[r]``)."""
    for r in range(n.shape[0]):
        p0 = indptr[r]
        m = 0
        for step in range(k[r]):
            top = n[r] - k[r] + step                    # draw t in [0, top]
            t = _below(seed, head, np.uint64(first_row + r), np.uint64(step), top + 1)
            for q in range(p0, p0 + m):                 # already chosen: take `top` instead
                if out[q] == t:
                    t = top
                    break
            out[p0 + m] = t
            m += 1
        out[p0:p0 + m].sort()


def draw(seed: int, head: int, n: np.ndarray, k: np.ndarray,
         first_row: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row ``first_row + r`` draws ``min(k[r], n[r])`` positions out of ``range(n[r])``;
    returns the CSR ``(indptr, positions)`` (int64, each row sorted)."""
    n = np.asarray(n, np.int64)
    k = np.minimum(np.asarray(k, np.int64), n)
    if n.size and n.max() > 2**32:
        raise ValueError("the draw supports at most 2**32 candidates per row")
    indptr = np.zeros(n.size + 1, np.int64)
    np.cumsum(k, out=indptr[1:])
    out = np.empty(int(indptr[-1]), np.int64)
    draw_rows(np.uint64(seed), np.uint64(head), np.uint64(first_row), n, k, indptr, out)
    return indptr, out


@numba.njit(cache=True, nogil=True)
def _word_sums(seed, head, row, out):  # pragma: no cover - compiled
    """``out[step]`` = the sum of the four 16-bit words of the hash of
    ``(seed, head, row, step)``, minus their mean 131070, over 32768."""
    w = np.uint64(0xFFFF)
    for step in range(out.shape[0]):
        u = splitmix64(splitmix64(splitmix64(splitmix64(seed) ^ head) ^ row) ^ np.uint64(step))
        s = (u & w) + ((u >> np.uint64(16)) & w) + ((u >> np.uint64(32)) & w) + (u >> np.uint64(48))
        out[step] = (np.float64(s) - 131070.0) / 32768.0


def hash_normals(seed: int, head: int, row: int, count: int) -> np.ndarray:
    """``count`` near-Gaussian values, exact in float64, from the hashes of
    ``(seed, head, row, step)``, ``step = 0 .. count - 1`` (spec/patterns.md, `lsh`)."""
    out = np.empty(count, np.float64)
    _word_sums(np.uint64(seed), np.uint64(head), np.uint64(row), out)
    return out
