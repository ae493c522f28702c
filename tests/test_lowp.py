"""refattn.lowp: plain attention with inputs and intermediates rounded to a low precision T,
the baseline of the golden-vector tolerance policy."""

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

import refattn
from refattn import ALiBi, Dropout, Mask, SparseBias, patterns
from refattn.golden import lowp
from refattn.contract import make_problem
from refattn.errors import RefattnError

LOW = (np.float32, np.float16, ml_dtypes.bfloat16)
EPS = {np.float32: 2.0 ** -23, np.float16: 2.0 ** -10, ml_dtypes.bfloat16: 2.0 ** -7}
NAMES = ("out", "lse", "dq", "dk", "dv", "dbias")


def _grid(rng, *shape):
    """Golden-style values: multiples of 1/64 in [-4, 4] (exact in every T)."""
    return rng.integers(-256, 257, shape) / 64.0


def _case(name, seed=0):
    """(q, k, v, mask, kw, dout, dlse) for one feature of the contract."""
    rng = np.random.default_rng(seed)
    B, H, Hkv, Lq, Lk, D, Dv = 1, 2, 2, 12, 12, 4, 4
    mask, kw, dlse = patterns.SlidingWindow(3, 1).mask(Lq, Lk), {}, None
    if name == "gqa_causal":
        B, H, Hkv, Lq, Lk, Dv = 2, 4, 2, 10, 14, 5
        mask = patterns.Causal().mask(Lq, Lk)
    elif name == "softcap_dense_bias":
        mask = None
        kw = {"softcap": 2.0, "bias": _grid(rng, 2, 1, Lq, 1) / 2}
        B = 2
    elif name == "alibi":
        mask = patterns.Causal().mask(Lq, Lk)
        kw = {"bias": ALiBi(ALiBi.default_slopes(H))}
    elif name == "sparse_bias_dropout":
        kw = {"bias": SparseBias(_grid(rng, mask.nnz) / 4), "dropout": Dropout.sample(0.3, mask, B, H, seed=5)}
    elif name == "ragged":
        mask = Mask.stack([[patterns.SlidingWindow(2, 0).mask(Lq, Lk), patterns.Causal().mask(Lq, Lk)]])
        values = [[_grid(rng, mask.group(0, h).nnz) / 4 for h in range(H)]]
        kw = {"bias": SparseBias(values), "dropout": Dropout.sample(0.2, mask, B, H, seed=3)}
    elif name == "dlse":
        dlse = _grid(rng, B, H, Lq)
    elif name == "empty_rows":   # bottom-right causal with Lq > Lk: the first 4 rows are empty
        Lq, Lk = 12, 8
        mask = patterns.Causal().mask(Lq, Lk)
        kw = {"bias": _grid(rng, Lq, Lk) / 4}
        dlse = _grid(rng, B, H, Lq)
    q, k, v = _grid(rng, B, H, Lq, D), _grid(rng, B, Hkv, Lk, D), _grid(rng, B, Hkv, Lk, Dv)
    dout = _grid(rng, B, H, Lq, Dv)
    return q, k, v, mask, kw, dout, dlse


CASES = ("sliding", "gqa_causal", "softcap_dense_bias", "alibi", "sparse_bias_dropout", "ragged", "dlse",
         "empty_rows")


def _run(name, dtype, seed=0):
    """The oracle's and the naive model's results for a case, as {tensor name: leaves}."""
    q, k, v, mask, kw, dout, dlse = _case(name, seed)
    p = make_problem(q, k, v, mask, **kw)
    r = refattn.forward(q, k, v, mask, **kw)
    g = refattn.backward(q, k, v, r.out, r.lse, dout, mask, dlse=dlse, **kw)
    nr = lowp.naive_forward(p, dtype)
    ng = lowp.naive_backward(p, nr.out, nr.lse, dout, dlse, dtype)
    gold = {"out": [r.out], "lse": [r.lse], "dq": [g.dq], "dk": [g.dk], "dv": [g.dv], "dbias": _leaves(g.dbias)}
    naive = {"out": [nr.out], "lse": [nr.lse], "dq": [ng.dq], "dk": [ng.dk], "dv": [ng.dv],
             "dbias": _leaves(ng.dbias)}
    return gold, naive, (p, r, g, dout, dlse)


