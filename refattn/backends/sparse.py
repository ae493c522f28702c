"""The SciPy sparse route: attention computed on the mask's nonzeros only.

spec/backends.md maps each step to the equations of spec/semantics.md and
spec/backward.md. Per (batch, head) group, in chunks of whole rows holding at most
``NNZ_CHUNK`` nonzeros (so memory is O(nnz) plus a bounded workspace):

1. SDDMM: ``s_e = scale * <Q[r_e], K[c_e]>`` for every nonzero ``e = (r_e, c_e)``,
   by gathering rows of Q and K at the CSR coordinates; then softcap and bias on ``s``.
2. A segmented, numerically stable softmax: per row, ``m = max s``, ``l = sum exp(s - m)``
   (``reduceat`` over ``indptr``), ``L = m + log l``, ``P_e = exp(s_e - L_r)``.
3. SpMM: ``O = (P * Z / (1 - p)) V`` with ``P`` as a CSR matrix on the mask's structure.

The backward recomputes ``P`` from ``L`` on the same structure (never stored across the
call): ``dV = P_Z^T dO``, ``dP_e = <dO[r_e], V[c_e]> Z_e / (1 - p)``,
``dS = P (dP - D_r)`` (+ ``dlse_r P``), and ``dQ = scale dS K``, ``dK = scale dS^T Q``
as sparse-dense products. This module shares no code with the other backends.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..alignment import align_offset
from ..bias import ALiBi, SparseBias
from ..contract import DenseBias, Grads, Problem, Result, dbias_result, dbias_zeros

COMPUTE_DTYPES = (np.float64, np.float32)
OPTIONS: dict = {}

#: Nonzeros per chunk: each per-nonzero workspace array (``nnz_chunk x D`` gathers
#: included) stays around ``NNZ_CHUNK * D`` elements.
NNZ_CHUNK = 1 << 18


class _Chunk:
    """Rows ``r0:r1`` of one group's CSR: nonzeros ``lo:hi``, their local rows ``r``
    (0-based within the chunk), global rows ``i``, columns ``c``, and the local indptr."""

    def __init__(self, csr, r0: int, r1: int):
        self.r0, self.r1 = r0, r1
        self.lo, self.hi = int(csr.indptr[r0]), int(csr.indptr[r1])
        self.indptr = (csr.indptr[r0:r1 + 1] - self.lo).astype(np.int64)
        self.r = np.repeat(np.arange(r1 - r0), np.diff(self.indptr))
        self.i = self.r + r0
        self.c = csr.indices[self.lo:self.hi].astype(np.int64)
        self.nonempty = np.diff(self.indptr) > 0

    def matrix(self, values: np.ndarray, lk: int) -> sp.csr_array:
        """The chunk's ``(rows, Lk)`` CSR with per-nonzero ``values``."""
        return sp.csr_array((values, self.c, self.indptr), shape=(self.r1 - self.r0, lk))


def _chunks(csr):
    """Row ranges holding at most ``NNZ_CHUNK`` nonzeros each (at least one row)."""
    indptr = csr.indptr
    lq = indptr.shape[0] - 1
    r0 = 0
    while r0 < lq:
        r1 = int(np.searchsorted(indptr, indptr[r0] + NNZ_CHUNK, side="right")) - 1
        r1 = min(max(r1, r0 + 1), lq)
        yield _Chunk(csr, r0, r1)
        r0 = r1


def _rowdot(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``<A[e], B[e]>`` for every row e."""
    return np.einsum("ed,ed->e", A, B)


def _scores(p: Problem, ch: _Chunk, b: int, h: int, Q, K, dtype):
    """``s`` on the chunk's nonzeros (scale, softcap, bias in the spec's order), and
    ``t = tanh(s / softcap)`` for the softcap's chain rule."""
    s = dtype.type(p.scale) * _rowdot(Q[ch.i], K[ch.c])
    t = None
    if p.softcap is not None:
        cap = dtype.type(p.softcap)
        t = np.tanh(s / cap)
        s = cap * t
    if p.bias is not None:
        s = s + _bias_values(p, ch, b, h).astype(dtype)
    return s, t


def _bias_values(p: Problem, ch: _Chunk, b: int, h: int) -> np.ndarray:
    bias = p.bias
    if isinstance(bias, DenseBias):
        bb, hb, lqb, lkb = bias.values.shape
        plane = bias.values[b if bb > 1 else 0, h if hb > 1 else 0]
        return plane[ch.i if lqb > 1 else 0, ch.c if lkb > 1 else 0]
    if isinstance(bias, SparseBias):
        return bias.grid.at(b, h)[ch.lo:ch.hi]
    return -bias.slopes[h] * _alibi_distance(p, ch)           # ALiBi


def _alibi_distance(p: Problem, ch: _Chunk) -> np.ndarray:
    """``|j - i'|`` on the nonzeros, ``i' = i + offset`` for the ALiBi's alignment."""
    return np.abs(ch.c - (ch.i + align_offset(p.bias.align, p.lq, p.lk))).astype(np.float64)


def _dropout_scale(p: Problem, ch: _Chunk, b: int, h: int, dtype):
    """``Z / (1 - p)`` on the nonzeros, or None without dropout."""
    if p.dropout is None:
        return None
    keep = p.dropout.grid.at(b, h)[ch.lo:ch.hi]
    return np.where(keep, dtype.type(1.0 / (1.0 - p.dropout.p)), dtype.type(0.0))


