"""Every golden output from two routes that share no arithmetic, and their agreement.

`compute_case` runs the float64 oracle (``dense``) and the SciPy sparse route on a case's
inputs and requires them to agree within `AGREEMENT_BOUND` (spec/golden-format.md, "How
outputs are made").
"""

from __future__ import annotations

import numpy as np

from ..attention import backward, forward
from ..errors import RefattnError
from .cases import Case, make_inputs

#: The two routes that compute every output, and how closely they must agree.
ROUTES = ("dense", "sparse")
AGREEMENT_BOUND = 1e-13


def call_kwargs(inputs: dict) -> dict:
    return {"scale": inputs["scale"], "softcap": inputs["softcap"], "bias": inputs["bias"],
            "dropout": inputs["dropout"]}


def leaves(x) -> list[np.ndarray]:
    if x is None:
        return []
    if isinstance(x, np.ndarray):
        return [x]
    return [np.asarray(leaf) for row in x for leaf in row]


def run_route(backend: str, inputs: dict) -> dict:
    """Forward and backward of one route: ``{out, lse, dq, dk, dv, dbias}`` (dbias as
    leaves, or absent)."""
    kw = call_kwargs(inputs)
    q, k, v, mask = inputs["q"], inputs["k"], inputs["v"], inputs["mask"]
    r = forward(q, k, v, mask, backend=backend, **kw)
    g = backward(q, k, v, r.out, r.lse, inputs["dout"], mask, dlse=inputs["dlse"], backend=backend, **kw)
    res = {"out": r.out, "lse": r.lse, "dq": g.dq, "dk": g.dk, "dv": g.dv}
    if g.dbias is not None:
        res["dbias"] = g.dbias
    return res


def term_floors(inputs: dict) -> dict:
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
        xs, ys = leaves(a[name]), leaves(b[name])
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
    agree = agreement(other, gold, term_floors(inputs))
    bad = {k: v for k, v in agree.items() if not v <= AGREEMENT_BOUND}
    if bad:
        raise RefattnError(f"golden: case {case.id}: routes {ROUTES[0]} and {ROUTES[1]} disagree: "
                           + ", ".join(f"{k} {v:.3g}" for k, v in bad.items()) + f" > {AGREEMENT_BOUND}")
    return inputs, gold, agree


def output_drift(gold: dict, floors: dict) -> dict[str, float]:
    """How far each output may lie from its value on the machine that generated the suite:
    `AGREEMENT_BOUND` times the reference magnitude the agreement is measured against."""
    out = {}
    for name in gold:
        xs = [x[np.isfinite(x)] for x in leaves(gold[name])]
        big = max((float(np.max(np.abs(x), initial=0.0)) for x in xs), default=0.0)
        out[name] = AGREEMENT_BOUND * max(big, floors[name])
    return out