def _leaves(x):
    if x is None:
        return []
    if isinstance(x, np.ndarray):
        return [x]
    return [np.asarray(a) for row in x for a in row]


def _finite(x):
    return np.where(np.isfinite(x), x, 0.0)


# ---- rounding --------------------------------------------------------------------------
def _bf16_reference(x):
    """float64 -> bfloat16 by round-to-odd to float32, then ml_dtypes' nearest-even (correct:
    float32 has more than bfloat16's 8 + 2 bits)."""
    with np.errstate(over="ignore"):
        f = x.astype(np.float32)
    bits = f.view(np.uint32).copy()
    fix = (f.astype(np.float64) != x) & (bits % 2 == 0)
    bits[fix] += np.where(np.abs(f.astype(np.float64)) > np.abs(x), -1, 1)[fix].astype(np.uint32)
    return bits.view(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)


def _rounding_inputs(dtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(20000) * 2.0 ** rng.integers(-160, 140, 20000)
    t = rng.standard_normal(5000).astype(dtype)                       # ties: midpoints of neighbours
    up = np.nextafter(t, np.array(np.inf, dtype)).astype(np.float64)
    mid = (t.astype(np.float64) + up) / 2
    return np.concatenate([x, mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf), [0.0, -0.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_rounding_from_the_format_matches_numpy_casts(dtype):
    """The rounding used for bfloat16, from (p, qmin, max) alone, is IEEE's for float32 and
    float16 (whose numpy casts `round_to` uses)."""
    x = _rounding_inputs(dtype)
    with np.errstate(over="ignore"):
        want = x.astype(dtype).astype(np.float64)
    np.testing.assert_array_equal(lowp._round_bits(x, lowp._format(dtype)), want)
    np.testing.assert_array_equal(lowp.round_to(x, dtype), want)


def test_round_to_bfloat16_is_correct_where_rounding_via_float32_is_not():
    """ml_dtypes before 0.7 converted float64 to bfloat16 through float32, rounding twice
    (1 + 2**-8 + 2**-30 became 1.0); `round_to` rounds once, whatever ml_dtypes does."""
    x = _rounding_inputs(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(lowp.round_to(x, ml_dtypes.bfloat16), _bf16_reference(x))
    y = np.array([1 + 2.0 ** -8 + 2.0 ** -30])                       # just above a midpoint
    assert lowp.round_to(y, ml_dtypes.bfloat16)[0] == 1 + 2.0 ** -7
    twice = y.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)[0]
    assert twice == 1.0                                              # the double rounding avoided


@pytest.mark.parametrize("dtype", LOW)
def test_exact_rational_rounding_agrees(dtype):
    f = lowp._format(dtype)
    x = _rounding_inputs(dtype)[::7]
    got = np.array([lowp._round_exact(Fraction(float(v)), f) for v in x])
    np.testing.assert_array_equal(got, lowp.round_to(x, dtype))


def test_sums_are_exact_then_rounded_once():
    f = lowp._format(np.float32)
    a = np.array([[1.0, 2.0 ** -24, 2.0 ** -70]])                 # exact sum just above a midpoint
    ones = np.ones((3, 1))
    assert lowp._rdot(a, ones, f)[0, 0] == 1 + 2.0 ** -23
    assert lowp.round_to(a @ ones, np.float32)[0, 0] == 1.0       # float64 first: rounds twice
    assert lowp._rdot(a[:, :2], ones[:2], f)[0, 0] == 1.0          # an exact tie goes to even
    b = np.array([[1.0, 2.0 ** -24, -2.0 ** -70]])                 # just below it
    assert lowp._rdot(b, ones, f)[0, 0] == 1.0
    for terms in (a[0], b[0], np.array([3.0, 2.0 ** -23, 2.0 ** -80, -2.0 ** -81])):
        want = lowp._round_exact(sum(map(Fraction, terms.tolist()), Fraction(0)), f)
        assert lowp._round_sum(terms, f) == want


@pytest.mark.parametrize("dtype", LOW)
def test_exact_sum_accumulator(dtype):
    f = lowp._format(dtype)
    rng = np.random.default_rng(2)
    lo = {np.float32: -140, np.float16: -20, ml_dtypes.bfloat16: -125}[dtype]
    hi = {np.float32: 110, np.float16: 8, ml_dtypes.bfloat16: 110}[dtype]
    x = lowp.round_to(rng.standard_normal((40, 5)) * 2.0 ** rng.integers(lo, hi, (40, 5)), dtype)
    x[20:30] = -x[:10] + lowp.round_to(x[10:20] * 2.0 ** -30, dtype)   # cancellation
    x[:, 4] = 0.0
    acc = lowp._ExactSum((5,), f)
    for rows in (slice(0, 7), slice(7, 31), slice(31, 40)):
        acc.add((slice(None),), x[rows], (0,))
    want = [lowp._round_exact(sum(map(Fraction, x[:, j].tolist()), Fraction(0)), f) for j in range(5)]
    np.testing.assert_array_equal(acc.result(), want)
    total = lowp._ExactSum((1,), f)
    total.add((slice(None),), x, (0, 1))
    assert total.result()[0] == lowp._round_exact(sum(map(Fraction, x.ravel().tolist()), Fraction(0)), f)


@pytest.mark.parametrize("name", ["exp", "tanh", "log"])
@pytest.mark.parametrize("dtype", LOW)
def test_decimal_functions_agree_with_numpy(name, dtype):
    rng = np.random.default_rng(3)
    x = lowp.round_to(rng.uniform(-12, 12, 300), dtype)
    x = np.abs(x) + 1.0 if name == "log" else x
    f = lowp._format(dtype)
    got = np.array([lowp._exact_function(name, float(v), f) for v in x])
    np.testing.assert_array_equal(got, lowp._rfun(name, x, f))


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_exact_path_everywhere_gives_the_same_bits(dtype, monkeypatch):
    """The fast path (float64 plus an error bound) and the exact path (rationals, decimal)
    round every sum, quotient and function alike."""
    gold, fast, _ = _run("sparse_bias_dropout", dtype)
    gold2, fast2, _ = _run("softcap_dense_bias", dtype)

    def exact_everywhere(s, bound, f, exact):
        r = np.empty(np.shape(s))
        for idx in np.ndindex(r.shape):
            r[idx] = exact(idx)
        return r + 0.0

    monkeypatch.setattr(lowp, "_certify", exact_everywhere)
    _, slow, _ = _run("sparse_bias_dropout", dtype)
    _, slow2, _ = _run("softcap_dense_bias", dtype)
    for a, b in ((fast, slow), (fast2, slow2)):
        for n in NAMES:
            for x, y in zip(a[n], b[n]):
                np.testing.assert_array_equal(x, y, err_msg=n)


# ---- the model against the oracle ------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_float64_model_is_the_oracle(name):
    gold, naive, _ = _run(name, np.float64)
    for n in NAMES:
        assert len(gold[n]) == len(naive[n]), n
        for x, g in zip(naive[n], gold[n]):
            np.testing.assert_array_equal(np.isneginf(x), np.isneginf(g))
            scale = max(1.0, float(np.abs(_finite(g)).max()))
            assert np.abs(_finite(x) - _finite(g)).max() <= 1e-13 * scale, n


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", CASES)
def test_low_precision_results_are_values_of_the_dtype(name, dtype):
    _, naive, _ = _run(name, dtype)
    for n in NAMES:
        for x in naive[n]:
            np.testing.assert_array_equal(x.astype(dtype).astype(np.float64), x, err_msg=n)


@pytest.mark.parametrize("name", ["sliding", "softcap_dense_bias", "gqa_causal", "alibi"])
def test_error_scales_with_the_dtype_epsilon(name):
    """max|naive - gold| / (eps_T max|gold|) in [1/20, 20] (seen: 0.2 to 3), and the errors
    order as the epsilons: bfloat16 > float16 > float32 > float64."""
    errors = {}
    for dtype in (np.float64,) + LOW:
        gold, naive, _ = _run(name, dtype)
        errors[dtype] = {}
        for n in NAMES:
            if not gold[n]:
                continue
            err = max(np.abs(_finite(x) - _finite(g)).max() for x, g in zip(naive[n], gold[n]))
            size = max(np.abs(_finite(g)).max() for g in gold[n])
            errors[dtype][n] = err
            if dtype in EPS and n != "dbias":   # ALiBi's dbias (the slopes' gradient) sums whole rows
                assert EPS[dtype] / 20 <= err / size <= 20 * EPS[dtype], (n, dtype, err / size / EPS[dtype])
    for n in errors[np.float64]:
        e = [errors[d][n] for d in (np.float64, np.float32, np.float16, ml_dtypes.bfloat16)]
        assert e[0] < e[1] < e[2] < e[3], (n, e)


@pytest.mark.parametrize("dtype", (np.float64,) + LOW)
def test_empty_rows(dtype):
    gold, naive, _ = _run("empty_rows", dtype)
    out, lse, dq, dbias = naive["out"][0], naive["lse"][0], naive["dq"][0], naive["dbias"][0]
    assert np.all(out[:, :, :4] == 0) and np.all(np.isneginf(lse[:, :, :4]))
    assert np.all(np.isfinite(lse[:, :, 4:]))
    assert np.all(dq[:, :, :4] == 0) and np.all(dbias[:4] == 0) and np.any(dbias[4:] != 0)
    q, k, v = (np.ones((1, 1, 3, 2)),) * 3
    p = make_problem(q, k, v, Mask.empty(3, 3))
    r = lowp.naive_forward(p, dtype)
    g = lowp.naive_backward(p, r.out, r.lse, np.ones((1, 1, 3, 2)), np.ones((1, 1, 3)), dtype)
    assert np.all(r.out == 0) and np.all(np.isneginf(r.lse))
    assert not (g.dq.any() or g.dk.any() or g.dv.any())


@pytest.mark.parametrize("dtype", LOW)
def test_deterministic(dtype):
    _, a, _ = _run("ragged", dtype)
    _, b, _ = _run("ragged", dtype)
    for n in NAMES:
        for x, y in zip(a[n], b[n]):
            assert x.tobytes() == y.tobytes(), n


@pytest.mark.parametrize("dtype", (np.float64,) + LOW)
def test_baseline_errors(dtype):
    for name, keys in (("sliding", {"out", "lse", "dq", "dk", "dv"}), ("alibi", set(NAMES))):
        _, _, (p, r, g, dout, dlse) = _run(name, dtype)
        errors = lowp.baseline_errors(p, r.out, r.lse, g, dout, dlse, dtype)
        assert set(errors) == keys
        gold = {"out": r.out, "lse": r.lse[np.isfinite(r.lse)], "dq": g.dq, "dk": g.dk, "dv": g.dv,
                "dbias": g.dbias}
        for n, e in errors.items():
            size = max(1.0, float(np.abs(gold[n]).max()))
            assert (0 < e < 50 * EPS[dtype] * size) if dtype in EPS else (e < 1e-13 * size), (n, e)
    bad = r.lse.copy()
    bad[0, 0, 5] = -np.inf
    with pytest.raises(RefattnError, match="-inf on the same rows"):
        lowp.baseline_errors(p, r.out, bad, g, dout, dlse, dtype)


def test_baseline_errors_skip_empty_rows():
    _, _, (p, r, g, dout, dlse) = _run("empty_rows", np.float16)
    errors = lowp.baseline_errors(p, r.out, r.lse, g, dout, dlse, np.float16)
    assert set(errors) == set(NAMES) and all(np.isfinite(e) and e > 0 for e in errors.values())


@pytest.mark.parametrize("dtype", LOW)
def test_grid_inputs_are_unchanged_by_the_input_rounding(dtype):
    rng = np.random.default_rng(4)
    x = _grid(rng, 1000)
    np.testing.assert_array_equal(lowp.round_to(x, dtype), x)
    q, k, v, mask, kw, _, _ = _case("softcap_dense_bias")
    c = lowp._Ctx(make_problem(q, k, v, mask, **kw), lowp._format(dtype))
    for got, want in ((c.q, q), (c.k, k), (c.v, v), (c.bias, kw["bias"].reshape(c.bias.shape))):
        np.testing.assert_array_equal(got, want)
    off = make_problem(q + 1e-5, k, v, mask, **kw)          # off the grid: rounded
    assert not np.array_equal(lowp._Ctx(off, lowp._format(dtype)).q, q + 1e-5)


def test_errors():
    q, k, v, mask, kw, _, _ = _case("sliding")
    p = make_problem(q, k, v, mask)
    with pytest.raises(RefattnError, match="dtype must be one of"):
        lowp.naive_forward(p, np.int32)
    big = np.full((1, 1, 2, 4), 200.0)                       # q . k = 160000 > float16's 65504
    with pytest.raises(RefattnError, match="overflows"):
        lowp.naive_forward(make_problem(big, big, big, scale=1.0), np.float16)
    assert np.isfinite(lowp.naive_forward(make_problem(big, big, big, scale=1.0), np.float32).lse).all()


def test_model_equals_a_textbook_float16_attention():
    """The model, written plainly with numpy float16 arrays (elementwise ops in float16;
    matmuls and sums exact in float64 for these few grid values, then cast once; exp, tanh,
    log from float64, then cast), on a small case with every step: GQA, causal mask,
    softcap, dense bias, dropout, dlse."""
    rng = np.random.default_rng(6)
    H, L, D = 2, 6, 3
    q, k, v = _grid(rng, 1, H, L, D), _grid(rng, 1, 1, L, D), _grid(rng, 1, 1, L, D)
    dout, dlse, bias = _grid(rng, 1, H, L, D), _grid(rng, 1, H, L), _grid(rng, 1, H, L, L) / 8
    mask = patterns.Causal().mask(L, L)
    drop = Dropout.sample(0.25, mask, 1, H, seed=2)
    kw = {"softcap": 1.5, "bias": bias, "dropout": drop, "scale": 0.3}
    p = make_problem(q, k, v, mask, **kw)
    r = lowp.naive_forward(p, np.float16)
    g = lowp.naive_backward(p, r.out, r.lse, dout, dlse, np.float16)

    h16, f64 = np.float16, np.float64
    T = lambda x: np.asarray(x, f64).astype(h16)          # noqa: E731 - one rounding from float64
    mm = lambda a, b: T(a.astype(f64) @ b.astype(f64))    # noqa: E731
    allowed = mask.to_dense()
    scale, cap, inv = T(0.3)[()], T(1.5)[()], T(4 / 3)[()]
    K, V = T(k[0, 0]), T(v[0, 0])
    Pds, dS0s, dOs, Qs = [], [], [], []
    for h in range(H):
        Q, dO, bh = T(q[0, h]), T(dout[0, h]), T(bias[0, h])
        Z = np.zeros((L, L))
        Z[allowed] = drop.keep[0, h]
        S0 = scale * mm(Q, K.T)
        Tn = T(np.tanh((S0 / cap).astype(f64)))
        S = cap * Tn + bh
        m = np.where(allowed, S, -np.inf).max(axis=1).astype(h16)
        E = np.where(allowed, T(np.exp((S - m[:, None]).astype(f64))), h16(0))
        ell = T(E.astype(f64).sum(axis=1))
        P = E / ell[:, None]
        Pd = P * inv * Z.astype(h16)
        out = mm(Pd, V)
        lse = m + T(np.log(ell.astype(f64)))
        np.testing.assert_array_equal(r.out[0, h], out.astype(f64))
        np.testing.assert_array_equal(r.lse[0, h], lse.astype(f64))
        Dsum = T((dO.astype(f64) * out.astype(f64)).sum(axis=1))
        dP = mm(dO, V.T) * inv * Z.astype(h16)
        dS = P * (dP - Dsum[:, None]) + T(dlse[0, h])[:, None] * P
        np.testing.assert_array_equal(g.dbias[0, h], dS.astype(f64))
        dS0 = dS * (h16(1) - Tn * Tn)
        np.testing.assert_array_equal(g.dq[0, h], (scale * mm(dS0, K)).astype(f64))
        Pds.append(Pd), dS0s.append(dS0), dOs.append(dO), Qs.append(Q)
    Pd, dS0, dO, Q = (np.concatenate(x) for x in (Pds, dS0s, dOs, Qs))
    np.testing.assert_array_equal(g.dv[0, 0], mm(Pd.T, dO).astype(f64))
    np.testing.assert_array_equal(g.dk[0, 0], (scale * mm(dS0.T, Q)).astype(f64))
