"""`Mask`: the boolean sparsity of attention, held as canonical CSR.

A mask says which keys each query may attend: entry ``(i, j)`` is stored
(allowed) or absent (removed). It is held as a ``scipy.sparse.csr_array`` in
canonical form: indices sorted and unique within each row, every stored entry
``True``, index arrays of dtype int32 when every index and the entry count fit,
else int64. The arrays are read-only, so a `Mask` is a value.

A mask is either one matrix of shape ``(Lq, Lk)`` (``ndim == 2``), shared by
every (batch, head), or a stack of shape ``(Bm, Hm, Lq, Lk)`` (``ndim == 4``)
holding one matrix per (batch, head) group, with size-1 broadcasting: ``Bm`` is
1 or B, ``Hm`` is 1 or H (query heads). See spec/semantics.md, "Masks".
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import scipy.sparse as sp

from . import blocks as _blocks
from .errors import RefattnError, check_allocation, check_dim
from ._csr_merge import DIFFERENCE, INTERSECTION, UNION, merge

_INT32_MAX = np.iinfo(np.int32).max


def _index_dtype(nnz: int, lk: int) -> np.dtype:
    return np.dtype(np.int32) if max(nnz, lk) <= _INT32_MAX else np.dtype(np.int64)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _canonical_csr(indptr, indices, shape: tuple[int, int], what: str) -> sp.csr_array:
    """Validate raw CSR arrays and return a canonical, read-only csr_array.

    Nothing is repaired: unsorted or duplicate indices are an error, because a
    mask that had to be repaired was probably built wrongly.
    """
    lq, lk = shape
    indptr = np.asarray(indptr)
    indices = np.asarray(indices)
    for arr, nm in ((indptr, "indptr"), (indices, "indices")):
        if arr.ndim != 1:
            raise RefattnError(f"{what}: {nm} must be 1-D, got shape {arr.shape}")
        if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
            raise RefattnError(f"{what}: {nm} must have an integer dtype, got {arr.dtype}")
    if indptr.shape[0] != lq + 1:
        raise RefattnError(
            f"{what}: indptr must have length Lq + 1 = {lq + 1}, got {indptr.shape[0]}"
        )
    nnz = indices.shape[0]
    if indptr[0] != 0:
        raise RefattnError(f"{what}: indptr[0] must be 0, got {indptr[0]}")
    steps = np.diff(indptr.astype(np.int64))
    if steps.size and steps.min() < 0:
        row = int(np.flatnonzero(steps < 0)[0])
        raise RefattnError(f"{what}: indptr must be non-decreasing; it decreases at row {row}")
    if indptr[-1] != nnz:
        raise RefattnError(
            f"{what}: indptr[-1] must equal len(indices) = {nnz}, got {indptr[-1]}"
        )
    if nnz:
        lo, hi = indices.min(), indices.max()
        if lo < 0 or hi >= lk:
            pos = int(np.flatnonzero((indices < 0) | (indices >= lk))[0])
            row = int(np.searchsorted(indptr, pos, side="right") - 1)
            raise RefattnError(
                f"{what}: column index {indices[pos]} at row {row} is out of range [0, {lk})"
            )
        # Within a row, indices must strictly increase; a step at a row start is free.
        row_start = np.zeros(nnz, dtype=bool)
        row_start[indptr[:-1][indptr[:-1] < nnz]] = True
        bad = (np.diff(indices.astype(np.int64)) <= 0) & ~row_start[1:]
        if bad.any():
            pos = int(np.flatnonzero(bad)[0]) + 1
            row = int(np.searchsorted(indptr, pos, side="right") - 1)
            kind = "duplicate" if indices[pos] == indices[pos - 1] else "unsorted"
            raise RefattnError(
                f"{what}: {kind} column indices in row {row} "
                f"({indices[pos - 1]} then {indices[pos]}); indices must be sorted and unique"
            )
    idx = _index_dtype(nnz, lk)
    csr = sp.csr_array(
        (
            _frozen(np.ones(nnz, dtype=bool)),
            _frozen(indices.astype(idx, copy=True)),
            _frozen(indptr.astype(idx, copy=True)),
        ),
        shape=(lq, lk),
        copy=False,
    )
    csr.has_sorted_indices = True
    csr.has_canonical_format = True
    return csr


def _csr_from_dense(b: np.ndarray, what: str) -> sp.csr_array:
    rows, cols = np.nonzero(b)
    indptr = np.zeros(b.shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=b.shape[0]), out=indptr[1:])
    return _canonical_csr(indptr, cols, b.shape, what)


class Mask:
    """Boolean sparsity of attention scores, one CSR matrix per (batch, head) group.

    Build one with :meth:`from_dense`, :meth:`from_csr`, :meth:`from_indices`,
    :meth:`full`, :meth:`empty`, :meth:`stack`, or from a pattern
    (``refattn.patterns.get(name, ...).mask(lq, lk)``). Do not call the
    constructor directly.
    """

    __slots__ = ("_groups", "_group_shape", "_matrix_shape", "_ndim", "_layouts")

    def __init__(self, groups, group_shape, matrix_shape, ndim, _token=None):
        if _token is not _PRIVATE:
            raise TypeError(
                "Mask() is not public; use Mask.from_dense, Mask.from_csr, Mask.from_indices, "
                "Mask.full, Mask.empty or Mask.stack"
            )
        self._groups: tuple[sp.csr_array, ...] = groups
        self._group_shape: tuple[int, int] = group_shape
        self._matrix_shape: tuple[int, int] = matrix_shape
        self._ndim: int = ndim
        # Block layouts computed from this mask, by (block_q, block_k): a mask is a value
        # (read-only arrays), so a layout once computed stays right (refattn.blocks.blocks).
        self._layouts: dict = {}

    # ---- constructors -------------------------------------------------------------
    @classmethod
    def _single(cls, csr: sp.csr_array) -> Mask:
        return cls((csr,), (1, 1), (int(csr.shape[0]), int(csr.shape[1])), 2, _PRIVATE)

    @classmethod
    def _from_canonical(cls, indptr: np.ndarray, indices: np.ndarray, shape: tuple[int, int]) -> Mask:
        """Wrap arrays that are canonical by construction (pattern builders; their exactness
        is tested against brute force), without validation or copies: O(1) extra memory
        beyond the all-True data array. ``indptr``/``indices`` must already have the
        dtype `_index_dtype` picks."""
        want = _index_dtype(int(indices.shape[0]), shape[1])
        assert indptr.dtype == want and indices.dtype == want, (indptr.dtype, indices.dtype, want)
        csr = sp.csr_array(
            (_frozen(np.ones(indices.shape[0], dtype=bool)), _frozen(indices), _frozen(indptr)),
            shape=shape, copy=False,
        )
        csr.has_sorted_indices = True
        csr.has_canonical_format = True
        return cls._single(csr)

    @classmethod
    def from_indices(cls, indptr, indices, shape) -> Mask:
        """A 2-D mask from raw CSR arrays (``indptr`` of length Lq + 1, sorted unique
        ``indices`` per row) and ``shape = (Lq, Lk)``."""
        lq, lk = _parse_matrix_shape(shape, "Mask.from_indices: shape")
        return cls._single(_canonical_csr(indptr, indices, (lq, lk), "Mask.from_indices"))

    @classmethod
    def from_csr(cls, csr) -> Mask:
        """A 2-D mask from a ``scipy.sparse`` CSR array or matrix.

        Every stored entry must be nonzero (explicit zeros are rejected rather than
        silently dropped), and indices must already be sorted and unique.
        """
        if not (sp.issparse(csr) and csr.format == "csr"):
            raise RefattnError(
                f"Mask.from_csr: expected a scipy.sparse CSR array or matrix, got "
                f"{type(csr).__name__}" + (" (convert with .tocsr())" if sp.issparse(csr) else "")
            )
        if csr.ndim != 2:
            raise RefattnError(f"Mask.from_csr: expected a 2-D CSR, got ndim={csr.ndim}")
        lq, lk = _parse_matrix_shape(csr.shape, "Mask.from_csr: shape")
        data = np.asarray(csr.data)
        if data.dtype.kind not in "biuf":
            raise RefattnError(f"Mask.from_csr: data must be boolean or real, got dtype {data.dtype}")
        if data.size and not np.all((data != 0) & ~np.isnan(data)):
            pos = int(np.flatnonzero((data == 0) | np.isnan(data))[0])
            row = int(np.searchsorted(csr.indptr, pos, side="right") - 1)
            raise RefattnError(
                f"Mask.from_csr: stored entry {pos} (row {row}, column {csr.indices[pos]}) is "
                f"{data[pos]}; a mask stores only allowed entries, each nonzero and not NaN "
                "(call .eliminate_zeros() to drop zeros)"
            )
        return cls._single(_canonical_csr(csr.indptr, csr.indices, (lq, lk), "Mask.from_csr"))

    @classmethod
    def from_dense(cls, b) -> Mask:
        """A mask from a boolean array of shape ``(Lq, Lk)`` or ``(Bm, Hm, Lq, Lk)``."""
        b = np.asarray(b)
        if b.dtype != np.bool_:
            raise RefattnError(
                f"Mask.from_dense: expected a boolean array, got dtype {b.dtype} "
                "(compare explicitly, e.g. `x != 0`)"
            )
        if b.ndim == 2:
            _parse_matrix_shape(b.shape, "Mask.from_dense: shape")
            return cls._single(_csr_from_dense(b, "Mask.from_dense"))
        if b.ndim == 4:
            return cls.stack(
                [[cls.from_dense(b[i, j]) for j in range(b.shape[1])] for i in range(b.shape[0])]
            )
        raise RefattnError(
            f"Mask.from_dense: expected a 2-D (Lq, Lk) or 4-D (Bm, Hm, Lq, Lk) array, "
            f"got shape {b.shape}"
        )

    @classmethod
    def full(cls, lq: int, lk: int) -> Mask:
        """Every query attends every key (dense attention)."""
        lq, lk = check_dim(lq, "lq"), check_dim(lk, "lk")
        idx = _index_dtype(lq * lk, lk)
        check_allocation(lq * lk * np.dtype(idx).itemsize, f"Mask.full({lq}, {lk}): a CSR of {lq * lk} entries")
        indptr = np.arange(lq + 1, dtype=np.int64) * lk
        indices = np.tile(np.arange(lk, dtype=idx), lq)
        return cls._single(_canonical_csr(indptr, indices, (lq, lk), "Mask.full"))

    @classmethod
    def empty(cls, lq: int, lk: int) -> Mask:
        """No query attends any key (every row is empty)."""
        lq, lk = check_dim(lq, "lq"), check_dim(lk, "lk")
        return cls.from_indices(np.zeros(lq + 1, np.int64), np.zeros(0, np.int64), (lq, lk))

    @classmethod
    def stack(cls, masks: Sequence[Sequence]) -> Mask:
        """One mask per (batch, head) group: ``masks[b][h]`` for a ``(Bm, Hm)`` grid.

        Each entry is a 2-D `Mask` (or a boolean array or CSR, converted as by
        :meth:`from_dense` / :meth:`from_csr`); all must share ``(Lq, Lk)``. For
        one mask per head shared by every batch element, pass ``[per_head]``.
        """
        if isinstance(masks, (Mask, np.ndarray)) or sp.issparse(masks):
            raise RefattnError(
                "Mask.stack: expected a nested sequence masks[b][h] of 2-D masks, "
                f"got {type(masks).__name__}"
            )
        try:
            rows = list(masks)
            grid = [list(r) for r in rows]
        except TypeError:
            raise RefattnError(
                "Mask.stack: expected a nested sequence masks[b][h] of 2-D masks") from None
        if not rows or any(isinstance(r, (Mask, np.ndarray)) or sp.issparse(r) for r in rows):
            raise RefattnError(
                "Mask.stack: expected a non-empty nested sequence masks[b][h] "
                "(for one mask per head, pass [per_head])"
            )
        hm = len(grid[0])
        if hm == 0 or any(len(r) != hm for r in grid):
            raise RefattnError(
                f"Mask.stack: every row of masks[b][h] must have the same non-zero length; "
                f"got lengths {[len(r) for r in grid]}"
            )
        groups = []
        shape = None
        for bi, r in enumerate(grid):
            for hi, m in enumerate(r):
                if not isinstance(m, Mask):
                    m = cls.from_csr(m) if sp.issparse(m) else cls.from_dense(m)
                if m.ndim != 2:
                    raise RefattnError(
                        f"Mask.stack: masks[{bi}][{hi}] must be 2-D, got shape {m.shape}"
                    )
                if shape is None:
                    shape = m.shape
                elif m.shape != shape:
                    raise RefattnError(
                        f"Mask.stack: masks[{bi}][{hi}] has shape {m.shape}, "
                        f"expected {shape} like masks[0][0]"
                    )
                groups.append(m._groups[0])
        return cls(tuple(groups), (len(grid), hm), shape, 4, _PRIVATE)

    # ---- properties ---------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """2 for a single ``(Lq, Lk)`` mask, 4 for a ``(Bm, Hm, Lq, Lk)`` stack."""
        return self._ndim

    @property
    def shape(self) -> tuple[int, ...]:
        """``(Lq, Lk)`` or ``(Bm, Hm, Lq, Lk)``."""
        return self._matrix_shape if self._ndim == 2 else self._group_shape + self._matrix_shape

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """``(Lq, Lk)``, the shape of every group's matrix."""
        return self._matrix_shape

    @property
    def group_shape(self) -> tuple[int, int]:
        """``(Bm, Hm)``; ``(1, 1)`` for a 2-D mask."""
        return self._group_shape

    @property
    def csr(self) -> sp.csr_array:
        """The read-only CSR of a mask with a single group."""
        if len(self._groups) != 1:
            raise RefattnError(
                f"Mask.csr: this mask has {self._group_shape[0]}x{self._group_shape[1]} groups; "
                "use .group(b, h)"
            )
        return self._groups[0]

    @property
    def nnz(self) -> int:
        """Allowed entries, summed over the stored groups."""
        return int(sum(g.nnz for g in self._groups))

    @property
    def density(self) -> float:
        """``nnz / (groups * Lq * Lk)``: the fraction of allowed entries."""
        lq, lk = self._matrix_shape
        return self.nnz / (len(self._groups) * lq * lk)

    def group(self, b: int, h: int) -> sp.csr_array:
        """The CSR used by batch ``b``, query head ``h`` (size-1 axes broadcast, so any
        ``b >= 0`` is accepted when ``Bm == 1``; negative indices are errors)."""
        bm, hm = self._group_shape
        for val, n, nm in ((b, bm, "b"), (h, hm, "h")):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0 or (n > 1 and val >= n):
                limit = "any int >= 0 (the axis broadcasts)" if n == 1 else f"an int in [0, {n})"
                raise RefattnError(f"Mask.group: {nm} must be {limit}, got {val!r}")
        return self._groups[(b if bm > 1 else 0) * hm + (h if hm > 1 else 0)]

    def iter_groups(self) -> Iterator[tuple[int, int, sp.csr_array]]:
        """Yield ``(b, h, csr)`` over the stored groups, row-major."""
        bm, hm = self._group_shape
        for i, g in enumerate(self._groups):
            yield i // hm, i % hm, g

    def row_counts(self, b: int = 0, h: int = 0) -> np.ndarray:
        """Allowed keys per query row of group ``(b, h)`` (int64, length Lq)."""
        return np.diff(self.group(b, h).indptr).astype(np.int64)

    def to_dense(self) -> np.ndarray:
        """The boolean array of shape :attr:`shape` (O(Lq * Lk): for small masks)."""
        dense = np.stack([g.toarray() for g in self._groups])
        return dense.reshape(self.shape)

    def check_compatible(self, batch: int, heads: int, lq: int, lk: int) -> None:
        """Raise `RefattnError` unless this mask fits q of (batch, heads, lq, .) and k of lk."""
        if self._matrix_shape != (lq, lk):
            raise RefattnError(
                f"mask: shape (Lq, Lk) = {self._matrix_shape} does not match q and k, "
                f"which need ({lq}, {lk})"
            )
        bm, hm = self._group_shape
        if bm not in (1, batch) or hm not in (1, heads):
            raise RefattnError(
                f"mask: group shape (Bm, Hm) = ({bm}, {hm}) does not broadcast to "
                f"(batch, heads) = ({batch}, {heads}); each must be 1 or equal"
            )

    # ---- set algebra -----------------------------------------------------------------
    def _combine(self, other: Mask, op: str) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        if self._matrix_shape != other._matrix_shape:
            raise RefattnError(
                f"mask {op}: shapes (Lq, Lk) differ: {self._matrix_shape} and {other._matrix_shape}"
            )
        (ba, ha), (bb, hb) = self._group_shape, other._group_shape
        if ba not in (1, bb) and bb not in (1, ba) or ha not in (1, hb) and hb not in (1, ha):
            raise RefattnError(
                f"mask {op}: group shapes {self._group_shape} and {other._group_shape} do not broadcast"
            )
        grid = [[Mask._single(_set_op(self.group(b, h), other.group(b, h), op))
                 for h in range(max(ha, hb))] for b in range(max(ba, bb))]
        if self._ndim == 2 and other._ndim == 2:
            return grid[0][0]
        return Mask.stack(grid)

    def __or__(self, other: Mask) -> Mask:
        """Union: an entry allowed by either mask."""
        return self._combine(other, "|")

    def __and__(self, other: Mask) -> Mask:
        """Intersection: an entry allowed by both masks."""
        return self._combine(other, "&")

    def __sub__(self, other: Mask) -> Mask:
        """Difference: an entry allowed by this mask and not by ``other``."""
        return self._combine(other, "-")

    # ---- value semantics --------------------------------------------------------------
    def __eq__(self, other) -> bool:
        if not isinstance(other, Mask):
            return NotImplemented
        if self.shape != other.shape:
            return False
        return all(
            np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
            for a, b in zip(self._groups, other._groups)
        )

    __hash__ = None  # equal by structure; unhashable, as numpy and scipy arrays are

    def __repr__(self) -> str:
        return f"Mask(shape={self.shape}, nnz={self.nnz}, density={self.density:.4g})"

    # ---- block layouts (refattn/blocks.py, spec/blocks.md) ------------------------------
    def blocks(self, block_q: int, block_k: int | None = None):
        """The non-empty ``block_q x block_k`` tiles of every group, each full or partial
        (a `refattn.blocks.BlockLayout`); ``block_k`` defaults to ``block_q``."""
        return _blocks.blocks(self, block_q, block_k)

    def to_layout(self, block_q: int, block_k: int | None = None, *, heads: int | None = None):
        """The block-sparse layout ``[H, nbq, nbk]`` (int64, 1 where a tile is non-empty)
        of DeepSpeed / Triton block-sparse kernels; see `refattn.blocks.to_layout`."""
        return _blocks.to_layout(self, block_q, block_k, heads=heads)

    def to_flex_block_mask(self, block_size=128, *, batch: int | None = None,
                           heads: int | None = None):
        """The fields of PyTorch FlexAttention's ``BlockMask`` as NumPy arrays (a
        `refattn.blocks.FlexBlockArrays`); see `refattn.blocks.to_flex_block_mask`."""
        return _blocks.to_flex_block_mask(self, block_size, batch=batch, heads=heads)


_PRIVATE = object()


def _set_op(a: sp.csr_array, b: sp.csr_array, op: str) -> sp.csr_array:
    """Union, intersection or difference of two canonical boolean CSRs, in O(Lq + nnz)
    by a compiled merge of each row's sorted indices (`refattn._csr_merge`)."""
    code = {"|": UNION, "&": INTERSECTION, "-": DIFFERENCE}[op]
    lk = a.shape[1]
    indptr, indices = merge(code, a.indptr, a.indices, b.indptr, b.indices,
                            lambda nnz: _index_dtype(nnz, lk))
    return Mask._from_canonical(indptr, indices, a.shape).csr


def _parse_matrix_shape(shape, what: str) -> tuple[int, int]:
    try:
        lq, lk = shape
    except (TypeError, ValueError):
        raise RefattnError(f"{what} must be a pair (Lq, Lk), got {shape!r}") from None
    return check_dim(lq, f"{what}[0] (Lq)"), check_dim(lk, f"{what}[1] (Lk)")
