"""The cross-backend matrix: every registered backend against the dense oracle.

Every backend in ``refattn.backends.names()`` other than ``dense`` joins by being
registered (``cuda`` on a real GPU; under the simulator it runs a reduced set, in
test_cuda_backend.py): it is run over every pattern (``refattn.patterns.examples``), every feature
of the contract and awkward shapes, and must agree with ``dense`` on ``out``, ``lse``,
``dq``, ``dk``, ``dv`` and ``dbias`` within 1e-12 relative in float64. The default run
covers each axis fully with the others held at a representative value; the full product
is marked slow.
"""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn import ALiBi, Dropout, Mask, SparseBias, backends, patterns
from refattn.patterns.examples import example

def _candidates():
    """Every available backend but the oracle; ``cuda`` only on a real GPU (under Numba's
    simulator it runs the reduced matrix of test_cuda_backend.py instead)."""
    names = [n for n in backends.names() if n != "dense"]
    if "cuda" in names and backends.get("cuda").simulated():
        names.remove("cuda")
    return names


CANDIDATES = _candidates()
RTOL = 1e-12

# (Lq, Lk, D, Dv): L = 1, D = 1, decoding (Lq = 1), Lq != Lk both ways, sizes that are
# not multiples of common block sizes, and one that spans several default tiles.
SHAPES = [(1, 1, 1, 1), (1, 19, 4, 3), (7, 7, 1, 2), (13, 21, 5, 3), (21, 13, 3, 5), (70, 70, 4, 4)]
SQUARE, RECT = (16, 16, 4, 3), (13, 21, 4, 3)


def _sparse_values(rng, mask, B, H):
    return [[rng.standard_normal(mask.group(b, h).nnz) for h in range(H)] for b in range(B)]


# feature -> (heads H, kv heads Hkv, builder(rng, mask, B, H, Lq, Lk) -> forward kwargs, with dlse?)
FEATURES = {
    "plain": (2, 2, lambda rng, m, B, H, Lq, Lk: {}, False),
    "gqa": (4, 2, lambda rng, m, B, H, Lq, Lk: {}, False),
    "mqa": (3, 1, lambda rng, m, B, H, Lq, Lk: {}, False),
    "scale": (2, 2, lambda rng, m, B, H, Lq, Lk: {"scale": 0.37}, False),
    "softcap": (2, 2, lambda rng, m, B, H, Lq, Lk: {"softcap": 1.5}, False),
    "alibi": (2, 2, lambda rng, m, B, H, Lq, Lk: {"bias": ALiBi(ALiBi.default_slopes(H))}, False),
    "alibi_top_left": (2, 2, lambda rng, m, B, H, Lq, Lk: {"bias": ALiBi([0.5, 0.25], "top_left")}, False),
    "dense_bias": (2, 2, lambda rng, m, B, H, Lq, Lk: {"bias": rng.standard_normal((B, H, Lq, Lk))}, False),
    "dense_bias_broadcast": (2, 2, lambda rng, m, B, H, Lq, Lk: {"bias": rng.standard_normal((1, H, 1, Lk))},
                             False),
    "dense_bias_rows": (2, 2, lambda rng, m, B, H, Lq, Lk: {"bias": rng.standard_normal((Lq, 1))}, False),
    "sparse_bias": (2, 2, lambda rng, m, B, H, Lq, Lk: {"bias": SparseBias(_sparse_values(rng, m, B, H))},
                    False),
    "dropout": (2, 2, lambda rng, m, B, H, Lq, Lk: {"dropout": Dropout.sample(0.3, m, B, H, seed=5)}, False),
    "dlse": (2, 2, lambda rng, m, B, H, Lq, Lk: {}, True),
    "everything": (4, 2, lambda rng, m, B, H, Lq, Lk: {
        "softcap": 2.0, "bias": rng.standard_normal((B, 1, Lq, Lk)),
        "dropout": Dropout.sample(0.2, m, B, H, seed=9)}, True),
}


def _leaves(x):
    if x is None:
        return []
    if isinstance(x, np.ndarray):
        return [x]
    return [leaf for row in x for leaf in row]


