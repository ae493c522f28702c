"""The golden suite: its cases, their generation by two routes, and the file format.

spec/golden-format.md is the format and spec/tolerance.md the policy a kernel is judged
by. A case (`Case`) is a pure function of its definition and seed: `make_inputs` draws
the inputs on the exact input grid, `compute_case` runs the float64 oracle and the SciPy
sparse route (which share no arithmetic) and requires them to agree, and `write_case` /
`read_case` store and load the arrays. `suite()` lists every case of the committed suite.
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from dataclasses import dataclass, field

import numpy as np

from . import patterns
from .attention import backward, forward
from .bias import ALiBi, SparseBias
from .dropout import Dropout
from .errors import RefattnError
from .mask import Mask
from .patterns.examples import example

SCHEMA_VERSION = 1
FORMAT = "refattn-golden"
#: Every input value is a multiple of GRID_STEP within [-GRID_MAX, GRID_MAX]: at most 9
#: significant bits, exact in bfloat16, float16, float32 and float64.
GRID_STEP, GRID_MAX = 1.0 / 64.0, 4.0
#: The two routes that compute every output, and how closely they must agree.
ROUTES = ("dense", "sparse")
AGREEMENT_BOUND = 1e-13
INPUT_DTYPES = ("float64", "float32", "float16", "bfloat16")
TENSORS = ("out", "lse", "dq", "dk", "dv", "dbias")
#: A fixed date for the archive's entries, so that a case's bytes depend on its content only.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Case:
    """One case of the suite: the pattern (or None for an explicit mask builder), shapes,
    seed and features; everything else follows from these."""

    id: str
    group: str                       # "pattern", "feature" or "shape"
    pattern: patterns.Pattern | None
    B: int
    H: int
    Hkv: int
    Lq: int
    Lk: int
    D: int
    Dv: int
    seed: int
    features: tuple[str, ...] = ()
    scale: float | None = None       # None: 1 / sqrt(D)
    softcap: float | None = None
    bias: str | None = None          # None, "dense", "dense_broadcast", "sparse", "alibi", "alibi_top_left"
    dropout_p: float | None = None
    dlse: bool = False
    explicit_mask: object = field(default=None, compare=False)   # (Lq, Lk, H, rng) -> Mask, for pattern None

    @property
    def shape(self) -> dict:
        return {"B": self.B, "H": self.H, "Hkv": self.Hkv, "Lq": self.Lq, "Lk": self.Lk, "D": self.D, "Dv": self.Dv}


def grid_values(rng: np.random.Generator, shape) -> np.ndarray:
    """Standard normals rounded to the input grid (float64, exact in every input dtype)."""
    return np.clip(np.round(rng.standard_normal(shape) / GRID_STEP) * GRID_STEP, -GRID_MAX, GRID_MAX)


def case_mask(case: Case, q: np.ndarray, k: np.ndarray) -> Mask:
    """The case's mask; a content-dependent pattern chooses it from the inputs ``q``, ``k``
    (the file stores the realized mask, so other libraries need not recompute it)."""
    if case.pattern is not None:
        return case.pattern.mask(case.Lq, case.Lk, heads=case.H, q=q, k=k)
    return case.explicit_mask(case.Lq, case.Lk, case.H, np.random.default_rng(case.seed + 1))


def make_inputs(case: Case) -> dict:
    """The case's inputs (arrays and call options) from its seed: q, k, v, dout, then dlse
    and the bias values when used, drawn in that order from one PCG64 stream; the dropout
    keep-mask from `Dropout.sample` with seed ``seed + 2``."""
    rng = np.random.default_rng(case.seed)
    q = grid_values(rng, (case.B, case.H, case.Lq, case.D))
    k = grid_values(rng, (case.B, case.Hkv, case.Lk, case.D))
    v = grid_values(rng, (case.B, case.Hkv, case.Lk, case.Dv))
    dout = grid_values(rng, (case.B, case.H, case.Lq, case.Dv))
    mask = case_mask(case, q, k)
    inputs = {"q": q, "k": k, "v": v, "dout": dout, "mask": mask, "dlse": None,
              "scale": case.scale if case.scale is not None else 1.0 / np.sqrt(case.D),
              "softcap": case.softcap, "bias": None, "dropout": None}
    if case.dlse:
        inputs["dlse"] = grid_values(rng, (case.B, case.H, case.Lq))
    if case.bias == "dense":
        inputs["bias"] = grid_values(rng, (case.B, case.H, case.Lq, case.Lk))
    elif case.bias == "dense_broadcast":
        inputs["bias"] = grid_values(rng, (1, case.H, 1, case.Lk))
    elif case.bias == "sparse":
        inputs["bias"] = SparseBias([[grid_values(rng, mask.group(b, h).nnz) for h in range(case.H)]
                                     for b in range(case.B)])
    elif case.bias in ("alibi", "alibi_top_left"):
        align = "top_left" if case.bias == "alibi_top_left" else "bottom_right"
        inputs["bias"] = ALiBi(ALiBi.default_slopes(case.H), align)
    elif case.bias is not None:
        raise RefattnError(f"golden: unknown bias kind {case.bias!r} in case {case.id}")
    if case.dropout_p is not None:
        inputs["dropout"] = Dropout.sample(case.dropout_p, mask, case.B, case.H, seed=case.seed + 2)
    return inputs


def _call_kwargs(inputs: dict) -> dict:
    return {"scale": inputs["scale"], "softcap": inputs["softcap"], "bias": inputs["bias"],
            "dropout": inputs["dropout"]}


def _leaves(x) -> list[np.ndarray]:
    if x is None:
        return []
    if isinstance(x, np.ndarray):
        return [x]
    return [np.asarray(leaf) for row in x for leaf in row]


def run_route(backend: str, inputs: dict) -> dict:
    """Forward and backward of one route: ``{out, lse, dq, dk, dv, dbias}`` (dbias as
    leaves, or absent)."""
    kw = _call_kwargs(inputs)
    q, k, v, mask = inputs["q"], inputs["k"], inputs["v"], inputs["mask"]
    r = forward(q, k, v, mask, backend=backend, **kw)
    g = backward(q, k, v, r.out, r.lse, inputs["dout"], mask, dlse=inputs["dlse"], backend=backend, **kw)
    res = {"out": r.out, "lse": r.lse, "dq": g.dq, "dk": g.dk, "dv": g.dv}
    if g.dbias is not None:
        res["dbias"] = g.dbias
    return res


def _term_floors(inputs: dict) -> dict:
    """The size of the terms each tensor sums: the relative bound of the agreement check
    is taken against it where a tensor is smaller (zero in exact arithmetic), as in the
    cross-backend matrix."""
    big = lambda x: float(np.max(np.abs(x), initial=0.0))  # noqa: E731
    q, k, v, dout = inputs["q"], inputs["k"], inputs["v"], inputs["dout"]
    p = inputs["dropout"].p if inputs["dropout"] is not None else 0.0
    dS = 2 * dout.shape[-1] * big(dout) * big(v) / (1 - p) + (big(inputs["dlse"]) if inputs["dlse"] is not None else 0)
    s = inputs["scale"]
    return {"out": big(v), "lse": 1.0, "dq": s * dS * big(k), "dk": s * dS * big(q), "dv": big(dout) / (1 - p),
            "dbias": dS}


def agreement(a: dict, b: dict, floors: dict) -> dict[str, float]:
    """Per tensor ``max|a - b| / max(max|b|, floor)`` (LSE over finite rows; the rows that
    are -inf must be the same)."""
    out = {}
    for name in b:
        xs, ys = _leaves(a[name]), _leaves(b[name])
        worst = 0.0
        for x, y in zip(xs, ys, strict=True):
            if name == "lse":
                fin = np.isfinite(y)
                if not np.array_equal(np.isfinite(x), fin) or not (x[~fin] == -np.inf).all():
                    return {**out, name: np.inf}
                x, y = x[fin], y[fin]
            ref = max(float(np.max(np.abs(y), initial=0.0)), floors[name])
            err = float(np.max(np.abs(x - y), initial=0.0))
            worst = max(worst, err / ref if ref > 0 else (0.0 if err == 0 else np.inf))
        out[name] = worst
    return out


def compute_case(case: Case) -> tuple[dict, dict, dict]:
    """``(inputs, outputs, agreement)``: the oracle's outputs, checked against the second
    route; `RefattnError` if they disagree beyond `AGREEMENT_BOUND`."""
    inputs = make_inputs(case)
    gold = run_route(ROUTES[0], inputs)
    other = run_route(ROUTES[1], inputs)
    agree = agreement(other, gold, _term_floors(inputs))
    bad = {k: v for k, v in agree.items() if not v <= AGREEMENT_BOUND}
    if bad:
        raise RefattnError(f"golden: case {case.id}: routes {ROUTES[0]} and {ROUTES[1]} disagree: "
                           + ", ".join(f"{k} {v:.3g}" for k, v in bad.items()) + f" > {AGREEMENT_BOUND}")
    return inputs, gold, agree


# ---- the file ------------------------------------------------------------------------------

def _per_bh(grid_leaves: list[list[np.ndarray]], B: int, H: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Leaves of a (possibly broadcast) per-(b, h) grid of nonzero values, expanded to every
    (b, h) in row-major order: ``(values, offsets)``."""
    bv, hv = len(grid_leaves), len(grid_leaves[0])
    leaves = [np.asarray(grid_leaves[b if bv > 1 else 0][h if hv > 1 else 0]) for b in range(B) for h in range(H)]
    offsets = np.concatenate([[0], np.cumsum([x.shape[0] for x in leaves])]).astype(np.int64)
    values = np.concatenate(leaves).astype(dtype) if leaves else np.zeros(0, dtype)
    return values, offsets


