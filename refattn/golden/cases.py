"""The built-in golden cases: what a case is, how its inputs are drawn, and the suite.

A case (`Case`) is a pure function of its definition and seed: `make_inputs` draws the
inputs on the exact input grid (spec/golden-format.md, "Inputs"), and `case_mask` builds
its mask. A case is also data (`Case.to_dict`, `Case.from_dict`), and a list of them a
file (`case_list`, `read_case_list`, spec/golden-format.md "Case lists"). `suite()` lists
every case of the committed suite, the tier ``core`` (`TIERS`); `select` picks cases by id.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
from dataclasses import dataclass

import numpy as np

from .. import patterns
from ..bias import ALiBi, SparseBias
from ..dropout import Dropout
from ..errors import RefattnError
from ..mask import Mask
from ..patterns.examples import example

#: Every input value is a multiple of GRID_STEP within [-GRID_MAX, GRID_MAX]: at most 9
#: significant bits, exact in bfloat16, float16, float32 and float64.
GRID_STEP, GRID_MAX = 1.0 / 64.0, 4.0


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
    mask: str | None = None          # with pattern None: the name of an explicit mask (EXPLICIT_MASKS)

    @property
    def shape(self) -> dict:
        return {"B": self.B, "H": self.H, "Hkv": self.Hkv, "Lq": self.Lq, "Lk": self.Lk, "D": self.D, "Dv": self.Dv}

    def to_dict(self) -> dict:
        """The case as data (spec/golden-format.md, "Case lists"): what a case list holds and
        what the manifest records for the case, key for key."""
        return {"id": self.id, "group": self.group,
                "pattern": self.pattern.to_dict() if self.pattern is not None else None, "mask": self.mask,
                "shape": self.shape, "seed": self.seed, "features": list(self.features),
                "options": {"scale": self.scale, "softcap": self.softcap, "bias": self.bias,
                            "dropout_p": self.dropout_p, "dlse": self.dlse}}

    @staticmethod
    def from_dict(d) -> Case:
        """Inverse of `to_dict`, checking every field; `RefattnError` naming the first problem
        (a case list is read from a file, maybe another's)."""
        return _case_from_dict(d)


#: A case id: what a file name and a table cell can hold.
CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}")
#: The largest length or dimension a case may declare (positions are int32 in kernels).
MAX_DIM = 2**31 - 1
#: The kinds of bias a case can have.
BIAS_KINDS = (None, "dense", "dense_broadcast", "sparse", "alibi", "alibi_top_left")
_CASE_KEYS = {"id", "group", "pattern", "mask", "shape", "seed", "features", "options"}
_OPTION_KEYS = {"scale", "softcap", "bias", "dropout_p", "dlse"}


def _int(x, name: str, lowest: int, highest: int, where: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not lowest <= x <= highest:
        raise RefattnError(f"{where}: {name} must be an int in [{lowest}, {highest}], got {x!r}")
    return x


def _number(x, name: str, where: str, *, positive: bool) -> float | None:
    if x is None:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or (positive and x <= 0):
        raise RefattnError(f"{where}: {name} must be null or a finite number{' > 0' if positive else ''}, got {x!r}")
    return float(x)


def _case_from_dict(d) -> Case:
    where = f"case {d.get('id')!r}" if isinstance(d, dict) else "case"
    if not isinstance(d, dict) or set(d) != _CASE_KEYS:
        raise RefattnError(f"{where}: expected an object with the keys {sorted(_CASE_KEYS)}, got "
                           f"{sorted(d) if isinstance(d, dict) else type(d).__name__}")
    if not isinstance(d["id"], str) or not CASE_ID.fullmatch(d["id"]):
        raise RefattnError(f"{where}: id must be letters, digits, '.', '_', '+', '-' (at most 200), got {d['id']!r}")
    if not isinstance(d["group"], str) or not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", d["group"]):
        raise RefattnError(f"{where}: group must be a short lowercase word, got {d['group']!r}")
    if (d["pattern"] is None) == (d["mask"] is None):
        raise RefattnError(f"{where}: give exactly one of pattern (a pattern's to_dict()) and mask "
                           f"(one of {sorted(EXPLICIT_MASKS)})")
    pattern = patterns.from_dict(d["pattern"]) if d["pattern"] is not None else None
    if d["mask"] is not None and d["mask"] not in EXPLICIT_MASKS:
        raise RefattnError(f"{where}: mask must be one of {sorted(EXPLICIT_MASKS)}, got {d['mask']!r}")
    shape = d["shape"]
    keys = ("B", "H", "Hkv", "Lq", "Lk", "D", "Dv")
    if not isinstance(shape, dict) or set(shape) != set(keys):
        raise RefattnError(f"{where}: shape must give exactly {', '.join(keys)}, got {shape!r}")
    dims = [_int(shape[k], f"shape.{k}", 1, MAX_DIM, where) for k in keys]
    if dims[1] % dims[2]:
        raise RefattnError(f"{where}: shape.H = {dims[1]} is not a multiple of shape.Hkv = {dims[2]}")
    seed = _int(d["seed"], "seed", 0, 2**63 - 3, where)
    if not isinstance(d["features"], list) or not all(isinstance(f, str) and f for f in d["features"]):
        raise RefattnError(f"{where}: features must be a list of words, got {d['features']!r}")
    opts = d["options"]
    if not isinstance(opts, dict) or set(opts) != _OPTION_KEYS:
        raise RefattnError(f"{where}: options must give exactly {sorted(_OPTION_KEYS)}, got {opts!r}")
    if opts["bias"] not in BIAS_KINDS:
        raise RefattnError(f"{where}: options.bias must be one of {list(BIAS_KINDS)}, got {opts['bias']!r}")
    p = _number(opts["dropout_p"], "options.dropout_p", where, positive=False)
    if p is not None and not 0 <= p < 1:
        raise RefattnError(f"{where}: options.dropout_p must be in [0, 1), got {p}")
    if not isinstance(opts["dlse"], bool):
        raise RefattnError(f"{where}: options.dlse must be true or false, got {opts['dlse']!r}")
    return Case(d["id"], d["group"], pattern, *dims, seed, tuple(d["features"]),
                scale=_number(opts["scale"], "options.scale", where, positive=False),
                softcap=_number(opts["softcap"], "options.softcap", where, positive=True),
                bias=opts["bias"], dropout_p=p, dlse=opts["dlse"], mask=d["mask"])


def grid_values(rng: np.random.Generator, shape) -> np.ndarray:
    """Standard normals rounded to the input grid (float64, exact in every input dtype)."""
    return np.clip(np.round(rng.standard_normal(shape) / GRID_STEP) * GRID_STEP, -GRID_MAX, GRID_MAX)


def case_mask(case: Case, q: np.ndarray, k: np.ndarray) -> Mask:
    """The case's mask; a content-dependent pattern chooses it from the inputs ``q``, ``k``
    (the file stores the realized mask, so other libraries need not recompute it)."""
    if case.pattern is not None:
        return case.pattern.mask(case.Lq, case.Lk, heads=case.H, q=q, k=k)
    return EXPLICIT_MASKS[case.mask](case.Lq, case.Lk, case.H, np.random.default_rng(case.seed + 1))


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


#: Pattern cases: every registered pattern at a length that is no multiple of 32 or 64.
PATTERN_L, PATTERN_D = 48, 16


def _empty_rows_mask(lq: int, lk: int, heads: int, rng: np.random.Generator) -> Mask:
    """A random mask with some rows, and one head's whole first rows, empty."""
    dense = rng.random((1, heads, lq, lk)) < 0.3
    dense[:, :, ::5] = False
    dense[:, 0, :3] = False
    return Mask.from_dense(dense)


#: Masks that no pattern makes, by the name a case gives: ``(Lq, Lk, H, rng) -> Mask``, drawn
#: from ``numpy.random.default_rng(seed + 1)``.
EXPLICIT_MASKS = {"random_empty_rows": _empty_rows_mask}


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
                          mask="random_empty_rows" if p is None else None, **opts))
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


