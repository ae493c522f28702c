"""The cpu route: Numba-parallel tiled kernels, bitwise reproducible for any thread count.

Forward (spec/backends.md, "cpu"): one work item per (batch, head, query block ``I``);
it walks the non-empty key blocks ``J`` of ``I`` in increasing order and keeps, per
query row, the running max ``m``, the running sum ``l`` and the unnormalised output,
as FlashAttention-2's Algorithm 1. Backward without atomics, in two passes:
``dQ`` per (batch, head, query block) over the same tiles, and ``dK``, ``dV`` per
(batch, kv head, key block ``J``) over the transposed block structure (the query
blocks whose tile ``(I, J)`` is non-empty, for each query head reading that kv
head). Every output element is written by exactly one work item, which sums its
terms in a fixed order, so the result cannot depend on how items are spread over
threads.

A tile is computed one of two ways, chosen from the mask alone:

* *dense*: full tiles, and partial ones holding at least `DENSE_TILE_MIN_DENSITY`
  of their entries. ``Q_I K_J^T``, ``P V_J``, ``dO_I V_J^T``, ``dS K_J``,
  ``P^T dO_I`` and ``dS^T Q_I`` are BLAS products on the tile (``np.dot`` inside
  the kernel, with BLAS held to one thread so that the kernels' own threads are
  not oversubscribed); the softmax arithmetic runs on the allowed entries only, and
  removed entries of a partial tile are 0 in ``P`` and ``dS`` for the products.
* *entry by entry*: sparse partial tiles. Each allowed entry's dot products are
  summed in a fixed order (`_dot`), and its contribution added row by row.

Memory beyond inputs and outputs: a few ``block_q x block_k`` tiles per thread and
the block layout; never an ``Lq x Lk`` array. This module shares no arithmetic
with the other backends.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import scipy.linalg.cython_blas  # noqa: F401  (the BLAS Numba's np.dot calls: load it before limiting it)
from numba import prange
from threadpoolctl import ThreadpoolController

from .._tiles import lower_bound
from ._exp import exp
from ._host import (ALIBI, DB_ALIBI, DB_COLS, DB_ENTRIES, DB_FULL, DB_NONE, DB_ROWS, DENSE, SPARSE, Plan, block_size,
                    bias_args, dbias_buffers, dbias_reduce, drop_args, plan)
from ..contract import Grads, Problem, Result

COMPUTE_DTYPES = (np.float64, np.float32)

#: A partial tile with at least this fraction of its entries allowed is computed with
#: BLAS tile products; sparser ones entry by entry. Measured (float32, one thread, D = 64):
#: a BLAS tile costs about 7 ns per cell in the forward (sliding window), the entry route
#: about 36 ns per entry (strided), so the crossover lies near a density of 0.2.
DENSE_TILE_MIN_DENSITY = 0.25


OPTIONS = {"block_q": (block_size, 64), "block_k": (block_size, 64)}

_blas_controller = None


def _one_blas_thread():
    """A context in which BLAS runs on the calling thread only (the kernels are the
    parallel layer)."""
    global _blas_controller
    if _blas_controller is None:
        _blas_controller = ThreadpoolController()
    return _blas_controller.limit(limits=1, user_api="blas")


# ---- the compiled arithmetic ----------------------------------------------------------
# The kernels work on a tile's *row segments*: the allowed entries of each query row
# r0 + r within one tile, as the first lens[r] values of row r of a 2-D buffer: the
# tile's own row for a full tile (entry u is column c0 + u), else gathered (entry u is
# CSR position e0s[r] + u, its column read from the CSR). Each feature (softcap, each
# kind of bias, dropout, dlse, each place dbias goes) is its own loop over the tile,
# chosen by a test made once per tile, so that the loops stay branch-free and vectorise,
# and one compiled kernel per dtype serves every combination of features. (Arrays are
# never sliced per row, nor taken out of tuples outside the branch that uses them:
# each such view costs reference counting, which cost a third of the forward's time.)

@numba.njit(cache=True, nogil=True, inline="always")
def _dot(A, ra, B, rb):  # pragma: no cover - compiled
    """``sum_d A[ra, d] B[rb, d]`` with eight partial sums over ``d mod 8``, combined
    pairwise: a fixed order that vectorises without reassociation (no fastmath)."""
    n = A.shape[1]
    zero = A.dtype.type(0)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = zero
    d = 0
    while d + 8 <= n:
        s0 += A[ra, d] * B[rb, d]
        s1 += A[ra, d + 1] * B[rb, d + 1]
        s2 += A[ra, d + 2] * B[rb, d + 2]
        s3 += A[ra, d + 3] * B[rb, d + 3]
        s4 += A[ra, d + 4] * B[rb, d + 4]
        s5 += A[ra, d + 5] * B[rb, d + 5]
        s6 += A[ra, d + 6] * B[rb, d + 6]
        s7 += A[ra, d + 7] * B[rb, d + 7]
        d += 8
    while d < n:
        s0 += A[ra, d] * B[rb, d]
        d += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(cache=True, nogil=True, inline="always")
def _sum8(X, r, n):  # pragma: no cover - compiled
    """``X[r, 0] + ... + X[r, n-1]`` as eight partial sums over the index mod 8, combined
    pairwise (a fixed order; one running sum would wait on each addition in turn)."""
    zero = X.dtype.type(0)
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = zero
    t = 0
    while t + 8 <= n:
        s0 += X[r, t]
        s1 += X[r, t + 1]
        s2 += X[r, t + 2]
        s3 += X[r, t + 3]
        s4 += X[r, t + 4]
        s5 += X[r, t + 5]
        s6 += X[r, t + 6]
        s7 += X[r, t + 7]
        t += 8
    while t < n:
        s0 += X[r, t]
        t += 1
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@numba.njit(cache=True, nogil=True, inline="always")
def _max8(X, r, n):  # pragma: no cover - compiled
    """``max(X[r, 0], ..., X[r, n-1])`` for ``n >= 1`` as eight running maxima (max is
    exact: the order cannot change the value)."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = X[r, 0]
    t = 0
    while t + 8 <= n:
        m0 = max(m0, X[r, t])
        m1 = max(m1, X[r, t + 1])
        m2 = max(m2, X[r, t + 2])
        m3 = max(m3, X[r, t + 3])
        m4 = max(m4, X[r, t + 4])
        m5 = max(m5, X[r, t + 5])
        m6 = max(m6, X[r, t + 6])
        m7 = max(m7, X[r, t + 7])
        t += 8
    while t < n:
        m0 = max(m0, X[r, t])
        t += 1
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@numba.njit(cache=True, nogil=True, inline="always")
def _col(indices, ioff, c0, gathered, u):  # pragma: no cover - compiled
    """The column of a segment's entry ``u``: ``c0 + u`` in a full tile's row, else read
    from the CSR."""
    return indices[ioff + u] if gathered else c0 + u


