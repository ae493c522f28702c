"""Assembling the masks of content-dependent patterns straight as CSR.

The selections of spec/patterns.md ("Content-dependent patterns") have three shapes:
rows that take every key with their label (`lsh` without chunks, `routing`), rows that
take a few key ranges (the block selections of `nsa_select` and `moba`) or the top
entries of their candidates (`topk`), and sets of (query, key) pairs (`lsh`'s chunks).
Each is assembled here into a canonical CSR without an ``Lq x Lk`` array: every
temporary has O(nnz + Lq + Lk) entries (lsh's chunks: O(pairs), duplicates included),
and the row-blocked selections hold at most ``ROW_BUDGET`` scores at a time.
"""

from __future__ import annotations

import numpy as np

from ..mask import Mask
from .base import _allocate, _finish

#: Scores the row-blocked selections (topk, the block selections) hold at once.
ROW_BUDGET = 1 << 20


def rows_per_block(width: int) -> int:
    """Rows of ``width`` scores each that fit in ``ROW_BUDGET``."""
    return max(1, ROW_BUDGET // max(width, 1))


def gather_runs(source: np.ndarray, start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """``concat(source[start[r] : start[r] + count[r]] for r)``, in O(total)."""
    count = np.maximum(count, 0).astype(np.int64)
    total = int(count.sum())
    first = np.cumsum(count) - count                          # where each run starts in the output
    pos = np.repeat(np.asarray(start, np.int64) - first, count) + np.arange(total, dtype=np.int64)
    return source[pos]


def from_row_parts(parts, lq: int, lk: int) -> Mask:
    """A 2-D mask from ``(counts, indices)`` parts covering consecutive rows in order;
    each part's indices are sorted and unique within every row."""
    counts = np.concatenate([c for c, _ in parts]) if parts else np.zeros(0, np.int64)
    assert counts.size == lq, (counts.size, lq)
    indptr, indices = _allocate(counts.astype(np.int64), lq, lk)
    at = 0
    for _, idx in parts:
        indices[at:at + idx.size] = idx
        at += idx.size
    return _finish(indptr, indices, lq, lk)


def same_label(label_q: np.ndarray, label_k: np.ndarray, lk: int, limit: np.ndarray | None) -> Mask:
    """Row ``i`` allows every key ``j`` with ``label_k[j] == label_q[i]`` (and, with
    ``limit``, ``j <= limit[i]``). Keys are grouped by a stable sort of their labels, so
    each row is one run of that order, already increasing in ``j``."""
    lq = label_q.size
    order = np.argsort(label_k, kind="stable")
    sorted_labels = label_k[order].astype(np.int64)
    label_q = label_q.astype(np.int64)
    start = np.searchsorted(sorted_labels, label_q, "left")
    if limit is None:
        stop = np.searchsorted(sorted_labels, label_q, "right")
    else:   # (label, key) codes increase along the order: cut each run at its last key <= limit
        code = sorted_labels * (lk + 1) + order
        stop = np.searchsorted(code, label_q * (lk + 1) + np.clip(limit, -1, lk - 1), "right")
    count = np.maximum(stop - start, 0)
    return from_row_parts([(count, gather_runs(order, start, count))], lq, lk)


def expand_ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows of key ranges ``lo[r, m] <= j < hi[r, m]`` (``(R, M)`` arrays, each row's
    ranges increasing and disjoint; ``hi <= lo`` is empty) to ``(counts, indices)``."""
    width = np.maximum(hi - lo, 0)
    counts = width.sum(axis=1)
    return counts, gather_runs(np.arange(int(hi.max(initial=0)) + 1, dtype=np.int64),
                               lo.ravel(), width.ravel())


def from_pairs(rows: np.ndarray, cols: np.ndarray, lq: int, lk: int) -> Mask:
    """The mask of the (query, key) pairs, duplicates allowed, in O(E log E)."""
    code = np.sort(rows.astype(np.int64) * lk + cols)        # by row, then key
    code = code[np.r_[True, code[1:] != code[:-1]]] if code.size else code
    r = code // lk
    counts = np.bincount(r, minlength=lq)
    return from_row_parts([(counts, code - r * lk)], lq, lk)


def top_per_row(indptr: np.ndarray, row: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Which entries of CSR-ordered candidates (keys increasing within each row; ``row``
    the row of each entry) are among their row's ``k`` highest scores, ties to the lower
    key: a stable sort by ``-score`` inside each row keeps the lower key first."""
    order = np.lexsort((-scores, row))                        # by row, then -score, then key
    keep = np.empty(scores.size, bool)
    keep[order] = (np.arange(scores.size) - indptr[row[order]]) < k
    return keep


def top_of_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """The columns of each row's ``k`` highest scores (``k <= width``), ties to the lower
    column, row by row in increasing column: what a stable sort by ``-score`` keeps, found
    in linear time as every score above the row's k-th largest, then the lowest columns
    equal to it."""
    r, width = scores.shape
    if k == 0:
        return np.zeros(0, np.int64)
    kth = np.partition(scores, width - k, axis=1)[:, width - k, None]
    above = scores > kth
    tied = scores == kth
    need = k - above.sum(axis=1, keepdims=True)               # >= 1: the k-th itself
    return np.nonzero(above | (tied & (np.cumsum(tied, axis=1) <= need)))[1]


def drop_self_unless_alone(m: Mask) -> Mask:
    """Remove the diagonal entry ``(i, i)`` of every row that has another key."""
    csr = m.csr
    lq, lk = csr.shape
    indptr = csr.indptr.astype(np.int64)
    counts = np.diff(indptr)
    row = np.repeat(np.arange(lq), counts)
    keep = (csr.indices != row) | (counts[row] == 1)
    return from_row_parts([(np.bincount(row[keep], minlength=lq), csr.indices[keep])], lq, lk)
