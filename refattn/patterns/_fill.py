"""The one compiled loop of the pattern builders: writing arithmetic progressions into a
CSR's index array. Serial and exact (integer arithmetic), so the result does not depend
on threads; cached on disk, so later processes load it in well under a second."""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def fill_progressions(indptr, first, step, indices):  # pragma: no cover - compiled
    """``indices[indptr[i] + t] = first[i] + step * t`` for every row i and t < row length."""
    for i in range(indptr.shape[0] - 1):
        base = first[i]
        for p in range(indptr[i], indptr[i + 1]):
            indices[p] = base
            base += step


def fill(indptr: np.ndarray, first: np.ndarray, step: int, indices: np.ndarray) -> None:
    fill_progressions(indptr, first.astype(np.int64), np.int64(step), indices)


@numba.njit(cache=True, nogil=True)
def fill_two_ranges(indptr, a_hi, b_lo, indices):  # pragma: no cover - compiled
    """Row i holds ``0 .. a_hi[i] - 1`` then ``b_lo[i] ..`` up to its length (a_hi <= b_lo)."""
    for i in range(indptr.shape[0] - 1):
        p = indptr[i]
        for j in range(a_hi[i]):
            indices[p] = j
            p += 1
        j = b_lo[i]
        while p < indptr[i + 1]:
            indices[p] = j
            p += 1
            j += 1


@numba.njit(cache=True, nogil=True)
def fill_blocks(indptr, bindptr, bindices, block, lk, indices):  # pragma: no cover - compiled
    """Row i holds the keys of the key blocks ``bindices[bindptr[i // block]:...]`` in order."""
    for i in range(indptr.shape[0] - 1):
        p = indptr[i]
        qb = i // block
        for t in range(bindptr[qb], bindptr[qb + 1]):
            j0 = bindices[t] * block
            for j in range(j0, min(j0 + block, lk)):
                indices[p] = j
                p += 1


@numba.njit(cache=True, nogil=True)
def fill_fixed(ip, block, summary, causal, lk, indptr, indices, write):  # pragma: no cover - compiled
    """Sparse Transformer ``fixed`` rows, in increasing key order: the summary columns of
    the blocks before the query's own, its own block (up to ``i'`` when causal), then, when
    not causal, the summary columns after it. ``write=False`` stores each row's count in
    ``indptr[i + 1]``; ``write=True`` writes the keys from ``indptr[i]``."""
    for i in range(ip.shape[0]):
        n = indptr[i] if write else 0
        own = ip[i] // block if ip[i] >= 0 else -1
        last = min(ip[i], lk - 1) if causal else lk - 1
        own_lo = own * block
        own_hi = min(own_lo + block - 1, last) if own >= 0 else -1
        t = 0
        while t * block < lk:
            if t == own:
                for j in range(own_lo, own_hi + 1):
                    if write:
                        indices[n] = j
                    n += 1
            else:
                for j in range(t * block + block - summary, min(t * block + block, last + 1)):
                    if write:
                        indices[n] = j
                    n += 1
            t += 1
        if not write:
            indptr[i + 1] = n