@numba.njit(cache=True, nogil=True)
def _scores(X, nr, lens, e0s, r0, c0, indices, eb, gathered, b, h, scale, cap, T, bias):  # pragma: no cover
    """``S`` of a tile's row segments ``X[r, :lens[r]]`` in place, from ``q_i . k_j``,
    in the spec's order: scale, softcap (``T = tanh(scale x / cap)`` kept for the
    backward), bias (`_host.bias_args`)."""
    kind = bias[0]
    for r in range(nr):
        for u in range(lens[r]):
            X[r, u] = scale * X[r, u]
    if cap > 0:
        for r in range(nr):
            for u in range(lens[r]):
                T[r, u] = math.tanh(X[r, u] / cap)
                X[r, u] = cap * T[r, u]
    if kind == DENSE:
        dense = bias[1]
        bb, hb, lqb, lkb = dense.shape
        bi, hi = b if bb > 1 else 0, h if hb > 1 else 0
        for r in range(nr):
            ii, ioff = r0 + r if lqb > 1 else 0, eb + e0s[r]
            for u in range(lens[r]):
                X[r, u] += dense[bi, hi, ii, _col(indices, ioff, c0, gathered, u) if lkb > 1 else 0]
    elif kind == SPARSE:
        values, vbase = bias[2], bias[3]
        for r in range(nr):
            vb = vbase[b, h] + e0s[r]
            for u in range(lens[r]):
                X[r, u] += values[vb + u]
    elif kind == ALIBI:
        slopes, offset = bias[4], bias[5]
        slope = -slopes[h]
        for r in range(nr):
            ii, ioff = r0 + r + offset, eb + e0s[r]
            for u in range(lens[r]):
                X[r, u] += slope * slopes.dtype.type(abs(_col(indices, ioff, c0, gathered, u) - ii))


