"""Set operations on canonical boolean CSR structures by a compiled row-wise merge.

Each row of the result is the union, intersection or difference of two sorted index
lists. Two passes (count, then write) put the result straight into arrays of its final
size and index dtype: peak memory is the two operands plus the result, with no
temporaries of the operands' size (SciPy's boolean arithmetic makes several).
"""

import numba
import numpy as np

UNION, INTERSECTION, DIFFERENCE = 0, 1, 2


@numba.njit(cache=True, nogil=True)
def _merge(op, ap, ai, bp, bi, indptr, out, write):  # pragma: no cover - compiled
    """Row r of the result from rows r of A and B. ``write=False``: store each row's
    count in ``indptr[r + 1]``; ``write=True``: write the indices from ``indptr[r]``."""
    for r in range(ap.shape[0] - 1):
        p, pe, q, qe = ap[r], ap[r + 1], bp[r], bp[r + 1]
        n = indptr[r] if write else 0
        while p < pe or q < qe:
            if q == qe or (p < pe and ai[p] < bi[q]):        # only in A
                j = ai[p]
                keep = op != INTERSECTION
                p += 1
            elif p == pe or bi[q] < ai[p]:                   # only in B
                j = bi[q]
                keep = op == UNION
                q += 1
            else:                                            # in both
                j = ai[p]
                keep = op != DIFFERENCE
                p += 1
                q += 1
            if keep:
                if write:
                    out[n] = j
                n += 1
        if not write:
            indptr[r + 1] = n


def merge(op: int, ap, ai, bp, bi, index_dtype) -> tuple[np.ndarray, np.ndarray]:
    """``(indptr, indices)`` of ``A op B`` for canonical CSR structures of the same shape;
    ``index_dtype(nnz)`` picks the result's index dtype once its size is known."""
    lq = ap.shape[0] - 1
    counts = np.zeros(lq + 1, np.int64)
    _merge(op, ap, ai, bp, bi, counts, np.empty(0, np.int64), False)
    indptr = np.cumsum(counts)
    dtype = index_dtype(int(indptr[-1]))
    indices = np.empty(int(indptr[-1]), dtype)
    _merge(op, ap, ai, bp, bi, indptr, indices, True)
    return indptr.astype(dtype), indices
