"""Block-sparse attention from an explicit block layout (spec/patterns.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RefattnError
from ..mask import Mask
from .base import Pattern, check_int, keep, register, rows_from_block_csr


def check_layout(layout, name: str) -> np.ndarray:
    """A read-only boolean ``[nbq, nbk]`` or ``[H, nbq, nbk]`` copy of ``layout`` (bools,
    or integers that are all 0 or 1)."""
    arr = np.array(layout)
    if arr.dtype.kind in "iu" and arr.size and not np.isin(arr, (0, 1)).all():
        raise RefattnError(f"{name} must hold only 0/1 or booleans")
    if arr.dtype.kind not in "biu" or arr.ndim not in (2, 3) or 0 in arr.shape:
        raise RefattnError(f"{name} must be a non-empty boolean array [nbq, nbk] or [H, nbq, nbk], "
                           f"got dtype {arr.dtype} shape {arr.shape}")
    arr = arr.astype(bool)
    arr.flags.writeable = False
    return arr


def mask_from_layout(layout: np.ndarray, block: int, lq: int, lk: int, what: str) -> Mask:
    """The element mask of a 2-D block layout; its shape must be ``(ceil(Lq / block),
    ceil(Lk / block))``."""
    want = (-(-lq // block), -(-lk // block))
    if layout.shape != want:
        raise RefattnError(f"{what}: a layout of shape {layout.shape} does not fit Lq = {lq}, "
                           f"Lk = {lk} with block = {block}; need {want}")
    counts = layout.sum(axis=1)
    bindptr = np.zeros(want[0] + 1, np.int64)
    np.cumsum(counts, out=bindptr[1:])
    return rows_from_block_csr(bindptr, np.nonzero(layout)[1], block, lq, lk)


@register
@dataclass(frozen=True, eq=False)
class BlockSparse(Pattern):
    """Query ``i`` may attend key ``j`` iff ``layout[i // block, j // block]`` (per head
    ``layout[h, ...]`` for a 3-D layout). The layout must have exactly
    ``ceil(Lq / block) x ceil(Lk / block)`` blocks; the last block row and column may be
    shorter than ``block``."""

    layout: np.ndarray
    block: int
    name = "block_sparse"

    def __post_init__(self):
        object.__setattr__(self, "layout", check_layout(self.layout, "block_sparse.layout"))
        keep(self, "block", check_int, "block_sparse.block", 1)

    def __eq__(self, other):
        return (type(other) is type(self) and self.block == other.block
                and self.layout.shape == other.layout.shape and bool(np.array_equal(self.layout, other.layout)))

    def __hash__(self):
        return hash((self.name, self.block, self.layout.shape, self.layout.tobytes()))

    def _build_heads(self, lq: int, lk: int, heads: int | None) -> Mask:
        if self.layout.ndim == 2:
            return mask_from_layout(self.layout, self.block, lq, lk, "block_sparse")
        n_heads = self.layout.shape[0]
        if heads is not None and heads != n_heads:
            raise RefattnError(f"block_sparse: the layout has {n_heads} heads, but heads = {heads}")
        return Mask.stack([[mask_from_layout(lay, self.block, lq, lk, f"block_sparse (head {h})")
                            for h, lay in enumerate(self.layout)]])
