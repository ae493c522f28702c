"""The one contract every backend implements, and the validation in front of it.

`make_problem` turns the public arguments of ``refattn.forward`` into a validated
`Problem`; `check_backward_inputs` does the same for what ``refattn.backward`` adds.
Backends receive only validated input, so they never re-check it and never see a
value that could silently produce a wrong number (spec/semantics.md, "Validation").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .bias import ALiBi, SparseBias
from .dropout import Dropout
from .errors import RefattnError
from .mask import Mask
from .nonzero_values import FLOAT_DTYPES, check_against_mask

#: Input dtypes every backend accepts for q, k, v.
SUPPORTED_DTYPES = FLOAT_DTYPES


class Result(NamedTuple):
    """Forward result: ``out`` of shape (B, H, Lq, Dv), ``lse`` of shape (B, H, Lq)."""

    out: np.ndarray
    lse: np.ndarray


class Grads(NamedTuple):
    """Backward result. ``dq``, ``dk``, ``dv`` have the shapes of q, k, v; ``dbias``
    has the layout of the bias that was given (None without a bias)."""

    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray
    dbias: object = None


@dataclass(frozen=True, eq=False)
class DenseBias:
    """A dense bias, viewed as 4-D ``(Bb, Hb, Lqb, Lkb)`` (each 1 or full) for broadcasting;
    ``shape`` is the shape the caller gave, which ``dbias`` takes back."""

    values: np.ndarray  # float64, 4-D
    shape: tuple[int, ...]

    def block(self, b: int, h: int, rows: slice, lq: int, lk: int) -> np.ndarray:
        """The ``(rows, Lk)`` slice for batch b, head h (broadcast, read-only view)."""
        bb, hb, lqb, _ = self.values.shape
        x = self.values[b if bb > 1 else 0, h if hb > 1 else 0]
        x = x[rows] if lqb > 1 else x
        return np.broadcast_to(x, (rows.stop - rows.start, lk))


@dataclass(frozen=True, eq=False)
class Problem:
    """Validated inputs of one attention call (shapes as in spec/semantics.md)."""

    q: np.ndarray  # (B, H, Lq, D), a supported dtype, finite
    k: np.ndarray  # (B, Hkv, Lk, D), same dtype
    v: np.ndarray  # (B, Hkv, Lk, Dv), same dtype
    mask: Mask
    scale: float
    softcap: float | None
    bias: DenseBias | SparseBias | ALiBi | None
    dropout: Dropout | None

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def lq(self) -> int:
        return self.q.shape[2]

    @property
    def lk(self) -> int:
        return self.k.shape[2]

    @property
    def dim(self) -> int:
        return self.q.shape[3]

    @property
    def dim_v(self) -> int:
        return self.v.shape[3]

    @property
    def group_size(self) -> int:
        """Query heads per kv head: query head h reads kv head ``h // group_size``."""
        return self.heads // self.kv_heads


def on_cuda_device(x) -> bool:
    """Whether ``x`` is a CUDA device array: CuPy arrays, torch CUDA tensors, Numba device
    arrays (anything with ``__cuda_array_interface__``; a torch tensor that requires grad
    raises on reading it, and counts too)."""
    if isinstance(x, np.ndarray):
        return False
    try:
        getattr(x, "__cuda_array_interface__")
    except AttributeError:
        return False
    except Exception:  # e.g. torch: "Can't get __cuda_array_interface__ on Variable that requires grad"
        return True
    return True