@numba.njit(cache=True, nogil=True)
def _online_softmax(X, nr, lens, e0s, m, l, acc, b, h, drop):  # pragma: no cover - compiled
    """One online-softmax step for each row of a tile: ``S`` in ``X`` in, ``P~ Z / (1 - p)``
    out; rescales ``acc``, updates the running ``m`` and ``l``."""
    zero, one = X.dtype.type(0), X.dtype.type(1)
    for r in range(nr):
        n = lens[r]
        if n == 0:
            continue
        m_new = max(m[r], _max8(X, r, n))
        alpha = exp(m[r] - m_new)                           # e^(m_old - m_new); 0 from -inf
        for u in range(n):
            X[r, u] = exp(X[r, u] - m_new)                  # P~ = exp(S - m_new)
        l[r] = alpha * l[r] + _sum8(X, r, n)                # l = e^(m_old - m_new) l + rowsum(P~)
        m[r] = m_new
        if alpha != one:
            for d in range(acc.shape[1]):
                acc[r, d] *= alpha
    if drop[3]:
        keep, kbase, zscale = drop[0], drop[1], drop[2]
        for r in range(nr):
            kb = kbase[b, h] + e0s[r]
            for u in range(lens[r]):
                X[r, u] = X[r, u] * zscale if keep[kb + u] else zero


@numba.njit(cache=True, nogil=True)
def _tile_grads(X, DP, PZ, nr, lens, e0s, r0, c0, indices, eb, gathered, b, h, lse, Drow, dlse, scale, cap,
                T, bias, drop, db_mode, rowterm, dbias):  # pragma: no cover - compiled
    """Backward of a tile's row segments, ``X = q_i . k_j`` and ``DP = dO_i . v_j``.

    Leaves ``P`` in ``X``, ``dS`` times the softcap's derivative in ``DP`` and
    ``P Z / (1 - p)`` in ``PZ`` (which may be ``X`` itself); adds the dbias terms of
    ``db_mode`` to ``rowterm`` (per-row terms) or ``dbias = (full, entries,
    entries_base, cols)``."""
    zero, one = X.dtype.type(0), X.dtype.type(1)
    has_dropout = drop[3]
    _scores(X, nr, lens, e0s, r0, c0, indices, eb, gathered, b, h, scale, cap, T, bias)
    for r in range(nr):
        Li = lse[b, h, r0 + r]
        for u in range(lens[r]):
            X[r, u] = exp(X[r, u] - Li)                     # P = exp(S - L)
    if has_dropout:
        keep, kbase, zscale = drop[0], drop[1], drop[2]
        for r in range(nr):
            kb = kbase[b, h] + e0s[r]
            for u in range(lens[r]):
                DP[r, u] = DP[r, u] * zscale if keep[kb + u] else zero   # dP = (dO_i . v_j) Z / (1 - p)
    for r in range(nr):
        Di = Drow[b, h, r0 + r]
        for u in range(lens[r]):
            DP[r, u] = X[r, u] * (DP[r, u] - Di)            # dS = P (dP - D_i)
    if drop[4]:
        for r in range(nr):
            dli = dlse[b, h, r0 + r]
            for u in range(lens[r]):
                DP[r, u] += dli * X[r, u]                   #      + dlse_i P
    if db_mode == DB_ROWS:                                  # dbias = dS (the bias is added last)
        for r in range(nr):
            rowterm[r] += _sum8(DP, r, lens[r])
    elif db_mode == DB_ALIBI:
        slopes, offset = bias[4], bias[5]
        for r in range(nr):
            ii, ioff, term = r0 + r + offset, eb + e0s[r], zero
            for u in range(lens[r]):
                term += DP[r, u] * -slopes.dtype.type(abs(_col(indices, ioff, c0, gathered, u) - ii))
            rowterm[r] += term
    elif db_mode == DB_FULL:
        db_full = dbias[0]
        for r in range(nr):
            ioff = eb + e0s[r]
            for u in range(lens[r]):
                db_full[b, h, r0 + r, _col(indices, ioff, c0, gathered, u)] = DP[r, u]
    elif db_mode == DB_ENTRIES:
        db_entries, db_base = dbias[1], dbias[2]
        for r in range(nr):
            base = db_base[b, h] + e0s[r]
            for u in range(lens[r]):
                db_entries[base + u] = DP[r, u]
    elif db_mode == DB_COLS:
        db_cols = dbias[3]
        for r in range(nr):
            ioff = eb + e0s[r]
            for u in range(lens[r]):
                db_cols[b, h, _col(indices, ioff, c0, gathered, u)] += DP[r, u]
    if cap > 0:
        for r in range(nr):
            for u in range(lens[r]):
                DP[r, u] *= one - T[r, u] * T[r, u]         # d(c tanh(s / c)) / ds = 1 - T^2
    if has_dropout:
        keep, kbase, zscale = drop[0], drop[1], drop[2]
        for r in range(nr):
            kb = kbase[b, h] + e0s[r]
            for u in range(lens[r]):
                PZ[r, u] = X[r, u] * zscale if keep[kb + u] else zero
    else:
        for r in range(nr):
            for u in range(lens[r]):
                PZ[r, u] = X[r, u]