def _segment_lse(s: np.ndarray, ch: _Chunk) -> np.ndarray:
    """``L_r = m_r + log(sum_e exp(s_e - m_r))`` per row, ``-inf`` on empty rows."""
    L = np.full(ch.r1 - ch.r0, -np.inf, dtype=s.dtype)
    starts = ch.indptr[:-1][ch.nonempty]                      # reduceat needs non-empty segments
    if starts.size:
        m = np.maximum.reduceat(s, starts)
        m_e = np.repeat(m, np.diff(ch.indptr)[ch.nonempty])
        L[ch.nonempty] = m + np.log(np.add.reduceat(np.exp(s - m_e), starts))
    return L


def forward(p: Problem, config) -> Result:
    dtype = np.dtype(config.compute_dtype)
    B, H, Lq, Dv = p.batch, p.heads, p.lq, p.dim_v
    q, k, v = (x.astype(dtype) for x in (p.q, p.k, p.v))
    O = np.zeros((B, H, Lq, Dv), dtype)
    L = np.full((B, H, Lq), -np.inf, dtype)
    for b in range(B):
        for h in range(H):
            g = h // p.group_size
            Q, K, V = q[b, h], k[b, g], v[b, g]
            for ch in _chunks(p.mask.group(b, h)):
                s, _ = _scores(p, ch, b, h, Q, K, dtype)
                Lc = _segment_lse(s, ch)
                P = np.exp(s - Lc[ch.r])                       # P_e = exp(s_e - L_r)
                zs = _dropout_scale(p, ch, b, h, dtype)
                PZ = P if zs is None else P * zs
                O[b, h, ch.r0:ch.r1] = ch.matrix(PZ, p.lk) @ V  # O = P_Z V (SpMM)
                L[b, h, ch.r0:ch.r1] = Lc
    return Result(O, L)


def backward(p: Problem, out, lse, dout, dlse, config) -> Grads:
    dtype = np.dtype(config.compute_dtype)
    q, k, v = (x.astype(dtype) for x in (p.q, p.k, p.v))
    out, lse, dout = (x.astype(dtype) for x in (out, lse, dout))
    dlse = None if dlse is None else dlse.astype(dtype)
    dq, dk, dv = np.zeros(q.shape, dtype), np.zeros(k.shape, dtype), np.zeros(v.shape, dtype)
    dbias = dbias_zeros(p, dtype)
    Dsum = np.einsum("bhid,bhid->bhi", dout, out)               # D = rowsum(dO * O)
    scale = dtype.type(p.scale)
    for b in range(p.batch):
        for h in range(p.heads):
            g = h // p.group_size
            Q, K, V = q[b, h], k[b, g], v[b, g]
            for ch in _chunks(p.mask.group(b, h)):
                rows = slice(ch.r0, ch.r1)
                s, t = _scores(p, ch, b, h, Q, K, dtype)
                P = np.exp(s - lse[b, h, ch.i])                 # recomputed from L
                zs = _dropout_scale(p, ch, b, h, dtype)
                PZ = P if zs is None else P * zs
                dO = dout[b, h, rows]
                dv[b, g] += ch.matrix(PZ, p.lk).T @ dO          # dV = P_Z^T dO
                dP = _rowdot(dO[ch.r], V[ch.c])                 # dP = dO V^T on the nonzeros
                if zs is not None:
                    dP = dP * zs
                dS = P * (dP - Dsum[b, h, ch.i])                # dS = P (dP - D)
                if dlse is not None:
                    dS = dS + dlse[b, h, ch.i] * P              # dL_i / dS_ij = P_ij
                _accumulate_dbias(p, dbias, dS, ch, b, h)
                if t is not None:
                    dS = dS * (1 - t * t)                       # d(c tanh(x / c)) / dx
                dSm = ch.matrix(dS, p.lk)
                dq[b, h, rows] = scale * (dSm @ K)              # dQ = scale dS K
                dk[b, g] += scale * (dSm.T @ Q[rows])           # dK = scale dS^T Q
    return Grads(dq, dk, dv, dbias_result(p, dbias))


# ---- dbias, in the layout of the bias that was given --------------------------------
def _accumulate_dbias(p: Problem, dbias, dS, ch: _Chunk, b: int, h: int) -> None:
    """``dbias`` is ``dS`` (the bias enters ``S`` additively), summed over broadcast axes."""
    if isinstance(p.bias, DenseBias):
        bb, hb, lqb, lkb = dbias.shape
        target = dbias[b if bb > 1 else 0, h if hb > 1 else 0]
        flat = np.broadcast_to((ch.i if lqb > 1 else 0) * lkb + (ch.c if lkb > 1 else 0), dS.shape)
        target += np.bincount(flat, weights=dS, minlength=lqb * lkb).reshape(lqb, lkb).astype(dbias.dtype)
    elif isinstance(p.bias, SparseBias):
        bv, hv = p.bias.grid.shape
        dbias[b if bv > 1 else 0][h if hv > 1 else 0][ch.lo:ch.hi] += dS
    elif isinstance(p.bias, ALiBi):
        dbias[h] += np.sum(dS * -_alibi_distance(p, ch).astype(dS.dtype))
