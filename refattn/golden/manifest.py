"""``manifest.json``: the suite's header and one entry per case (spec/golden-format.md).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from .._version import __version__
from ..errors import RefattnError
from ..mask import Mask
from .casefile import MAX_CASE_BYTES, MAX_MANIFEST_BYTES, check_relative, read_confined, sha256
from .cases import CASE_ID, GRID_MAX, GRID_STEP, MAX_DIM, Case, id_matches
from .routes import AGREEMENT_BOUND, ROUTES
from .tolerance import ATOL_ULPS, EPS, FACTOR, INPUT_DTYPES, allowed, baselines

SCHEMA_VERSION = 2
FORMAT = "refattn-golden"


def manifest_entry(case: Case, inputs: dict, gold: dict, agree: dict, data: bytes) -> dict:
    """The case's entry in ``manifest.json`` (spec/golden-format.md); ``data`` is its file."""
    mask: Mask = inputs["mask"]
    bias = None
    if case.bias in ("dense", "dense_broadcast"):
        bias = {"kind": "dense", "shape": list(np.shape(inputs["bias"]))}
    elif case.bias == "sparse":
        bias = {"kind": "sparse"}
    elif case.bias is not None:
        bias = {"kind": "alibi", "align": inputs["bias"].align}
    empty = sum(int((mask.row_counts(b, h) == 0).sum()) for b in range(case.B) for h in range(case.H))
    base = baselines(inputs, gold)
    return {
        "id": case.id, "case": case.to_dict(), "group": case.group, "file": f"cases/{case.id}.npz",
        "sha256": sha256(data),
        "bytes": len(data), "pattern": case.pattern.to_dict() if case.pattern is not None else None,
        "shape": case.shape, "seed": case.seed,
        "features": list(case.features) + (["empty_rows"] if empty and "empty_rows" not in case.features else []),
        "scale": float(inputs["scale"]), "softcap": case.softcap, "bias": bias, "dropout_p": case.dropout_p,
        "dlse": case.dlse, "mask": {"groups": list(mask.group_shape), "nnz": int(sum(
            c.nnz for _, _, c in mask.iter_groups())), "empty_rows": empty},
        "input_dtypes": list(INPUT_DTYPES), "agreement": agree, "baselines": base,
        "allowed": allowed(base, gold),
    }


def manifest_header() -> dict:
    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "refattn_version": __version__,
            "routes": list(ROUTES), "agreement_bound": AGREEMENT_BOUND,
            "input_grid": {"step": GRID_STEP, "max_abs": GRID_MAX},
            "tolerance": {"policy": "spec/tolerance.md", "factor": FACTOR, "atol_ulps": ATOL_ULPS, "eps": EPS}}


