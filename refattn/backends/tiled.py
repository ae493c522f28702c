"""The tiled route: FlashAttention-2 (Dao, 2023) written in NumPy, for reading and checking.

The forward is the paper's Algorithm 1 and the backward its Algorithm 2, with the
spec's symbols (spec/backends.md maps each line). The score matrix is cut into tiles
of ``block_q x block_k``; only the non-empty tiles of the mask's block layout are
visited (`refattn.blocks`), full tiles without an element mask and partial tiles with
it. Per query block, the forward keeps the running row max ``m``, the running sum
``l`` of ``exp(S - m)`` and the unnormalised output ``O``, rescaling them by
``exp(m_old - m_new)`` whenever the max grows; at the end ``O / l`` and
``L = m + log l``. The backward walks key blocks in the outer loop and, for each, the
query blocks whose tile is non-empty (the transposed layout), recomputing
``P = exp(S - L)`` per tile. This module shares no code with the other backends.
"""
# ruff: noqa: E741  (I, J, l, O: the notation of the paper and the spec)

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..alignment import align_offset
from ..bias import ALiBi, SparseBias
from ..blocks import blocks as block_layout
from ..contract import DenseBias, Grads, Problem, Result, dbias_result, dbias_zeros
from ._host import block_size

COMPUTE_DTYPES = (np.float64, np.float32)


OPTIONS = {"block_q": (block_size, 64), "block_k": (block_size, 64)}


@dataclass
class _Tile:
    """Tile ``(I, J)``: rows ``rows`` and columns ``cols`` of the score matrix; for a
    partial tile, its allowed entries (local row ``r``, local column ``c``) and their
    positions ``e`` in the group's CSR order (to read per-nonzero bias and dropout)."""

    rows: slice
    cols: slice
    full: bool
    r: np.ndarray
    c: np.ndarray
    e: np.ndarray


def _tiles_by_query_block(csr, layout, I: int, block_q: int, block_k: int, lq: int, lk: int):
    """The non-empty tiles of query block ``I``, in increasing key block ``J``."""
    rows = slice(I * block_q, min(lq, (I + 1) * block_q))
    lo, hi = int(csr.indptr[rows.start]), int(csr.indptr[rows.stop])
    e = np.arange(lo, hi)
    r = np.repeat(np.arange(rows.stop - rows.start), np.diff(csr.indptr[rows.start:rows.stop + 1]))
    col = csr.indices[lo:hi].astype(np.int64)
    J_of = col // block_k
    order = np.argsort(J_of, kind="stable")                   # group the entries by key block
    r, col, e, J_of = r[order], col[order], e[order], J_of[order]
    Js = layout.indices[layout.indptr[I]:layout.indptr[I + 1]]
    fulls = layout.full[layout.indptr[I]:layout.indptr[I + 1]]
    bounds = np.searchsorted(J_of, np.append(Js, Js[-1] + 1 if Js.size else 0))
    for t, (J, full) in enumerate(zip(Js.tolist(), fulls.tolist())):
        a, z = bounds[t], bounds[t + 1]
        cols = slice(J * block_k, min(lk, (J + 1) * block_k))
        yield J, _Tile(rows, cols, bool(full), r[a:z], col[a:z] - cols.start, e[a:z])


