"""Every kind of bad input gets a RefattnError naming the argument (spec/semantics.md §9)."""

import ml_dtypes
import numpy as np
import pytest

import refattn
from refattn import ALiBi, Dropout, Mask, RefattnError, SparseBias

from .conftest import random_qkv


@pytest.fixture
def qkv(rng):
    return random_qkv(rng, 2, 4, 2, 5, 6, 3, 2)


def test_refattn_error_is_a_value_error():
    assert issubclass(RefattnError, ValueError)


@pytest.mark.parametrize("which, shape, message", [
    ("q", (2, 4, 5), "q: expected a 4-D array"),
    ("k", (2, 2, 6, 3, 1), "k: expected a 4-D array"),
    ("k", (2, 2, 6, 4), r"k: head dim D = 4 must equal q's D = 3"),
    ("v", (2, 2, 7, 2), r"v: \(Hkv, Lk\) = \(2, 7\) must equal k's"),
    ("k", (1, 2, 6, 3), "batch: q has B = 2 but k has 1"),
    ("k", (2, 3, 6, 3), None),  # H % Hkv: checked with v reshaped too, below
    ("q", (2, 4, 0, 3), r"q: every dimension must be >= 1"),
])
def test_shape_errors(qkv, rng, which, shape, message):
    q, k, v = qkv
    args = {"q": q, "k": k, "v": v}
    args[which] = rng.standard_normal(shape)
    if message is None:
        args["v"] = rng.standard_normal((2, 3, 6, 2))
        message = "heads: q has H = 4 heads, k/v have Hkv = 3; H % Hkv must be 0"
    with pytest.raises(RefattnError, match=message):
        refattn.forward(args["q"], args["k"], args["v"])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex128, np.longdouble,
                                   ml_dtypes.float8_e4m3fn])
def test_unsupported_dtypes(qkv, dtype):
    q, k, v = qkv
    with pytest.raises(RefattnError, match=r"q: dtype must be one of float16, bfloat16, float32, float64"):
        refattn.forward(q.astype(dtype), k.astype(dtype), v.astype(dtype))


def test_mixed_dtypes(qkv):
    q, k, v = qkv
    with pytest.raises(RefattnError, match="q, k, v must share one dtype; got float32, float64, float64"):
        refattn.forward(q.astype(np.float32), k, v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_name_tensor_and_index(qkv, which, bad):
    args = dict(zip("qkv", (x.copy() for x in qkv)))
    args[which][1, 0, 2, 1] = bad
    args[which][1, 1, 0, 0] = bad  # a later one: the first in C order is reported
    with pytest.raises(RefattnError, match=rf"{which}: non-finite value {bad} at index \[1, 0, 2, 1\]"):
        refattn.forward(args["q"], args["k"], args["v"])


def test_non_finite_in_half_precision(qkv):
    q, k, v = (x.astype(ml_dtypes.bfloat16) for x in qkv)
    q[0, 0, 0, 0] = np.inf
    with pytest.raises(RefattnError, match=r"q: non-finite value inf at index \[0, 0, 0, 0\]"):
        refattn.forward(q, k, v)


@pytest.mark.parametrize("kw, message", [
    (dict(scale=np.nan), "scale must be finite"),
    (dict(scale="0.5"), "scale must be a real number"),
    (dict(scale=True), "scale must be a real number"),
    (dict(softcap=0.0), r"softcap must be > 0 \(use None to disable it\)"),
    (dict(softcap=-1.0), "softcap must be > 0"),
    (dict(softcap=np.inf), "softcap must be finite"),
    (dict(mask=np.ones((5, 6), bool)), "mask must be a refattn.Mask"),
    (dict(mask=Mask.full(6, 5)), r"mask: shape \(Lq, Lk\) = \(6, 5\) does not match"),
    (dict(bias=np.zeros((3, 5, 6))), r"bias: shape \(3, 5, 6\) does not broadcast to \(B, H, Lq, Lk\) = \(2, 4, 5, 6\)"),
    (dict(bias=np.zeros((1, 1, 1, 1, 6))), "bias: shape .* does not broadcast"),
    (dict(bias=np.zeros((5, 6), np.int64)), "bias: dtype must be one of"),
    (dict(bias=ALiBi([1.0, 2.0])), r"ALiBi.slopes\): expected one slope per query head, shape \(4,\)"),
    (dict(bias=SparseBias(np.zeros(3))), "has 3 values but the mask group there has nnz = 30"),
    (dict(bias=SparseBias(np.zeros((3, 1, 30)))), r"grid shape \(Bv, Hv\) = \(3, 1\) does not broadcast"),
    (dict(dropout=0.1), r"dropout must be a refattn.Dropout\(p, keep\)"),
    (dict(dropout=Dropout(0.1, np.ones(29, bool))), "dropout.keep: batch 0, head 0 has 29 values"),
])
def test_argument_errors(qkv, kw, message):
    with pytest.raises(RefattnError, match=message):
        refattn.forward(*qkv, **kw)


def test_non_finite_bias_is_rejected(qkv):
    bias = np.zeros((5, 6))
    bias[2, 3] = -np.inf
    with pytest.raises(RefattnError, match=r"bias: non-finite value -inf at index \[2, 3\]"):
        refattn.forward(*qkv, bias=bias)
    with pytest.raises(RefattnError, match=r"non-finite value nan at index 1"):
        SparseBias(np.array([0.0, np.nan]))
    with pytest.raises(RefattnError, match="non-finite slope at head 0"):
        ALiBi([np.inf])


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, np.nan])
def test_dropout_probability_range(p):
    with pytest.raises(RefattnError, match=r"dropout.p must be in \[0, 1\)"):
        Dropout(p, np.ones(3, bool))


