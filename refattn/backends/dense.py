"""The float64 dense oracle: the plainest code that states spec/semantics.md and
spec/backward.md. Every other backend is judged against it.

Symbols follow the spec: ``S`` scores, ``P`` probabilities, ``Z`` the dropout
keep-mask, ``O`` output, ``L`` the log-sum-exp, ``D = rowsum(dO * O)``, ``dS``.

Whatever the input dtype, everything is computed in float64. Rows are processed in
chunks of at most ``ROW_CHUNK_ELEMENTS`` scores, so memory stays bounded (about a
dozen ``chunk x Lk`` float64 arrays) and no ``B*H*Lq*Lk`` array is ever built.
"""

from __future__ import annotations

import numpy as np

from ..bias import ALiBi, SparseBias
from ..contract import DenseBias, Grads, Problem, Result, dbias_result, dbias_zeros

#: The oracle computes in float64 only, and has no options.
COMPUTE_DTYPES = (np.float64,)
OPTIONS: dict = {}

#: Scores per chunk (rows * Lk); 2**21 float64 = 16 MiB per chunk-sized array.
ROW_CHUNK_ELEMENTS = 1 << 21


def _row_chunks(lq: int, lk: int):
    rows = max(1, min(lq, ROW_CHUNK_ELEMENTS // lk))
    for r0 in range(0, lq, rows):
        yield slice(r0, min(lq, r0 + rows))


def _chunk_nonzeros(csr, rows: slice):
    """``(lo, hi, r, c)``: the chunk's nonzeros are ``lo:hi`` in CSR order, at local row
    ``r`` and column ``c``."""
    lo, hi = csr.indptr[rows.start], csr.indptr[rows.stop]
    r = np.repeat(np.arange(rows.stop - rows.start), np.diff(csr.indptr[rows.start:rows.stop + 1]))
    return lo, hi, r, csr.indices[lo:hi]


def _on_nonzeros(csr, rows: slice, values: np.ndarray) -> np.ndarray:
    """Scatter per-nonzero ``values`` of the CSR's ``rows`` into a dense ``(rows, Lk)``
    array, 0 elsewhere."""
    lo, hi, r, c = _chunk_nonzeros(csr, rows)
    out = np.zeros((rows.stop - rows.start, csr.shape[1]))
    out[r, c] = values[lo:hi]
    return out


def _gather_nonzeros(csr, rows: slice, dense: np.ndarray) -> np.ndarray:
    """The entries of a dense ``(rows, Lk)`` array at the CSR's nonzeros of ``rows``."""
    _, _, r, c = _chunk_nonzeros(csr, rows)
    return dense[r, c]


def _scores(p: Problem, b: int, h: int, rows: slice, Q, K):
    """``S`` for one row chunk: scale, softcap, bias (spec order), and the tanh needed by
    the softcap's chain rule. Masked entries are not removed here."""
    S = p.scale * (Q[rows] @ K.T)
    T = None
    if p.softcap is not None:
        T = np.tanh(S / p.softcap)
        S = p.softcap * T
    if isinstance(p.bias, DenseBias):
        S = S + p.bias.block(b, h, rows, p.lq, p.lk)
    elif isinstance(p.bias, SparseBias):
        S = S + _on_nonzeros(p.mask.group(b, h), rows, p.bias.grid.at(b, h))
    elif isinstance(p.bias, ALiBi):
        S = S + p.bias.block(h, rows, p.lq, p.lk)
    return S, T


def _allowed(p: Problem, b: int, h: int, rows: slice) -> np.ndarray:
    return p.mask.group(b, h)[rows].toarray()


def _dropout_scale(p: Problem, b: int, h: int, rows: slice) -> np.ndarray | float:
    """``Z / (1 - p)`` on the chunk (1.0 without dropout)."""
    if p.dropout is None:
        return 1.0
    Z = _on_nonzeros(p.mask.group(b, h), rows, p.dropout.grid.at(b, h).astype(np.float64))
    return Z / (1.0 - p.dropout.p)


def _masked(S, allowed):
    """Remove the entries off the mask: ``-inf``, so ``exp(S - L) = 0`` there and never overflows."""
    return np.where(allowed, S, -np.inf)


def _probabilities(S, L):
    """``P = exp(S - L)`` for masked scores ``S``; 0 off the mask and on empty rows (L = -inf)."""
    nonempty = np.isfinite(L)
    P = np.zeros_like(S)
    P[nonempty] = np.exp(S[nonempty] - L[nonempty, None])
    return P


def forward(p: Problem, config=None) -> Result:
    B, H, Lq, Dv = p.batch, p.heads, p.lq, p.dim_v
    q, k, v = (x.astype(np.float64) for x in (p.q, p.k, p.v))
    O = np.zeros((B, H, Lq, Dv))
    L = np.full((B, H, Lq), -np.inf)
    for b in range(B):
        for h in range(H):
            g = h // p.group_size
            Q, K, V = q[b, h], k[b, g], v[b, g]
            for rows in _row_chunks(Lq, p.lk):
                S, _ = _scores(p, b, h, rows, Q, K)
                allowed = _allowed(p, b, h, rows)
                S = _masked(S, allowed)
                m = S.max(axis=1)
                nonempty = allowed.any(axis=1)  # from the mask: a +inf score is not an empty row
                # L = m + log(sum_j exp(S_ij - m)) on rows with an allowed key; -inf otherwise.
                Lc = np.full(m.shape, -np.inf)
                Lc[nonempty] = m[nonempty] + np.log(
                    np.exp(S[nonempty] - m[nonempty, None]).sum(axis=1)
                )
                P = _probabilities(S, Lc)
                O[b, h, rows] = (P * _dropout_scale(p, b, h, rows)) @ V
                L[b, h, rows] = Lc
    return Result(O, L)


def backward(p: Problem, out, lse, dout, dlse, config=None) -> Grads:
    """Gradients from ``(Q, K, V, O, L, dO)``; ``P`` is recomputed from ``L`` per chunk."""
    B, H, Lq, Lk = p.batch, p.heads, p.lq, p.lk
    q, k, v = (x.astype(np.float64) for x in (p.q, p.k, p.v))
    dq = np.zeros(q.shape)
    dk = np.zeros(k.shape)
    dv = np.zeros(v.shape)
    dbias = dbias_zeros(p)
    Dsum = np.sum(dout * out, axis=-1)  # D = rowsum(dO * O), (B, H, Lq)
    for b in range(B):
        for h in range(H):
            g = h // p.group_size
            Q, K, V = q[b, h], k[b, g], v[b, g]
            for rows in _row_chunks(Lq, Lk):
                S, T = _scores(p, b, h, rows, Q, K)
                P = _probabilities(_masked(S, _allowed(p, b, h, rows)), lse[b, h, rows])
                Zs = _dropout_scale(p, b, h, rows)
                dO = dout[b, h, rows]
                dv[b, g] += (P * Zs).T @ dO                      # dV = (P * Z/(1-p))^T dO
                dP = (dO @ V.T) * Zs                             # dP = (dO V^T) * Z/(1-p)
                dS = P * (dP - Dsum[b, h, rows, None])           # dS = P * (dP - D)
                if dlse is not None:
                    dS += dlse[b, h, rows, None] * P             # dL_i/dS_ij = P_ij
                _accumulate_dbias(p, dbias, dS, b, h, rows)       # dbias = dS
                if T is not None:
                    dS = dS * (1.0 - T * T)                      # d(c tanh(x/c))/dx
                dq[b, h, rows] = p.scale * (dS @ K)              # dQ = scale dS K
                dk[b, g] += p.scale * (dS.T @ Q[rows])           # dK = scale dS^T Q
    return Grads(dq, dk, dv, dbias_result(p, dbias))


# ---- dbias, in the layout of the bias that was given ----------------------------------
def _accumulate_dbias(p: Problem, dbias, dS, b, h, rows) -> None:
    if isinstance(p.bias, DenseBias):
        bb, hb, lqb, lkb = dbias.shape
        d = dS if lkb > 1 else dS.sum(axis=1, keepdims=True)
        target = dbias[b if bb > 1 else 0, h if hb > 1 else 0]
        if lqb > 1:
            target[rows] += d
        else:
            target += d.sum(axis=0, keepdims=True)
    elif isinstance(p.bias, SparseBias):
        bv, hv = p.bias.grid.shape
        csr = p.mask.group(b, h)
        lo, hi = csr.indptr[rows.start], csr.indptr[rows.stop]
        dbias[b if bv > 1 else 0][h if hv > 1 else 0][lo:hi] += _gather_nonzeros(csr, rows, dS)
    elif isinstance(p.bias, ALiBi):
        dbias[h] += np.sum(dS * p.bias.distance(rows, p.lq, p.lk))
