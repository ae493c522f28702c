"""``manifest.json``: the suite's header and one entry per case (spec/golden-format.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._version import __version__
from ..errors import RefattnError
from ..mask import Mask
from .casefile import sha256
from .cases import GRID_MAX, GRID_STEP, Case, id_matches
from .routes import AGREEMENT_BOUND, ROUTES
from .tolerance import ATOL_ULPS, EPS, FACTOR, INPUT_DTYPES, allowed, baselines

SCHEMA_VERSION = 1
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
        "id": case.id, "group": case.group, "file": f"cases/{case.id}.npz", "sha256": sha256(data),
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
    """``manifest.json`` of a suite, checked to be one this version reads."""
    path = Path(golden_dir) / "manifest.json"
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise RefattnError(f"golden: no manifest at {path} (generate one: refattn golden generate --out DIR)") \
            from None
    except (OSError, ValueError) as e:
        raise RefattnError(f"golden: cannot read {path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RefattnError(f"golden: {path} is not a refattn golden manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise RefattnError(f"golden: {path} has schema version {manifest.get('schema_version')!r}; "
                           f"this refattn reads version {SCHEMA_VERSION}")
    if not isinstance(manifest.get("cases"), list):
        raise RefattnError(f"golden: {path} has no list of cases")
    return manifest


def select_entries(entries: list, expr: str | None, where: str) -> list:
    """The manifest entries whose id matches ``expr`` (all without it); `RefattnError` if
    ``expr`` selects none."""
    if expr is None:
        return list(entries)
    chosen = [e for e in entries if isinstance(e, dict) and id_matches(e.get("id"), expr)]
    if not chosen:
        raise RefattnError(f"--filter {expr!r} selects no case of {where}")
    return chosen