@numba.njit(cache=True, nogil=True, inline="always")
def _row_end(indices, eb, start, stop, c1, full, nc):  # pragma: no cover - compiled
    """The end of a row's run of entries with column < ``c1``, from ``start``."""
    if full:
        return start + nc
    e = start
    while e < stop and indices[eb + e] < c1:
        e += 1
    return e


@numba.njit(cache=True, nogil=True, inline="always")
def _unflatten(item, n1, n2):  # pragma: no cover - compiled
    """Work item -> ``(i0, i1, i2)``, row-major over ``(n0, n1, n2)`` except that the
    last index runs zig-zag (0, n2 - 1, 1, n2 - 2, ...): a causal mask's light and
    heavy blocks then alternate, and each thread's contiguous share of the items holds
    about the same work. (In int64: a prange index may be unsigned, and mixing it with
    signed integers would give floats.)"""
    t = np.int64(item)
    z = t % n2
    return t // (n1 * n2), (t // n2) % n1, z // 2 if z % 2 == 0 else n2 - 1 - z // 2


# ---- forward ----------------------------------------------------------------------------
# Per row and tile the segment is either the tile's row itself (a full tile: S[r]) or
# gathered into a scratch row (XG[r]); the two calls below name their arrays directly,
# so no array view is made per row (each would cost reference counting).