def case_arrays(case: Case, inputs: dict, outputs: dict) -> dict[str, np.ndarray]:
    """The arrays of the case file (spec/golden-format.md), by name."""
    mask: Mask = inputs["mask"]
    csrs = [csr for _, _, csr in mask.iter_groups()]
    arrays = {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"], "dout": inputs["dout"]}
    if inputs["dlse"] is not None:
        arrays["dlse"] = inputs["dlse"]
    arrays["mask_indptr"] = np.stack([np.asarray(c.indptr, np.int64) for c in csrs])
    arrays["mask_indices"] = np.concatenate([np.asarray(c.indices, np.int64) for c in csrs])
    arrays["mask_offsets"] = np.concatenate([[0], np.cumsum([c.nnz for c in csrs])]).astype(np.int64)
    bias = inputs["bias"]
    if isinstance(bias, SparseBias):
        arrays["bias_values"], arrays["bias_offsets"] = _per_bh(bias.grid.grid, case.B, case.H, np.float64)
    elif isinstance(bias, ALiBi):
        arrays["alibi_slopes"] = np.asarray(bias.slopes, np.float64)
    elif bias is not None:
        arrays["bias"] = np.asarray(bias, np.float64)
    if inputs["dropout"] is not None:
        arrays["dropout_keep"], arrays["dropout_offsets"] = _per_bh(inputs["dropout"].grid.grid, case.B, case.H,
                                                                    np.uint8)
    for name in ("out", "lse", "dq", "dk", "dv"):
        arrays[name] = np.asarray(outputs[name], np.float64)
    if "dbias" in outputs:
        if isinstance(bias, SparseBias):
            dbias = outputs["dbias"]
            leaves = [[np.asarray(x) for x in row] for row in dbias] if not isinstance(dbias, np.ndarray) else \
                [[dbias[b, h] for h in range(dbias.shape[1])] for b in range(dbias.shape[0])]
            arrays["dbias_values"], _ = _per_bh(leaves, case.B, case.H, np.float64)
        else:
            arrays["dbias"] = np.asarray(outputs["dbias"], np.float64)
    return {name: np.ascontiguousarray(a) for name, a in arrays.items()}


def write_case(path, arrays: dict[str, np.ndarray]) -> bytes:
    """Write ``arrays`` as an uncompressed ``.npz`` with fixed entry dates; return its bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            entry = io.BytesIO()
            np.lib.format.write_array(entry, arrays[name], allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, entry.getvalue())
    data = buf.getvalue()
    with open(path, "wb") as f:
        f.write(data)
    return data


def read_case(path) -> dict[str, np.ndarray]:
    """The arrays of a case file; `RefattnError` (not a traceback) if it is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise RefattnError(f"golden: cannot read case file {path}: {type(e).__name__}: {e}") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the suite -------------------------------------------------------------------------------

#: Pattern cases: every registered pattern at a length that is no multiple of 32 or 64.
PATTERN_L, PATTERN_D = 48, 16


def _empty_rows_mask(lq: int, lk: int, heads: int, rng: np.random.Generator) -> Mask:
    """A random mask with some rows, and one head's whole first rows, empty."""
    dense = rng.random((1, heads, lq, lk)) < 0.3
    dense[:, :, ::5] = False
    dense[:, 0, :3] = False
    return Mask.from_dense(dense)


def suite() -> list[Case]:
    """Every case of the golden suite, in a fixed order (ids unique)."""
    cases = []
    seed = 1000
    for name in patterns.names():
        p = example(name, PATTERN_L, PATTERN_L, seed=0)
        if p is None:
            continue
        seed += 1
        cases.append(Case(f"pattern-{name}", "pattern", p, 1, 2, 2, PATTERN_L, PATTERN_L, PATTERN_D,
                          PATTERN_D, seed, ("content",) if p.content_dependent else ()))
    window = patterns.get("sliding_window", left=7, right=3)
    causal = patterns.get("causal")
    causal_tl = patterns.get("causal", align="top_left")
    L, D = 40, 16
    features = [
        # id, pattern, (B, H, Hkv, Lq, Lk, D, Dv), features, options
        ("gqa", window, (2, 4, 2, L, L, D, D), ("gqa",), {}),
        ("mqa", window, (1, 3, 1, L, L, D, 8), ("mqa",), {}),
        ("rect-bottom-right", causal, (1, 2, 2, 24, 56, D, D), ("rect",), {}),
        ("rect-top-left", causal_tl, (1, 2, 2, 56, 24, D, D), ("rect", "causal_top_left"), {}),
        ("empty-rows-causal", causal, (1, 2, 2, 56, 24, D, D), ("rect", "empty_rows"), {}),
        ("empty-rows-random", None, (1, 2, 2, L, L, D, D), ("empty_rows",), {}),
        ("scale", window, (1, 2, 2, L, L, D, D), ("scale",), {"scale": 0.3}),
        ("softcap", window, (1, 2, 2, L, L, D, D), ("softcap",), {"softcap": 1.5}),
        ("alibi", causal, (1, 4, 4, L, L, D, D), ("alibi",), {"bias": "alibi"}),
        ("alibi-top-left-rect", causal_tl, (1, 2, 2, 24, 56, D, D), ("alibi", "rect", "causal_top_left"),
         {"bias": "alibi_top_left"}),
        ("dense-bias", window, (2, 2, 2, L, L, D, D), ("dense_bias",), {"bias": "dense"}),
        ("dense-bias-broadcast", window, (2, 2, 2, L, L, D, D), ("dense_bias",), {"bias": "dense_broadcast"}),
        ("sparse-bias", window, (1, 2, 2, L, L, D, D), ("sparse_bias",), {"bias": "sparse"}),
        ("dropout", window, (1, 2, 2, L, L, D, D), ("dropout",), {"dropout_p": 0.25}),
        ("dlse", window, (1, 2, 2, L, L, D, D), ("dlse",), {"dlse": True}),
        ("content-gqa", patterns.get("nsa_select", block=4, top_n=3), (2, 4, 2, L, L, D, D),
         ("content", "gqa"), {}),
        ("content-rect", patterns.get("topk", k=5, base=causal), (1, 2, 2, 24, 56, D, D), ("content", "rect"), {}),
        ("everything", window, (2, 4, 2, L, L, D, 8), ("gqa", "softcap", "dense_bias", "dropout", "dlse"),
         {"softcap": 2.0, "bias": "dense", "dropout_p": 0.2, "dlse": True}),
    ]
    for fid, p, (B, H, Hkv, Lq, Lk, d, dv), feats, opts in features:
        seed += 1
        cases.append(Case(f"feature-{fid}", "feature", p, B, H, Hkv, Lq, Lk, d, dv, seed, feats,
                          explicit_mask=_empty_rows_mask if p is None else None, **opts))
    shapes = [
        ("l1", causal, (1, 1, 1, 1, 1, 8, 8), ()),
        ("d1", window, (1, 2, 2, 33, 33, 1, 1), ()),
        ("d256", causal, (1, 1, 1, 20, 20, 256, 256), ()),
        ("l77", causal, (1, 2, 1, 77, 77, 16, 16), ("gqa",)),
        ("decode", causal, (2, 4, 2, 1, 100, 32, 32), ("decode", "rect", "gqa")),
        ("l130-window", window, (1, 1, 1, 130, 130, 8, 8), ()),
    ]
    for sid, p, (B, H, Hkv, Lq, Lk, d, dv), feats in shapes:
        seed += 1
        cases.append(Case(f"shape-{sid}", "shape", p, B, H, Hkv, Lq, Lk, d, dv, seed, feats))
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "golden case ids must be unique"
    return cases


# ---- the manifest, generation and the check ---------------------------------------------------

#: The tolerance policy's constants (spec/tolerance.md): per dtype T and tensor. In float16
#: and bfloat16 FlashAttention's factors (2 forward, 3 gradients): a kernel accumulates in
#: float32, far below T's rounding, as the baseline's exact sums model. In float32 and
#: float64 a kernel accumulates in T itself, and a D-term sum's rounding grows with D where
#: the baseline's does not: FlexAttention's float32 factor, 10.
_HALF = {"out": 2.0, "lse": 2.0, "dq": 3.0, "dk": 3.0, "dv": 3.0, "dbias": 3.0}
_FULL = {name: 10.0 for name in _HALF}
FACTOR = {"float64": _FULL, "float32": _FULL, "float16": _HALF, "bfloat16": _HALF}
ATOL_ULPS = 2.0
EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
#: Baselines must come out the same when recomputed, within this relative bound plus the
#: reproducibility of the outputs they are measured from: a baseline is a distance from the
#: stored outputs, which another machine's BLAS and exp reproduce only to within
#: `AGREEMENT_BOUND` (spec/golden-format.md, "How outputs are made").
BASELINE_RTOL = 1e-3


def id_matches(case_id, expr: str) -> bool:
    """Whether ``case_id`` matches one of the comma-separated shell patterns of ``expr``
    (``fnmatch``: ``pattern-*``, ``feature-gqa,shape-*``)."""
    import fnmatch

    pats = [s.strip() for s in expr.split(",") if s.strip()]
    if not pats:
        raise RefattnError(f"--filter: no pattern in {expr!r}")
    return isinstance(case_id, str) and any(fnmatch.fnmatchcase(case_id, p) for p in pats)


def select_entries(entries: list, expr: str | None, where: str) -> list:
    """The manifest entries whose id matches ``expr`` (all without it); `RefattnError` if
    ``expr`` selects none."""
    if expr is None:
        return list(entries)
    chosen = [e for e in entries if isinstance(e, dict) and id_matches(e.get("id"), expr)]
    if not chosen:
        raise RefattnError(f"--filter {expr!r} selects no case of {where}")
    return chosen


def select(cases: list[Case], expr: str | None) -> list[Case]:
    """The cases whose id matches ``expr`` (`id_matches`); all without ``expr``."""
    return list(cases) if expr is None else [c for c in cases if id_matches(c.id, expr)]


def _problem(inputs: dict):
    from .contract import make_problem

    return make_problem(inputs["q"], inputs["k"], inputs["v"], inputs["mask"], **_call_kwargs(inputs))


def baselines(inputs: dict, gold: dict) -> dict[str, dict[str, float]]:
    """Per input dtype T and tensor: ``max|x_naiveT - x_gold|``, the error of plain
    attention computed in T (`refattn.lowp`)."""
    from . import lowp
    from .contract import Grads

    p = _problem(inputs)
    grads = Grads(gold["dq"], gold["dk"], gold["dv"], gold.get("dbias"))
    return {dt: {k: float(v) for k, v in lowp.baseline_errors(p, gold["out"], gold["lse"], grads, inputs["dout"],
                                                              inputs["dlse"], dt).items()}
            for dt in INPUT_DTYPES}


def allowed(base: dict[str, dict[str, float]], gold: dict) -> dict[str, dict[str, float]]:
    """``factor * baseline + atol_ulps * eps_T * max|x_gold|`` per dtype and tensor."""
    def big(name):
        xs = _leaves(gold[name])
        if name == "lse":
            xs = [x[np.isfinite(x)] for x in xs]
        return max((float(np.max(np.abs(x), initial=0.0)) for x in xs), default=0.0)
    return {dt: {name: FACTOR[dt][name] * b + ATOL_ULPS * EPS[dt] * big(name) for name, b in per.items()}
            for dt, per in base.items()}


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
    from ._version import __version__

    return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "refattn_version": __version__,
            "routes": list(ROUTES), "agreement_bound": AGREEMENT_BOUND,
            "input_grid": {"step": GRID_STEP, "max_abs": GRID_MAX},
            "tolerance": {"policy": "spec/tolerance.md", "factor": FACTOR, "atol_ulps": ATOL_ULPS, "eps": EPS}}