def test_dropout_keep_must_be_boolean():
    with pytest.raises(RefattnError, match="dropout.keep.*expected dtype bool, got float64"):
        Dropout(0.1, np.ones(3))


def test_value_grid_shapes():
    with pytest.raises(RefattnError, match=r"expected shape \(nnz,\) or \(Bv, Hv, nnz\)"):
        SparseBias(np.zeros((2, 3)))
    with pytest.raises(RefattnError, match="same non-zero number of arrays"):
        SparseBias([[np.zeros(2)], []])
    with pytest.raises(RefattnError, match="expected a 1-D array over the nonzeros"):
        SparseBias([[np.zeros((2, 2))]])


def test_alibi_arguments():
    with pytest.raises(RefattnError, match=r"ALiBi.align\) must be one of"):
        ALiBi([1.0], align="center")
    with pytest.raises(RefattnError, match=r"expected shape \(H,\)"):
        ALiBi(np.ones((2, 2)))
    with pytest.raises(RefattnError, match="heads must be an int >= 1"):
        ALiBi.default_slopes(0)


def test_alibi_default_slopes_follow_the_paper():
    np.testing.assert_allclose(ALiBi.default_slopes(8), 2.0 ** (-np.arange(1, 9)))
    # Not a power of two: the 4 slopes of n = 4, then every other slope of n = 8.
    np.testing.assert_allclose(ALiBi.default_slopes(6),
                               [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])


def test_unknown_backend(qkv):
    with pytest.raises(RefattnError, match="backend: unknown backend 'nope'"):
        refattn.forward(*qkv, backend="nope")


