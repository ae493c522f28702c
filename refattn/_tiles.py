"""The non-empty tiles of a canonical CSR, by a compiled pass over its rows.

Query block ``I`` covers rows ``I*bq .. min(Lq, (I+1)*bq) - 1``; an entry in column
``c`` lies in key block ``c // bk``. Two passes (count the distinct key blocks of
each query block, then write them with their entry counts) put the result straight
into arrays of its final size: time O(nnz), memory O(number of tiles) beyond the
input, where NumPy's route builds several int64 arrays of nnz entries.
`refattn.blocks` checks this against its NumPy route.
"""

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def lower_bound(indices, lo, hi, value):  # pragma: no cover - compiled
    """The first position ``p`` in ``[lo, hi)`` with ``indices[p] >= value`` (``hi`` if
    none), for sorted ``indices[lo:hi]``."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if indices[mid] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True, nogil=True)
def _block_tiles(indptr, indices, r0, r1, bk, count, touched):  # pragma: no cover - compiled
    """Entry counts of the key blocks met by rows ``r0:r1`` into ``count`` (zeros on
    entry), and the distinct blocks, sorted, as ``touched[:n]``; returns n."""
    n = 0
    for r in range(r0, r1):
        e, end = indptr[r], indptr[r + 1]
        while e < end:                       # one run of entries per key block of the row
            J = indices[e] // bk
            stop = lower_bound(indices, e, end, (J + 1) * bk)
            if count[J] == 0:
                touched[n] = J
                n += 1
            count[J] += stop - e
            e = stop
    touched[:n].sort()
    return n


@numba.njit(cache=True, parallel=True)
def tiles(indptr, indices, lq, bq, bk, nbk):  # pragma: no cover - compiled
    """``(tile_ptr, key_block, count)``: for each query block ``I``, its non-empty key
    blocks ``key_block[tile_ptr[I]:tile_ptr[I + 1]]`` in increasing order and the
    number of entries each holds."""
    nbq = (lq + bq - 1) // bq
    # Query blocks are handled in chunks that share one scratch array, reset after each
    # block where it was touched (allocating O(nbk) per block would cost O(nbq * nbk)).
    chunk = max(1, min(64, nbq // 64))
    nchunks = (nbq + chunk - 1) // chunk
    per_block = np.zeros(nbq + 1, np.int64)
    for c in numba.prange(nchunks):
        count = np.zeros(nbk, np.int64)
        touched = np.empty(nbk, np.int64)
        for I in range(c * chunk, min(nbq, (c + 1) * chunk)):
            n = _block_tiles(indptr, indices, I * bq, min(lq, (I + 1) * bq), bk, count, touched)
            per_block[I + 1] = n
            count[touched[:n]] = 0
    tile_ptr = np.cumsum(per_block)
    key_block = np.empty(tile_ptr[nbq], np.int64)
    counts = np.empty(tile_ptr[nbq], np.int64)
    for c in numba.prange(nchunks):
        count = np.zeros(nbk, np.int64)
        touched = np.empty(nbk, np.int64)
        for I in range(c * chunk, min(nbq, (c + 1) * chunk)):
            n = _block_tiles(indptr, indices, I * bq, min(lq, (I + 1) * bq), bk, count, touched)
            for t in range(n):
                key_block[tile_ptr[I] + t] = touched[t]
                counts[tile_ptr[I] + t] = count[touched[t]]
            count[touched[:n]] = 0
    return tile_ptr, key_block, counts