def load_manifest(golden_dir) -> dict:
    """``manifest.json`` of a suite, read as an untrusted file (`casefile.read_confined`) and
    checked to be one this version reads; its entries are checked one by one, later
    (`check_entry`), so that one malformed entry costs one case."""
    path = Path(golden_dir) / "manifest.json"
    if not path.exists() and not path.is_symlink():
        raise RefattnError(f"golden: no manifest at {path} (generate one: refattn golden generate --out DIR)")
    text = read_confined(golden_dir, "manifest.json", MAX_MANIFEST_BYTES, "golden")
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise RefattnError(f"golden: cannot read {path}: {type(e).__name__}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RefattnError(f"golden: {path} is not a refattn golden manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise RefattnError(f"golden: {path} has schema version {manifest.get('schema_version')!r}; "
                           f"this refattn reads version {SCHEMA_VERSION}")
    if not isinstance(manifest.get("cases"), list):
        raise RefattnError(f"golden: {path} has no list of cases")
    return manifest


def entry_id(entry) -> str:
    """A manifest entry's id for messages, whatever the entry is."""
    cid = entry.get("id") if isinstance(entry, dict) else None
    return cid if isinstance(cid, str) and CASE_ID.fullmatch(cid) else "?"


#: The keys a reader of an entry uses (spec/golden-format.md, "manifest.json").
_REQUIRED_KEYS = {"id", "file", "bytes", "sha256", "shape", "scale", "softcap", "bias", "dropout_p", "dlse", "mask",
                  "allowed"}
_SHAPE = ("B", "H", "Hkv", "Lq", "Lk", "D", "Dv")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_entry(entry) -> dict:
    """``entry`` if it is a well-formed manifest entry (spec/golden-format.md, "manifest.json"),
    else `RefattnError` naming the first problem. Checked: the types and ranges of every key
    a reader uses; that the declared inputs fit in the declared file size (so that no entry
    makes a reader allocate more than its file); and that every allowed error is a finite
    number >= 0."""
    def bad(why: str):
        raise RefattnError(f"malformed manifest entry {entry_id(entry)}: {why}")

    if not isinstance(entry, dict):
        bad(f"expected an object, got {type(entry).__name__}")
    missing = sorted(_REQUIRED_KEYS - set(entry))
    if missing:
        bad(f"missing key(s) {missing}")
    if not isinstance(entry.get("id"), str) or not CASE_ID.fullmatch(entry["id"]):
        bad(f"id must be letters, digits, '.', '_', '+', '-' (at most 200), got {entry.get('id')!r}")
    if not isinstance(entry.get("file"), str):
        bad(f"file must be a relative path, got {entry.get('file')!r}")
    check_relative(entry["file"], f"malformed manifest entry {entry['id']}: file")
    if not _is_int(entry.get("bytes")) or not 0 < entry["bytes"] <= MAX_CASE_BYTES:
        bad(f"bytes must be an int in [1, {MAX_CASE_BYTES}], got {entry.get('bytes')!r}")
    if not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        bad("sha256 must be 64 lowercase hex digits")
    shape = entry.get("shape")
    if not isinstance(shape, dict) or not all(_is_int(shape.get(k)) and 1 <= shape[k] <= MAX_DIM for k in _SHAPE):
        bad(f"shape must give {', '.join(_SHAPE)} as ints in [1, {MAX_DIM}], got {shape!r}")
    B, H, Hkv, Lq, Lk, D, Dv = (shape[k] for k in _SHAPE)
    if H % Hkv:
        bad(f"shape: H = {H} is not a multiple of Hkv = {Hkv}")
    inputs = 8 * (B * H * Lq * D + B * Hkv * Lk * (D + Dv) + B * H * Lq * Dv)     # q, k, v, dout in float64
    if inputs > entry["bytes"]:
        bad(f"shape {B}x{H}/{Hkv}x{Lq}x{Lk}x{D}/{Dv} needs {inputs} bytes of inputs, more than the "
            f"file's {entry['bytes']}")
    if not _is_number(entry.get("scale")):
        bad(f"scale must be a finite number, got {entry.get('scale')!r}")
    if entry.get("softcap") is not None and not (_is_number(entry["softcap"]) and entry["softcap"] > 0):
        bad(f"softcap must be null or a finite number > 0, got {entry['softcap']!r}")
    p = entry.get("dropout_p")
    if p is not None and not (_is_number(p) and 0 <= p < 1):
        bad(f"dropout_p must be null or a number in [0, 1), got {p!r}")
    if not isinstance(entry.get("dlse"), bool):
        bad(f"dlse must be true or false, got {entry.get('dlse')!r}")
    bias = entry.get("bias")
    if bias is not None and not (isinstance(bias, dict) and bias.get("kind") in ("dense", "sparse", "alibi")):
        bad(f"bias must be null or an object with kind dense, sparse or alibi, got {bias!r}")
    if isinstance(bias, dict) and bias["kind"] == "alibi" and bias.get("align") not in ("top_left", "bottom_right"):
        bad(f"bias.align must be top_left or bottom_right, got {bias.get('align')!r}")
    groups = entry.get("mask", {}).get("groups") if isinstance(entry.get("mask"), dict) else None
    if not (isinstance(groups, list) and len(groups) == 2 and all(_is_int(g) for g in groups)
            and groups[0] in (1, B) and groups[1] in (1, H)):
        bad(f"mask.groups must be [Bm, Hm] with Bm in (1, B) and Hm in (1, H), got {groups!r}")
    allowed_ = entry.get("allowed")
    if not isinstance(allowed_, dict):
        bad("allowed must be an object of dtypes")
    for dtype, per in allowed_.items():
        if not isinstance(per, dict) or not all(_is_number(v) and v >= 0 for v in per.values()):
            bad(f"allowed.{dtype} must map tensors to finite numbers >= 0, got {per!r}")
    return entry


def select_entries(entries: list, expr: str | None, where: str) -> list:
    """The manifest entries whose id matches ``expr`` (all without it); `RefattnError` if
    ``expr`` selects none."""
    if expr is None:
        return list(entries)
    chosen = [e for e in entries if isinstance(e, dict) and id_matches(e.get("id"), expr)]
    if not chosen:
        raise RefattnError(f"--filter {expr!r} selects no case of {where}")
    return chosen