class TestBackwardInputs:
    @pytest.fixture
    def fwd(self, qkv):
        r = refattn.forward(*qkv)
        return qkv, r

    def test_shapes(self, fwd):
        (q, k, v), r = fwd
        with pytest.raises(RefattnError, match=r"dout: expected shape \(2, 4, 5, 2\), got \(2, 4, 5, 3\)"):
            refattn.backward(q, k, v, r.out, r.lse, np.zeros((2, 4, 5, 3)))
        with pytest.raises(RefattnError, match=r"out: expected shape"):
            refattn.backward(q, k, v, r.out[:, :2], r.lse, np.zeros(r.out.shape))
        with pytest.raises(RefattnError, match=r"lse: expected a 3-D array"):
            refattn.backward(q, k, v, r.out, r.lse[..., None], np.zeros(r.out.shape))
        with pytest.raises(RefattnError, match=r"dlse: expected shape \(2, 4, 5\)"):
            refattn.backward(q, k, v, r.out, r.lse, np.zeros(r.out.shape), dlse=np.zeros((2, 4, 6)))

    def test_non_finite(self, fwd):
        (q, k, v), r = fwd
        dout = np.zeros(r.out.shape)
        dout[0, 1, 2, 0] = np.nan
        with pytest.raises(RefattnError, match=r"dout: non-finite value nan at index \[0, 1, 2, 0\]"):
            refattn.backward(q, k, v, r.out, r.lse, dout)
        with pytest.raises(RefattnError, match=r"dlse: non-finite value inf"):
            refattn.backward(q, k, v, r.out, r.lse, np.zeros(r.out.shape), dlse=np.full(r.lse.shape, np.inf))

    def test_lse_must_match_empty_rows(self, qkv):
        q, k, v = qkv
        dm = np.ones((5, 6), bool)
        dm[3] = False
        m = Mask.from_dense(dm)
        r = refattn.forward(q, k, v, m)
        dout = np.zeros(r.out.shape)
        lse = r.lse.copy()
        lse[1, 2, 3] = 0.0
        with pytest.raises(RefattnError, match=r"lse\[1, 2, 3\] = 0.0, but row 3 has no allowed key, so LSE must be -inf"):
            refattn.backward(q, k, v, r.out, lse, dout, m)
        lse = r.lse.copy()
        lse[0, 0, 0] = -np.inf
        with pytest.raises(RefattnError, match=r"row 0 has allowed keys, so LSE must be finite"):
            refattn.backward(q, k, v, r.out, lse, dout, m)
        lse = r.lse.copy()
        lse[0, 0, 1] = np.nan
        with pytest.raises(RefattnError, match=r"lse\[0, 0, 1\] = nan"):
            refattn.backward(q, k, v, r.out, lse, dout, m)


def test_overflowing_scores_are_an_error_not_an_empty_row():
    # S = 1e400 overflows to +inf: the row has an allowed key, so it must not be taken as empty.
    q = np.full((1, 1, 2, 1), 1e200)
    k = np.full((1, 1, 3, 1), 1e200)
    with pytest.raises(RefattnError, match=r"lse: the result is not finite at index \[0, 0, 0\] although every "
                                           r"input is finite; the computation overflows float64"):
        refattn.forward(q, k, np.ones((1, 1, 3, 1)))


def test_overflow_in_backward_is_an_error(rng):
    q, k, v = random_qkv(rng, 1, 1, 1, 2, 3, 1)
    r = refattn.forward(q, k, v)
    lse = r.lse - 800.0  # finite, but inconsistent: exp(S - lse) overflows
    with pytest.raises(RefattnError, match="dq: the result is not finite|dv: the result is not finite|dk: the result"):
        refattn.backward(q, k, v, r.out, lse, np.ones(r.out.shape))


