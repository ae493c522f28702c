"""From the suite's float64 BHSD arrays to what an implementation takes, and back.

The mask is rebuilt from the case file's CSR arrays and handed over in the form the
implementation declares; inputs are cast to the verified dtype (exactly: golden inputs lie
on a grid every dtype holds) and laid out as it asks; outputs come back as float64 BHSD.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..errors import RefattnError
from ..mask import Mask

LAYOUTS = ("bhsd", "bshd")
FRAMEWORKS = ("numpy", "torch")


def rebuild_mask(arrays: dict, entry: dict) -> Mask:
    bm, hm = entry["mask"]["groups"]
    lq, lk = entry["shape"]["Lq"], entry["shape"]["Lk"]
    indptr, indices, offsets = arrays["mask_indptr"], arrays["mask_indices"], arrays["mask_offsets"]
    def group(g: int) -> Mask:
        cols = indices[offsets[g]:offsets[g + 1]]
        return Mask.from_csr(sp.csr_array((np.ones(cols.shape[0], bool), cols, indptr[g]), shape=(lq, lk)))
    groups = [[group(b * hm + h) for h in range(hm)] for b in range(bm)]
    return groups[0][0] if (bm, hm) == (1, 1) else Mask.stack(groups)


def per_bh_dense(values: np.ndarray, offsets: np.ndarray, mask: Mask, B: int, H: int, dtype) -> np.ndarray:
    """Values on each (b, h)'s nonzeros (CSR order) as a dense ``(B, H, Lq, Lk)`` array, 0 elsewhere."""
    lq, lk = mask.matrix_shape
    out = np.zeros((B, H, lq, lk), dtype)
    for b in range(B):
        for h in range(H):
            csr = mask.group(b, h)
            rows = np.repeat(np.arange(lq), np.diff(csr.indptr))
            out[b, h, rows, csr.indices] = values[offsets[b * H + h]:offsets[b * H + h + 1]]
    return out


#: The most entries of a dense ``(B, H, Lq, Lk)`` array the verifier builds for an
#: implementation (a dense mask, a sparse bias or dropout keep-mask given densely): past it
#: the case is unsupported in that form, never a huge allocation (spec/verify.md).
MAX_DENSE_ENTRIES = 2**28


def dense_size_problem(what: str, shape: tuple[int, ...], hint: str = "") -> str | None:
    """Why a dense array of ``shape`` is not built, or None."""
    n = 1
    for d in shape:
        n *= int(d)
    if n <= MAX_DENSE_ENTRIES:
        return None
    return f"{what} would be a dense array of {n} entries {tuple(shape)}, more than the verifier builds (2**28){hint}"


def is_causal_top_left(mask: Mask) -> bool | None:
    """True for the top-left causal mask, False for the dense one, None otherwise; decided
    from the CSR in O(Lq) (a canonical row of ``n`` keys that ends at key ``n - 1`` holds
    exactly the keys ``0 .. n - 1``), building nothing the size of ``Lq x Lk``."""
    lq, lk = mask.matrix_shape
    if mask.group_shape != (1, 1):
        return None
    csr = mask.group(0, 0)
    counts = np.diff(csr.indptr)
    nonempty = counts > 0
    starts_at_zero = (csr.indices[csr.indptr[:-1][nonempty]] == 0).all()
    if not (nonempty.all() and starts_at_zero):
        return None
    ends = csr.indices[csr.indptr[1:] - 1]
    if not (ends == counts - 1).all():       # with sorted unique keys: row i holds 0 .. counts[i] - 1
        return None
    if (counts == lk).all():
        return False
    return True if np.array_equal(counts, np.minimum(np.arange(1, lq + 1), lk)) else None


def to_dtype(x: np.ndarray, dtype: str):
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))


class Frame:
    """Conversions between the suite's float64 BHSD arrays and what the implementation takes."""

    def __init__(self, framework: str, layout: str, dtype: str):
        self.framework, self.layout, self.dtype = framework, layout, dtype
        if framework == "torch":
            try:
                import torch
            except ImportError:
                raise RefattnError("--framework torch: torch is not installed") from None
            self.torch = torch

    def tensor(self, x: np.ndarray, *, seq: bool = False, cast: bool = True):
        """An input: cast to the dtype (exact: the golden inputs are on the grid), in the layout."""
        if seq and self.layout == "bshd":
            x = np.ascontiguousarray(np.swapaxes(x, 1, 2))
        if self.framework == "torch":
            torch = self.torch
            if x.dtype == bool:
                return torch.from_numpy(x.copy())
            t = torch.from_numpy(np.asarray(x, np.float64).copy())
            return t.to(getattr(torch, self.dtype)) if cast else t
        return to_dtype(x, self.dtype) if cast and x.dtype != bool else x

    def copy(self, x):
        """A copy of the values of an array handed to the implementation (None for other
        objects, which are not watched)."""
        if isinstance(x, np.ndarray):
            return x.copy()
        if self.framework == "torch" and isinstance(x, self.torch.Tensor):
            return x.detach().clone()
        return None

    def same(self, x, before) -> bool:
        """Whether ``x`` still holds the values copied in ``before``, bit for bit."""
        if isinstance(before, np.ndarray):
            return x.shape == before.shape and x.tobytes() == before.tobytes()
        return bool(x.shape == before.shape and self.torch.equal(x.detach(), before))

    def back(self, x, name: str, *, seq: bool = False) -> np.ndarray | None:
        """An output as a float64 BHSD NumPy array (exact); None stays None. Anything that is
        no array of real numbers (a generator, a complex array, a tensor that cannot be read)
        is a `RefattnError` naming ``name``: it is that tensor's failure, never a value with
        a part dropped."""
        if x is None:
            return None
        try:
            if type(x).__module__.split(".")[0] == "torch":      # any framework: a torch tensor is read
                import torch

                x = x.detach().to("cpu")
                if x.is_complex():
                    raise RefattnError(f"{name}: expected real numbers, got a {x.dtype} tensor")
                x = (x.to(torch.float64) if x.is_floating_point() else x).numpy()
            a = np.asarray(x)
        except RefattnError:
            raise
        except Exception as e:  # noqa: BLE001  whatever the object raises, it is not an array
            raise RefattnError(f"{name}: cannot be read as an array ({type(x).__name__}: {type(e).__name__}: "
                               f"{e})") from None
        if a.dtype.kind not in "fiub":
            raise RefattnError(f"{name}: expected an array of real numbers, got dtype {a.dtype} "
                               f"({type(x).__name__})")
        a = a.astype(np.float64)
        if seq and self.layout == "bshd":
            if a.ndim != 4:
                raise RefattnError(f"{name}: expected a 4-D array in the bshd layout, got shape {a.shape}")
            a = np.swapaxes(a, 1, 2)
        return a