@numba.njit(cache=True, nogil=True)
def _forward_block(q, k, v, scale, cap, mask, tl, bias, drop, bq, bk, b, h, I,
                   out, lse):  # pragma: no cover - compiled
    """Algorithm 1 for query block ``I`` of (b, h): the O and L of its rows."""
    indptr, indices, base, gid = mask
    tile_ptr, tile_key, tile_full, tile_dense = tl[0], tl[1], tl[2], tl[3]
    dt = q.dtype
    neg_inf, zero = dt.type(-np.inf), dt.type(0)
    Lq, Lk, Dv = q.shape[2], k.shape[2], v.shape[3]
    g = h // (q.shape[1] // k.shape[1])
    G = gid[b, h]
    ip, eb = indptr[G], base[G]
    r0 = I * bq
    r1 = min(Lq, r0 + bq)
    nr = r1 - r0
    Qi, Kg, Vg = q[b, h, r0:r1], k[b, g], v[b, g]
    m = np.empty(nr, dt)
    m[:] = neg_inf                                          # running max
    l = np.zeros(nr, dt)                                    # running sum of exp(S - m)
    acc = np.zeros((nr, Dv), dt)                            # unnormalised output
    ptr = ip[r0:r1].copy()                                  # each row's next entry
    e0s, lens = np.empty(nr, np.int64), np.empty(nr, np.int64)
    sbuf = np.empty(bq * bk, dt)
    pvbuf = np.empty(bq * Dv, dt)
    XG, T = np.empty((nr, bk), dt), np.empty((nr, bk), dt)
    for t in range(tile_ptr[G, I], tile_ptr[G, I + 1]):
        c0 = tile_key[t] * bk
        c1 = min(Lk, c0 + bk)
        nc = c1 - c0
        full, dense_tile = tile_full[t], tile_dense[t]
        for r in range(nr):                                 # each row's entries in this tile
            e0s[r] = ptr[r]
            ptr[r] = _row_end(indices, eb, ptr[r], ip[r0 + r + 1], c1, full, nc)
            lens[r] = ptr[r] - e0s[r]
        S = sbuf[:nr * nc].reshape((nr, nc))
        if dense_tile:
            np.dot(Qi, Kg[c0:c1].T, S)                      # Q_I K_J^T
        if full:                                            # the segments are S's rows
            _scores(S, nr, lens, e0s, r0, c0, indices, eb, False, b, h, scale, cap, T, bias)
            _online_softmax(S, nr, lens, e0s, m, l, acc, b, h, drop)
        else:                                               # gathered into XG's rows
            for r in range(nr):
                for u in range(lens[r]):
                    j = indices[eb + e0s[r] + u]
                    XG[r, u] = S[r, j - c0] if dense_tile else _dot(Qi, r, Kg, j)
            _scores(XG, nr, lens, e0s, r0, c0, indices, eb, True, b, h, scale, cap, T, bias)
            _online_softmax(XG, nr, lens, e0s, m, l, acc, b, h, drop)
            for r in range(nr):
                if dense_tile:
                    S[r, :] = zero                          # removed entries: P~ = 0
                    for u in range(lens[r]):
                        S[r, indices[eb + e0s[r] + u] - c0] = XG[r, u]
                else:
                    for u in range(lens[r]):
                        j = indices[eb + e0s[r] + u]
                        for d in range(Dv):
                            acc[r, d] += XG[r, u] * Vg[j, d]   # O_i += P~_ij Z_ij / (1 - p) v_j
        if dense_tile:
            PV = pvbuf[:nr * Dv].reshape((nr, Dv))
            np.dot(S, Vg[c0:c1], PV)                        # O += (P~ Z / (1 - p)) V_J
            acc += PV
    for r in range(nr):
        if l[r] > zero:
            for d in range(Dv):
                out[b, h, r0 + r, d] = acc[r, d] / l[r]     # O = diag(l)^-1 O
            lse[b, h, r0 + r] = m[r] + math.log(l[r])       # L = m + log l
        # else: an empty row keeps O = 0, L = -inf (spec/semantics.md, section 4)


@numba.njit(cache=True, parallel=True)
def _forward_kernel(q, k, v, scale, cap, mask, tl, bias, drop, bq, bk, out, lse):  # pragma: no cover
    B, H, Lq = q.shape[0], q.shape[1], q.shape[2]
    nbq = (Lq + bq - 1) // bq
    for item in prange(B * H * nbq):
        b, h, I = _unflatten(item, H, nbq)
        _forward_block(q, k, v, scale, cap, mask, tl, bias, drop, bq, bk, b, h, I, out, lse)


# ---- backward ---------------------------------------------------------------------------

@numba.njit(cache=True, parallel=True)
def _rowdot_kernel(dout, out, D):  # pragma: no cover - compiled
    """``D = rowsum(dO * O)``, each row summed left to right."""
    B, H, Lq, Dv = out.shape
    for item in prange(B * H):
        b, h, _ = _unflatten(item, H, 1)
        for i in range(Lq):
            s = D.dtype.type(0)
            for d in range(Dv):
                s += dout[b, h, i, d] * out[b, h, i, d]
            D[b, h, i] = s