def id_matches(case_id, expr: str) -> bool:
    """Whether ``case_id`` matches one of the comma-separated shell patterns of ``expr``
    (``fnmatch``: ``pattern-*``, ``feature-gqa,shape-*``)."""
    pats = [s.strip() for s in expr.split(",") if s.strip()]
    if not pats:
        raise RefattnError(f"--filter: no pattern in {expr!r}")
    return isinstance(case_id, str) and any(fnmatch.fnmatchcase(case_id, p) for p in pats)


def select(cases: list[Case], expr: str | None) -> list[Case]:
    """The cases whose id matches ``expr`` (`id_matches`); all without ``expr``."""
    return list(cases) if expr is None else [c for c in cases if id_matches(c.id, expr)]


# ---- case lists: cases as data (spec/golden-format.md, "Case lists") ------------------------------

CASE_LIST_FORMAT = "refattn-golden-cases"
CASE_LIST_SCHEMA = 2
MAX_CASE_LIST_BYTES = 64 * 2**20
#: The named case lists refattn builds in: ``core`` is the suite committed in ``golden/``.
TIERS = {"core": suite}


def tier(name: str) -> list[Case]:
    """The cases of the built-in tier ``name``."""
    if name not in TIERS:
        raise RefattnError(f"--tier: unknown tier {name!r}; the tiers are {sorted(TIERS)}")
    return TIERS[name]()


def case_list(cases: list[Case], tier_name: str | None = None) -> dict:
    """A case list as data, ready for ``json.dumps``: what `read_case_list` reads."""
    return {"format": CASE_LIST_FORMAT, "schema_version": CASE_LIST_SCHEMA, "tier": tier_name,
            "cases": [c.to_dict() for c in cases]}


def cases_from_list(data, where: str) -> list[Case]:
    """The cases of a case list (as `case_list` makes them); `RefattnError` naming ``where``
    and the first problem. Ids must be unique."""
    if not isinstance(data, dict) or data.get("format") != CASE_LIST_FORMAT:
        raise RefattnError(f"{where}: not a refattn case list (format {CASE_LIST_FORMAT!r})")
    if data.get("schema_version") != CASE_LIST_SCHEMA:
        raise RefattnError(f"{where}: case list schema version {data.get('schema_version')!r}; this refattn reads "
                           f"{CASE_LIST_SCHEMA}")
    if not isinstance(data.get("cases"), list) or not data["cases"]:
        raise RefattnError(f"{where}: the case list has no cases")
    cases = [Case.from_dict(d) for d in data["cases"]]
    seen: set[str] = set()
    for c in cases:
        if c.id in seen:
            raise RefattnError(f"{where}: case id {c.id!r} appears twice")
        seen.add(c.id)
    return cases


def read_case_list(path) -> list[Case]:
    """The cases of the case list file at ``path`` (JSON, at most 64 MiB)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CASE_LIST_BYTES + 1)
    except OSError as e:
        raise RefattnError(f"--cases {path}: cannot read it: {e.strerror or e}") from None
    if len(data) > MAX_CASE_LIST_BYTES:
        raise RefattnError(f"--cases {path}: larger than {MAX_CASE_LIST_BYTES} bytes")
    try:
        parsed = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise RefattnError(f"--cases {path}: not JSON: {type(e).__name__}: {e}") from None
    return cases_from_list(parsed, f"--cases {path}")
