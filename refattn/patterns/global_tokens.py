"""Global tokens: rows and columns that attend and are attended by everything."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RefattnError
from ..mask import Mask
from .base import MAX_PARAM, Pattern, register


@register
@dataclass(frozen=True)
class GlobalTokens(Pattern):
    """``i in indices or j in indices``. Index ``g`` is a global row when ``g < Lq`` and a
    global column when ``g < Lk``; an index beyond both lengths is an error."""

    indices: tuple
    name = "global_tokens"

    def __post_init__(self):
        try:
            idx = np.asarray(self.indices)
        except (ValueError, TypeError, OverflowError):
            idx = np.asarray([], dtype=object)
        if idx.size == 0 and idx.dtype != object:  # no global token: an empty pattern
            idx = idx.astype(np.int64)
        if idx.ndim != 1 or idx.dtype.kind not in "iu" or (idx.size and not 0 <= idx.min() <= idx.max() <= MAX_PARAM):
            raise RefattnError(f"global_tokens.indices must be a 1-D array of ints in [0, 2**40], got "
                               f"{self.indices!r}")
        if np.unique(idx).size != idx.size:
            raise RefattnError("global_tokens.indices must be unique")
        object.__setattr__(self, "indices", tuple(sorted(idx.tolist())))

    def _build(self, lq: int, lk: int) -> Mask:
        g = np.array(self.indices, dtype=np.int64)
        if g.size and g.max() >= max(lq, lk):
            raise RefattnError(f"global_tokens: index {g.max()} is beyond both Lq = {lq} and Lk = {lk}")
        rows, cols = g[g < lq], g[g < lk]
        is_global = np.zeros(lq, bool)
        is_global[rows] = True
        counts = np.where(is_global, lk, cols.size).astype(np.int64)
        indptr = np.zeros(lq + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        # A global row lists every key (index t); any other row lists the global columns.
        t = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1], counts)
        from_cols = cols[np.minimum(t, cols.size - 1)] if cols.size else t
        indices = np.where(np.repeat(is_global, counts), t, from_cols)
        return Mask.from_indices(indptr, indices, (lq, lk))
