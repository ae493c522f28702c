"""Block layouts of a `Mask`: which tiles of a tiled kernel hold work, and exports.

A tiled attention kernel cuts the ``(Lq, Lk)`` score matrix into tiles of
``block_q x block_k`` entries. Query block ``I`` holds rows
``I*block_q .. min(Lq, (I+1)*block_q) - 1`` and key block ``J`` holds columns
``J*block_k .. min(Lk, (J+1)*block_k) - 1``; the last block of each axis may be
shorter (ragged). A tile is *empty* when it holds no allowed entry, *full* when
every one of its in-range entries is allowed, and *partial* otherwise. See
spec/blocks.md for the definitions, the exports and where they follow PyTorch.

Everything here costs O(nnz) per group plus the size of the output: no
``Lq x Lk`` array is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from . import _tiles
from .errors import RefattnError, check_dim

__all__ = [
    "EMPTY", "FULL", "PARTIAL", "BlockGroup", "BlockLayout", "FlexBlockArrays",
    "blocks", "to_flex_block_mask", "to_layout", "to_torch_block_mask",
]

#: Tile states in :meth:`BlockLayout.to_dense`.
EMPTY, PARTIAL, FULL = 0, 1, 2


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class BlockGroup(NamedTuple):
    """The tiles of one (batch, head) group, in CSR form over query blocks.

    Query block ``I`` owns entries ``indptr[I]:indptr[I + 1]`` of the other arrays.
    """

    indptr: np.ndarray   #: int64, length nbq + 1
    indices: np.ndarray  #: int64 key blocks ``J``, strictly increasing within each ``I``
    full: np.ndarray     #: bool, the tile is full (else partial)
    counts: np.ndarray   #: int64, allowed entries in the tile (>= 1)


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """The non-empty tiles of every group of a mask, each marked full or partial.

    Build one with :func:`blocks` (or ``Mask.blocks``). ``groups`` holds one
    :class:`BlockGroup` per stored mask group, row-major over ``group_shape``.
    """

    block_q: int
    block_k: int
    shape: tuple[int, int]        #: (Lq, Lk)
    group_shape: tuple[int, int]  #: (Bm, Hm), as the mask's
    ndim: int                     #: the mask's ndim, 2 or 4
    nbq: int                      #: ceil(Lq / block_q)
    nbk: int                      #: ceil(Lk / block_k)
    groups: tuple[BlockGroup, ...]

    def group(self, b: int, h: int) -> BlockGroup:
        """The tiles used by batch ``b``, query head ``h`` (size-1 axes broadcast,
        as in :meth:`Mask.group`)."""
        bm, hm = self.group_shape
        for val, n, nm in ((b, bm, "b"), (h, hm, "h")):
            if (isinstance(val, (bool, np.bool_)) or not isinstance(val, (int, np.integer))
                    or val < 0 or (n > 1 and val >= n)):
                limit = "any int >= 0 (the axis broadcasts)" if n == 1 else f"an int in [0, {n})"
                raise RefattnError(f"BlockLayout.group: {nm} must be {limit}, got {val!r}")
        return self.groups[(b if bm > 1 else 0) * hm + (h if hm > 1 else 0)]

    def iter_groups(self) -> Iterator[tuple[int, int, BlockGroup]]:
        """Yield ``(b, h, group)`` over the stored groups, row-major."""
        hm = self.group_shape[1]
        for i, g in enumerate(self.groups):
            yield i // hm, i % hm, g

    def num_full(self) -> int:
        """Full tiles, summed over the stored groups."""
        return int(sum(np.count_nonzero(g.full) for g in self.groups))

    def num_partial(self) -> int:
        """Partial tiles, summed over the stored groups."""
        return int(sum(g.full.size - np.count_nonzero(g.full) for g in self.groups))

    def num_nonempty(self) -> int:
        """Non-empty (full or partial) tiles, summed over the stored groups."""
        return int(sum(g.full.size for g in self.groups))

    def to_dense(self) -> np.ndarray:
        """Tile states (`EMPTY` 0, `PARTIAL` 1, `FULL` 2) as int8 of shape ``(nbq, nbk)``
        for a 2-D mask, ``(Bm, Hm, nbq, nbk)`` for a 4-D one (O(number of tiles))."""
        out = np.zeros((len(self.groups), self.nbq, self.nbk), dtype=np.int8)
        for k, g in enumerate(self.groups):
            rows = np.repeat(np.arange(self.nbq), np.diff(g.indptr))
            out[k, rows, g.indices] = np.where(g.full, FULL, PARTIAL)
        return out.reshape((self.nbq, self.nbk) if self.ndim == 2
                           else self.group_shape + (self.nbq, self.nbk))

    def __eq__(self, other) -> bool:
        if not isinstance(other, BlockLayout):
            return NotImplemented
        head = ("block_q", "block_k", "shape", "group_shape", "ndim", "nbq", "nbk")
        return all(getattr(self, f) == getattr(other, f) for f in head) and all(
            all(np.array_equal(x, y) for x, y in zip(a, b))
            for a, b in zip(self.groups, other.groups)
        )

    __hash__ = None

    def __repr__(self) -> str:
        return (
            f"BlockLayout(shape={self.shape}, group_shape={self.group_shape}, "
            f"block=({self.block_q}, {self.block_k}), tiles=({self.nbq}, {self.nbk}), "
            f"full={self.num_full()}, partial={self.num_partial()})"
        )


# ---- computing the tiles ------------------------------------------------------------


@runtime_checkable
class Mask(Protocol):
    """What the layouts read of a `refattn.Mask`. `refattn.mask` builds on this module (a
    mask hands its block methods to it), so the type is named here by its interface."""

    matrix_shape: tuple[int, int]
    group_shape: tuple[int, int]
    ndim: int
    _layouts: dict

    def iter_groups(self): ...


def _check_mask(mask, fn: str) -> Mask:
    if not isinstance(mask, Mask):
        raise RefattnError(f"{fn}: mask must be a refattn.Mask, got {type(mask).__name__}")
    return mask


def _edge_sizes(length: int, block: int, nblocks: int) -> np.ndarray:
    """Entries in each block of an axis of ``length`` cut into ``block``-sized pieces."""
    starts = np.arange(nblocks, dtype=np.int64) * block
    return np.minimum(starts + block, length) - starts


def _group_tiles(indptr, indices, lq: int, lk: int, bq: int, bk: int,
                 method: str = "compiled") -> BlockGroup:
    """Tiles of one canonical CSR in O(nnz + nbq).

    Each stored entry gets tile id ``I * nbk + J``; the distinct ids in increasing
    order are the non-empty tiles, query block major, key block minor: exactly the
    CSR order. ``method`` "compiled" (the default) counts them in one compiled pass
    over the rows with O(number of tiles) memory (`refattn._tiles`); "bincount" and
    "unique" are two NumPy routes that the tests hold it against: they build int64
    arrays of nnz entries, and "bincount" one of ``nbq * nbk``.
    """
    nbq, nbk = -(-lq // bq), -(-lk // bk)
    indptr = np.asarray(indptr, dtype=np.int64)
    if method == "compiled":
        out_ptr, kb, counts = _tiles.tiles(indptr, np.asarray(indices), lq, bq, bk, nbk)
        qb = np.repeat(np.arange(nbq, dtype=np.int64), np.diff(out_ptr))
        capacity = _edge_sizes(lq, bq, nbq)[qb] * _edge_sizes(lk, bk, nbk)[kb]
        return BlockGroup(_frozen(out_ptr), _frozen(kb), _frozen(counts == capacity), _frozen(counts))
    cols = np.asarray(indices, dtype=np.int64)
    nnz = cols.shape[0]
    # Entries of query block I are indptr[I*bq] .. indptr[min((I+1)*bq, Lq)] - 1.
    block_ptr = indptr[np.minimum(np.arange(nbq + 1, dtype=np.int64) * bq, lq)]
    tile = np.repeat(np.arange(nbq, dtype=np.int64) * nbk, np.diff(block_ptr))
    tile += cols // bk
    n_tiles = nbq * nbk
    if method == "bincount":
        per_tile = np.bincount(tile, minlength=n_tiles)
        ids = np.flatnonzero(per_tile).astype(np.int64)
        counts = per_tile[ids].astype(np.int64)
    elif method == "unique":
        if nnz and not np.all(tile[1:] >= tile[:-1]):
            tile = np.sort(tile)  # already sorted when block_q == 1 (rows are sorted)
        starts = np.flatnonzero(np.r_[True, tile[1:] != tile[:-1]]) if nnz else np.zeros(0, np.int64)
        ids = tile[starts]
        counts = np.diff(np.r_[starts, nnz]).astype(np.int64)
    else:  # pragma: no cover - internal
        raise ValueError(method)
    qb, kb = ids // nbk, ids % nbk
    out_ptr = np.zeros(nbq + 1, dtype=np.int64)
    np.cumsum(np.bincount(qb, minlength=nbq), out=out_ptr[1:])
    capacity = _edge_sizes(lq, bq, nbq)[qb] * _edge_sizes(lk, bk, nbk)[kb]
    return BlockGroup(_frozen(out_ptr), _frozen(kb), _frozen(counts == capacity), _frozen(counts))


def blocks(mask: Mask, block_q: int, block_k: int | None = None) -> BlockLayout:
    """The non-empty tiles of every group of ``mask`` cut into ``block_q x block_k`` tiles.

    ``block_k`` defaults to ``block_q``. For each group and query block ``I`` the
    layout lists the non-empty key blocks ``J`` in increasing order, whether each is
    full (every in-range entry of the tile allowed; a ragged edge tile counts only
    the entries inside the matrix) and how many entries it allows. O(nnz + number of
    query blocks) per group, once: the layout is kept with the mask (a value), and a
    later call with the same block sizes returns it (the 1M-token sliding window's
    takes 0.5 s to compute, a sixth of a float32 forward pass).
    """
    mask = _check_mask(mask, "blocks")
    bq = check_dim(block_q, "blocks: block_q")
    bk = bq if block_k is None else check_dim(block_k, "blocks: block_k")
    cached = mask._layouts.get((bq, bk))
    if cached is not None:
        return cached
    lq, lk = mask.matrix_shape
    groups = tuple(
        _group_tiles(csr.indptr, csr.indices, lq, lk, bq, bk) for _, _, csr in mask.iter_groups()
    )
    layout = BlockLayout(bq, bk, (lq, lk), mask.group_shape, mask.ndim,
                         -(-lq // bq), -(-lk // bk), groups)
    mask._layouts[(bq, bk)] = layout
    return layout


def _tile_grid(layout: BlockLayout, which: str) -> np.ndarray:
    """Boolean ``[Bm, Hm, nbq, nbk]``: tiles that are non-empty ("any"), full by refattn's
    definition ("full"), or full by PyTorch's (every one of ``block_q * block_k``
    entries allowed: "torch_full")."""
    bm, hm = layout.group_shape
    out = np.zeros((bm * hm, layout.nbq, layout.nbk), dtype=bool)
    for k, g in enumerate(layout.groups):
        if which == "any":
            sel = np.ones(g.indices.shape, dtype=bool)
        elif which == "full":
            sel = g.full
        else:
            sel = g.counts == layout.block_q * layout.block_k
        rows = np.repeat(np.arange(layout.nbq), np.diff(g.indptr))
        out[k, rows[sel], g.indices[sel]] = True
    return out.reshape(bm, hm, layout.nbq, layout.nbk)


def _broadcast_count(value, have: int, fn: str, name: str, axis: str) -> int:
    if value is None:
        return have
    n = check_dim(value, f"{fn}: {name}")
    if have not in (1, n):
        raise RefattnError(
            f"{fn}: {name}={n} does not match the mask's {axis} = {have}; it must be 1 "
            f"(broadcast) or equal {name}"
        )
    return n


# ---- layouts for block-sparse kernels ---------------------------------------------------


def to_layout(mask: Mask, block_q: int, block_k: int | None = None, *,
              heads: int | None = None) -> np.ndarray:
    """The block-sparse layout ``[H, nbq, nbk]`` (int64, 1 where the tile is non-empty).

    This is the layout block-sparse kernels such as DeepSpeed's sparse attention and
    Triton's blocksparse matmul take (one per head, shared by the batch). A 2-D mask
    gives ``H = 1``; a 4-D mask must have ``Bm == 1`` and gives ``H = Hm``. ``heads``
    broadcasts a mask with one head group to that many copies (``Hm`` must be 1 or
    equal ``heads``). ``block_k`` defaults to ``block_q``.
    """
    mask = _check_mask(mask, "to_layout")
    layout = blocks(mask, check_dim(block_q, "to_layout: block_q"),
                    None if block_k is None else check_dim(block_k, "to_layout: block_k"))
    bm, hm = mask.group_shape
    if bm != 1:
        raise RefattnError(
            f"to_layout: the mask has Bm = {bm} batch groups, but a layout is per head and "
            "shared by the batch; pass a mask with Bm == 1 (Mask.stack([per_head]))"
        )
    h = _broadcast_count(heads, hm, "to_layout", "heads", "head groups Hm")
    grid = _tile_grid(layout, "any")[0].astype(np.int64)
    return np.broadcast_to(grid, (h, layout.nbq, layout.nbk)).copy()


# ---- PyTorch FlexAttention ----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FlexBlockArrays:
    """NumPy arrays with the fields of PyTorch FlexAttention's ``BlockMask``.

    As ``create_block_mask`` builds them (torch 2.13, ``separate_full_blocks=True``):
    ``kv_num_blocks[b, h, I]`` counts the *partial* key blocks of query block ``I`` and
    ``kv_indices[b, h, I, :kv_num_blocks]`` lists them in increasing order; the
    ``full_kv_*`` pair does the same for the *full* blocks. A tile is full here only
    when all ``block_q * block_k`` entries are allowed, so a ragged edge tile is never
    full. Each ``*_indices`` row is a permutation of ``range(nbk)``: the listed blocks,
    then every other block in increasing order (torch's padding). ``q_*`` and
    ``full_q_*`` are the same for the transposed grid (``[B, H, nbk, nbq]``).
    All arrays are int32.
    """

    seq_lengths: tuple[int, int]  #: (Lq, Lk)
    block_size: tuple[int, int]   #: (block_q, block_k)
    kv_num_blocks: np.ndarray
    kv_indices: np.ndarray
    full_kv_num_blocks: np.ndarray
    full_kv_indices: np.ndarray
    q_num_blocks: np.ndarray
    q_indices: np.ndarray
    full_q_num_blocks: np.ndarray
    full_q_indices: np.ndarray

    #: The array fields, in ``BlockMask``'s names.
    ARRAYS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
              "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")


def _ordered(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """torch's (num_blocks, indices) of a boolean grid along the last axis: selected
    positions first, then the rest, each in increasing order."""
    num = np.count_nonzero(sel, axis=-1).astype(np.int32)
    idx = np.argsort(~sel, axis=-1, kind="stable").astype(np.int32)
    return _frozen(num), _frozen(idx)


def _parse_block_size(block_size, fn: str) -> tuple[int, int]:
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise RefattnError(
                f"{fn}: block_size must be an int or a pair (q, kv), got {block_size!r}"
            )
        return (check_dim(block_size[0], f"{fn}: block_size[0] (q)"),
                check_dim(block_size[1], f"{fn}: block_size[1] (kv)"))
    n = check_dim(block_size, f"{fn}: block_size")
    return n, n


def to_flex_block_mask(mask: Mask, block_size=128, *, batch: int | None = None,
                       heads: int | None = None) -> FlexBlockArrays:
    """The fields of the FlexAttention ``BlockMask`` that ``create_block_mask`` builds for
    this mask, as NumPy arrays (see :class:`FlexBlockArrays`).

    ``block_size`` is an int or a pair ``(q, kv)`` (torch's default is 128). The
    arrays have shape ``[B, H, ...]`` with ``(B, H)`` the mask's group shape, or
    ``batch`` / ``heads`` where given (each mask axis must be 1 or equal them).
    """
    fn = "to_flex_block_mask"
    mask = _check_mask(mask, fn)
    bq, bk = _parse_block_size(block_size, fn)
    bm, hm = mask.group_shape
    b = _broadcast_count(batch, bm, fn, "batch", "batch groups Bm")
    h = _broadcast_count(heads, hm, fn, "heads", "head groups Hm")
    layout = blocks(mask, bq, bk)
    grid = (b, h, layout.nbq, layout.nbk)
    nonempty = np.broadcast_to(_tile_grid(layout, "any"), grid)
    full = np.broadcast_to(_tile_grid(layout, "torch_full"), grid)
    partial = nonempty & ~full
    fields = {}
    for prefix, sel in (("", partial), ("full_", full)):
        fields[prefix + "kv_num_blocks"], fields[prefix + "kv_indices"] = _ordered(sel)
        fields[prefix + "q_num_blocks"], fields[prefix + "q_indices"] = _ordered(
            np.swapaxes(sel, -1, -2))
    return FlexBlockArrays(seq_lengths=mask.matrix_shape, block_size=(bq, bk), **fields)


def to_torch_block_mask(mask: Mask, block_size=128, *, batch: int | None = None,
                        heads: int | None = None, device=None):
    """A ``torch.nn.attention.flex_attention.BlockMask`` for this mask (needs torch).

    Built with ``BlockMask.from_kv_blocks`` from :func:`to_flex_block_mask`, with a
    ``mask_mod`` that looks each ``(b, h, q, kv)`` up in the mask's sorted flat
    positions (O(nnz) memory), so flex_attention applies the exact mask inside
    partial tiles. ``device`` defaults to the CPU.
    """
    fn = "to_torch_block_mask"
    arrays = to_flex_block_mask(mask, block_size, batch=batch, heads=heads)
    try:
        import torch
        from torch.nn.attention.flex_attention import BlockMask
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{fn} needs PyTorch (the 'oracle' extra): {e}") from None
    device = torch.device("cpu" if device is None else device)
    lq, lk = mask.matrix_shape
    bm, hm = mask.group_shape
    flat = [g * lq * lk + np.repeat(np.arange(lq, dtype=np.int64), np.diff(csr.indptr)) * lk
            + np.asarray(csr.indices, dtype=np.int64)
            for g, (_, _, csr) in enumerate(mask.iter_groups())]
    keys = np.concatenate(flat + [np.array([-1], dtype=np.int64)])  # -1: never matches
    keys.sort()  # already sorted but for the sentinel
    keys_t = torch.from_numpy(keys).to(device)
    last = keys.shape[0] - 1
    stride_b, stride_h = (hm if bm > 1 else 0), (1 if hm > 1 else 0)

    def mask_mod(b, h, q_idx, kv_idx):
        pos = ((b * stride_b + h * stride_h) * lq + q_idx) * lk + kv_idx
        at = torch.searchsorted(keys_t, pos).clamp(max=last)
        return keys_t[at] == pos

    t = {name: torch.from_numpy(np.array(getattr(arrays, name))).to(device)
         for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")}
    return BlockMask.from_kv_blocks(
        t["kv_num_blocks"], t["kv_indices"], t["full_kv_num_blocks"], t["full_kv_indices"],
        BLOCK_SIZE=arrays.block_size, mask_mod=mask_mod, seq_lengths=arrays.seq_lengths,
    )