def test_flat_lists_are_the_nnz_form(qkv):
    q, k, v = qkv
    nnz = 5 * 6
    a = refattn.forward(q, k, v, bias=SparseBias([0.25] * nnz), dropout=Dropout(0.5, [True, False] * (nnz // 2)))
    b = refattn.forward(q, k, v, bias=SparseBias(np.full(nnz, 0.25)),
                        dropout=Dropout(0.5, np.array([True, False] * (nnz // 2))))
    np.testing.assert_array_equal(a.out, b.out)


def test_keep_mask_is_copied_so_dropout_is_a_value(qkv):
    q, k, v = qkv
    keep = np.ones(30, bool)
    d = Dropout(0.5, keep)
    r = refattn.forward(q, k, v, dropout=d)
    keep[:] = False  # a later write to the caller's buffer must not change d
    np.testing.assert_array_equal(refattn.forward(q, k, v, dropout=d).out, r.out)
    assert not d.grid.at(0, 0).flags.writeable


@pytest.mark.parametrize("values", [np.arange(3), np.arange(3).astype(np.longdouble), np.ones(3, bool)])
def test_sparse_bias_dtypes_follow_dense_bias(values):
    with pytest.raises(RefattnError, match="SparseBias.values.*dtype must be one of"):
        SparseBias(values)


@pytest.mark.parametrize("call, message", [
    (lambda m: Dropout.sample("x", m, 1, 1, 0), "dropout.p must be a real number"),
    (lambda m: Dropout.sample(None, m, 1, 1, 0), "dropout.p must be a real number"),
    (lambda m: Dropout.sample(0.1, np.ones((2, 3), bool), 1, 1, 0), "mask must be a refattn.Mask"),
    (lambda m: Dropout.sample(0.1, m, 1.5, 1, 0), "batch must be an int"),
    (lambda m: Dropout.sample(0.1, m, 0, 1, 0), "batch must be >= 1"),
    (lambda m: Dropout.sample(0.1, m, 1, 1, -3), "seed must be an int >= 0"),
])
def test_dropout_sample_arguments(call, message):
    with pytest.raises(RefattnError, match=message):
        call(Mask.full(2, 3))


def test_dropout_sample_draw_is_documented():
    m = Mask.from_dense(np.array([[True, False, True], [True, True, True]]))
    d = Dropout.sample(0.3, m, 2, 2, seed=42)
    g = np.random.Generator(np.random.PCG64(42))
    expected = np.array([[g.random(5) >= 0.3 for _ in range(2)] for _ in range(2)])
    np.testing.assert_array_equal(np.array(d.keep), expected)


@pytest.mark.parametrize("call", [
    lambda: ALiBi([0.5], align=np.array(["top_left", "x"])),
    lambda: refattn.patterns.get(["causal"]),
])
def test_non_string_names(call):
    with pytest.raises(RefattnError):
        call()


@pytest.mark.parametrize("dbias", [np.array([1.0, np.inf]), [[np.zeros(2), np.array([np.nan])]]])
def test_non_finite_dbias_is_an_error(dbias):
    from refattn.attention import _check_grads
    from refattn.contract import HOST, Grads
    z = np.zeros((1, 1, 1, 1))
    with pytest.raises(RefattnError, match="dbias: the result is not finite"):
        _check_grads(Grads(z, z, z, dbias), HOST, np.float64)


@pytest.mark.parametrize("backend", ["dense", "sparse", "tiled", "cpu"])
@pytest.mark.parametrize("compute_dtype", ["flaot32", "nonsense", ["float32"], "int32", "float16", 3.5])
def test_a_misspelt_compute_dtype_is_an_error(qkv, backend, compute_dtype):
    """A name that is no dtype the backend computes in is refused, never read as float64
    (np.dtype(None) is float64; a misspelling once became None and passed)."""
    q, k, v = qkv
    with pytest.raises(RefattnError, match=rf"compute_dtype: backend '{backend}' computes in"):
        refattn.forward(q, k, v, backend=backend, compute_dtype=compute_dtype)


def _overflowing(kind, dtype=np.float64):
    """The triggers of issue 19: (q, k, v, kwargs) whose scores overflow the compute dtype."""
    if kind == "1e300":
        q = np.full((1, 1, 4, 2), 1e300)
        return q, q.copy(), np.ones((1, 1, 4, 2)), {}
    if kind == "scale":
        q = np.ones((1, 1, 4, 2))
        return q, q.copy(), np.ones((1, 1, 4, 2)), {"scale": 1e308}
    if kind == "1e154":                   # each product is finite, their sum over D = 2 is not
        q = np.full((1, 1, 4, 2), 1e154)
        q[0, 0, 1] = -1e154
        return q, q.copy(), np.ones((1, 1, 4, 2)), {"scale": 1.0}
    if kind == "one-row":                 # one row of four overflows, the others are fine
        q = np.zeros((1, 1, 4, 1))
        q[0, 0, 2] = 1e300
        k = np.ones((1, 1, 4, 1))
        return q, k * 1e10, np.ones((1, 1, 4, 1)), {"scale": 1.0}
    raise AssertionError(kind)


# Numba's CUDA simulator runs kernels as NumPy scalars in threads, outside the call's errstate:
# its overflow warnings are the simulator's, not the backend's.
SIMULATED_OVERFLOW = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                                                "ignore:invalid value encountered:RuntimeWarning")
ALL_BACKENDS = [pytest.param(b, marks=SIMULATED_OVERFLOW) if b == "cuda" else b for b in refattn.backends.names()]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ["1e300", "scale", "1e154", "one-row"])
def test_overflowing_scores_are_an_error_on_every_backend(backend, kind):
    """Never a fake empty row (out = 0, lse = -inf) where the mask allows keys."""
    q, k, v, kw = _overflowing(kind)
    with pytest.raises(RefattnError, match=r"lse: .*although every input is finite; the computation overflows "
                                           r"float64"):
        refattn.forward(q, k, v, backend=backend, **kw)


@pytest.mark.parametrize("backend", [b for b in ALL_BACKENDS if b != "dense"])
def test_overflowing_float32_compute_names_float32(backend):
    q = np.full((1, 1, 4, 2), 1e20, np.float32)
    with pytest.raises(RefattnError, match=r"the computation overflows float32"):
        refattn.forward(q, q.copy(), np.ones((1, 1, 4, 2), np.float32), backend=backend, compute_dtype="float32")


@pytest.mark.parametrize("backend", ["tiled", "cpu"])
@pytest.mark.parametrize("value", [0, 4097, 10**6, 2**70, True, 2.0])
def test_block_sizes_are_bounded(qkv, backend, value):
    """A tile side past 4096 (a 128 MiB float64 tile per thread) is refused up front: a block
    of 10**6 once made the cpu backend's kernel fail with a SystemError."""
    q, k, v = qkv
    with pytest.raises(RefattnError, match=r"options\['block_q'\] must be an int in \[1, 4096\]"):
        refattn.forward(q, k, v, backend=backend, options={"block_q": value})


@pytest.mark.parametrize("scale", [10**400, -(10**400), float("inf"), float("nan")])
def test_a_scale_beyond_float64_is_an_error(qkv, scale):
    q, k, v = qkv
    with pytest.raises(RefattnError, match="scale must be finite"):
        refattn.forward(q, k, v, scale=scale)


def test_a_mask_larger_than_memory_is_refused_before_it_is_built(qkv):
    """No mask given means every key: at Lq = Lk = 200000 that is 4e10 entries (298 GiB),
    refused in one line instead of a MemoryError from deep inside."""
    from refattn.errors import physical_memory

    if physical_memory() is None or physical_memory() >= 2**38:
        pytest.skip("this machine's memory is unknown or would hold the mask")
    big = np.zeros((1, 1, 200_000, 1))
    with pytest.raises(RefattnError, match=r"Mask.full\(200000, 200000\): a CSR of 40000000000 entries would "
                                           r"take 298 GiB, more than this machine's"):
        refattn.forward(big, big, big)
    with pytest.raises(RefattnError, match=r"a mask of \d+ entries \(10000000 x 10000000\) would take"):
        refattn.patterns.SlidingWindow(10**5, 10**5).mask(10**7, 10**7)
    with pytest.raises(RefattnError, match=r"a 2000000000 x 2000000000 mask's row arrays would take"):
        refattn.patterns.SlidingWindow(1, 0).mask(2 * 10**9, 2 * 10**9)


def test_refattn_run_too_large_is_one_line(capsys):
    from refattn.cli import main
    from refattn.errors import physical_memory

    if physical_memory() is None or physical_memory() >= 2**38:
        pytest.skip("this machine's memory is unknown or would hold the mask")
    assert main(["run", "--lq", "200000", "--dim", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("refattn run: error: Mask.full(200000, 200000)") and err.count("\n") == 1


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_huge_v_is_refused_by_every_backend_alike(backend):
    """v = 1.5e308: the oracle's P @ V stays finite, a tiled kernel's running sum does not;
    one rule for all (spec/semantics.md, section 7): refused everywhere, named."""
    q = np.zeros((1, 1, 4, 2))
    v = np.full((1, 1, 4, 2), 1.5e308)
    with pytest.raises(RefattnError, match=r"v: max\|v\| = 1\.5e\+308 with up to 4 allowed keys in a row can "
                                           r"overflow float64"):
        refattn.forward(q, q, v, backend=backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_at_the_bound_every_backend_computes(backend):
    """Just inside the rule every backend returns the same finite numbers."""
    q = np.zeros((1, 1, 4, 2))
    v = np.full((1, 1, 4, 2), np.finfo(np.float64).max / 4 * 0.99)
    v[0, 0, 1] *= -0.5
    r = refattn.forward(q, q, v, backend=backend)
    ref = refattn.forward(q, q, v)
    assert np.isfinite(r.out).all()
    np.testing.assert_allclose(r.out, ref.out, rtol=1e-12)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_huge_dout_is_refused_by_every_backend_alike(backend):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 4, 2)) for _ in range(3))
    r = refattn.forward(q, k, v)
    with pytest.raises(RefattnError, match=r"dout: max\|dout\| = 1e\+308 times max\|v\| = .* can overflow float64 "
                                           r"in dP = dO \. V"):
        refattn.backward(q, k, v, r.out, r.lse, np.full(r.out.shape, 1e308), backend=backend)
