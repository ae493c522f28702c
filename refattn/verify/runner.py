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

import math
from pathlib import Path

import numpy as np

from .. import golden
from ..errors import RefattnError
from ..golden.trust import load_case
from ..mask import Mask
from .frame import FRAMEWORKS, LAYOUTS, Frame, dense_size_problem, is_causal_top_left, per_bh_dense, rebuild_mask
from .impl import Impl, Unsupported, accepts, failure, outputs
from .verdict import CaseVerdict, TensorVerdict, compare

DTYPES = golden.INPUT_DTYPES


def verify_case(impl: Impl, golden_dir, entry: dict, dtype: str = "float32", layout: str = "bhsd",
                framework: str = "numpy") -> CaseVerdict:
    """Run ``impl`` on one case and judge it (spec/tolerance.md). The case is read as from
    an untrusted folder (`refattn.golden.trust`): a case that fails its checks is this
    case's ERROR, before the implementation is called."""
    try:
        return _verify_case(impl, golden_dir, entry, dtype, layout, framework)
    except (KeyError, IndexError, ValueError, TypeError, OverflowError, MemoryError) as e:
        # the last resort for a case the checks let through that still cannot be set up:
        # its ERROR, never the end of the run (the implementation's own failures are caught inside)
        return CaseVerdict(golden.entry_id(entry), "error", f"the suite: the case cannot be set up: "
                                                            f"{type(e).__name__}: {e}")


def _verify_case(impl: Impl, golden_dir, entry: dict, dtype: str, layout: str, framework: str) -> CaseVerdict:
    cid = golden.entry_id(entry)
    try:
        arrays = load_case(golden_dir, entry)
        mask = rebuild_mask(arrays, entry)
        if dtype not in entry["allowed"]:
            raise RefattnError(f"case {cid}: the manifest has no allowed errors for {dtype}")
    except RefattnError as e:
        return CaseVerdict(cid, "error", f"the suite: {e}")
    frame = Frame(framework, layout, dtype)
    bias = entry["bias"]
    s = entry["shape"]
    B, H = s["B"], s["H"]
    kwargs: dict = {"scale": entry["scale"]}
    form = impl.mask_form
    if form == "csr":
        kwargs["mask"] = mask
    elif form == "causal":
        causal = is_causal_top_left(mask)
        if causal is None:
            return CaseVerdict(cid, "unsupported", "mask is neither dense nor top-left causal")
        kwargs["mask"] = causal
    else:
        why = dense_size_problem("the mask", (*mask.group_shape, *mask.matrix_shape),
                                 '; take the mask as csr (mask_form = "csr")')
        if why is not None:
            return CaseVerdict(cid, "unsupported", why)
        dense = mask.to_dense()
        dense = dense.reshape((1, 1) + dense.shape) if dense.ndim == 2 else dense
        if form == "flex":
            kwargs["mask"] = mask.to_flex_block_mask(getattr(impl.forward, "flex_block", 128), batch=B, heads=H)
            kwargs["mask_dense"] = frame.tensor(dense)
        else:
            kwargs["mask"] = frame.tensor(dense)
    for kind, what in (((bias or {}).get("kind") == "sparse", "the sparse bias"),
                       (entry["dropout_p"] is not None, "the dropout keep-mask")):
        why = dense_size_problem(what, (B, H, *mask.matrix_shape)) if kind else None
        if why is not None:
            return CaseVerdict(cid, "unsupported", why)
    if entry["softcap"] is not None:
        kwargs["softcap"] = entry["softcap"]
    if bias is not None and bias["kind"] == "dense":
        kwargs["bias"] = frame.tensor(arrays["bias"])
    elif bias is not None and bias["kind"] == "sparse":
        kwargs["bias"] = frame.tensor(per_bh_dense(arrays["bias_values"], arrays["bias_offsets"], mask, B, H,
                                                    np.float64))
    elif bias is not None:
        kwargs["alibi_slopes"] = frame.tensor(arrays["alibi_slopes"], cast=False)
        kwargs["alibi_align"] = bias["align"]
    if entry["dropout_p"] is not None:
        kwargs["dropout_p"] = entry["dropout_p"]
        kwargs["dropout_keep"] = frame.tensor(per_bh_dense(arrays["dropout_keep"], arrays["dropout_offsets"],
                                                            mask, B, H, np.uint8).astype(bool))
    fixed = {"scale", "mask"}
    missing = set(kwargs) - fixed - accepts(impl.forward, set(kwargs) - fixed)
    if missing:
        return CaseVerdict(cid, "unsupported", f"forward takes no {', '.join(sorted(missing))}")
    q, k, v = (frame.tensor(arrays[n], seq=True) for n in ("q", "k", "v"))
    handed = {"q": q, "k": k, "v": v, **{n: kwargs[n] for n in _ARRAY_KWARGS if n in kwargs}}
    inputs = snapshot(frame, handed)
    allowed = entry["allowed"][dtype]
    empty_rows = np.stack([mask.row_counts(b, h) == 0 for b in range(B) for h in range(H)]).reshape(B, H, -1)
    try:
        got = outputs(impl.forward(q, k, v, **kwargs), ("out", "lse"))
    except Unsupported as e:
        return CaseVerdict(cid, "unsupported", str(e) or "forward raised Unsupported")
    except KeyboardInterrupt:
        raise
    except BaseException as e:  # noqa: B036  the implementation's failure, sys.exit included, is a verdict
        message, tb = failure(e, impl.forward, "forward")
        return CaseVerdict(cid, "error", message, traceback=tb)
    verdicts = [judge(frame, "out", got["out"], arrays["out"], allowed["out"], empty_rows, seq=True),
                judge(frame, "lse", got["lse"], arrays["lse"], allowed["lse"], None)]
    verdicts += modified(frame, inputs, "forward")
    if impl.backward is not None:
        bkw = dict(kwargs)
        if entry["dlse"]:
            bkw["dlse"] = frame.tensor(arrays["dlse"])
            if "dlse" not in accepts(impl.backward, {"dlse"}):
                return CaseVerdict(cid, "unsupported", "backward takes no dlse", verdicts)
        # the forward's own LSE; the golden one (in the dtype) when the forward gives none
        lse_in = got["lse"] if got["lse"] is not None else frame.tensor(arrays["lse"])
        dout = frame.tensor(arrays["dout"], seq=True)
        inputs = snapshot(frame, {**handed, "out": got["out"], "lse": lse_in, "dout": dout,
                                  **({"dlse": bkw["dlse"]} if "dlse" in bkw else {})})
        try:
            g = outputs(impl.backward(q, k, v, got["out"], lse_in, dout, **bkw), ("dq", "dk", "dv", "dbias"))
        except Unsupported as e:
            return CaseVerdict(cid, "unsupported", str(e) or "backward raised Unsupported", verdicts)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # noqa: B036
            message, tb = failure(e, impl.backward, "backward")
            return CaseVerdict(cid, "error", message, verdicts, traceback=tb)
        for name in ("dq", "dk", "dv"):
            verdicts.append(judge(frame, name, g[name], arrays[name], allowed[name],
                                  empty_rows if name == "dq" else None, seq=True))
        if bias is not None:
            if bias["kind"] == "sparse":                    # the gradient on the mask's nonzeros
                verdicts.append(judge(frame, "dbias", g["dbias"], arrays["dbias_values"], allowed["dbias"], None,
                                      on_nonzeros=mask))
            else:
                verdicts.append(judge(frame, "dbias", g["dbias"], arrays.get("dbias"), allowed["dbias"], None))
        verdicts += modified(frame, inputs, "backward")
    failed = next((t for t in verdicts if not t.ok), None)
    return CaseVerdict(cid, "fail" if failed else "pass", "", verdicts)


