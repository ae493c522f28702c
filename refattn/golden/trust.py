"""A case of a suite from a folder that is not trusted: what must hold before any value in
it is believed (spec/golden-format.md, "Threat model").

`load_case` checks, in this order: the manifest entry's form (`manifest.check_entry`); the
case file, read as a regular file inside the suite's folder and no larger than the entry
says (`casefile.read_confined`); its size and SHA-256 against the entry; its arrays
(`casefile.parse_case`: known dtypes, headers that match their data); the arrays against
the entry (names, shapes, a valid CSR mask); and the allowed errors against the
tolerance formula applied to the entry's own baselines and the stored outputs. A suite
that passes these is the suite its manifest describes; whether its numbers are right is
what ``refattn golden check`` decides, by regenerating every case.
"""

from __future__ import annotations

import numpy as np

from ..errors import RefattnError
from .casefile import parse_case, read_confined, sha256
from .manifest import check_entry
from .routes import leaves
from .tolerance import ATOL_ULPS, EPS, FACTOR

#: How closely a manifest's allowed error must follow from its own baseline (the formula's
#: rounding is far below this).
ALLOWED_RTOL = 1e-9


def _shapes(entry: dict) -> dict[str, tuple[int, ...]]:
    s = entry["shape"]
    B, H, Hkv, Lq, Lk, D, Dv = (s[k] for k in ("B", "H", "Hkv", "Lq", "Lk", "D", "Dv"))
    bm, hm = entry["mask"]["groups"]
    shapes = {"q": (B, H, Lq, D), "k": (B, Hkv, Lk, D), "v": (B, Hkv, Lk, Dv), "dout": (B, H, Lq, Dv),
              "out": (B, H, Lq, Dv), "lse": (B, H, Lq), "dq": (B, H, Lq, D), "dk": (B, Hkv, Lk, D),
              "dv": (B, Hkv, Lk, Dv), "mask_indptr": (bm * hm, Lq + 1), "mask_offsets": (bm * hm + 1,)}
    if entry["dlse"]:
        shapes["dlse"] = (B, H, Lq)
    bias = entry["bias"]
    if bias is not None and bias["kind"] == "alibi":
        shapes["alibi_slopes"] = (H,)
    if bias is not None and bias["kind"] == "dense":
        shapes["bias"] = shapes["dbias"] = tuple(bias.get("shape") or ())
    if bias is not None and bias["kind"] == "sparse":
        shapes["bias_offsets"] = (B * H + 1,)
    if entry["dropout_p"] is not None:
        shapes["dropout_offsets"] = (B * H + 1,)
    return shapes


#: The tensors a case is judged on, by whether it has a bias.
_JUDGED = ("out", "lse", "dq", "dk", "dv")


def check_arrays(arrays: dict, entry: dict) -> None:
    """`RefattnError` unless the case file's arrays are what ``entry`` declares (names, shapes,
    dtypes, a valid CSR, values on the mask's entries that walk its groups)."""
    cid = entry["id"]
    for name, shape in _shapes(entry).items():
        if name not in arrays:
            raise RefattnError(f"case {cid}: the case file has no array {name!r}")
        if arrays[name].shape != shape:
            raise RefattnError(f"case {cid}: array {name!r} has shape {arrays[name].shape}, the manifest "
                               f"declares {shape}")
    for name in ("q", "k", "v", "dout", "out", "dq", "dk", "dv", "dlse", "bias", "dbias", "alibi_slopes"):
        if name in arrays and (arrays[name].dtype != np.float64 or not np.isfinite(arrays[name]).all()):
            raise RefattnError(f"case {cid}: array {name!r} must be finite float64")
    bias = entry["bias"]
    if bias is not None and bias["kind"] == "dense" and len(arrays["bias"].shape) != 4:
        raise RefattnError(f"case {cid}: a dense bias must be a 4-D array broadcastable to (B, H, Lq, Lk)")
    lse = arrays["lse"]
    if lse.dtype != np.float64 or np.isnan(lse).any() or (lse == np.inf).any():
        raise RefattnError(f"case {cid}: array 'lse' must be float64, finite or -inf")
    indptr, offsets = arrays["mask_indptr"], arrays["mask_offsets"]
    indices = arrays.get("mask_indices")
    lq, lk = entry["shape"]["Lq"], entry["shape"]["Lk"]
    if indices is None or indices.ndim != 1 or any(a.dtype != np.int64 for a in (indptr, offsets, indices)):
        raise RefattnError(f"case {cid}: the mask arrays must be int64 (mask_indices 1-D)")
    if (offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != indices.shape[0]
            or (indptr[:, 0] != 0).any() or (np.diff(indptr, axis=1) < 0).any()
            or (indptr[:, -1] != np.diff(offsets)).any() or (indices.size and (indices.min() < 0
                                                                               or indices.max() >= lk))):
        raise RefattnError(f"case {cid}: the mask arrays are not a valid CSR of {lq} x {lk}")
    # values on the mask's entries, per (b, h): offsets must walk the entries of each group
    B, H = entry["shape"]["B"], entry["shape"]["H"]
    bm, hm = entry["mask"]["groups"]
    per_bh = np.array([offsets[(b if bm > 1 else 0) * hm + (h if hm > 1 else 0) + 1]
                       - offsets[(b if bm > 1 else 0) * hm + (h if hm > 1 else 0)]
                       for b in range(B) for h in range(H)], np.int64)
    for values, offs, dtype in (("bias_values", "bias_offsets", np.float64), ("dbias_values", "bias_offsets",
                                                                             np.float64),
                                ("dropout_keep", "dropout_offsets", np.uint8)):
        if offs not in arrays:
            continue
        o, vals = arrays[offs], arrays.get(values)
        if (vals is None or vals.ndim != 1 or vals.dtype != dtype or o.dtype != np.int64 or o[0] != 0
                or not np.array_equal(np.diff(o), per_bh) or o[-1] != vals.shape[0]
                or (dtype == np.float64 and not np.isfinite(vals).all())):
            raise RefattnError(f"case {cid}: {values!r} and {offs!r} are not the values on the mask's entries")