@numba.njit(cache=True, nogil=True)
def _dq_block(q, k, v, dout, lse, Drow, dlse, scale, cap, mask, tl, bias, drop, bq, bk,
              b, h, I, dq, db_mode, db_rows, dbias):  # pragma: no cover - compiled
    """dQ of query block ``I`` of (b, h), and the row-owned dbias terms."""
    indptr, indices, base, gid = mask
    tile_ptr, tile_key, tile_full, tile_dense = tl[0], tl[1], tl[2], tl[3]
    dt = q.dtype
    zero = dt.type(0)
    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    g = h // (q.shape[1] // k.shape[1])
    G = gid[b, h]
    ip, eb = indptr[G], base[G]
    r0 = I * bq
    r1 = min(Lq, r0 + bq)
    nr = r1 - r0
    Qi, dOi, Kg, Vg = q[b, h, r0:r1], dout[b, h, r0:r1], k[b, g], v[b, g]
    dQi = np.zeros((nr, D), dt)
    rowterm = np.zeros(nr, dt)
    ptr = ip[r0:r1].copy()
    e0s, lens = np.empty(nr, np.int64), np.empty(nr, np.int64)
    sbuf, dpbuf, qbuf = np.empty(bq * bk, dt), np.empty(bq * bk, dt), np.empty(bq * D, dt)
    XG, DG = np.empty((nr, bk), dt), np.empty((nr, bk), dt)
    PZ, T = np.empty((nr, bk), dt), np.empty((nr, bk), dt)
    for t in range(tile_ptr[G, I], tile_ptr[G, I + 1]):
        c0 = tile_key[t] * bk
        c1 = min(Lk, c0 + bk)
        nc = c1 - c0
        full, dense_tile = tile_full[t], tile_dense[t]
        for r in range(nr):
            e0s[r] = ptr[r]
            ptr[r] = _row_end(indices, eb, ptr[r], ip[r0 + r + 1], c1, full, nc)
            lens[r] = ptr[r] - e0s[r]
        S = sbuf[:nr * nc].reshape((nr, nc))
        dP = dpbuf[:nr * nc].reshape((nr, nc))
        if dense_tile:
            np.dot(Qi, Kg[c0:c1].T, S)                      # Q_I K_J^T
            np.dot(dOi, Vg[c0:c1].T, dP)                    # dO_I V_J^T
        if full:                                            # dS goes to dP in place
            _tile_grads(S, dP, PZ, nr, lens, e0s, r0, c0, indices, eb, False, b, h, lse, Drow, dlse, scale,
                        cap, T, bias, drop, db_mode, rowterm, dbias)
        else:
            for r in range(nr):
                for u in range(lens[r]):
                    j = indices[eb + e0s[r] + u]
                    if dense_tile:
                        XG[r, u], DG[r, u] = S[r, j - c0], dP[r, j - c0]
                    else:
                        XG[r, u], DG[r, u] = _dot(Qi, r, Kg, j), _dot(dOi, r, Vg, j)
            _tile_grads(XG, DG, PZ, nr, lens, e0s, r0, c0, indices, eb, True, b, h, lse, Drow, dlse, scale,
                        cap, T, bias, drop, db_mode, rowterm, dbias)
            for r in range(nr):
                if dense_tile:
                    dP[r, :] = zero                         # removed entries: dS = 0
                    for u in range(lens[r]):
                        dP[r, indices[eb + e0s[r] + u] - c0] = DG[r, u]
                else:
                    for u in range(lens[r]):
                        j = indices[eb + e0s[r] + u]
                        w = scale * DG[r, u]
                        for d in range(D):
                            dQi[r, d] += w * Kg[j, d]       # dQ_i += scale dS_ij k_j
        if dense_tile:
            dSK = qbuf[:nr * D].reshape((nr, D))
            np.dot(dP, Kg[c0:c1], dSK)                      # dQ_I += scale dS K_J
            for r in range(nr):
                for d in range(D):
                    dQi[r, d] += scale * dSK[r, d]
    dq[b, h, r0:r1] = dQi
    if db_mode == DB_ROWS or db_mode == DB_ALIBI:
        db_rows[b, h, r0:r1] = rowterm


@numba.njit(cache=True, parallel=True)
def _dq_kernel(q, k, v, dout, lse, Drow, dlse, scale, cap, mask, tl, bias, drop, bq, bk,
               dq, db_mode, db_rows, dbias):  # pragma: no cover - compiled
    B, H, Lq = q.shape[0], q.shape[1], q.shape[2]
    nbq = (Lq + bq - 1) // bq
    for item in prange(B * H * nbq):
        b, h, I = _unflatten(item, H, nbq)
        _dq_block(q, k, v, dout, lse, Drow, dlse, scale, cap, mask, tl, bias, drop, bq, bk,
                  b, h, I, dq, db_mode, db_rows, dbias)