def _as_float_array(x, name: str, *, ndim: int | None = None) -> np.ndarray:
    """``np.asarray(x)`` checked to be a supported floating dtype (and rank). A device
    array is refused, never copied to the host behind the caller's back."""
    if on_cuda_device(x):
        raise RefattnError(f"{name}: a CUDA device array, but this call runs on the host (a host backend, "
                           "or q, k, v on the host); use backend='cuda' with q, k, v on the device, "
                           "or copy it to the host")
    try:
        a = np.asarray(x)
    except Exception as e:  # objects numpy cannot convert
        raise RefattnError(f"{name}: cannot be converted to an array ({e})") from None
    if a.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise RefattnError(f"{name}: dtype must be one of {names}; got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise RefattnError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    return a


def first_nonfinite(a: np.ndarray, allow_neginf: bool = False) -> tuple[int, ...] | None:
    """Index of the first (C order) element of ``a`` that is NaN or infinite (or, with
    ``allow_neginf``, NaN or +inf), or None."""
    bad = ~np.isfinite(a)
    if allow_neginf:
        bad &= ~np.isneginf(a)
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.flatnonzero(bad.ravel())[0]), a.shape))


def require_finite(a, name: str, arrays=None) -> None:
    """Raise `RefattnError` naming ``name`` and the first non-finite index."""
    idx = (arrays or HOST).first_nonfinite(a)
    if idx is not None:
        raise RefattnError(f"{name}: non-finite value {a[idx]} at index {list(idx)}; inputs must be finite")


def first_bad_lse(p: "Problem", lse: np.ndarray) -> tuple[int, int, int] | None:
    """The first ``(b, h, i)`` where ``lse`` is NaN or +inf, or is -inf on a row with
    allowed keys, or not -inf on a row without (spec/backward.md), or None."""
    for b in range(p.batch):
        for h in range(p.heads):
            empty = p.mask.row_counts(b, h) == 0
            row = lse[b, h]
            bad = np.isnan(row) | (row == np.inf) | (np.isneginf(row) != empty)
            if bad.any():
                return b, h, int(np.flatnonzero(bad)[0])
    return None


class HostArrays:
    """Where the arrays of a call live, and the checks made on them there: host memory,
    as NumPy arrays (every backend). A backend that also takes device arrays provides
    an object with these methods for them (``DEVICE_ARRAYS``, e.g. ``cuda``'s)."""

    name = "host"

    def adopt(self, x, name: str, ndim: int | None = None):
        """``x`` as an array of a supported floating dtype (and rank ``ndim``)."""
        return _as_float_array(x, name, ndim=ndim)

    def first_nonfinite(self, a, allow_neginf: bool = False):
        return first_nonfinite(a, allow_neginf)

    def first_bad_lse(self, p: "Problem", lse):
        return first_bad_lse(p, lse)

    def to_backend(self, a):
        """``out``, ``lse``, ``dout`` or ``dlse`` as backends receive them: float64 here."""
        return a.astype(np.float64)


#: The default: arrays in host memory.
HOST = HostArrays()


def _real_number(x, name: str) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise RefattnError(f"{name} must be a real number, got {x!r}")
    try:
        value = float(x)
    except OverflowError:           # an int past float64's range, e.g. 10**400
        raise RefattnError(f"{name} must be finite, got an integer beyond float64's range") from None
    if not math.isfinite(value):
        raise RefattnError(f"{name} must be finite, got {value}")
    return value


