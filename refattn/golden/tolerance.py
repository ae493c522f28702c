"""The tolerance policy (spec/tolerance.md): per dtype and tensor, what error a kernel is allowed.

``allowed = factor * baseline + atol_ulps * eps_T * max|x_gold|``, where the baseline is the
error of plain attention computed in the dtype `T` (`refattn.golden.lowp`).
"""

from __future__ import annotations

import numpy as np

from ..contract import Grads, make_problem
from . import lowp
from .routes import call_kwargs, leaves

#: The dtypes a kernel is judged for, and the tensors it is judged on.
INPUT_DTYPES = ("float64", "float32", "float16", "bfloat16")
TENSORS = ("out", "lse", "dq", "dk", "dv", "dbias")

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


def _problem(inputs: dict):
    return make_problem(inputs["q"], inputs["k"], inputs["v"], inputs["mask"], **call_kwargs(inputs))


def baselines(inputs: dict, gold: dict) -> dict[str, dict[str, float]]:
    """Per input dtype T and tensor: ``max|x_naiveT - x_gold|``, the error of plain
    attention computed in T (`refattn.golden.lowp`)."""
    p = _problem(inputs)
    grads = Grads(gold["dq"], gold["dk"], gold["dv"], gold.get("dbias"))
    return {dt: {k: float(v) for k, v in lowp.baseline_errors(p, gold["out"], gold["lse"], grads, inputs["dout"],
                                                              inputs["dlse"], dt).items()}
            for dt in INPUT_DTYPES}


def allowed(base: dict[str, dict[str, float]], gold: dict) -> dict[str, dict[str, float]]:
    """``factor * baseline + atol_ulps * eps_T * max|x_gold|`` per dtype and tensor."""
    def big(name):
        xs = leaves(gold[name])
        if name == "lse":
            xs = [x[np.isfinite(x)] for x in xs]
        return max((float(np.max(np.abs(x), initial=0.0)) for x in xs), default=0.0)
    return {dt: {name: FACTOR[dt][name] * b + ATOL_ULPS * EPS[dt] * big(name) for name, b in per.items()}
            for dt, per in base.items()}
