"""Text pictures of masks: one character per cell, or per block above a size."""

from __future__ import annotations

import math

import numpy as np

from .errors import RefattnError
from .mask import Mask


def draw(mask: Mask, *, max_size: int = 64, b: int = 0, h: int = 0) -> str:
    """The mask of group ``(b, h)`` as text, a row of characters per query row.

    ``#`` allowed, ``.`` removed. When ``Lq`` or ``Lk`` exceeds ``max_size``, cells are
    aggregated into blocks so the picture is at most ``max_size`` wide and tall:
    ``#`` a full block, ``+`` a partial one, ``.`` an empty one. O(nnz + picture)."""
    if not isinstance(mask, Mask):
        raise RefattnError(f"draw: expected a refattn.Mask, got {type(mask).__name__}")
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise RefattnError(f"draw: max_size must be an int >= 1, got {max_size!r}")
    csr = mask.group(b, h)
    lq, lk = mask.matrix_shape
    bq, bk = math.ceil(lq / max_size), math.ceil(lk / max_size)
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    rows = np.repeat(np.arange(lq), np.diff(csr.indptr))
    counts = np.zeros((nq, nk), np.int64)
    np.add.at(counts, (rows // bq, csr.indices // bk), 1)
    # cells per block, with the ragged last row/column of blocks
    hq = np.minimum(bq, lq - np.arange(nq) * bq)[:, None]
    hk = np.minimum(bk, lk - np.arange(nk) * bk)[None, :]
    chars = np.where(counts == 0, ".", np.where(counts == hq * hk, "#", "+"))
    return "\n".join("".join(r) for r in chars)
