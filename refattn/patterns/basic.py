"""The two basic patterns: `Dense` (every key) and `Causal`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..alignment import DEFAULT_ALIGN, align_offset, check_align
from ..mask import Mask
from .base import Pattern, register, rows_from_ranges


@register
@dataclass(frozen=True)
class Dense(Pattern):
    """Query i may attend every key j."""

    name = "dense"

    def _build(self, lq: int, lk: int) -> Mask:
        return Mask.full(lq, lk)


@register
@dataclass(frozen=True)
class Causal(Pattern):
    """Query i may attend key j iff ``j <= i + offset``: offset 0 for ``top_left``,
    ``Lk - Lq`` for ``bottom_right`` (spec/semantics.md, "Alignment"). Under
    bottom_right with ``Lq > Lk`` the first ``Lq - Lk`` rows are empty."""

    align: str = DEFAULT_ALIGN
    name = "causal"

    def __post_init__(self):
        check_align(self.align)

    def _build(self, lq: int, lk: int) -> Mask:
        i = np.arange(lq, dtype=np.int64)
        return rows_from_ranges(np.zeros(lq, np.int64), i + align_offset(self.align, lq, lk) + 1, lq, lk)
