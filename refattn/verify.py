"""Verify a third-party attention implementation against the golden suite.

The calling convention (spec/verify.md) in short. An implementation is a forward function

    forward(q, k, v, *, mask, scale, [softcap], [bias], [alibi_slopes, alibi_align],
            [dropout_p, dropout_keep]) -> out | (out, lse) | {"out": ..., "lse": ...}

and optionally a backward function

    backward(q, k, v, out, lse, dout, *, mask, scale, ..., [dlse]) -> (dq, dk, dv[, dbias]) | dict

Arrays are in the layout ``bhsd`` (default) or ``bshd`` and in the verified dtype, as
NumPy arrays or, with ``framework="torch"``, torch tensors. Keyword arguments the case
does not use are not passed; a case that needs one the function does not accept, or a
mask form it cannot take, is *unsupported* (never passed). The function declares the
mask form it takes with an attribute ``mask_form``: ``"csr"`` (a `refattn.Mask`),
``"dense"`` (a boolean ``(Bm, Hm, Lq, Lk)`` array, the default), ``"flex"`` (a
`refattn.blocks.FlexBlockArrays` with ``block_size`` from the attribute ``flex_block``,
plus the dense array as ``mask_dense``) or ``"causal"`` (``mask`` is a bool: causal with
the top-left alignment, as ``is_causal`` in PyTorch; other masks are unsupported). It may
also raise `Unsupported` itself.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from . import golden
from .golden import select_entries
from .errors import RefattnError
from .mask import Mask

MASK_FORMS = ("csr", "dense", "flex", "causal")
LAYOUTS = ("bhsd", "bshd")
FRAMEWORKS = ("numpy", "torch")
DTYPES = ("float64", "float32", "float16", "bfloat16")


class Unsupported(Exception):
    """Raised by an implementation for a case it cannot express (reported, never passed)."""


@dataclass
class Impl:
    """An implementation under test."""

    forward: object
    backward: object | None = None
    name: str = "impl"

    @property
    def mask_form(self) -> str:
        form = getattr(self.forward, "mask_form", "dense")
        if form not in MASK_FORMS:
            raise RefattnError(f"{self.name}: mask_form must be one of {MASK_FORMS}, got {form!r}")
        return form


def load_function(spec: str):
    """``module:function`` (``module:obj.attr`` too) -> the callable."""
    if not isinstance(spec, str) or ":" not in spec:
        raise RefattnError(f"implementation {spec!r}: expected module:function")
    mod_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise RefattnError(f"implementation {spec!r}: cannot import {mod_name!r} ({e})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RefattnError(f"implementation {spec!r}: {mod_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise RefattnError(f"implementation {spec!r} is not callable")
    return obj


def load_impl(forward_spec: str, backward_spec: str | None = None) -> Impl:
    fwd = load_function(forward_spec)
    bwd = load_function(backward_spec) if backward_spec else getattr(fwd, "backward", None)
    return Impl(fwd, bwd, forward_spec)


# ---- one case ---------------------------------------------------------------------------------

@dataclass
class TensorVerdict:
    name: str
    error: float
    allowed: float
    ok: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.error / self.allowed if self.allowed > 0 else (0.0 if self.error == 0 else math.inf)


@dataclass
class CaseVerdict:
    case_id: str
    status: str                      # "pass", "fail", "unsupported", "error"
    message: str = ""
    tensors: list[TensorVerdict] = field(default_factory=list)

    @property
    def first_failure(self) -> TensorVerdict | None:
        return next((t for t in self.tensors if not t.ok), None)

    @property
    def worst(self) -> TensorVerdict | None:
        return max(self.tensors, key=lambda t: t.ratio, default=None)


def _rebuild_mask(arrays: dict, entry: dict) -> Mask:
    bm, hm = entry["mask"]["groups"]
    lq, lk = entry["shape"]["Lq"], entry["shape"]["Lk"]
    indptr, indices, offsets = arrays["mask_indptr"], arrays["mask_indices"], arrays["mask_offsets"]
    def group(g: int) -> Mask:
        cols = indices[offsets[g]:offsets[g + 1]]
        return Mask.from_csr(sp.csr_array((np.ones(cols.shape[0], bool), cols, indptr[g]), shape=(lq, lk)))
    groups = [[group(b * hm + h) for h in range(hm)] for b in range(bm)]
    return groups[0][0] if (bm, hm) == (1, 1) else Mask.stack(groups)


def _per_bh_dense(values: np.ndarray, offsets: np.ndarray, mask: Mask, B: int, H: int, dtype) -> np.ndarray:
    """Values on each (b, h)'s nonzeros (CSR order) as a dense ``(B, H, Lq, Lk)`` array, 0 elsewhere."""
    lq, lk = mask.matrix_shape
    out = np.zeros((B, H, lq, lk), dtype)
    for b in range(B):
        for h in range(H):
            csr = mask.group(b, h)
            rows = np.repeat(np.arange(lq), np.diff(csr.indptr))
            out[b, h, rows, csr.indices] = values[offsets[b * H + h]:offsets[b * H + h + 1]]
    return out


