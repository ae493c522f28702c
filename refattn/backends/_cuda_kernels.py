"""The compiled arithmetic of the ``cuda`` backend (numba.cuda kernels).

Three attention kernels, as in spec/backends.md ("cuda"):

* `forward`: a thread block per (query block ``I``, head, batch); one thread per
  query row ``i``, which keeps the row's running max ``m``, running sum ``l`` and
  unnormalised output in registers. The block walks the non-empty key blocks ``J``
  of ``I`` in increasing order; for each it stages ``K_J`` and ``V_J`` in shared
  memory, then every thread takes its row's allowed entries in the tile, one online-
  softmax step per tile (FlashAttention-2's Algorithm 1, at the granularity of a row).
* `dq`: the same grid and walk; each thread recomputes its row's ``P`` from ``L``
  and sums its ``dQ_i`` and the row-owned dbias terms.
* `dkdv`: a thread block per (key block ``J``, kv head, batch); one thread per key
  column ``j``, which sums ``dK_j`` and ``dV_j`` over the query heads of the kv
  head, in increasing order, and for each over the query blocks whose tile
  ``(I, J)`` is non-empty (the transposed block layout), in increasing order. The
  block stages ``Q_I``, ``dO_I``, the rows' ``L``, ``D``, ``dlse`` and a map from
  the tile's entries to their CSR positions in shared memory.

No atomics in the attention arithmetic: every output element has one owning thread,
which adds its terms in an order fixed by the mask. Kernels are specialised (compiled)
per compute dtype, block sizes and head dims, because shared and local arrays need
sizes known at compile time; `kernels` keeps each specialisation once made.

Also here: small elementwise kernels for the device-array path (dtype casts, the
``D = rowsum(dO * O)`` pass, and the validation of device inputs and results).
"""

from __future__ import annotations

import math
from functools import lru_cache
from types import SimpleNamespace

import numba
import numpy as np
from numba import cuda

from ._host import ALIBI, DB_ALIBI, DB_COLS, DB_ENTRIES, DB_FULL, DB_ROWS, DENSE, SPARSE

#: Static shared memory a thread block may use without opting in to more.
SHARED_BYTES = 48 * 1024


def forward_shared_bytes(itemsize: int, bq: int, bk: int, dim: int, dim_v: int) -> int:
    """Shared memory of `forward` and `dq`: the staged ``K_J`` and ``V_J``."""
    return bk * (dim + dim_v) * itemsize


def dkdv_shared_bytes(itemsize: int, bq: int, bk: int, dim: int, dim_v: int) -> int:
    """Shared memory of `dkdv`: ``Q_I``, ``dO_I``, the rows' ``L``, ``D``, ``dlse`` and
    first CSR position, and the tile's int16 entry map."""
    return bq * (dim + dim_v) * itemsize + bq * (3 * itemsize + 8) + bq * bk * 2