@numba.njit(cache=True, nogil=True)
def _dkdv_block(q, k, v, dout, lse, Drow, dlse, scale, cap, mask, tl, bias, drop, bq, bk,
                b, g, J, dk, dv, db_mode, dbias):  # pragma: no cover - compiled
    """dK, dV of key block ``J`` of kv head g: for each query head reading g, in
    increasing order, each query block whose tile (I, J) is non-empty, in increasing
    order; and the column-owned dbias terms."""
    indptr, indices, base, gid = mask
    tile_full, tile_dense, tile_query, ttile_ptr, ttile = tl[2], tl[3], tl[4], tl[5], tl[6]
    dt = q.dtype
    zero = dt.type(0)
    H, Lq, Lk, D, Dv = q.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    group = H // k.shape[1]
    c0 = J * bk
    c1 = min(Lk, c0 + bk)
    nc = c1 - c0
    Kj, Vj = k[b, g, c0:c1], v[b, g, c0:c1]
    dKj, dVj = np.zeros((nc, D), dt), np.zeros((nc, Dv), dt)
    e0s, lens = np.empty(bq, np.int64), np.empty(bq, np.int64)
    rowterm = np.zeros(bq, dt)                              # unused: no per-row dbias term here
    sbuf, dpbuf = np.empty(bq * bk, dt), np.empty(bq * bk, dt)
    kbuf, vbuf = np.empty(bk * D, dt), np.empty(bk * Dv, dt)
    XG, DG = np.empty((bq, bk), dt), np.empty((bq, bk), dt)
    PZ, T = np.empty((bq, bk), dt), np.empty((bq, bk), dt)
    for h in range(g * group, (g + 1) * group):
        G = gid[b, h]
        ip, eb = indptr[G], base[G]
        for tt in range(ttile_ptr[G, J], ttile_ptr[G, J + 1]):
            t = ttile[tt]
            r0 = tile_query[t] * bq
            r1 = min(Lq, r0 + bq)
            nr = r1 - r0
            Qi, dOi = q[b, h, r0:r1], dout[b, h, r0:r1]
            full, dense_tile = tile_full[t], tile_dense[t]
            for r in range(nr):
                i = r0 + r
                e0s[r] = lower_bound(indices, eb + ip[i], eb + ip[i + 1], c0) - eb
                lens[r] = _row_end(indices, eb, e0s[r], ip[i + 1], c1, full, nc) - e0s[r]
            S = sbuf[:nr * nc].reshape((nr, nc))
            dP = dpbuf[:nr * nc].reshape((nr, nc))
            if dense_tile:
                np.dot(Qi, Kj.T, S)
                np.dot(dOi, Vj.T, dP)
            if full:                                        # P Z / (1 - p) to S, dS to dP, in place
                _tile_grads(S, dP, S, nr, lens, e0s, r0, c0, indices, eb, False, b, h, lse, Drow, dlse,
                            scale, cap, T, bias, drop, db_mode, rowterm, dbias)
            else:
                for r in range(nr):
                    for u in range(lens[r]):
                        c = indices[eb + e0s[r] + u] - c0
                        if dense_tile:
                            XG[r, u], DG[r, u] = S[r, c], dP[r, c]
                        else:
                            XG[r, u], DG[r, u] = _dot(Qi, r, Kj, c), _dot(dOi, r, Vj, c)
                _tile_grads(XG, DG, PZ, nr, lens, e0s, r0, c0, indices, eb, True, b, h, lse, Drow, dlse,
                            scale, cap, T, bias, drop, db_mode, rowterm, dbias)
                for r in range(nr):
                    if dense_tile:
                        S[r, :] = zero
                        dP[r, :] = zero
                        for u in range(lens[r]):
                            c = indices[eb + e0s[r] + u] - c0
                            S[r, c], dP[r, c] = PZ[r, u], DG[r, u]
                    else:
                        for u in range(lens[r]):
                            c = indices[eb + e0s[r] + u] - c0
                            w = scale * DG[r, u]
                            for d in range(Dv):
                                dVj[c, d] += PZ[r, u] * dOi[r, d]   # dV_j += P_ij Z_ij / (1 - p) dO_i
                            for d in range(D):
                                dKj[c, d] += w * Qi[r, d]   # dK_j += scale dS_ij q_i
            if dense_tile:
                PdO = vbuf[:nc * Dv].reshape((nc, Dv))
                np.dot(S.T, dOi, PdO)                       # dV_J += (P Z / (1 - p))^T dO_I
                dVj += PdO
                dSQ = kbuf[:nc * D].reshape((nc, D))
                np.dot(dP.T, Qi, dSQ)                       # dK_J += scale dS^T Q_I
                for c in range(nc):
                    for d in range(D):
                        dKj[c, d] += scale * dSQ[c, d]
    dk[b, g, c0:c1] = dKj
    dv[b, g, c0:c1] = dVj