#: The keyword arguments that are arrays an implementation could write into.
_ARRAY_KWARGS = ("mask", "mask_dense", "bias", "alibi_slopes", "dropout_keep")


def snapshot(frame: Frame, arrays: dict) -> dict:
    """``{name: (the object handed over, a copy of its values)}`` for the arrays among ``arrays``."""
    copies = {name: (x, frame.copy(x)) for name, x in arrays.items()}
    return {name: pair for name, pair in copies.items() if pair[1] is not None}


def modified(frame: Frame, inputs: dict, who: str) -> list[TensorVerdict]:
    """A failing verdict for each input whose values ``who`` changed in place (spec/verify.md)."""
    return [TensorVerdict(name, math.inf, 0.0, False, f"modified in place by the {who}: an implementation "
                          "must not write into its inputs")
            for name, (x, before) in inputs.items() if not frame.same(x, before)]


def judge(frame: Frame, name: str, got, gold: np.ndarray, allowed: float, empty, *, seq: bool = False,
          on_nonzeros: Mask | None = None) -> TensorVerdict:
    """One returned tensor against the gold (`compare`); something that is no array of real
    numbers fails with the reason. ``on_nonzeros``: a dense ``(B, H, Lq, Lk)`` result is
    judged on that mask's entries (a sparse bias's gradient), in CSR order."""
    try:
        value = frame.back(got, name, seq=seq)
        if value is not None and on_nonzeros is not None and value.ndim == 4:
            nb, nh = value.shape[:2]
            if value.shape[2:] != on_nonzeros.matrix_shape:
                raise RefattnError(f"{name}: shape {value.shape}, expected (B, H, Lq, Lk) or the values on the "
                                   f"mask's entries {gold.shape}")
            value = np.concatenate([value[b, h][on_nonzeros.group(b, h).toarray()]
                                    for b in range(nb) for h in range(nh)])
    except RefattnError as e:
        return TensorVerdict(name, math.inf, allowed, False, str(e))
    return compare(name, value, gold, allowed, empty)


def plan(golden_dir=None, dtype: str = "float32", expr: str | None = None, layout: str = "bhsd",
         framework: str = "numpy") -> tuple[Path, list[dict]]:
    """The suite's folder (``golden_dir``, else the rule of `refattn.golden.locate`) and its
    manifest entries selected by ``expr``, after checking the run's options."""
    if dtype not in DTYPES:
        raise RefattnError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise RefattnError(f"--layout must be one of {LAYOUTS}, got {layout!r}")
    if framework not in FRAMEWORKS:
        raise RefattnError(f"--framework must be one of {FRAMEWORKS}, got {framework!r}")
    gdir = golden.resolve_golden_dir(golden_dir)
    return gdir, golden.select_entries(golden.load_manifest(gdir)["cases"], expr, str(gdir))


def verify(impl: Impl, golden_dir=None, dtype: str = "float32", expr: str | None = None,
           layout: str = "bhsd", framework: str = "numpy", progress=None) -> list[CaseVerdict]:
    """Every (selected) case of the suite in ``golden_dir`` (default: `refattn.golden.locate`'s
    rule). ``progress(i, n, case_id)`` is called before each case and once at the end."""
    gdir, entries = plan(golden_dir, dtype, expr, layout, framework)
    results = []
    for i, entry in enumerate(entries):
        if progress is not None:
            progress(i, len(entries), golden.entry_id(entry))
        results.append(verify_case(impl, gdir, entry, dtype, layout, framework))
    if progress is not None:
        progress(len(entries), len(entries), "")
    return results
