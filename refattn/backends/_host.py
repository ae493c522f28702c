"""Host-side preparation shared by the compiled backends (``cpu``, ``cuda``), and the block
size option of the host tiled backends (``tiled``, ``cpu``: `block_size`).

Flat arrays that kernels can take: the mask's CSR groups and block layout (`plan`), the
bias and dropout as per-(b, h) offsets into flat value arrays (`bias_args`,
`drop_args`), and the buffers in which kernels leave dbias terms, each (b, h) in slots
of its own, with their reduction over broadcast axes afterwards (`dbias_buffers`,
`dbias_reduce`). Bookkeeping only: the attention arithmetic stays in each backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..alignment import align_offset
from ..bias import ALiBi, SparseBias
from ..blocks import blocks as block_layout
from ..contract import DenseBias, Problem, dbias_result
from ..errors import RefattnError

# bias kinds, and where dbias is accumulated (row-owned terms in the dQ pass,
# column-owned ones in the dK/dV pass)
NO_BIAS, DENSE, SPARSE, ALIBI = 0, 1, 2, 3
DB_NONE, DB_ROWS, DB_FULL, DB_COLS, DB_ENTRIES, DB_ALIBI = 0, 1, 2, 3, 4, 5


#: The largest tile side of the host backends (``tiled``, ``cpu``): a 4096 x 4096 float64
#: tile is 128 MiB per thread. A block longer than the sequence is a single block.
MAX_HOST_BLOCK = 4096


def block_size(value, name: str) -> int:
    """A host backend's ``block_q`` or ``block_k`` option: an int in ``[1, MAX_HOST_BLOCK]``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or not 1 <= value <= MAX_HOST_BLOCK:
        raise RefattnError(f"{name} must be an int in [1, {MAX_HOST_BLOCK}], got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Plan:
    """The mask and its block layout as the kernels take them, for one call.

    ``mask``: (indptr ``[G, Lq + 1]`` int64 per group, the groups' indices
    concatenated, each group's offset into them ``[G]``, the group of each (b, h)
    ``[B, H]``). ``tiles``: (``tile_ptr [G, nbq + 1]``, then per tile its key block,
    full, dense and query block, then the transposed structure ``ttile_ptr [G, nbk + 1]``
    and ``ttile``: the tiles of each key block in increasing query block)."""

    mask: tuple
    tiles: tuple
    nnz: np.ndarray  # [G] entries per group


def group_ids(p: Problem) -> np.ndarray:
    """``[B, H]`` int64: the mask group (in `Mask.iter_groups` order) that (b, h) reads."""
    bm, hm = p.mask.group_shape
    b = np.arange(p.batch)[:, None] if bm > 1 else np.zeros((p.batch, 1), np.int64)
    h = np.arange(p.heads)[None, :] if hm > 1 else np.zeros((1, p.heads), np.int64)
    return np.ascontiguousarray(np.broadcast_to(b * hm + h, (p.batch, p.heads)), np.int64)


def plan(p: Problem, bq: int, bk: int, dense_min_density: float = 1.0) -> Plan:
    """The kernels' view of ``p.mask`` cut into ``bq x bk`` tiles (see `Plan`). A tile is
    marked *dense* when it is full or holds at least ``dense_min_density`` of its entries."""
    csrs = [csr for _, _, csr in p.mask.iter_groups()]
    gid = group_ids(p)
    indptr = np.stack([np.asarray(c.indptr, np.int64) for c in csrs])
    nnz = indptr[:, -1].copy()
    base = np.concatenate([[0], np.cumsum(nnz)[:-1]]).astype(np.int64)
    # One group: its index array as it is (no copy of what may be gigabytes).
    indices = csrs[0].indices if len(csrs) == 1 else np.concatenate([c.indices for c in csrs])
    # Read-only whatever the mask's make-up (a one-group mask's own array is): the compiled
    # kernels are typed by it, and a second type would compile them all again (~100 s).
    indices = indices.view()
    indices.flags.writeable = False
    layout = block_layout(p.mask, bq, bk)
    nbq, nbk = layout.nbq, layout.nbk
    tile_ptr = np.empty((len(csrs), nbq + 1), np.int64)
    keys, fulls, denses, queries, ttile_ptr, ttiles = [], [], [], [], np.empty((len(csrs), nbk + 1), np.int64), []
    first = 0
    rows = np.minimum(np.arange(nbq) * bq + bq, p.lq) - np.arange(nbq) * bq
    cols = np.minimum(np.arange(nbk) * bk + bk, p.lk) - np.arange(nbk) * bk
    for G, grp in enumerate(layout.groups):
        tile_ptr[G] = grp.indptr + first
        I = np.repeat(np.arange(nbq, dtype=np.int64), np.diff(grp.indptr))
        area = rows[I] * cols[grp.indices]
        keys.append(grp.indices)
        fulls.append(grp.full)
        denses.append(grp.full | (grp.counts >= dense_min_density * area))
        queries.append(I)
        order = np.argsort(grp.indices, kind="stable")      # by key block, then query block
        ttiles.append(order + first)
        ttile_ptr[G, 0] = 0
        np.cumsum(np.bincount(grp.indices, minlength=nbk), out=ttile_ptr[G, 1:])
        ttile_ptr[G] += first                               # this group's tiles start at `first`
        first += grp.indices.shape[0]
    cat = lambda xs, dtype: np.ascontiguousarray(np.concatenate(xs), dtype)  # noqa: E731
    tiles = (tile_ptr, cat(keys, np.int64), cat(fulls, np.bool_), cat(denses, np.bool_),
             cat(queries, np.int64), ttile_ptr, cat(ttiles, np.int64))
    return Plan((indptr, indices, base, gid), tiles, nnz)


def per_bh(grid, p: Problem, dtype):
    """Values on the nonzeros (`ValueGrid`) as one flat array and the offset of (b, h)'s."""
    leaves = [leaf for row in grid.grid for leaf in row]
    flat = np.concatenate(leaves).astype(dtype) if len(leaves) > 1 else leaves[0].astype(dtype)
    starts = np.concatenate([[0], np.cumsum([x.shape[0] for x in leaves])[:-1]]).astype(np.int64)
    bv, hv = grid.shape
    where = np.empty((p.batch, p.heads), np.int64)
    for b in range(p.batch):
        for h in range(p.heads):
            where[b, h] = starts[(b if bv > 1 else 0) * hv + (h if hv > 1 else 0)]
    return flat, where


def bias_args(p: Problem, dt):
    """(kind, dense, values, vbase, slopes, alibi offset), unused arrays as 1-element dummies."""
    dense = np.zeros((1, 1, 1, 1), dt)
    values, vbase = np.zeros(1, dt), np.zeros((p.batch, p.heads), np.int64)
    slopes, offset = np.zeros(p.heads, dt), 0
    kind = NO_BIAS
    if isinstance(p.bias, DenseBias):
        kind, dense = DENSE, np.ascontiguousarray(p.bias.values, dt)
    elif isinstance(p.bias, SparseBias):
        kind = SPARSE
        values, vbase = per_bh(p.bias.grid, p, dt)
    elif isinstance(p.bias, ALiBi):
        kind, slopes, offset = ALIBI, p.bias.slopes.astype(dt), align_offset(p.bias.align, p.lq, p.lk)
    return (kind, dense, values, vbase, slopes, offset)


def drop_args(p: Problem, dt, has_dlse: bool):
    """(keep, kbase, 1 / (1 - p), dropout on, dlse given)."""
    if p.dropout is None:
        return (np.zeros(1, np.bool_), np.zeros((p.batch, p.heads), np.int64), dt.type(1), False, has_dlse)
    keep, kbase = per_bh(p.dropout.grid, p, np.bool_)
    return (keep, kbase, dt.type(1.0 / (1.0 - p.dropout.p)), True, has_dlse)


# ---- dbias: per-(b, h) terms from the kernels, reduced over broadcast axes here -----------

def dbias_buffers(p: Problem, nnz_bh: np.ndarray, dt):
    """Where the kernels put dbias's terms: each (b, h) has its own slots, so no two
    work items write one element; broadcast axes are summed afterwards."""
    B, H = p.batch, p.heads
    bufs = {"rows": np.zeros((1, 1, 1), dt), "full": np.zeros((1, 1, 1, 1), dt),
            "cols": np.zeros((1, 1, 1), dt), "entries": np.zeros(1, dt),
            "entries_base": np.zeros((B, H), np.int64)}
    if isinstance(p.bias, DenseBias):
        _, _, lqb, lkb = p.bias.values.shape
        if lkb == 1:
            bufs["rows"] = np.zeros((B, H, p.lq), dt)      # sum_j dS_ij
            return DB_ROWS, bufs
        if lqb == 1:
            bufs["cols"] = np.zeros((B, H, p.lk), dt)      # sum_i dS_ij
            return DB_COLS, bufs
        bufs["full"] = np.zeros((B, H, p.lq, p.lk), dt)
        return DB_FULL, bufs
    if isinstance(p.bias, SparseBias):
        sizes = nnz_bh.ravel()
        bufs["entries_base"] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64).reshape(B, H)
        bufs["entries"] = np.zeros(int(sizes.sum()), dt)
        return DB_ENTRIES, bufs
    if isinstance(p.bias, ALiBi):
        bufs["rows"] = np.zeros((B, H, p.lq), dt)          # sum_j dS_ij * -|j - i'|
        return DB_ALIBI, bufs
    return DB_NONE, bufs


