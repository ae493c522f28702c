"""The built-in golden cases: what a case is, how its inputs are drawn, and the suite.

A case (`Case`) is a pure function of its definition and seed: `make_inputs` draws the
inputs on the exact input grid (spec/golden-format.md, "Inputs"), and `case_mask` builds
its mask. `suite()` lists every case of the committed suite; `select` picks cases by id.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

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