def generate(out_dir, expr: str | None = None, progress=None) -> dict:
    """Write the selected cases and ``manifest.json`` under ``out_dir``; return the manifest.
    ``progress(i, n, case_id)`` is called before each case."""
    import json
    from pathlib import Path

    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    cases = select(suite(), expr)
    if not cases:
        raise RefattnError(f"--filter {expr!r} selects no case (`refattn golden list` lists them)")
    entries = []
    for i, case in enumerate(cases):
        if progress is not None:
            progress(i, len(cases), case.id)
        inputs, gold, agree = compute_case(case)
        data = write_case(out / "cases" / f"{case.id}.npz", case_arrays(case, inputs, gold))
        entries.append(manifest_entry(case, inputs, gold, agree, data))
    if progress is not None:
        progress(len(cases), len(cases), "")
    manifest = {**manifest_header(), "cases": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def load_manifest(golden_dir) -> dict:
    """``manifest.json`` of a suite, checked to be one this version reads."""
    import json
    from pathlib import Path

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


@dataclass
class CheckResult:
    case_id: str
    ok: bool
    message: str


def check_case(golden_dir, entry: dict, cases_by_id: dict[str, Case]) -> CheckResult:
    """One case: its file's size and checksum, then a regeneration compared with it (a
    malformed manifest entry is a failed check, not a crash)."""
    cid = entry.get("id", "?") if isinstance(entry, dict) else "?"
    if not isinstance(entry, dict):
        return CheckResult(cid, False, f"malformed manifest entry: expected an object, got {type(entry).__name__}")
    try:
        return _check_case(golden_dir, entry, cases_by_id)
    except (TypeError, AttributeError, KeyError, ValueError) as e:
        return CheckResult(cid, False, f"malformed manifest entry: {type(e).__name__}: {e}")


#: Manifest keys that are measurements of this machine's routes, compared within bounds
#: (agreement: not at all, it is rounding noise of the two routes) rather than exactly.
_MEASURED = {"agreement", "baselines", "allowed"}


def _check_case(golden_dir, entry: dict, cases_by_id: dict[str, Case]) -> CheckResult:
    from pathlib import Path

    cid = entry.get("id", "?")
    path = Path(golden_dir) / entry.get("file", "")
    try:
        data = path.read_bytes()
    except OSError as e:
        return CheckResult(cid, False, f"cannot read {path}: {e.strerror or e}")
    if len(data) != entry.get("bytes") or sha256(data) != entry.get("sha256"):
        return CheckResult(cid, False, f"{path.name}: size or SHA-256 differs from the manifest "
                           f"({len(data)} bytes; the file was changed or truncated)")
    case = cases_by_id.get(cid)
    if case is None:
        return CheckResult(cid, False, "not a case of this refattn's suite (generated by another version?)")
    try:
        stored = read_case(path)
        inputs, gold, _ = compute_case(case)
        fresh = case_arrays(case, inputs, gold)
    except RefattnError as e:
        return CheckResult(cid, False, str(e))
    if set(stored) != set(fresh):
        return CheckResult(cid, False, f"arrays {sorted(set(stored) ^ set(fresh))} missing or unexpected")
    outputs = {"out", "lse", "dq", "dk", "dv", "dbias", "dbias_values"}
    for name in sorted(set(fresh) - outputs):                     # inputs and the mask: exactly
        if stored[name].dtype != fresh[name].dtype or not np.array_equal(stored[name], fresh[name]):
            return CheckResult(cid, False, f"input {name!r} differs from its regeneration from seed {case.seed}")
    floors = _term_floors(inputs)
    floors["dbias_values"] = floors["dbias"]
    for name in sorted(set(fresh) & outputs):
        got = agreement({name: stored[name]}, {name: fresh[name]}, floors)[name]
        if not got <= AGREEMENT_BOUND:
            return CheckResult(cid, False, f"{name} differs from its regeneration by {got:.3g} (relative) "
                               f"> {AGREEMENT_BOUND}")
    expected = manifest_entry(case, inputs, gold, {}, data)
    for key in sorted(set(expected) | set(entry)):
        if key not in _MEASURED and entry.get(key) != expected.get(key):
            return CheckResult(cid, False, f"manifest key {key!r} is {entry.get(key)!r}, the case gives "
                               f"{expected.get(key)!r}")
    drift = _output_drift(gold, floors)
    for key, fresh_values in (("baselines", expected["baselines"]), ("allowed", expected["allowed"])):
        for dt, per in fresh_values.items():
            for name, b in per.items():
                s = entry.get(key, {}).get(dt, {}).get(name)
                # allowed = factor * baseline + atol_ulps * eps * max|gold| moves with both terms
                slack = drift[name] * ((FACTOR[dt][name] + ATOL_ULPS * EPS[dt]) if key == "allowed" else 1.0)
                if not isinstance(s, (int, float)) or not abs(s - b) <= BASELINE_RTOL * b + slack:
                    return CheckResult(cid, False, f"{key} {dt} {name} = {s!r} in the manifest, {b:.6g} recomputed")
    return CheckResult(cid, True, "ok")


def _output_drift(gold: dict, floors: dict) -> dict[str, float]:
    """How far each output may lie from its value on the machine that generated the suite:
    `AGREEMENT_BOUND` times the reference magnitude the agreement is measured against."""
    out = {}
    for name in gold:
        xs = [x[np.isfinite(x)] for x in _leaves(gold[name])]
        big = max((float(np.max(np.abs(x), initial=0.0)) for x in xs), default=0.0)
        out[name] = AGREEMENT_BOUND * max(big, floors[name])
    return out


def check(golden_dir, expr: str | None = None, progress=None) -> list[CheckResult]:
    """Check every (selected) case of the suite in ``golden_dir``."""
    manifest = load_manifest(golden_dir)
    by_id = {c.id: c for c in suite()}
    entries = select_entries(manifest["cases"], expr, str(golden_dir))
    results = []
    for i, entry in enumerate(entries):
        if progress is not None:
            progress(i, len(entries), entry.get("id", "?"))
        results.append(check_case(golden_dir, entry, by_id))
    if progress is not None:
        progress(len(entries), len(entries), "")
    return results