def _is_causal_top_left(mask: Mask) -> bool | None:
    """True for the top-left causal mask, False for the dense one, None otherwise."""
    lq, lk = mask.matrix_shape
    if mask.group_shape != (1, 1):
        return None
    if mask == Mask.full(lq, lk):
        return False
    tril = Mask.from_dense(np.tril(np.ones((lq, lk), bool)))
    return True if mask == tril else None


def _to_dtype(x: np.ndarray, dtype: str):
    import ml_dtypes

    return x.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))


class _Frame:
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
        return _to_dtype(x, self.dtype) if cast and x.dtype != bool else x

    def back(self, x, *, seq: bool = False) -> np.ndarray:
        """An output as a float64 BHSD NumPy array (exact)."""
        if x is None:
            return None
        if self.framework == "torch" and isinstance(x, self.torch.Tensor):
            x = x.detach().to("cpu")
            x = (x.to(self.torch.float64) if x.is_floating_point() else x).numpy()
        x = np.asarray(x).astype(np.float64)
        if seq and self.layout == "bshd":
            x = np.swapaxes(x, 1, 2)
        return x


def _accepts(fn, names: set[str]) -> set[str]:
    """The names among ``names`` that ``fn`` takes as keyword arguments."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set(names)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(names)
    return {n for n in names if n in params}


def _outputs(result, names: tuple[str, ...]) -> dict:
    if isinstance(result, dict):
        return {n: result.get(n) for n in names}
    if isinstance(result, (tuple, list)):
        return {n: (result[i] if i < len(result) else None) for i, n in enumerate(names)}
    return {names[0]: result, **{n: None for n in names[1:]}}


def _compare(name: str, got, gold: np.ndarray, allowed: float, empty: np.ndarray | None) -> TensorVerdict:
    """The rule of spec/tolerance.md for one tensor."""
    if got is None:
        return TensorVerdict(name, 0.0, allowed, True, "not provided")
    if got.shape != gold.shape:
        return TensorVerdict(name, math.inf, allowed, False, f"shape {got.shape}, expected {gold.shape}")
    fin = np.isfinite(gold)
    if not np.array_equal(np.isfinite(got), fin) or (got[~fin] != gold[~fin]).any():
        idx = np.argwhere((np.isfinite(got) != fin) | (~fin & (got != gold)))[0].tolist()
        return TensorVerdict(name, math.inf, allowed, False, f"{got[tuple(idx)]} at {idx}, expected "
                                                               f"{gold[tuple(idx)]}")
    if empty is not None and empty.any():               # rows with no key: exactly 0
        rows = got[empty]
        if (rows != 0).any():
            idx = np.argwhere(empty)[int(np.argwhere((rows != 0).any(axis=-1))[0, 0])].tolist()
            return TensorVerdict(name, math.inf, allowed, False, f"row {idx} has no allowed key: must be 0")
    err = float(np.max(np.abs(got[fin] - gold[fin]), initial=0.0))
    return TensorVerdict(name, err, allowed, err <= allowed)


def verify_case(impl: Impl, golden_dir, entry: dict, dtype: str = "float32", layout: str = "bhsd",
                framework: str = "numpy") -> CaseVerdict:
    """Run ``impl`` on one case and judge it (spec/tolerance.md)."""
    from pathlib import Path

    cid = entry["id"]
    arrays = golden.read_case(Path(golden_dir) / entry["file"])
    frame = _Frame(framework, layout, dtype)
    mask = _rebuild_mask(arrays, entry)
    s = entry["shape"]
    B, H = s["B"], s["H"]
    kwargs: dict = {"scale": entry["scale"]}
    form = impl.mask_form
    if form == "csr":
        kwargs["mask"] = mask
    elif form == "causal":
        causal = _is_causal_top_left(mask)
        if causal is None:
            return CaseVerdict(cid, "unsupported", "mask is neither dense nor top-left causal")
        kwargs["mask"] = causal
    else:
        dense = mask.to_dense()
        dense = dense.reshape((1, 1) + dense.shape) if dense.ndim == 2 else dense
        if form == "flex":
            kwargs["mask"] = mask.to_flex_block_mask(getattr(impl.forward, "flex_block", 128), batch=B, heads=H)
            kwargs["mask_dense"] = frame.tensor(dense)
        else:
            kwargs["mask"] = frame.tensor(dense)
    if entry["softcap"] is not None:
        kwargs["softcap"] = entry["softcap"]
    bias = entry["bias"]
    if bias is not None and bias["kind"] == "dense":
        kwargs["bias"] = frame.tensor(arrays["bias"])
    elif bias is not None and bias["kind"] == "sparse":
        kwargs["bias"] = frame.tensor(_per_bh_dense(arrays["bias_values"], arrays["bias_offsets"], mask, B, H,
                                                    np.float64))
    elif bias is not None:
        kwargs["alibi_slopes"] = frame.tensor(arrays["alibi_slopes"], cast=False)
        kwargs["alibi_align"] = bias["align"]
    if entry["dropout_p"] is not None:
        kwargs["dropout_p"] = entry["dropout_p"]
        kwargs["dropout_keep"] = frame.tensor(_per_bh_dense(arrays["dropout_keep"], arrays["dropout_offsets"],
                                                            mask, B, H, np.uint8).astype(bool))
    fixed = {"scale", "mask"}
    missing = set(kwargs) - fixed - _accepts(impl.forward, set(kwargs) - fixed)
    if missing:
        return CaseVerdict(cid, "unsupported", f"forward takes no {', '.join(sorted(missing))}")
    q, k, v = (frame.tensor(arrays[n], seq=True) for n in ("q", "k", "v"))
    allowed = entry["allowed"][dtype]
    empty_rows = np.stack([mask.row_counts(b, h) == 0 for b in range(B) for h in range(H)]).reshape(B, H, -1)
    try:
        got = _outputs(impl.forward(q, k, v, **kwargs), ("out", "lse"))
    except Unsupported as e:
        return CaseVerdict(cid, "unsupported", str(e) or "forward raised Unsupported")
    except Exception as e:  # the implementation's own failure is a verdict, not a crash
        return CaseVerdict(cid, "error", f"forward raised {type(e).__name__}: {e}")
    out, lse = frame.back(got["out"], seq=True), frame.back(got["lse"])
    verdicts = [_compare("out", out, arrays["out"], allowed["out"], empty_rows),
                _compare("lse", lse, arrays["lse"], allowed["lse"], None)]
    if impl.backward is not None:
        bkw = dict(kwargs)
        if entry["dlse"]:
            bkw["dlse"] = frame.tensor(arrays["dlse"])
            if "dlse" not in _accepts(impl.backward, {"dlse"}):
                return CaseVerdict(cid, "unsupported", "backward takes no dlse", verdicts)
        # the forward's own LSE; the golden one (in the dtype) when the forward gives none
        lse_in = got["lse"] if got["lse"] is not None else frame.tensor(arrays["lse"])
        try:
            g = _outputs(impl.backward(q, k, v, got["out"], lse_in, frame.tensor(arrays["dout"], seq=True), **bkw),
                         ("dq", "dk", "dv", "dbias"))
        except Unsupported as e:
            return CaseVerdict(cid, "unsupported", str(e) or "backward raised Unsupported", verdicts)
        except Exception as e:
            return CaseVerdict(cid, "error", f"backward raised {type(e).__name__}: {e}", verdicts)
        for name in ("dq", "dk", "dv"):
            verdicts.append(_compare(name, frame.back(g[name], seq=True), arrays[name], allowed[name],
                                     empty_rows if name == "dq" else None))
        if bias is not None:
            dbias = frame.back(g["dbias"])
            if dbias is not None and bias["kind"] == "sparse":   # the gradient on the mask's nonzeros
                dbias = np.concatenate([dbias[b, h][mask.group(b, h).toarray()] for b in range(B)
                                        for h in range(H)]) if dbias.ndim == 4 else dbias
                gold = arrays["dbias_values"]
            else:
                gold = arrays.get("dbias")
            verdicts.append(_compare("dbias", dbias, gold, allowed["dbias"], None))
    failed = next((t for t in verdicts if not t.ok), None)
    return CaseVerdict(cid, "fail" if failed else "pass", "", verdicts)


def verify(impl: Impl, golden_dir="golden", dtype: str = "float32", expr: str | None = None,
           layout: str = "bhsd", framework: str = "numpy", progress=None) -> list[CaseVerdict]:
    """Every (selected) case of the suite in ``golden_dir``."""
    if dtype not in DTYPES:
        raise RefattnError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise RefattnError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    if framework not in FRAMEWORKS:
        raise RefattnError(f"--framework must be one of {FRAMEWORKS}, got {framework!r}")
    entries = select_entries(golden.load_manifest(golden_dir)["cases"], expr, str(golden_dir))
    results = []
    for i, entry in enumerate(entries):
        if progress is not None:
            progress(i, len(entries), entry["id"])
        results.append(verify_case(impl, golden_dir, entry, dtype, layout, framework))
    if progress is not None:
        progress(len(entries), len(entries), "")
    return results