def assert_close(got, want, what, floor=0.0):
    """``max|got - want| <= RTOL * max(max|want|, floor)``: relative to the tensor's
    largest entry (exact where the reference is all zeros and ``floor`` is 0)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = np.max(np.abs(got - want), initial=0.0)
    assert err <= RTOL * max(np.max(np.abs(want), initial=0.0), floor), f"{what}: max error {err:.3g}"


def assert_agrees(backend, q, k, v, mask, kwargs, dout, dlse, options=None):
    """Forward and backward of ``backend`` against ``dense`` on the same call.

    Each tensor is compared relative to its largest entry, or, where that is smaller, to
    the size of the terms it is a sum of: a gradient can be exactly zero in exact
    arithmetic (a row with one key has ``dS = P (dP - D) = 0``; a bias broadcast along a
    row has ``dbias_i = sum_j dS_ij = 0``), and then both routes return rounding noise of
    the size of those terms, which no relative test can judge."""
    ref = refattn.forward(q, k, v, mask, **kwargs)
    got = refattn.forward(q, k, v, mask, backend=backend, options=options, **kwargs)
    assert got.out.dtype == np.float64 and got.lse.dtype == np.float64
    big = lambda x: float(np.max(np.abs(x), initial=0.0))  # noqa: E731
    assert_close(got.out, ref.out, f"{backend} out", big(v))
    finite = np.isfinite(ref.lse)
    assert np.array_equal(np.isfinite(got.lse), finite), f"{backend} lse: -inf rows differ"
    assert (got.lse[~finite] == -np.inf).all()
    assert_close(got.lse[finite], ref.lse[finite], f"{backend} lse", 1.0)
    gref = refattn.backward(q, k, v, ref.out, ref.lse, dout, mask, dlse=dlse, **kwargs)
    ggot = refattn.backward(q, k, v, ref.out, ref.lse, dout, mask, dlse=dlse, backend=backend,
                            options=options, **kwargs)
    # |dS_ij| = P_ij |dP_ij - D_i + dlse_i| <= 2 |dP| + |dlse|, |dP| <= Dv max|dO| max|V| / (1 - p)
    dS = 2 * dout.shape[-1] * big(dout) * big(v) * 2 + (big(dlse) if dlse is not None else 0)
    scale = kwargs.get("scale", 1 / np.sqrt(q.shape[-1]))
    floors = {"dq": scale * dS * big(k), "dk": scale * dS * big(q), "dv": 2 * big(dout)}
    for name in ("dq", "dk", "dv"):
        assert_close(getattr(ggot, name), getattr(gref, name), f"{backend} {name}", floors[name])
    a, b = _leaves(ggot.dbias), _leaves(gref.dbias)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert_close(x, y, f"{backend} dbias", dS)


def run_case(backend, pattern_name, feature, shape, seed=0, options=None, batch=2):
    Lq, Lk, D, Dv = shape
    p = example(pattern_name, Lq, Lk, seed=seed)
    if p is None:
        pytest.skip(f"{pattern_name} does not apply to Lq={Lq}, Lk={Lk}")
    H, Hkv, build, with_dlse = FEATURES[feature]
    B = batch
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, H, Lq, D))
    k = rng.standard_normal((B, Hkv, Lk, D))
    mask = p.mask(Lq, Lk, heads=H, q=q, k=k)      # content-dependent patterns choose from q, k
    v = rng.standard_normal((B, Hkv, Lk, Dv))
    kwargs = build(rng, mask, B, H, Lq, Lk)
    dout = rng.standard_normal((B, H, Lq, Dv))
    dlse = rng.standard_normal((B, H, Lq)) if with_dlse else None
    assert_agrees(backend, q, k, v, mask, kwargs, dout, dlse, options)


def test_there_is_something_to_compare():
    assert {"sparse", "tiled"} <= set(CANDIDATES)


# ---- the default run: each axis in full, the others at a representative value -----

@pytest.mark.parametrize("backend", CANDIDATES)
@pytest.mark.parametrize("pattern_name, shape", [
    pytest.param(name, shape, id=f"{name}-{'square' if shape == SQUARE else 'rect'}")
    for name in patterns.names() for shape in (SQUARE, RECT)
    if example(name, shape[0], shape[1]) is not None])       # self-attention layouts: square only
def test_every_pattern(backend, pattern_name, shape):
    run_case(backend, pattern_name, "everything", shape)


@pytest.mark.parametrize("backend", CANDIDATES)
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_feature_and_shape(backend, feature, shape):
    run_case(backend, "sliding_window", feature, shape)


@pytest.mark.parametrize("backend", CANDIDATES)
@pytest.mark.parametrize("pattern_name", ["causal", "global_tokens", "random", "block_sparse", "bigbird"])
@pytest.mark.parametrize("feature", FEATURES)
def test_features_on_more_patterns(backend, pattern_name, feature):
    run_case(backend, pattern_name, feature, RECT if pattern_name != "bigbird" else SQUARE)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), lq=st.integers(1, 20), lk=st.integers(1, 20), density=st.floats(0, 1),
       feature=st.sampled_from(sorted(FEATURES)), per_head=st.booleans())
def test_random_masks(data, lq, lk, density, feature, per_head):
    """Hypothesis-drawn masks, empty rows and empty masks included."""
    H, Hkv, build, with_dlse = FEATURES[feature]
    seed = data.draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    dense = rng.random((1, H, lq, lk) if per_head else (lq, lk)) < density
    mask = Mask.from_dense(dense)
    B = 2
    q, k, v = rng.standard_normal((B, H, lq, 3)), rng.standard_normal((B, Hkv, lk, 3)), rng.standard_normal((B, Hkv, lk, 2))
    kwargs = build(rng, mask, B, H, lq, lk)
    dout = rng.standard_normal((B, H, lq, 2))
    dlse = rng.standard_normal((B, H, lq)) if with_dlse else None
    for backend in CANDIDATES:
        assert_agrees(backend, q, k, v, mask, kwargs, dout, dlse)


# ---- float32 compute ----------------------------------------------------------------

@pytest.mark.parametrize("backend", [b for b in CANDIDATES if np.float32 in map(np.dtype, backends.get(b).COMPUTE_DTYPES)])
@pytest.mark.parametrize("feature", ["plain", "everything", "alibi", "sparse_bias"])
def test_float32_compute(backend, feature, rng):
    """In float32 the results come back in float32 and are within float32 rounding of the
    float64 oracle (a loose bound here; the tolerance policy is issue [6/9]'s)."""
    Lq, Lk, D, Dv = RECT
    H, Hkv, build, with_dlse = FEATURES[feature]
    mask = patterns.SlidingWindow(4, 2).mask(Lq, Lk)
    q, k, v = rng.standard_normal((1, H, Lq, D)), rng.standard_normal((1, Hkv, Lk, D)), rng.standard_normal((1, Hkv, Lk, Dv))
    kwargs = build(rng, mask, 1, H, Lq, Lk)
    dout = rng.standard_normal((1, H, Lq, Dv))
    ref = refattn.forward(q, k, v, mask, **kwargs)
    got = refattn.forward(q, k, v, mask, backend=backend, compute_dtype=np.float32, **kwargs)
    assert got.out.dtype == np.float32 and got.lse.dtype == np.float32
    np.testing.assert_allclose(got.out, ref.out, rtol=1e-4, atol=1e-5)
    g = refattn.backward(q, k, v, ref.out, ref.lse, dout, mask, backend=backend, compute_dtype="float32", **kwargs)
    gref = refattn.backward(q, k, v, ref.out, ref.lse, dout, mask, **kwargs)
    for name in ("dq", "dk", "dv"):
        assert getattr(g, name).dtype == np.float32
        np.testing.assert_allclose(getattr(g, name), getattr(gref, name), rtol=1e-4, atol=1e-4)
    # float32 differs from float64 by rounding: not by nothing, which would mean no float32 at all
    assert np.max(np.abs(got.out - ref.out)) > 0


def test_compute_dtype_and_options_are_validated(rng):
    q, k, v = rng.standard_normal((3, 1, 1, 4, 2))
    with pytest.raises(refattn.RefattnError, match=r"compute_dtype: backend 'dense' computes in \['float64'\]"):
        refattn.forward(q, k, v, compute_dtype=np.float32)
    with pytest.raises(refattn.RefattnError, match="compute_dtype: backend 'sparse' computes in"):
        refattn.forward(q, k, v, backend="sparse", compute_dtype="float16")
    with pytest.raises(refattn.RefattnError, match=r"takes \['block_k', 'block_q'\], got unknown \['block'\]"):
        refattn.forward(q, k, v, backend="tiled", options={"block": 4})
    with pytest.raises(refattn.RefattnError, match=r"options\['block_q'\] must be an int in \[1, 4096\]"):
        refattn.forward(q, k, v, backend="tiled", options={"block_q": 0})
    with pytest.raises(refattn.RefattnError, match="options: expected a dict"):
        refattn.forward(q, k, v, backend="tiled", options=[("block_q", 4)])
    with pytest.raises(refattn.RefattnError, match="takes no options"):
        refattn.forward(q, k, v, backend="sparse", options={"block_q": 4})


# ---- tiled: results independent of the block sizes --------------------------------

TILE_SIZES = [(1, 1), (3, 5), (8, 4), (16, 16), (64, 64)]


@pytest.mark.skipif("tiled" not in CANDIDATES, reason="no tiled backend")
@pytest.mark.parametrize("pattern_name", patterns.names())
def test_tiled_block_size_independence(pattern_name):
    """Every block size agrees with the oracle (hence with each other) to rounding."""
    for bq, bk in TILE_SIZES:
        run_case("tiled", pattern_name, "everything", SQUARE, options={"block_q": bq, "block_k": bk})


# ---- the full product (slow) --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backend", CANDIDATES)
@pytest.mark.parametrize("pattern_name", patterns.names())
def test_full_matrix(backend, pattern_name):
    for feature, shape in itertools.product(FEATURES, SHAPES):
        if example(pattern_name, shape[0], shape[1]) is not None:
            run_case(backend, pattern_name, feature, shape)
