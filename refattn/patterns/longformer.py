"""Longformer (Beltagy et al., 2020): a sliding window, optionally dilated, plus global
tokens both ways (spec/patterns.md)."""

from __future__ import annotations

from dataclasses import dataclass

from ..mask import Mask
from .base import Pattern, check_int, keep, register
from .global_tokens import GlobalTokens
from .windows import DilatedSlidingWindow


@register
@dataclass(frozen=True)
class Longformer(Pattern):
    """``w = window // 2`` keys on each side of ``i'`` (``2 w + 1`` with the diagonal),
    spaced ``dilation`` apart: ``|j - i'| <= w * dilation`` and ``(j - i') % dilation == 0``;
    or ``i`` or ``j`` in ``global_indices``."""

    window: int
    dilation: int = 1
    global_indices: tuple = ()
    name = "longformer"

    def __post_init__(self):
        keep(self, "window", check_int, "longformer.window", 0)
        keep(self, "dilation", check_int, "longformer.dilation", 1)
        glob = GlobalTokens(self.global_indices)      # validates and sorts the indices
        object.__setattr__(self, "global_indices", glob.indices)

    def _build(self, lq: int, lk: int) -> Mask:
        span = self.window // 2 * self.dilation
        m = DilatedSlidingWindow(span, span, self.dilation).mask(lq, lk)
        return m | GlobalTokens(self.global_indices).mask(lq, lk) if self.global_indices else m