def dbias_reduce(p: Problem, nnz_bh: np.ndarray, mode: int, bufs, dt):
    """dbias in the bias's layout: the per-(b, h) terms summed over the axes the bias
    broadcasts along, in increasing (b, h) order."""
    B, H = p.batch, p.heads
    if mode == DB_NONE:
        return None
    if mode == DB_ALIBI:
        return bufs["rows"].sum(axis=2).sum(axis=0)
    if mode == DB_ENTRIES:
        bv, hv = p.bias.grid.shape
        base, flat = bufs["entries_base"], bufs["entries"]
        out = [[None] * hv for _ in range(bv)]
        for b in range(B):
            for h in range(H):
                n = int(nnz_bh[b, h])
                term = flat[base[b, h]:base[b, h] + n]
                i, j = (b if bv > 1 else 0), (h if hv > 1 else 0)
                out[i][j] = term.copy() if out[i][j] is None else out[i][j] + term
        return dbias_result(p, out)
    bb, hb, lqb, lkb = p.bias.values.shape
    if mode == DB_ROWS:
        x = bufs["rows"][..., None]
        if lqb == 1:
            x = x.sum(axis=2, keepdims=True)
    elif mode == DB_COLS:
        x = bufs["cols"][:, :, None, :]
    else:
        x = bufs["full"]
    if bb == 1:
        x = x.sum(axis=0, keepdims=True)
    if hb == 1:
        x = x.sum(axis=1, keepdims=True)
    return dbias_result(p, np.ascontiguousarray(x))
