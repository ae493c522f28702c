"""Dropout as an explicit keep-mask (spec/semantics.md, "Dropout").

``O = (P * Z / (1 - p)) V`` with ``Z`` in {0, 1} given on the mask's nonzeros.
The keep-mask is an input, never drawn inside a kernel, so every backend and every
third-party kernel can be fed the same ``Z``. `Dropout.sample` draws one from a
documented seeded generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .errors import RefattnError, check_dim
from .mask import Mask
from .nonzero_values import ValueGrid, as_value_grid


@dataclass(frozen=True, eq=False)
class Dropout:
    """Drop probability ``p`` in ``[0, 1)`` and keep-mask ``keep`` (bool, values on the
    mask's nonzeros: shape ``(nnz,)``, ``(Bz, Hz, nnz)`` or ragged ``keep[b][h]``)."""

    p: float
    keep: object
    grid: ValueGrid = field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "p", _check_p(self.p))
        object.__setattr__(self, "grid", as_value_grid(self.keep, "dropout.keep", "bool"))

    @classmethod
    def sample(cls, p: float, mask: Mask, batch: int, heads: int, seed: int) -> Dropout:
        """Draw a keep-mask of shape ``(batch, heads, nnz)`` (ragged if the mask's groups
        differ in nnz).

        The draw: ``g = numpy.random.Generator(numpy.random.PCG64(seed))``; then for
        b in range(batch), for h in range(heads) in that order,
        ``keep[b][h] = g.random(nnz_bh) >= p``, where ``nnz_bh = mask.group(b, h).nnz``.
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise RefattnError(f"seed must be an int >= 0, got {seed!r}")
        p = _check_p(p)
        if not isinstance(mask, Mask):
            raise RefattnError(f"mask must be a refattn.Mask, got {type(mask).__name__}")
        batch, heads = check_dim(batch, "batch"), check_dim(heads, "heads")
        mask.check_compatible(batch, heads, *mask.matrix_shape)
        g = np.random.Generator(np.random.PCG64(int(seed)))
        keep = [[g.random(mask.group(b, h).nnz) >= p for h in range(heads)] for b in range(batch)]
        if len({len(k) for row in keep for k in row}) == 1:
            return cls(p, np.array(keep, dtype=bool).reshape(batch, heads, -1))
        return cls(p, keep)


def _check_p(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float, np.integer, np.floating)):
        raise RefattnError(f"dropout.p must be a real number in [0, 1), got {p!r}")
    p = float(p)
    if not (0.0 <= p < 1.0) or math.isnan(p):
        raise RefattnError(f"dropout.p must be in [0, 1), got {p}")
    return p
