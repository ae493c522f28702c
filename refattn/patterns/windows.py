"""Patterns whose rows are one or two contiguous key ranges around the aligned query
position ``i' = i + offset`` (spec/patterns.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..alignment import DEFAULT_ALIGN, check_align
from ..errors import RefattnError
from ..mask import Mask
from .base import (Pattern, check_bool, check_int, keep, query_positions, register,
                   rows_from_prefix_and_range, rows_from_progressions, rows_from_ranges)


@register
@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """``-left <= j - i' <= right``: ``left + right + 1`` keys away from the edges
    (``left`` does not count the diagonal, as FlashAttention's ``window_size``)."""

    left: int
    right: int
    align: str = DEFAULT_ALIGN
    name = "sliding_window"

    def __post_init__(self):
        keep(self, "left", check_int, "sliding_window.left")
        keep(self, "right", check_int, "sliding_window.right")
        check_align(self.align, "sliding_window.align")

    def _build(self, lq: int, lk: int) -> Mask:
        ip = query_positions(lq, lk, self.align)
        return rows_from_ranges(ip - self.left, ip + self.right + 1, lq, lk)


@register
@dataclass(frozen=True)
class DilatedSlidingWindow(Pattern):
    """Within the window ``-left <= j - i' <= right`` and ``(j - i') % dilation == 0``
    (Longformer's dilation: the window spans ``left`` positions, not ``left`` keys)."""

    left: int
    right: int
    dilation: int
    align: str = DEFAULT_ALIGN
    name = "dilated_sliding_window"

    def __post_init__(self):
        keep(self, "left", check_int, "dilated_sliding_window.left")
        keep(self, "right", check_int, "dilated_sliding_window.right")
        keep(self, "dilation", check_int, "dilated_sliding_window.dilation", 1)
        check_align(self.align, "dilated_sliding_window.align")

    def _build(self, lq: int, lk: int) -> Mask:
        d = self.dilation
        ip = query_positions(lq, lk, self.align)
        # j = i' + d t: the window gives -(left // d) <= t <= right // d, and 0 <= j < Lk gives
        # ceil(-i' / d) <= t <= floor((Lk - 1 - i') / d).
        t_lo = np.maximum(-(self.left // d), -(ip // d))
        t_hi = np.minimum(self.right // d, (lk - 1 - ip) // d)
        return rows_from_progressions(ip + d * t_lo, d, t_hi - t_lo + 1, lq, lk)


@register
@dataclass(frozen=True)
class PrefixLM(Pattern):
    """``j < prefix`` or ``j <= i'``: bidirectional over the prefix, causal after it."""

    prefix: int
    name = "prefix_lm"

    def __post_init__(self):
        keep(self, "prefix", check_int, "prefix_lm.prefix")

    def _build(self, lq: int, lk: int) -> Mask:
        ip = query_positions(lq, lk, DEFAULT_ALIGN)
        return rows_from_ranges(np.zeros(lq, np.int64), np.maximum(self.prefix, ip + 1), lq, lk)


@register
@dataclass(frozen=True)
class ChunkedCausal(Pattern):
    """Same chunk (``i' // chunk == j // chunk``) and ``j <= i'``."""

    chunk: int
    name = "chunked_causal"

    def __post_init__(self):
        keep(self, "chunk", check_int, "chunked_causal.chunk", 1)

    def _build(self, lq: int, lk: int) -> Mask:
        ip = query_positions(lq, lk, DEFAULT_ALIGN)
        lo = np.where(ip >= 0, ip // self.chunk * self.chunk, 0)
        return rows_from_ranges(lo, ip + 1, lq, lk)


@register
@dataclass(frozen=True)
class SinkWindow(Pattern):
    """StreamingLLM: causal, and ``j < sinks`` or ``0 <= i' - j < window`` (``window``
    keys including the diagonal)."""

    sinks: int
    window: int
    name = "sink_window"

    def __post_init__(self):
        keep(self, "sinks", check_int, "sink_window.sinks")
        keep(self, "window", check_int, "sink_window.window", 1)

    def _build(self, lq: int, lk: int) -> Mask:
        ip = query_positions(lq, lk, DEFAULT_ALIGN)
        return rows_from_prefix_and_range(np.minimum(self.sinks, ip + 1), ip - self.window + 1, ip + 1, lq, lk)


@register
@dataclass(frozen=True)
class Document(Pattern):
    """Packed sequences: ``i`` and ``j`` in the same document, and ``j <= i`` if ``causal``.

    Give ``lengths`` (document lengths, summing to ``Lq == Lk``) or ``segment_ids``
    (one non-decreasing id per position); exactly one of the two."""

    lengths: tuple | None = None
    segment_ids: tuple | None = None
    causal: bool = False
    name = "document"

    def __post_init__(self):
        if (self.lengths is None) == (self.segment_ids is None):
            raise RefattnError("document: give exactly one of lengths and segment_ids")
        if self.lengths is not None:
            if isinstance(self.lengths, (str, bytes, dict)) or np.ndim(self.lengths) != 1:
                raise RefattnError(f"document.lengths must be a sequence of ints, got {self.lengths!r}")
            vals = tuple(check_int(x, "document.lengths[...]", 1) for x in np.asarray(self.lengths).tolist())
            if not vals:
                raise RefattnError("document.lengths must not be empty")
            object.__setattr__(self, "lengths", vals)
        else:
            ids = np.asarray(self.segment_ids)
            if ids.ndim != 1 or ids.size == 0 or ids.dtype.kind not in "iu":
                raise RefattnError(f"document.segment_ids must be a non-empty 1-D int array, got {self.segment_ids!r}")
            if np.any(np.diff(ids) < 0):
                raise RefattnError("document.segment_ids must be non-decreasing (documents are contiguous)")
            object.__setattr__(self, "segment_ids", tuple(ids.tolist()))
        keep(self, "causal", check_bool, "document.causal")

    def _lengths(self) -> np.ndarray:
        if self.lengths is not None:
            return np.array(self.lengths, np.int64)
        _, counts = np.unique(np.array(self.segment_ids), return_counts=True)
        return counts.astype(np.int64)

    def _build(self, lq: int, lk: int) -> Mask:
        lengths = self._lengths()
        total = int(lengths.sum())
        if not (lq == lk == total):
            raise RefattnError(f"document: the documents cover {total} positions; need Lq == Lk == {total}, "
                               f"got ({lq}, {lk})")
        starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
        ends = np.repeat(np.cumsum(lengths), lengths)
        i = np.arange(lq, dtype=np.int64)
        return rows_from_ranges(starts, i + 1 if self.causal else ends, lq, lk)
