"""The inputs ``q`` and ``k`` a pattern's ``mask()`` is given, validated once (`Inputs`).

Every pattern takes them (spec/patterns.md): one that ignores their values checks only
their lengths, a content-dependent one reads them (`refattn.patterns.content`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RefattnError
from ..mask import Mask


@dataclass(frozen=True)
class Inputs:
    """Validated ``q`` (B, H, Lq, D) and ``k`` (B, Hkv, Lk, D) in float64 (``k`` None when
    not given); ``single`` when they came as one head, ``(Lq, D)`` and ``(Lk, D)``."""

    q: np.ndarray
    k: np.ndarray | None
    single: bool

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    def kv_head(self, h: int) -> int:
        """The kv head that query head ``h`` reads (spec/semantics.md, GQA)."""
        return h // (self.q.shape[1] // self.k.shape[1])

    @staticmethod
    def check(q, k, lq: int, lk: int, heads: int | None, *, read_values: bool) -> Inputs:
        """Shapes always; dtypes and finiteness only where the values are read."""
        given = q if q is not None else k
        single = hasattr(given, "shape") and len(given.shape) == 2
        arrays = {}
        for name, x, length in (("q", q, lq), ("k", k, lk)):
            if x is None:
                continue
            if not hasattr(x, "shape") or len(x.shape) != (2 if single else 4):
                raise RefattnError(f"pattern mask: q and k must be (B, H, L, D) arrays, or both (L, D) "
                                   f"for one head; got {name} {type(x).__name__} of shape "
                                   f"{getattr(x, 'shape', None)}")
            if x.shape[-2] != length:
                what = "lq" if name == "q" else "lk"
                raise RefattnError(f"pattern mask: {name} has length {x.shape[-2]} but {what} = {length}")
            arrays[name] = x
        if q is not None and k is not None:
            if q.shape[-1] != k.shape[-1]:
                raise RefattnError(f"pattern mask: q and k must share D, got {q.shape[-1]} and {k.shape[-1]}")
            if not single and (q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1]):
                raise RefattnError(f"pattern mask: k {tuple(k.shape)} does not fit q {tuple(q.shape)}: "
                                   "need the same B and H a multiple of Hkv")
        if q is not None and heads is not None and heads != (1 if single else q.shape[1]):
            raise RefattnError(f"pattern mask: heads={heads} but q has {1 if single else q.shape[1]} head(s)")
        if not read_values:
            return Inputs(np.empty((1, 1, lq, 0)), None, single)   # lengths checked, values unused
        if q is None:
            raise RefattnError("pattern mask: this pattern chooses keys from the inputs: pass q=")
        for name, x in arrays.items():
            try:
                a = np.asarray(x)
            except (TypeError, ValueError, RuntimeError) as e:   # e.g. a tensor that requires grad
                raise RefattnError(f"pattern mask: {name} cannot be read as a NumPy array: {e}") from None
            if a.dtype.kind not in "fiu":
                raise RefattnError(f"pattern mask: {name} must hold real numbers, got dtype {a.dtype}")
            a = a.astype(np.float64)
            if not np.isfinite(a).all():
                raise RefattnError(f"pattern mask: {name} has non-finite values; a selection "
                                   "from NaN or inf scores is undefined")
            arrays[name] = a[None, None] if single else a
        return Inputs(arrays["q"], arrays.get("k"), single)

    def need_k(self, name: str) -> np.ndarray:
        if self.k is None:
            raise RefattnError(f"pattern {name!r} reads the keys: pass k= to mask()")
        return self.k

    def finish(self, build) -> Mask:
        """``build(b, h)`` -> the 2-D `Mask` of every group, as one mask."""
        grid = [[build(b, h) for h in range(self.heads)] for b in range(self.batch)]
        return grid[0][0] if self.single else Mask.stack(grid)
