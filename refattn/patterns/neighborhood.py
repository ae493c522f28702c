"""NATTEN's 2-D neighborhood attention on a row-major ``height x width`` grid
(Hassani et al., 2023; rule as in NATTEN's FlexAttention mask, spec/patterns.md)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RefattnError
from ..mask import Mask
from .base import Pattern, _allocate, _finish, check_bool, check_int, keep, register


def axis_window(x: np.ndarray, length: int, kernel: int, dilation: int, causal: bool):
    """Per coordinate ``x`` on one axis: the first neighbour and how many, spaced ``dilation``.

    Work inside the dilation group ``x % dilation`` (coordinates ``x // dilation``, group
    length ``ceil((length - group) / dilation)``). Non-causal: ``kernel`` neighbours around
    ``x``, the window shifted inward at the edges (its centre clamped to
    ``[kernel // 2, group_length - 1 - right]``). Causal: ``x`` and up to ``kernel - 1``
    neighbours before it, not shifted."""
    group, xg = x % dilation, x // dilation
    if causal:
        lo = np.maximum(xg - kernel + 1, 0)
        count = xg - lo + 1
    else:
        left, right = kernel // 2, kernel // 2 + kernel % 2 - 1
        group_len = (length - group + dilation - 1) // dilation
        lo = np.clip(xg, left, group_len - 1 - right) - left
        count = np.full_like(x, kernel)
    return lo * dilation + group, count


@register
@dataclass(frozen=True)
class Neighborhood2D(Pattern):
    """Query ``(r, c)`` (position ``r * width + c``) attends the ``kernel x kernel``
    neighbourhood (spacing ``dilation``) around it: exactly ``kernel**2`` keys, the window
    shifted inward at the borders; with ``causal``, only keys at or before ``(r, c)`` on
    both axes, not shifted (fewer near the top-left). Needs ``Lq == Lk == height * width``
    and ``kernel * dilation <= min(height, width)``."""

    height: int
    width: int
    kernel: int
    dilation: int = 1
    causal: bool = False
    name = "neighborhood_2d"

    def __post_init__(self):
        for f in ("height", "width", "kernel", "dilation"):
            keep(self, f, check_int, f"neighborhood_2d.{f}", 1)
        keep(self, "causal", check_bool, "neighborhood_2d.causal")
        if self.kernel * self.dilation > min(self.height, self.width):
            raise RefattnError(f"neighborhood_2d: kernel * dilation = {self.kernel * self.dilation} must be "
                               f"<= min(height, width) = {min(self.height, self.width)}")

    def _build(self, lq: int, lk: int) -> Mask:
        n = self.height * self.width
        if not (lq == lk == n):
            raise RefattnError(f"neighborhood_2d: the {self.height} x {self.width} grid has {n} positions; "
                               f"need Lq == Lk == {n}, got ({lq}, {lk})")
        pos = np.arange(n, dtype=np.int64)
        k, d = self.kernel, self.dilation
        r0, nr = axis_window(pos // self.width, self.height, k, d, self.causal)
        c0, nc = axis_window(pos % self.width, self.width, k, d, self.causal)
        t = np.arange(k, dtype=np.int64) * d
        keys = (r0[:, None] + t)[:, :, None] * self.width + (c0[:, None] + t)[:, None, :]
        valid = (t < nr[:, None] * d)[:, :, None] & (t < nc[:, None] * d)[:, None, :]
        indptr, indices = _allocate(nr * nc, lq, lk)
        indices[:] = keys[valid]                  # row-major over (key row, key column): sorted
        return _finish(indptr, indices, lq, lk)