def _check_allowed(arrays: dict, entry: dict) -> None:
    """Each allowed error must be what the tolerance formula gives for the manifest's own
    baseline and the stored tensor (spec/tolerance.md), so that an allowance edited by hand
    (to 1e300, say) is caught. A baseline edited together with it is not: that is for
    ``refattn golden check`` to find."""
    cid = entry["id"]
    base, allowed = entry.get("baselines"), entry["allowed"]
    if not isinstance(base, dict):
        raise RefattnError(f"case {cid}: the manifest has no baselines")
    judged = set(_JUDGED) | ({"dbias"} if entry["bias"] is not None else set())
    for dtype, per in allowed.items():
        if dtype not in FACTOR or not isinstance(base.get(dtype), dict):
            raise RefattnError(f"case {cid}: allowed errors for an unknown dtype {dtype!r}, or without baselines")
        if set(per) != judged:
            raise RefattnError(f"case {cid}: allowed {dtype} must give exactly {sorted(judged)}, got {sorted(per)}")
        for name, value in per.items():
            b = base[dtype].get(name)
            key = "dbias_values" if name == "dbias" and "dbias_values" in arrays else name
            if key not in arrays or not isinstance(b, (int, float)) or isinstance(b, bool) or not b >= 0:
                raise RefattnError(f"case {cid}: allowed {dtype} {name} has no baseline or no stored tensor")
            xs = [x[np.isfinite(x)] for x in leaves(arrays[key])]
            big = max((float(np.max(np.abs(x), initial=0.0)) for x in xs), default=0.0)
            expected = FACTOR[dtype][name] * b + ATOL_ULPS * EPS[dtype] * big
            if not abs(value - expected) <= ALLOWED_RTOL * expected:
                raise RefattnError(f"case {cid}: allowed {dtype} {name} = {value!r} does not follow from its "
                                   f"baseline {b!r} (the formula gives {expected:.6g}); the manifest was edited")


def load_case(golden_dir, entry) -> dict[str, np.ndarray]:
    """The arrays of ``entry``'s case file once everything in the module docstring holds;
    `RefattnError` naming what does not."""
    entry = check_entry(entry)
    data = read_confined(golden_dir, entry["file"], entry["bytes"], f"case {entry['id']}")
    if len(data) != entry["bytes"] or sha256(data) != entry["sha256"]:
        raise RefattnError(f"case {entry['id']}: {entry['file']} is not the file the manifest lists: "
                           f"{len(data)} bytes and SHA-256 {sha256(data)[:16]}..., the manifest says "
                           f"{entry['bytes']} bytes and {entry['sha256'][:16]}... (changed or truncated)")
    arrays = parse_case(data, f"{golden_dir}/{entry['file']}")
    check_arrays(arrays, entry)
    _check_allowed(arrays, entry)
    return arrays
