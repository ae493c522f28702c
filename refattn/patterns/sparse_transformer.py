"""Sparse Transformer patterns (Child et al., 2019): strided and fixed (spec/patterns.md).

Positions are aligned as every pattern without an ``align`` parameter: ``i' = i + Lk - Lq``
(bottom_right); the original code is self-attention, ``Lq = Lk``, where ``i' = i``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..alignment import DEFAULT_ALIGN
from ..errors import RefattnError
from ..mask import Mask
from ._fill import fill_fixed
from .base import (Pattern, _allocate, _finish, check_bool, check_int, keep, query_positions, register,
                   rows_from_progressions, rows_from_ranges)


def _residue_columns(residue: np.ndarray, step: int, last: np.ndarray, lq: int, lk: int) -> Mask:
    """Row i allows ``j = residue[i] + step * t <= last[i]`` (residue in [0, step))."""
    count = np.where(last >= residue, (last - residue) // step + 1, 0)
    return rows_from_progressions(residue, step, count, lq, lk)


def _local(stride: int, lq: int, lk: int) -> Mask:
    ip = query_positions(lq, lk, DEFAULT_ALIGN)
    return rows_from_ranges(ip - stride + 1, ip + 1, lq, lk)


def _dilated(stride: int, causal: bool, lq: int, lk: int) -> Mask:
    ip = query_positions(lq, lk, DEFAULT_ALIGN)
    last = np.minimum(ip, lk - 1) if causal else np.full(lq, lk - 1, np.int64)
    return _residue_columns(ip % stride, stride, last, lq, lk)


@register
@dataclass(frozen=True)
class StridedLocal(Pattern):
    """The local half of strided attention: ``0 <= i' - j < stride`` (causal by
    construction, ``stride`` keys including the diagonal, as the original code's ``local``)."""

    stride: int
    name = "strided_local"

    def __post_init__(self):
        keep(self, "stride", check_int, "strided_local.stride", 1)

    def _build(self, lq: int, lk: int) -> Mask:
        return _local(self.stride, lq, lk)


@register
@dataclass(frozen=True)
class StridedDilated(Pattern):
    """The strided half: ``(i' - j) % stride == 0``, and ``j <= i'`` when ``causal``."""

    stride: int
    causal: bool = True
    name = "strided_dilated"

    def __post_init__(self):
        keep(self, "stride", check_int, "strided_dilated.stride", 1)
        keep(self, "causal", check_bool, "strided_dilated.causal")

    def _build(self, lq: int, lk: int) -> Mask:
        return _dilated(self.stride, self.causal, lq, lk)


@register
@dataclass(frozen=True)
class Strided(Pattern):
    """Strided attention: ``0 <= i' - j < stride`` or ``(i' - j) % stride == 0``, and
    ``j <= i'`` when ``causal`` (the union of ``strided_local`` and ``strided_dilated``)."""

    stride: int
    causal: bool = True
    name = "strided"

    def __post_init__(self):
        keep(self, "stride", check_int, "strided.stride", 1)
        keep(self, "causal", check_bool, "strided.causal")

    def _build(self, lq: int, lk: int) -> Mask:
        return _local(self.stride, lq, lk) | _dilated(self.stride, self.causal, lq, lk)


@register
@dataclass(frozen=True)
class Fixed(Pattern):
    """Fixed attention: ``i' // block == j // block`` or ``j % block >= block - summary``
    (the last ``summary`` columns of every block), and ``j <= i'`` when ``causal``."""

    block: int
    summary: int
    causal: bool = True
    name = "fixed"

    def __post_init__(self):
        keep(self, "block", check_int, "fixed.block", 1)
        keep(self, "summary", check_int, "fixed.summary", 0)
        if self.summary > self.block:
            raise RefattnError(f"fixed.summary must be <= block = {self.block}, got {self.summary}")
        keep(self, "causal", check_bool, "fixed.causal")

    def _build(self, lq: int, lk: int) -> Mask:
        # One compiled pass per row, in key order: O(Lq + nnz), the CSR its only large array.
        ip = query_positions(lq, lk, DEFAULT_ALIGN)
        counts = np.zeros(lq + 1, np.int64)
        args = (ip, np.int64(self.block), np.int64(self.summary), self.causal, np.int64(lk))
        fill_fixed(*args, counts, np.empty(0, np.int64), False)
        indptr, indices = _allocate(counts[1:], lq, lk)
        fill_fixed(*args, indptr, indices, True)
        return _finish(indptr, indices, lq, lk)