@numba.njit(cache=True, parallel=True)
def _dkdv_kernel(q, k, v, dout, lse, Drow, dlse, scale, cap, mask, tl, bias, drop, bq, bk,
                 dk, dv, db_mode, dbias):  # pragma: no cover - compiled
    B, Hkv, Lk = k.shape[0], k.shape[1], k.shape[2]
    nbk = (Lk + bk - 1) // bk
    for item in prange(B * Hkv * nbk):
        b, g, J = _unflatten(item, Hkv, nbk)
        _dkdv_block(q, k, v, dout, lse, Drow, dlse, scale, cap, mask, tl, bias, drop, bq, bk,
                    b, g, J, dk, dv, db_mode, dbias)


# ---- the host side -----------------------------------------------------------------------

def _inputs(p: Problem, dt):
    return tuple(np.ascontiguousarray(x, dt) for x in (p.q, p.k, p.v))


def _scalars(p: Problem, dt):
    return dt.type(p.scale), dt.type(0 if p.softcap is None else p.softcap)


def forward(p: Problem, config) -> Result:
    """Algorithm 1 over (batch, head, query block) in parallel."""
    return _forward(p, config, _plan(p, config))


def backward(p: Problem, out, lse, dout, dlse, config) -> Grads:
    """dQ per (batch, head, query block), then dK, dV per (batch, kv head, key block)."""
    return _backward(p, out, lse, dout, dlse, config, _plan(p, config))


def _plan(p: Problem, config) -> Plan:
    return plan(p, config.options["block_q"], config.options["block_k"], DENSE_TILE_MIN_DENSITY)


def _forward(p: Problem, config, plan: Plan) -> Result:
    dt = np.dtype(config.compute_dtype)
    bq, bk = config.options["block_q"], config.options["block_k"]
    q, k, v = _inputs(p, dt)
    scale, cap = _scalars(p, dt)
    out = np.zeros((p.batch, p.heads, p.lq, p.dim_v), dt)
    lse = np.full((p.batch, p.heads, p.lq), -np.inf, dt)
    with _one_blas_thread():
        _forward_kernel(q, k, v, scale, cap, plan.mask, plan.tiles, bias_args(p, dt),
                        drop_args(p, dt, False), bq, bk, out, lse)
    return Result(out, lse)


def _backward(p: Problem, out, lse, dout, dlse, config, plan: Plan) -> Grads:
    dt = np.dtype(config.compute_dtype)
    bq, bk = config.options["block_q"], config.options["block_k"]
    q, k, v = _inputs(p, dt)
    out, lse, dout = (np.ascontiguousarray(x, dt) for x in (out, lse, dout))
    dlse_arr = np.zeros((1, 1, 1), dt) if dlse is None else np.ascontiguousarray(dlse, dt)
    scale, cap = _scalars(p, dt)
    bias, drop = bias_args(p, dt), drop_args(p, dt, dlse is not None)
    nnz_bh = plan.nnz[plan.mask[3]]
    mode, bufs = dbias_buffers(p, nnz_bh, dt)
    dq, dk, dv = np.zeros(q.shape, dt), np.zeros(k.shape, dt), np.zeros(v.shape, dt)
    Drow = np.empty(lse.shape, dt)
    with _one_blas_thread():
        _rowdot_kernel(dout, out, Drow)                     # D = rowsum(dO * O)
        # dbias terms go to the pass that owns them: columns to dK/dV's, the rest to dQ's
        dbias = (bufs["full"], bufs["entries"], bufs["entries_base"], bufs["cols"])
        _dq_kernel(q, k, v, dout, lse, Drow, dlse_arr, scale, cap, plan.mask, plan.tiles, bias, drop,
                   bq, bk, dq, DB_NONE if mode == DB_COLS else mode, bufs["rows"], dbias)
        _dkdv_kernel(q, k, v, dout, lse, Drow, dlse_arr, scale, cap, plan.mask, plan.tiles, bias, drop,
                     bq, bk, dk, dv, mode if mode == DB_COLS else DB_NONE, dbias)
    return Grads(dq, dk, dv, dbias_reduce(p, nnz_bh, mode, bufs, dt))