def make_problem(q, k, v, mask=None, *, scale=None, softcap=None, bias=None, dropout=None,
                 arrays: HostArrays = HOST) -> Problem:
    """Validate forward arguments (spec/semantics.md) and return a `Problem`; ``q``, ``k``,
    ``v`` are taken and checked where ``arrays`` says (host memory by default)."""
    q = arrays.adopt(q, "q", ndim=4)
    k = arrays.adopt(k, "k", ndim=4)
    v = arrays.adopt(v, "v", ndim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise RefattnError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    for name, a in (("q", q), ("k", k), ("v", v)):
        if min(a.shape) < 1:
            raise RefattnError(f"{name}: every dimension must be >= 1, got shape {a.shape}")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise RefattnError(f"batch: q has B = {B} but k has {k.shape[0]} and v has {v.shape[0]}")
    if k.shape[3] != D:
        raise RefattnError(f"k: head dim D = {k.shape[3]} must equal q's D = {D}")
    if k.shape[1] != v.shape[1] or k.shape[2] != v.shape[2]:
        raise RefattnError(
            f"v: (Hkv, Lk) = {v.shape[1:3]} must equal k's (Hkv, Lk) = {k.shape[1:3]}"
        )
    Hkv, Lk = k.shape[1], k.shape[2]
    if H % Hkv != 0:
        raise RefattnError(f"heads: q has H = {H} heads, k/v have Hkv = {Hkv}; H % Hkv must be 0")
    for name, a in (("q", q), ("k", k), ("v", v)):
        require_finite(a, name, arrays)

    if mask is None:
        mask = Mask.full(Lq, Lk)
    elif not isinstance(mask, Mask):
        raise RefattnError(
            f"mask must be a refattn.Mask (Mask.from_dense / from_csr / a pattern) or None, "
            f"got {type(mask).__name__}"
        )
    mask.check_compatible(B, H, Lq, Lk)

    scale = 1.0 / math.sqrt(D) if scale is None else _real_number(scale, "scale")
    if softcap is not None:
        softcap = _real_number(softcap, "softcap")
        if softcap <= 0:
            raise RefattnError(f"softcap must be > 0 (use None to disable it), got {softcap}")

    bias = _check_bias(bias, mask, B, H, Lq, Lk)

    if dropout is not None:
        if not isinstance(dropout, Dropout):
            raise RefattnError(
                f"dropout must be a refattn.Dropout(p, keep) or None, got {type(dropout).__name__}"
            )
        check_against_mask(dropout.grid, mask, B, H, "dropout.keep")

    return Problem(q, k, v, mask, scale, softcap, bias, dropout)


def _check_bias(bias, mask: Mask, B: int, H: int, Lq: int, Lk: int):
    if bias is None:
        return None
    if isinstance(bias, SparseBias):
        check_against_mask(bias.grid, mask, B, H, "bias (SparseBias.values)")
        return bias
    if isinstance(bias, ALiBi):
        if bias.slopes.shape[0] != H:
            raise RefattnError(
                f"bias (ALiBi.slopes): expected one slope per query head, shape ({H},); "
                f"got {bias.slopes.shape}"
            )
        return bias
    a = _as_float_array(bias, "bias")
    target = (B, H, Lq, Lk)
    if a.ndim > 4 or any(n not in (1, t) for n, t in zip(a.shape[::-1], target[::-1])):
        raise RefattnError(
            f"bias: shape {a.shape} does not broadcast to (B, H, Lq, Lk) = {target}; "
            "each axis must be 1 or full (or pass SparseBias / ALiBi)"
        )
    require_finite(a, "bias")
    values = a.astype(np.float64).reshape((1,) * (4 - a.ndim) + a.shape)
    return DenseBias(values, a.shape)


def check_backward_inputs(p: Problem, out, lse, dout, dlse, arrays: HostArrays = HOST):
    """Validate what backward adds to a `Problem`; return (out, lse, dout, dlse) as
    backends take them (float64 host arrays by default; see ``arrays``)."""
    B, H, Lq, Dv = p.batch, p.heads, p.lq, p.dim_v
    out = arrays.adopt(out, "out", ndim=4)
    dout = arrays.adopt(dout, "dout", ndim=4)
    lse = arrays.adopt(lse, "lse", ndim=3)
    for name, a, want in (("out", out, (B, H, Lq, Dv)), ("dout", dout, (B, H, Lq, Dv)),
                          ("lse", lse, (B, H, Lq))):
        if a.shape != want:
            raise RefattnError(f"{name}: expected shape {want}, got {a.shape}")
    require_finite(out, "out", arrays)
    require_finite(dout, "dout", arrays)
    # LSE is -inf exactly on the rows with no allowed key (spec: "Empty rows"), and finite
    # elsewhere; anything else would make P = exp(S - LSE) meaningless.
    bad = arrays.first_bad_lse(p, lse)
    if bad is not None:
        b, h, i = bad
        what = "has no allowed key, so LSE must be -inf" if p.mask.row_counts(b, h)[i] == 0 else \
            "has allowed keys, so LSE must be finite"
        raise RefattnError(f"lse: lse[{b}, {h}, {i}] = {lse[b, h, i]}, but row {i} {what}")
    if dlse is not None:
        dlse = arrays.adopt(dlse, "dlse", ndim=3)
        if dlse.shape != (B, H, Lq):
            raise RefattnError(f"dlse: expected shape {(B, H, Lq)}, got {dlse.shape}")
        require_finite(dlse, "dlse", arrays)
        dlse = arrays.to_backend(dlse)
    return arrays.to_backend(out), arrays.to_backend(lse), arrays.to_backend(dout), dlse


def check_magnitudes(p: Problem, dtype, dout=None) -> None:
    """The one rule on the size of finite inputs, for every backend alike (spec/semantics.md,
    section 7): a sum that the contract lets a kernel form must not overflow the compute
    dtype ``T``. The forward's running sum adds up to a row's count of allowed keys ``n``
    terms of size up to ``max|v|`` (a tiled kernel's ``sum exp(s - m) v``), so
    ``n * max|v| <= max(T)``; the backward forms ``dP = dO . V`` and ``D = dO . O`` over
    ``Dv`` terms and adds each key's ``P dO`` over up to ``m`` queries (every query head of
    its group), so ``Dv * max|dO| * max|v| <= max(T)`` and ``m * max|dO| <= max(T)``. Past
    that, a `RefattnError` names the tensor: no backend computes, so none returns a number
    another refuses. (Host arrays; a call on device arrays is judged by its results.)"""
    top = float(np.finfo(np.dtype(dtype)).max)
    vmax = _max_abs(p.v)
    rows = max((int(np.diff(csr.indptr).max(initial=0)) for _, _, csr in p.mask.iter_groups()), default=0)
    if vmax * max(rows, 1) > top:
        raise RefattnError(f"v: max|v| = {vmax:.4g} with up to {rows} allowed keys in a row can overflow "
                           f"{np.dtype(dtype).name} in a kernel's running sum (max|v| x keys must be <= {top:.4g}); "
                           "refused on every backend")
    if dout is None:
        return
    dmax = _max_abs(dout)
    if p.dim_v * dmax * vmax > top:
        raise RefattnError(f"dout: max|dout| = {dmax:.4g} times max|v| = {vmax:.4g} over Dv = {p.dim_v} terms can "
                           f"overflow {np.dtype(dtype).name} in dP = dO . V (must be <= {top:.4g}); refused on every "
                           "backend")
    cols = max((int(np.bincount(csr.indices, minlength=p.lk).max(initial=0)) for _, _, csr in p.mask.iter_groups()),
               default=0) * p.group_size
    if dmax * max(cols, 1) > top:
        raise RefattnError(f"dout: max|dout| = {dmax:.4g} summed over up to {cols} queries of a key can overflow "
                           f"{np.dtype(dtype).name} in dv (must be <= {top:.4g}); refused on every backend")


def _max_abs(x) -> float:
    return float(np.max(np.abs(np.asarray(x, np.float64)), initial=0.0))


# ---- dbias layout: shared bookkeeping (the arithmetic that fills it stays per backend) --
def dbias_zeros(p: Problem, dtype=np.float64):
    """Zeros in the layout ``dbias`` takes for ``p.bias``: the dense bias's 4-D view, the
    sparse bias's per-group leaves, ALiBi's ``(H,)`` slopes; None without a bias."""
    if isinstance(p.bias, DenseBias):
        return np.zeros(p.bias.values.shape, dtype)
    if isinstance(p.bias, SparseBias):
        return [[np.zeros(x.shape, dtype) for x in row] for row in p.bias.grid.grid]
    if isinstance(p.bias, ALiBi):
        return np.zeros(p.heads, dtype)
    return None


def dbias_result(p: Problem, dbias):
    """``dbias`` reshaped to the layout the caller gave the bias in."""
    if isinstance(p.bias, DenseBias):
        return dbias.reshape(p.bias.shape)
    if isinstance(p.bias, SparseBias) and not p.bias.grid.ragged:
        return np.array(dbias).reshape(np.shape(p.bias.values))
    return dbias
