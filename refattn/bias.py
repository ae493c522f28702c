"""Additive score biases (spec/semantics.md, "Bias").

Three kinds, passed as ``bias=``:

* a dense array broadcastable to ``(B, H, Lq, Lk)`` (NumPy broadcasting, so it may
  have fewer than 4 axes);
* `SparseBias`: values on the mask's nonzeros (layout in `refattn.nonzero_values`);
* `ALiBi`: per-head slopes, ``bias[h, i, j] = -slopes[h] * |j - (i + offset)|``.

Masking, not a bias, removes entries: every bias value must be finite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .alignment import DEFAULT_ALIGN, align_offset, check_align
from .errors import RefattnError
from .nonzero_values import ValueGrid, as_value_grid


@dataclass(frozen=True, eq=False)
class SparseBias:
    """A bias given only on the mask's nonzeros.

    ``values``: shape ``(nnz,)`` or ``(Bv, Hv, nnz)``, or the ragged nested form
    ``values[b][h]``; entry ``t`` of group (b, h) is the bias of that group's
    ``t``-th stored entry in CSR order. Its gradient ``dbias`` comes back in the
    same layout.
    """

    values: object
    grid: ValueGrid = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "grid", as_value_grid(self.values, "bias (SparseBias.values)", "float"))


@dataclass(frozen=True, eq=False)
class ALiBi:
    """Attention with Linear Biases (Press et al., 2022).

    ``bias[b, h, i, j] = -slopes[h] * |j - (i + offset)|`` where ``offset`` is 0 for
    ``align="top_left"`` and ``Lk - Lq`` for ``"bottom_right"`` (the default, as
    for causal masks). Under a causal mask this is the paper's ``-m * (i - j)``.
    The gradient ``dbias`` is the gradient with respect to ``slopes`` (shape (H,)).
    """

    slopes: object
    align: str = DEFAULT_ALIGN

    def __post_init__(self):
        s = np.asarray(self.slopes)
        if s.ndim != 1 or s.shape[0] < 1:
            raise RefattnError(f"bias (ALiBi.slopes): expected shape (H,), got {s.shape}")
        if s.dtype.kind not in "fiu" or s.dtype.kind == "b":
            raise RefattnError(f"bias (ALiBi.slopes): expected real numbers, got dtype {s.dtype}")
        s = s.astype(np.float64)
        if not np.all(np.isfinite(s)):
            raise RefattnError(
                f"bias (ALiBi.slopes): non-finite slope at head {int(np.flatnonzero(~np.isfinite(s))[0])}"
            )
        s.flags.writeable = False
        object.__setattr__(self, "slopes", s)
        check_align(self.align, "bias (ALiBi.align)")

    @staticmethod
    def default_slopes(heads: int) -> np.ndarray:
        """The paper's slopes: for ``n`` a power of two, ``2**(-8 k / n)``, k = 1..n;
        otherwise those of the largest power of two ``m < n`` followed by every other
        slope of ``2m`` (the reference implementation's rule)."""
        if isinstance(heads, bool) or not isinstance(heads, (int, np.integer)) or heads < 1:
            raise RefattnError(f"heads must be an int >= 1, got {heads!r}")

        def power_of_two(n):
            return [2.0 ** (-8.0 * k / n) for k in range(1, n + 1)]

        m = 2 ** int(math.floor(math.log2(heads)))
        slopes = power_of_two(m)
        if m < heads:
            slopes += power_of_two(2 * m)[0::2][: heads - m]
        return np.array(slopes, dtype=np.float64)

    def distance(self, rows: slice, lq: int, lk: int) -> np.ndarray:
        """``-|j - (i + offset)|`` on ``(rows, Lk)``: the bias per unit slope, hence also
        the derivative of the bias with respect to a slope."""
        i = np.arange(rows.start, rows.stop, dtype=np.float64)[:, None] + align_offset(self.align, lq, lk)
        j = np.arange(lk, dtype=np.float64)[None, :]
        return -np.abs(j - i)

    def block(self, h: int, rows: slice, lq: int, lk: int) -> np.ndarray:
        """Dense ``(rows, Lk)`` bias of query head ``h`` (oracle use)."""
        return self.slopes[h] * self.distance(rows, lq, lk)