@cuda.jit(device=True, inline=True)
def _lower_bound(indices, lo, hi, x):  # pragma: no cover - compiled
    """The first position in ``indices[lo:hi]`` (sorted) whose value is >= x."""
    while lo < hi:
        mid = (lo + hi) // 2
        if indices[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@lru_cache(maxsize=None)
def kernels(dtype: str, bq: int, bk: int, dim: int, dim_v: int) -> SimpleNamespace:
    """The attention kernels for compute ``dtype`` ("float32" or "float64"), ``bq x bk``
    tiles and head dims ``dim``, ``dim_v`` (compiled at their first launch)."""
    DT = numba.from_dtype(np.dtype(dtype))
    BQ, BK, D, DV = bq, bk, dim, dim_v

    @cuda.jit(device=True, inline=True)
    def score(x, scale, cap, kind, bdense, bvalues, vpos, slopes, alibi_off, b, h, i, j):  # pragma: no cover
        """``(s_ij, T)`` from ``x = q_i . k_j`` in the spec's order: scale, softcap
        (``T = tanh(scale x / cap)``, kept for the backward; 0 without softcap), bias."""
        s = scale * x
        t = DT(0)
        if cap > 0:
            t = math.tanh(s / cap)
            s = cap * t
        if kind == DENSE:
            bb, hb, lqb, lkb = bdense.shape
            s += bdense[b if bb > 1 else 0, h if hb > 1 else 0, i if lqb > 1 else 0, j if lkb > 1 else 0]
        elif kind == SPARSE:
            s += bvalues[vpos]
        elif kind == ALIBI:
            s -= slopes[h] * DT(abs(j - (i + alibi_off)))
        return s, t

    @cuda.jit(device=True, inline=True)
    def stage_kv(Ks, Vs, k, v, b, g, c0, nc, r):  # pragma: no cover - compiled
        """``K_J``, ``V_J`` (keys ``c0 .. c0 + nc - 1``) into shared memory, by the block's
        ``BQ`` threads together; the barriers around it keep the previous tile until every
        thread is done with it, and the new one until every thread has written its part."""
        cuda.syncthreads()
        for x in range(r, nc * D, BQ):
            Ks[x // D, x % D] = k[b, g, c0 + x // D, x % D]
        for x in range(r, nc * DV, BQ):
            Vs[x // DV, x % DV] = v[b, g, c0 + x // DV, x % DV]
        cuda.syncthreads()

    @cuda.jit(device=True, inline=True)
    def row_run_end(indices, eb, ptr, stop, c1, full, nc):  # pragma: no cover - compiled
        """The end of a row's run of entries with key < ``c1`` from CSR position ``ptr``: in
        a full tile, all ``nc`` keys of the tile without reading the CSR."""
        if full:
            return ptr + nc
        while ptr < stop and indices[eb + ptr] < c1:
            ptr += 1
        return ptr

    @cuda.jit
    def forward(q, k, v, scale, cap, indptr, indices, base, gid, tile_ptr, tile_key, tile_full,
                kind, bdense, bvalues, vbase, slopes, alibi_off, keep, kbase, zscale, has_drop,
                out, lse):  # pragma: no cover - compiled
        Ks = cuda.shared.array((BK, D), DT)
        Vs = cuda.shared.array((BK, DV), DT)
        qi = cuda.local.array(D, DT)
        acc = cuda.local.array(DV, DT)
        s = cuda.local.array(BK, DT)
        I, h, b, r = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z, cuda.threadIdx.x
        Lq, Lk = q.shape[2], k.shape[2]
        g = h // (q.shape[1] // k.shape[1])
        G = gid[b, h]
        eb, vb, kb = base[G], vbase[b, h], kbase[b, h]
        zero, neg_inf = DT(0), DT(-math.inf)
        i = I * BQ + r
        active = i < Lq
        ptr, stop = 0, 0
        if active:
            for d in range(D):
                qi[d] = q[b, h, i, d]
            ptr, stop = indptr[G, i], indptr[G, i + 1]
        for d in range(DV):
            acc[d] = zero
        m, l = neg_inf, zero                                    # running max and sum
        for t in range(tile_ptr[G, I], tile_ptr[G, I + 1]):
            c0 = tile_key[t] * BK
            nc = min(BK, Lk - c0)
            stage_kv(Ks, Vs, k, v, b, g, c0, nc, r)
            if active:
                full = tile_full[t]
                e0 = ptr                                        # the row's entries in this tile
                ptr = row_run_end(indices, eb, ptr, stop, c0 + nc, full, nc)
                n = ptr - e0
                if n > 0:
                    mt = neg_inf
                    for u in range(n):
                        j = c0 + u if full else indices[eb + e0 + u]
                        x = zero
                        for d in range(D):
                            x += qi[d] * Ks[j - c0, d]          # q_i . k_j
                        sij, _ = score(x, scale, cap, kind, bdense, bvalues, vb + e0 + u, slopes, alibi_off,
                                       b, h, i, j)
                        s[u] = sij
                        mt = max(mt, sij)
                    m_new = max(m, mt)
                    alpha = math.exp(m - m_new)                 # e^(m_old - m_new); 0 from -inf
                    for d in range(DV):
                        acc[d] *= alpha
                    lsum = zero
                    for u in range(n):
                        j = c0 + u if full else indices[eb + e0 + u]
                        p = math.exp(s[u] - m_new)              # P~ = exp(S - m_new)
                        lsum += p
                        if has_drop:
                            p = p * zscale if keep[kb + e0 + u] else zero
                        for d in range(DV):
                            acc[d] += p * Vs[j - c0, d]         # O_i += P~_ij Z_ij / (1 - p) v_j
                    l = alpha * l + lsum
                    m = m_new
        if active:
            if l > zero:
                for d in range(DV):
                    out[b, h, i, d] = acc[d] / l                # O = diag(l)^-1 O
                lse[b, h, i] = m + math.log(l)                  # L = m + log l
            else:                                               # a row with no allowed key
                for d in range(DV):                             # (spec/semantics.md, section 4)
                    out[b, h, i, d] = zero
                lse[b, h, i] = neg_inf

    @cuda.jit
    def dq(q, k, v, dout, lse, Drow, dlse, has_dlse, scale, cap, indptr, indices, base, gid,
           tile_ptr, tile_key, tile_full, kind, bdense, bvalues, vbase, slopes, alibi_off,
           keep, kbase, zscale, has_drop, dqo, db_mode, db_rows, db_full, db_entries, db_base):  # pragma: no cover
        Ks = cuda.shared.array((BK, D), DT)
        Vs = cuda.shared.array((BK, DV), DT)
        qi = cuda.local.array(D, DT)
        doi = cuda.local.array(DV, DT)
        dqi = cuda.local.array(D, DT)
        I, h, b, r = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z, cuda.threadIdx.x
        Lq, Lk = q.shape[2], k.shape[2]
        g = h // (q.shape[1] // k.shape[1])
        G = gid[b, h]
        eb, vb, kb, dbb = base[G], vbase[b, h], kbase[b, h], db_base[b, h]
        zero, one = DT(0), DT(1)
        i = I * BQ + r
        active = i < Lq
        ptr, stop = 0, 0
        Li, Di, dli = zero, zero, zero
        if active:
            for d in range(D):
                qi[d] = q[b, h, i, d]
                dqi[d] = zero
            for d in range(DV):
                doi[d] = dout[b, h, i, d]
            ptr, stop = indptr[G, i], indptr[G, i + 1]
            Li, Di = lse[b, h, i], Drow[b, h, i]
            if has_dlse:
                dli = dlse[b, h, i]
        rowterm = zero
        for t in range(tile_ptr[G, I], tile_ptr[G, I + 1]):
            c0 = tile_key[t] * BK
            nc = min(BK, Lk - c0)
            stage_kv(Ks, Vs, k, v, b, g, c0, nc, r)
            if active:
                full = tile_full[t]
                e0 = ptr
                ptr = row_run_end(indices, eb, ptr, stop, c0 + nc, full, nc)
                for e in range(e0, ptr):
                    j = c0 + (e - e0) if full else indices[eb + e]
                    x = zero
                    dp = zero
                    for d in range(D):
                        x += qi[d] * Ks[j - c0, d]              # q_i . k_j
                    for d in range(DV):
                        dp += doi[d] * Vs[j - c0, d]            # dO_i . v_j
                    sij, T = score(x, scale, cap, kind, bdense, bvalues, vb + e, slopes, alibi_off, b, h, i, j)
                    p = math.exp(sij - Li)                      # P = exp(S - L)
                    if has_drop:
                        dp = dp * zscale if keep[kb + e] else zero   # dP = (dO_i . v_j) Z_ij / (1 - p)
                    ds = p * (dp - Di)                          # dS = P (dP - D_i)
                    if has_dlse:
                        ds += dli * p                           #      + dlse_i P
                    if db_mode == DB_ROWS:                      # dbias = dS (the bias is added last)
                        rowterm += ds
                    elif db_mode == DB_ALIBI:
                        rowterm -= ds * DT(abs(j - (i + alibi_off)))
                    elif db_mode == DB_FULL:
                        db_full[b, h, i, j] = ds
                    elif db_mode == DB_ENTRIES:
                        db_entries[dbb + e] = ds
                    if cap > 0:
                        ds *= one - T * T                       # d(c tanh(s / c)) / ds = 1 - T^2
                    w = scale * ds
                    for d in range(D):
                        dqi[d] += w * Ks[j - c0, d]             # dQ_i += scale dS_ij k_j
        if active:
            for d in range(D):
                dqo[b, h, i, d] = dqi[d]
            if db_mode == DB_ROWS or db_mode == DB_ALIBI:
                db_rows[b, h, i] = rowterm

    @cuda.jit
    def dkdv(q, k, v, dout, lse, Drow, dlse, has_dlse, scale, cap, indptr, indices, base, gid,
             tile_query, tile_full, ttile_ptr, ttile, kind, bdense, bvalues, vbase, slopes, alibi_off,
             keep, kbase, zscale, has_drop, dko, dvo, db_mode, db_cols):  # pragma: no cover - compiled
        Qs = cuda.shared.array((BQ, D), DT)
        dOs = cuda.shared.array((BQ, DV), DT)
        Ls = cuda.shared.array(BQ, DT)
        Ds = cuda.shared.array(BQ, DT)
        dLs = cuda.shared.array(BQ, DT)
        E0 = cuda.shared.array(BQ, numba.int64)                 # each row's first CSR position >= c0
        Seg = cuda.shared.array((BQ, BK), numba.int16)          # (row, column) -> entry of the row's run, or -1
        kj = cuda.local.array(D, DT)
        vj = cuda.local.array(DV, DT)
        dkj = cuda.local.array(D, DT)
        dvj = cuda.local.array(DV, DT)
        J, g, b, c = cuda.blockIdx.x, cuda.blockIdx.y, cuda.blockIdx.z, cuda.threadIdx.x
        H, Lq, Lk = q.shape[1], q.shape[2], k.shape[2]
        group = H // k.shape[1]
        zero, one = DT(0), DT(1)
        c0 = J * BK
        nc = min(BK, Lk - c0)
        j = c0 + c
        active = c < nc
        if active:
            for d in range(D):
                kj[d] = k[b, g, j, d]
                dkj[d] = zero
            for d in range(DV):
                vj[d] = v[b, g, j, d]
                dvj[d] = zero
        for h in range(g * group, (g + 1) * group):
            G = gid[b, h]
            eb, vb, kb = base[G], vbase[b, h], kbase[b, h]
            colterm = zero
            for tt in range(ttile_ptr[G, J], ttile_ptr[G, J + 1]):
                t = ttile[tt]
                r0 = tile_query[t] * BQ
                nr = min(BQ, Lq - r0)
                full = tile_full[t]
                cuda.syncthreads()                              # the previous tile is used up
                for x in range(c, nr * D, BK):
                    Qs[x // D, x % D] = q[b, h, r0 + x // D, x % D]
                for x in range(c, nr * DV, BK):
                    dOs[x // DV, x % DV] = dout[b, h, r0 + x // DV, x % DV]
                for rr in range(c, nr, BK):                     # each row's run of entries in the tile
                    i = r0 + rr
                    Ls[rr], Ds[rr] = lse[b, h, i], Drow[b, h, i]
                    dLs[rr] = dlse[b, h, i] if has_dlse else zero
                    lo = _lower_bound(indices, eb + indptr[G, i], eb + indptr[G, i + 1], c0) - eb
                    E0[rr] = lo
                    if not full:
                        for cc in range(BK):
                            Seg[rr, cc] = -1
                        e, hi = lo, indptr[G, i + 1]
                        while e < hi and indices[eb + e] < c0 + nc:
                            Seg[rr, indices[eb + e] - c0] = e - lo
                            e += 1
                cuda.syncthreads()
                if active:
                    for rr in range(nr):
                        u = c if full else Seg[rr, c]
                        if u >= 0:
                            i = r0 + rr
                            e = E0[rr] + u
                            x = zero
                            dp = zero
                            for d in range(D):
                                x += Qs[rr, d] * kj[d]          # q_i . k_j
                            for d in range(DV):
                                dp += dOs[rr, d] * vj[d]        # dO_i . v_j
                            sij, T = score(x, scale, cap, kind, bdense, bvalues, vb + e, slopes, alibi_off,
                                           b, h, i, j)
                            p = math.exp(sij - Ls[rr])          # P = exp(S - L)
                            pz = p
                            if has_drop:
                                if keep[kb + e]:
                                    dp *= zscale
                                    pz = p * zscale
                                else:
                                    dp = zero
                                    pz = zero
                            ds = p * (dp - Ds[rr])              # dS = P (dP - D_i)
                            if has_dlse:
                                ds += dLs[rr] * p
                            if db_mode == DB_COLS:
                                colterm += ds
                            if cap > 0:
                                ds *= one - T * T
                            w = scale * ds
                            for d in range(DV):
                                dvj[d] += pz * dOs[rr, d]       # dV_j += P_ij Z_ij / (1 - p) dO_i
                            for d in range(D):
                                dkj[d] += w * Qs[rr, d]         # dK_j += scale dS_ij q_i
            if active and db_mode == DB_COLS:
                db_cols[b, h, j] = colterm
        if active:
            for d in range(D):
                dko[b, g, j, d] = dkj[d]
            for d in range(DV):
                dvo[b, g, j, d] = dvj[d]

    @cuda.jit
    def rowdot(dout, out, Drow):  # pragma: no cover - compiled
        """``D = rowsum(dO * O)``, each row summed left to right."""
        B, H, Lq = Drow.shape
        for x in range(cuda.grid(1), B * H * Lq, cuda.gridsize(1)):
            b, h, i = x // (H * Lq), (x // Lq) % H, x % Lq
            s = DT(0)
            for d in range(DV):
                s += dout[b, h, i, d] * out[b, h, i, d]
            Drow[b, h, i] = s

    return SimpleNamespace(forward=forward, dq=dq, dkdv=dkdv, rowdot=rowdot)


# ---- elementwise kernels (any dtype, compiled per argument types) ---------------------

@cuda.jit
def cast4(src, dst):  # pragma: no cover - compiled
    """``dst[...] = src[...]`` converted to dst's dtype (4-D, any strides)."""
    n0, n1, n2, n3 = src.shape
    for x in range(cuda.grid(1), n0 * n1 * n2 * n3, cuda.gridsize(1)):
        a, rest = x // (n1 * n2 * n3), x % (n1 * n2 * n3)
        dst[a, rest // (n2 * n3), (rest // n3) % n2, rest % n3] = src[a, rest // (n2 * n3), (rest // n3) % n2,
                                                                       rest % n3]


@cuda.jit
def cast3(src, dst):  # pragma: no cover - compiled
    """``dst[...] = src[...]`` converted to dst's dtype (3-D, any strides)."""
    n0, n1, n2 = src.shape
    for x in range(cuda.grid(1), n0 * n1 * n2, cuda.gridsize(1)):
        dst[x // (n1 * n2), (x // n2) % n1, x % n2] = src[x // (n1 * n2), (x // n2) % n1, x % n2]


@cuda.jit(device=True, inline=True)
def _bad(x, allow_neginf):  # pragma: no cover - compiled
    y = numba.float64(x)
    return math.isnan(y) or (math.isinf(y) and (y > 0 or not allow_neginf))


@cuda.jit
def first_bad4(a, allow_neginf, first):  # pragma: no cover - compiled
    """``first[0] = min`` flat (C order) index of a NaN or infinite element of 4-D ``a``
    (with ``allow_neginf``: NaN or +inf); ``first[0]`` starts at ``a.size``."""
    n0, n1, n2, n3 = a.shape
    for x in range(cuda.grid(1), n0 * n1 * n2 * n3, cuda.gridsize(1)):
        r = x % (n1 * n2 * n3)
        if _bad(a[x // (n1 * n2 * n3), r // (n2 * n3), (r // n3) % n2, r % n3], allow_neginf):
            cuda.atomic.min(first, 0, x)                    # min is exact: any order gives one answer


@cuda.jit
def first_bad3(a, allow_neginf, first):  # pragma: no cover - compiled
    """`first_bad4` for 3-D ``a``."""
    n0, n1, n2 = a.shape
    for x in range(cuda.grid(1), n0 * n1 * n2, cuda.gridsize(1)):
        if _bad(a[x // (n1 * n2), (x // n2) % n1, x % n2], allow_neginf):
            cuda.atomic.min(first, 0, x)


@cuda.jit
def first_bad_lse(lse, empty, gid, first):  # pragma: no cover - compiled
    """``first[0] = min`` flat index ``(b, h, i)`` where ``lse`` is NaN or +inf, or
    where ``isneginf(lse)`` differs from ``empty[gid[b, h], i]`` (the row has no key)."""
    B, H, Lq = lse.shape
    for x in range(cuda.grid(1), B * H * Lq, cuda.gridsize(1)):
        b, h, i = x // (H * Lq), (x // Lq) % H, x % Lq
        y = numba.float64(lse[b, h, i])
        neginf = math.isinf(y) and y < 0
        if math.isnan(y) or (math.isinf(y) and y > 0) or neginf != empty[gid[b, h], i]:
            cuda.atomic.min(first, 0, x)