class _Tiling:
    """All non-empty tiles of one group, by query block and (transposed) by key block."""

    def __init__(self, csr, layout, block_q: int, block_k: int, lq: int, lk: int):
        nbq = -(-lq // block_q)
        self.by_query_block = [list(_tiles_by_query_block(csr, layout, I, block_q, block_k, lq, lk))
                               for I in range(nbq)]
        nbk = -(-lk // block_k)
        self.by_key_block: list[list[tuple[int, _Tile]]] = [[] for _ in range(nbk)]
        for I, tiles in enumerate(self.by_query_block):
            for J, tile in tiles:
                self.by_key_block[J].append((I, tile))


class _Terms:
    """The per-tile terms of ``S`` besides ``Q K^T``, and the dropout scale."""

    def __init__(self, p: Problem, b: int, h: int, dtype):
        self.p, self.b, self.h, self.dtype = p, b, h, dtype
        self.offset = align_offset(p.bias.align, p.lq, p.lk) if isinstance(p.bias, ALiBi) else 0

    def scores(self, Qi, Kj, tile: _Tile):
        """``S_ij`` (scale, softcap, bias; removed entries ``-inf`` on a partial tile)
        and ``T = tanh(scale Q K^T / softcap)``."""
        p, dt = self.p, self.dtype
        S = dt.type(p.scale) * (Qi @ Kj.T)
        T = None
        if p.softcap is not None:
            T = np.tanh(S / dt.type(p.softcap))
            S = dt.type(p.softcap) * T
        if p.bias is not None:
            S = S + self.bias_tile(tile)
        if not tile.full:
            allowed = np.zeros(S.shape, bool)
            allowed[tile.r, tile.c] = True
            S = np.where(allowed, S, -np.inf)
        return S, T

    def bias_tile(self, tile: _Tile) -> np.ndarray:
        p, dt = self.p, self.dtype
        nr, nc = tile.rows.stop - tile.rows.start, tile.cols.stop - tile.cols.start
        if isinstance(p.bias, DenseBias):
            bb, hb, lqb, lkb = p.bias.values.shape
            plane = p.bias.values[self.b if bb > 1 else 0, self.h if hb > 1 else 0]
            block = plane[tile.rows if lqb > 1 else slice(0, 1), tile.cols if lkb > 1 else slice(0, 1)]
            return np.broadcast_to(block, (nr, nc)).astype(dt)
        if isinstance(p.bias, SparseBias):
            return self.on_entries(tile, p.bias.grid.at(self.b, self.h))
        return dt.type(-p.bias.slopes[self.h]) * self.distance(tile)

    def distance(self, tile: _Tile) -> np.ndarray:
        """``|j - i'|`` on the tile, for ALiBi."""
        i = np.arange(tile.rows.start, tile.rows.stop)[:, None] + self.offset
        j = np.arange(tile.cols.start, tile.cols.stop)[None, :]
        return np.abs(j - i).astype(self.dtype)

    def on_entries(self, tile: _Tile, values: np.ndarray) -> np.ndarray:
        """Per-nonzero ``values`` placed on the tile (0 elsewhere)."""
        out = np.zeros((tile.rows.stop - tile.rows.start, tile.cols.stop - tile.cols.start), self.dtype)
        out[tile.r, tile.c] = values[tile.e]
        return out

    def dropout_scale(self, tile: _Tile):
        """``Z / (1 - p)`` on the tile, or None without dropout."""
        if self.p.dropout is None:
            return None
        keep = self.on_entries(tile, self.p.dropout.grid.at(self.b, self.h).astype(self.dtype))
        return keep * self.dtype.type(1.0 / (1.0 - self.p.dropout.p))


def _tilings(p: Problem, config):
    """``tiling(b, h)``: the tiles of group ``(b, h)``, from one block layout of the mask."""
    bq, bk = config.options["block_q"], config.options["block_k"]
    layout = block_layout(p.mask, bq, bk)
    return lambda b, h: _Tiling(p.mask.group(b, h), layout.group(b, h), bq, bk, p.lq, p.lk)


def forward(p: Problem, config, recorder=None) -> Result:
    """FlashAttention-2, Algorithm 1, per (batch, head) and query block ``I``. A
    ``recorder`` (`refattn.study.trace`) is shown each visited tile's state; it changes no number."""
    dt = np.dtype(config.compute_dtype)
    q, k, v = (x.astype(dt) for x in (p.q, p.k, p.v))
    O = np.zeros((p.batch, p.heads, p.lq, p.dim_v), dt)
    L = np.full((p.batch, p.heads, p.lq), -np.inf, dt)
    tiling = _tilings(p, config)
    for b in range(p.batch):
        for h in range(p.heads):
            g = h // p.group_size
            terms = _Terms(p, b, h, dt)
            for I, tiles in enumerate(tiling(b, h).by_query_block):
                if not tiles:
                    continue                                   # an empty query block: O = 0, L = -inf
                rows = tiles[0][1].rows
                Qi = q[b, h, rows]
                Oi = np.zeros((Qi.shape[0], p.dim_v), dt)
                li = np.zeros(Qi.shape[0], dt)
                mi = np.full(Qi.shape[0], -np.inf, dt)
                for J, tile in tiles:
                    Kj, Vj = k[b, g, tile.cols], v[b, g, tile.cols]
                    S, _ = terms.scores(Qi, Kj, tile)
                    m_new = np.maximum(mi, S.max(axis=1))
                    # A row with no allowed key yet keeps m = -inf; subtract 0 there, so that
                    # exp(-inf - 0) = 0 instead of exp(-inf + inf) = nan.
                    base = np.where(np.isfinite(m_new), m_new, dt.type(0))
                    P_tilde = np.exp(S - base[:, None])       # P~ = exp(S - m_new)
                    alpha = np.exp(mi - base)                  # rescale of the old l and O
                    li = alpha * li + P_tilde.sum(axis=1)      # l = e^(m_old - m_new) l + rowsum(P~)
                    Zs = terms.dropout_scale(tile)
                    PV = (P_tilde if Zs is None else P_tilde * Zs) @ Vj
                    Oi = alpha[:, None] * Oi + PV              # O = diag(e^(m_old - m_new)) O + P~ V
                    if recorder is not None:
                        recorder.forward_tile(b, h, I, J, tile.full, tile.rows, tile.cols, S, mi, m_new, alpha, li, Oi)
                    mi = m_new
                nonempty = li > 0
                O[b, h, rows] = np.where(nonempty[:, None], Oi / np.where(nonempty, li, 1)[:, None], 0)
                L[b, h, rows] = np.where(nonempty, mi + np.log(np.where(nonempty, li, 1)), -np.inf)
    return Result(O, L)


def backward(p: Problem, out, lse, dout, dlse, config, recorder=None) -> Grads:
    """FlashAttention-2, Algorithm 2: key blocks outside, their query blocks inside. A
    ``recorder`` (`refattn.study.trace`) is shown ``D`` and each visited tile's ``P``, ``dP``, ``dS``."""
    dt = np.dtype(config.compute_dtype)
    q, k, v = (x.astype(dt) for x in (p.q, p.k, p.v))
    out, lse, dout = (x.astype(dt) for x in (out, lse, dout))
    dlse = None if dlse is None else dlse.astype(dt)
    dq, dk, dv = np.zeros(q.shape, dt), np.zeros(k.shape, dt), np.zeros(v.shape, dt)
    dbias = dbias_zeros(p, dt)
    D = np.sum(dout * out, axis=-1)                            # D = rowsum(dO * O)
    if recorder is not None:
        recorder.backward_rowsums(D)
    scale = dt.type(p.scale)
    tiling = _tilings(p, config)
    for b in range(p.batch):
        for h in range(p.heads):
            g = h // p.group_size
            terms = _Terms(p, b, h, dt)
            for J, tiles in enumerate(tiling(b, h).by_key_block):
                if not tiles:
                    continue
                cols = tiles[0][1].cols
                Kj, Vj = k[b, g, cols], v[b, g, cols]
                dKj = np.zeros(Kj.shape, dt)
                dVj = np.zeros(Vj.shape, dt)
                for I, tile in tiles:
                    rows = tile.rows
                    Qi, dOi, Li = q[b, h, rows], dout[b, h, rows], lse[b, h, rows]
                    S, T = terms.scores(Qi, Kj, tile)
                    # P = exp(S - L); an empty row (L = -inf, its S all -inf) gets exp(-inf) = 0.
                    P = np.exp(S - np.where(np.isfinite(Li), Li, dt.type(0))[:, None])
                    Zs = terms.dropout_scale(tile)
                    dVj += (P if Zs is None else P * Zs).T @ dOi   # dV_j += P_Z^T dO_i
                    dP = dOi @ Vj.T                            # dP = dO_i V_j^T
                    if Zs is not None:
                        dP = dP * Zs
                    dS = P * (dP - D[b, h, rows, None])        # dS = P * (dP - D_i)
                    if dlse is not None:
                        dS = dS + dlse[b, h, rows, None] * P
                    if recorder is not None:
                        recorder.backward_tile(b, h, I, J, tile.full, rows, cols, P, dP, dS)
                    _accumulate_dbias(p, dbias, dS, terms, tile)
                    if T is not None:
                        dS = dS * (1 - T * T)
                    dq[b, h, rows] += scale * (dS @ Kj)        # dQ_i += scale dS K_j
                    dKj += scale * (dS.T @ Qi)                 # dK_j += scale dS^T Q_i
                dk[b, g, cols] += dKj
                dv[b, g, cols] += dVj
    return Grads(dq, dk, dv, dbias_result(p, dbias))


# ---- dbias, in the layout of the bias that was given --------------------------------
def _accumulate_dbias(p: Problem, dbias, dS, terms: _Terms, tile: _Tile) -> None:
    """``dbias`` is ``dS`` on the tile (removed entries have ``P = 0``, so ``dS = 0``)."""
    b, h = terms.b, terms.h
    if isinstance(p.bias, DenseBias):
        bb, hb, lqb, lkb = dbias.shape
        d = dS if lkb > 1 else dS.sum(axis=1, keepdims=True)
        d = d if lqb > 1 else d.sum(axis=0, keepdims=True)
        target = dbias[b if bb > 1 else 0, h if hb > 1 else 0]
        target[tile.rows if lqb > 1 else slice(0, 1), tile.cols if lkb > 1 else slice(0, 1)] += d
    elif isinstance(p.bias, SparseBias):
        bv, hv = p.bias.grid.shape
        dbias[b if bv > 1 else 0][h if hv > 1 else 0][tile.e] += dS[tile.r, tile.c]
    elif isinstance(p.bias, ALiBi):
        dbias[h] += np.sum(dS * -terms.distance(tile))
