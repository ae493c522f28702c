"""Per-entry values that live on a mask's nonzeros (sparse bias, dropout keep-mask).

Layout (spec/semantics.md, "Values on the mask's nonzeros"): for batch ``b`` and
query head ``h`` the values form a 1-D array aligned with the stored entries of
``mask.group(b, h)`` in CSR order (row by row, columns increasing). A value set
is given either as

* an array of shape ``(nnz,)`` (shared by every (batch, head)) or ``(Bv, Hv, nnz)``
  with ``Bv`` in ``{1, B}`` and ``Hv`` in ``{1, H}``; or
* a nested sequence ``values[b][h]`` of 1-D arrays of shape ``(Bv, Hv)``: the
  ragged form, needed when the groups of a stacked mask differ in nnz.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .errors import RefattnError
from .mask import Mask

#: Floating dtypes accepted for every float input (q, k, v, biases, gradients).
FLOAT_DTYPES = (
    np.dtype(np.float16),
    np.dtype(ml_dtypes.bfloat16),
    np.dtype(np.float32),
    np.dtype(np.float64),
)


@dataclass(frozen=True)
class ValueGrid:
    """Normalised values: ``grid[b][h]`` 1-D arrays over a ``(Bv, Hv)`` grid."""

    grid: tuple[tuple[np.ndarray, ...], ...]
    ragged: bool  # given as nested sequences (gradients come back the same way)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.grid), len(self.grid[0])

    def at(self, b: int, h: int) -> np.ndarray:
        bv, hv = self.shape
        return self.grid[b if bv > 1 else 0][h if hv > 1 else 0]


def as_value_grid(values, name: str, kind: str) -> ValueGrid:
    """Normalise ``values`` (see module docstring); ``kind`` is "float" or "bool"."""
    # values[b][h]: a sequence of sequences; a flat sequence of numbers is the (nnz,) form.
    nested = isinstance(values, (list, tuple)) and len(values) > 0 and all(
        isinstance(r, (list, tuple)) for r in values)
    if not nested or isinstance(values, np.ndarray):
        arr = np.asarray(values)
        if arr.ndim == 1:
            arr = arr[None, None]
        if arr.ndim != 3:
            raise RefattnError(
                f"{name}: expected shape (nnz,) or (Bv, Hv, nnz), or a nested sequence "
                f"[b][h] of 1-D arrays; got shape {arr.shape}"
            )
        grid = tuple(tuple(_leaf(arr[i, j], name, kind, f"[{i}, {j}]")
                           for j in range(arr.shape[1])) for i in range(arr.shape[0]))
        if not grid or not grid[0]:
            raise RefattnError(f"{name}: the (Bv, Hv) grid must not be empty, got shape {arr.shape}")
        return ValueGrid(grid, ragged=False)
    rows = list(values)
    if not rows or not all(isinstance(r, (list, tuple)) for r in rows):
        raise RefattnError(f"{name}: a nested sequence must have the form values[b][h] of 1-D arrays")
    hv = len(rows[0])
    if hv == 0 or any(len(r) != hv for r in rows):
        raise RefattnError(f"{name}: every values[b] must hold the same non-zero number of arrays")
    grid = tuple(tuple(_leaf(np.asarray(x), name, kind, f"[{i}][{j}]") for j, x in enumerate(r))
                 for i, r in enumerate(rows))
    return ValueGrid(grid, ragged=True)


def _leaf(a: np.ndarray, name: str, kind: str, where: str) -> np.ndarray:
    if a.ndim != 1:
        raise RefattnError(f"{name}{where}: expected a 1-D array over the nonzeros, got shape {a.shape}")
    if kind == "bool":
        if a.dtype != np.bool_:
            raise RefattnError(f"{name}{where}: expected dtype bool, got {a.dtype}")
        a = a.copy()  # a private, read-only copy: later writes to the caller's buffer cannot leak in
    else:
        if a.dtype not in FLOAT_DTYPES:
            raise RefattnError(
                f"{name}{where}: dtype must be one of {', '.join(map(str, FLOAT_DTYPES))}; got {a.dtype}")
        a = a.astype(np.float64)
        bad = ~np.isfinite(a)
        if bad.any():
            raise RefattnError(
                f"{name}{where}: non-finite value {a[bad][0]} at index {int(np.flatnonzero(bad)[0])}")
    a.flags.writeable = False
    return a


def check_against_mask(vg: ValueGrid, mask: Mask, batch: int, heads: int, name: str) -> None:
    """Check that the grid broadcasts to (batch, heads) and that every leaf has the nnz
    of the mask group it lies on."""
    bv, hv = vg.shape
    if bv not in (1, batch) or hv not in (1, heads):
        raise RefattnError(
            f"{name}: grid shape (Bv, Hv) = ({bv}, {hv}) does not broadcast to "
            f"(batch, heads) = ({batch}, {heads})"
        )
    for b in range(batch if (bv > 1 or mask.group_shape[0] > 1) else 1):
        for h in range(heads if (hv > 1 or mask.group_shape[1] > 1) else 1):
            n, want = vg.at(b, h).shape[0], mask.group(b, h).nnz
            if n != want:
                raise RefattnError(
                    f"{name}: batch {b}, head {h} has {n} values but the mask group there has "
                    f"nnz = {want}; values must align with the mask's nonzeros in CSR order"
                )
