"""The verdict's boundary, pinned (spec/tolerance.md): for every tensor and every dtype, an
error one ulp above the allowance fails and one at or just below it passes, and a case
passes only if every tensor does. A verifier whose bound moved (``err <= 2 * allowed``, a
failure counted only at twice the allowance) fails these tests.

The implementation under test returns the golden outputs themselves with one entry moved
by a chosen amount; the amounts are found with ``nextafter`` so that the error the verifier
measures, ``|got - gold|``, lands exactly where the test wants it."""

from pathlib import Path

import numpy as np
import pytest

from refattn import verify
from refattn.testing import golden_cases

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CASES = {c.id: c for c in golden_cases(golden_dir=GOLDEN, filter="pattern-causal,feature-dense-bias")}
DTYPES = ["float64", "float32", "float16", "bfloat16"]
TENSORS = ["out", "lse", "dq", "dk", "dv", "dbias"]


def moved(gold: float, allowed: float, side: str) -> float:
    """A value whose distance from ``gold``, as float64 subtraction measures it, is the
    least above ``allowed`` ("above"), or the greatest at most ``allowed`` ("at")."""
    x = gold + allowed
    while abs(x - gold) > allowed:
        x = np.nextafter(x, gold)
    if side == "above":
        while abs(x - gold) <= allowed:
            x = np.nextafter(x, np.inf)
    return float(x)


def impl_returning(case, changes: dict[str, str], dtype: str) -> verify.Impl:
    """Forward and backward that return the case's golden tensors, each tensor named in
    ``changes`` moved at one finite entry to the side of its allowance given there."""
    gold = case.arrays()
    allowed = case.entry["allowed"][dtype]

    def tensor(name):
        key = "dbias_values" if name == "dbias" and "dbias_values" in gold else name
        x = np.array(gold[key], np.float64)
        if name in changes:
            flat = x.reshape(-1)
            i = int(np.flatnonzero(np.isfinite(flat) & (flat != 0))[-1])
            flat[i] = moved(flat[i], allowed[name], changes[name])
        return x

    def forward(q, k, v, *, mask, scale, bias=None, **kw):
        return tensor("out"), tensor("lse")

    def backward(q, k, v, out, lse, dout, *, mask, scale, bias=None, **kw):
        grads = (tensor("dq"), tensor("dk"), tensor("dv"))
        return grads + ((tensor("dbias"),) if bias is not None else ())

    forward.mask_form = "csr"
    return verify.Impl(forward, backward, "moved")


def judge(cid: str, changes: dict[str, str], dtype: str) -> verify.CaseVerdict:
    case = CASES[cid]
    return verify.verify_case(impl_returning(case, changes, dtype), case.golden_dir, case.entry, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TENSORS)
def test_one_ulp_above_the_allowance_fails_and_at_it_passes(name, dtype):
    cid = "feature-dense-bias" if name == "dbias" else "pattern-causal"
    above = judge(cid, {name: "above"}, dtype)
    assert above.status == "fail"
    failed = {t.name: t for t in above.tensors if not t.ok}
    assert list(failed) == [name]
    assert failed[name].error > failed[name].allowed == CASES[cid].entry["allowed"][dtype][name]
    at = judge(cid, {name: "at"}, dtype)
    assert at.status == "pass", at
    t = next(t for t in at.tensors if t.name == name)
    assert t.ok and 0 < t.error <= t.allowed and t.ratio <= 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_case_is_the_conjunction_of_its_tensors(dtype):
    every = {name: "at" for name in TENSORS}
    assert judge("feature-dense-bias", every, dtype).status == "pass"
    for name in TENSORS:
        verdict = judge("feature-dense-bias", {**every, name: "above"}, dtype)
        assert verdict.status == "fail", name
        assert [t.name for t in verdict.tensors if not t.ok] == [name]
