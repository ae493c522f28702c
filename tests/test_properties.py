"""Property tests (hypothesis) of the dense oracle and of `Mask`.

Each test states one algebraic property that attention must satisfy whatever the
inputs: probabilities form a distribution on non-empty rows, keys are an unordered
set, GQA is repeated kv heads, (batch, head) problems are independent, a constant
score shift moves only the LSE, stacked masks broadcast per head, masks round-trip
through dense and CSR, and the oracle's row chunking does not change its numbers.
Sizes stay small (B <= 2, H <= 4, L <= 12, D <= 6) so the file runs in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import refattn
from refattn import Dropout, Mask, SparseBias
from refattn.backends import dense as dense_backend

PROPS = settings(max_examples=50, deadline=None)

MAX_B, MAX_H, MAX_L, MAX_D = 2, 4, 12, 6

_elements = st.floats(-2.0, 2.0, allow_nan=False, allow_infinity=False,
                      allow_subnormal=False, width=64)


# ---- strategies -------------------------------------------------------------------------
def farr(shape, elements=_elements):
    """A float64 array of ``shape`` with bounded finite entries."""
    return hnp.arrays(np.float64, tuple(shape), elements=elements)


@st.composite
def dims(draw, *, min_group=1, max_b=MAX_B):
    """(B, H, Hkv, Lq, Lk, D, Dv) with H = Hkv * group <= MAX_H."""
    B = draw(st.integers(1, max_b))
    hkv = draw(st.integers(1, 2))
    group = draw(st.integers(min_group, max(min_group, MAX_H // hkv)))
    H = hkv * group
    Lq = draw(st.integers(1, MAX_L))
    Lk = draw(st.integers(1, MAX_L))
    D = draw(st.integers(1, MAX_D))
    Dv = draw(st.integers(1, MAX_D))
    return B, H, hkv, Lq, Lk, D, Dv


@st.composite
def dense_masks(draw, B, H, Lq, Lk, *, allow_4d=True):
    """A boolean mask of shape (Lq, Lk) or (Bm, Hm, Lq, Lk), Bm in {1, B}, Hm in {1, H};
    all-empty and all-full masks are drawn on purpose."""
    if allow_4d and draw(st.booleans()):
        shape = (draw(st.sampled_from(sorted({1, B}))), draw(st.sampled_from(sorted({1, H}))), Lq, Lk)
    else:
        shape = (Lq, Lk)
    kind = draw(st.sampled_from(["random", "random", "random", "full", "empty"]))
    if kind == "full":
        return np.ones(shape, dtype=bool)
    if kind == "empty":
        return np.zeros(shape, dtype=bool)
    return draw(hnp.arrays(np.bool_, shape))


def scales():
    return st.one_of(st.none(), st.floats(-3.0, 3.0, allow_nan=False, allow_subnormal=False))


def softcaps():
    return st.one_of(st.none(), st.floats(0.1, 10.0, allow_nan=False))


@st.composite
def qkv(draw, B, H, hkv, Lq, Lk, D, Dv):
    q = draw(farr((B, H, Lq, D)))
    k = draw(farr((B, hkv, Lk, D)))
    v = draw(farr((B, hkv, Lk, Dv)))
    return q, k, v


# ---- helpers ----------------------------------------------------------------------------
def broadcast_mask(b: np.ndarray, B: int, H: int) -> np.ndarray:
    """The dense (B, H, Lq, Lk) view of a 2-D or 4-D boolean mask."""
    Lq, Lk = b.shape[-2:]
    return np.broadcast_to(b, (B, H, Lq, Lk))


def assert_close(actual, expected, rtol, *, what=""):
    """``assert_allclose`` with ``atol = rtol * max(1, max|expected|)``: relative to the
    array's magnitude, so entries that cancel to ~0 do not need relative accuracy."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    mag = float(np.max(np.abs(expected))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(1.0, mag),
                               err_msg=what)


def assert_lse_close(actual, expected, rtol, *, what="lse"):
    """LSEs agree: -inf at exactly the same places, finite values close."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    neg = np.isneginf(expected)
    np.testing.assert_array_equal(np.isneginf(actual), neg, err_msg=what)
    assert np.all(np.isfinite(actual[~neg])), what
    assert_close(actual[~neg], expected[~neg], rtol, what=what)


def assert_dbias_close(actual, expected, rtol, what="dbias"):
    if isinstance(expected, list):  # ragged SparseBias gradient: [b][h] 1-D arrays
        assert isinstance(actual, list) and len(actual) == len(expected), what
        for ra, re in zip(actual, expected):
            assert len(ra) == len(re), what
            for a, e in zip(ra, re):
                assert_close(a, e, rtol, what=what)
    elif expected is None:
        assert actual is None, what
    else:
        assert_close(actual, expected, rtol, what=what)


def run(q, k, v, mask, dout, *, dlse=None, **kw):
    """Forward then backward of the dense oracle; returns (Result, Grads)."""
    r = refattn.forward(q, k, v, mask, **kw)
    g = refattn.backward(q, k, v, r.out, r.lse, dout, mask, dlse=dlse, **kw)
    return r, g


# ---- 1. probabilities ---------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_probabilities_sum_to_one_on_nonempty_rows(data):
    B, H, hkv, Lq, Lk, D, _ = data.draw(dims())
    q = data.draw(farr((B, H, Lq, D)))
    k = data.draw(farr((B, hkv, Lk, D)))
    v = np.broadcast_to(np.eye(Lk), (B, hkv, Lk, Lk)).copy()  # out == P exactly
    bmask = data.draw(dense_masks(B, H, Lq, Lk))
    scale, softcap = data.draw(scales()), data.draw(softcaps())

    r = refattn.forward(q, k, v, Mask.from_dense(bmask), scale=scale, softcap=softcap)
    P, lse = r.out, r.lse
    assert P.shape == (B, H, Lq, Lk) and P.dtype == np.float64
    assert lse.shape == (B, H, Lq) and lse.dtype == np.float64

    allowed = broadcast_mask(bmask, B, H)
    nonempty = allowed.any(axis=-1)
    assert np.all(P >= 0)
    assert np.all(P[~allowed] == 0.0), "probability off the mask"
    assert np.all(P[~nonempty] == 0.0), "empty row has nonzero output"
    np.testing.assert_allclose(P.sum(axis=-1)[nonempty], 1.0, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(np.isneginf(lse), ~nonempty)
    assert np.all(np.isfinite(lse[nonempty]))


# ---- 2. key permutation -------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_key_permutation_invariance(data):
    B, H, hkv, Lq, Lk, D, Dv = data.draw(dims())
    q, k, v = data.draw(qkv(B, H, hkv, Lq, Lk, D, Dv))
    bmask = data.draw(dense_masks(B, H, Lq, Lk))
    perm = np.array(data.draw(st.permutations(range(Lk))), dtype=np.int64)
    scale, softcap = data.draw(scales()), data.draw(softcaps())
    bias = data.draw(st.one_of(st.none(), farr((B, H, Lq, Lk)), farr((Lq, Lk)), farr((1, Lk))))
    dout = data.draw(farr((B, H, Lq, Dv)))
    dlse = data.draw(st.one_of(st.none(), farr((B, H, Lq))))

    kw = dict(scale=scale, softcap=softcap)
    r, g = run(q, k, v, Mask.from_dense(bmask), dout, dlse=dlse, bias=bias, **kw)
    pbias = None if bias is None else bias[..., perm]
    rp, gp = run(q, k[:, :, perm], v[:, :, perm], Mask.from_dense(bmask[..., perm]), dout,
                 dlse=dlse, bias=pbias, **kw)

    tol = 1e-12
    assert_close(rp.out, r.out, tol, what="out")
    assert_lse_close(rp.lse, r.lse, tol)
    assert_close(gp.dq, g.dq, tol, what="dq")
    assert_close(gp.dk, g.dk[:, :, perm], tol, what="dk")
    assert_close(gp.dv, g.dv[:, :, perm], tol, what="dv")
    if bias is not None:
        assert_close(gp.dbias, g.dbias[..., perm], tol, what="dbias")


# ---- 3. GQA --------------------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_gqa_equals_repeated_kv_heads(data):
    B, H, hkv, Lq, Lk, D, Dv = data.draw(dims(min_group=2))
    group = H // hkv
    assert hkv < H
    q, k, v = data.draw(qkv(B, H, hkv, Lq, Lk, D, Dv))
    mask = Mask.from_dense(data.draw(dense_masks(B, H, Lq, Lk)))
    bias = data.draw(st.one_of(st.none(), farr((B, H, Lq, Lk))))
    dout = data.draw(farr((B, H, Lq, Dv)))
    dlse = data.draw(st.one_of(st.none(), farr((B, H, Lq))))
    kw = dict(scale=data.draw(scales()), softcap=data.draw(softcaps()), bias=bias)

    r, g = run(q, k, v, mask, dout, dlse=dlse, **kw)
    kr, vr = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    rr, gr = run(q, kr, vr, mask, dout, dlse=dlse, **kw)

    tol = 1e-13
    assert_close(r.out, rr.out, tol, what="out")
    assert_lse_close(r.lse, rr.lse, tol)
    assert_close(g.dq, gr.dq, tol, what="dq")
    assert_close(g.dk, gr.dk.reshape(B, hkv, group, Lk, D).sum(axis=2), tol, what="dk")
    assert_close(g.dv, gr.dv.reshape(B, hkv, group, Lk, Dv).sum(axis=2), tol, what="dv")
    assert_dbias_close(g.dbias, gr.dbias, tol)


# ---- 4. (batch, head) independence ---------------------------------------------------------
@PROPS
@given(data=st.data())
def test_batch_head_independence(data):
    B, H, hkv, Lq, Lk, D, Dv = data.draw(dims())
    group = H // hkv
    q, k, v = data.draw(qkv(B, H, hkv, Lq, Lk, D, Dv))
    bmask = data.draw(dense_masks(B, H, Lq, Lk))
    mask = Mask.from_dense(bmask)
    bias = data.draw(st.one_of(st.none(), farr((B, H, Lq, Lk))))
    dropout = None
    if data.draw(st.booleans()):
        p = data.draw(st.floats(0.0, 0.9))
        dropout = Dropout.sample(p, mask, B, H, seed=data.draw(st.integers(0, 2**32 - 1)))
    dout = data.draw(farr((B, H, Lq, Dv)))
    dlse = data.draw(st.one_of(st.none(), farr((B, H, Lq))))
    scale, softcap = data.draw(scales()), data.draw(softcaps())

    r, g = run(q, k, v, mask, dout, dlse=dlse, scale=scale, softcap=softcap, bias=bias,
               dropout=dropout)

    allowed = broadcast_mask(bmask, B, H)
    dk = np.zeros_like(g.dk)
    dv = np.zeros_like(g.dv)
    for b in range(B):
        for h in range(H):
            j = h // group
            m_bh = Mask.from_dense(np.ascontiguousarray(allowed[b, h]))
            d_bh = None if dropout is None else Dropout(dropout.p, dropout.grid.at(b, h))
            r1, g1 = run(
                q[b:b + 1, h:h + 1], k[b:b + 1, j:j + 1], v[b:b + 1, j:j + 1], m_bh,
                dout[b:b + 1, h:h + 1],
                dlse=None if dlse is None else dlse[b:b + 1, h:h + 1],
                scale=scale, softcap=softcap,
                bias=None if bias is None else bias[b:b + 1, h:h + 1],
                dropout=d_bh,
            )
            tol = 1e-13
            assert_close(r1.out[0, 0], r.out[b, h], tol, what=f"out[{b},{h}]")
            assert_lse_close(r1.lse[0, 0], r.lse[b, h], tol, what=f"lse[{b},{h}]")
            assert_close(g1.dq[0, 0], g.dq[b, h], tol, what=f"dq[{b},{h}]")
            if bias is not None:
                assert_close(g1.dbias[0, 0], g.dbias[b, h], tol, what=f"dbias[{b},{h}]")
            dk[b, j] += g1.dk[0, 0]
            dv[b, j] += g1.dv[0, 0]
    assert_close(g.dk, dk, 1e-13, what="dk")
    assert_close(g.dv, dv, 1e-13, what="dv")


# ---- 5. shift invariance -------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_constant_bias_shifts_only_lse(data):
    B, H, hkv, Lq, Lk, D, Dv = data.draw(dims())
    q, k, v = data.draw(qkv(B, H, hkv, Lq, Lk, D, Dv))
    bmask = data.draw(dense_masks(B, H, Lq, Lk))
    mask = Mask.from_dense(bmask)
    c = data.draw(st.floats(-100.0, 100.0, allow_nan=False, allow_subnormal=False))
    shape = data.draw(st.sampled_from([(), (1,), (1, 1, 1, 1), (Lq, Lk), (H, 1, 1),
                                       (B, H, Lq, Lk)]))
    bias = np.full(shape, c)
    dout = data.draw(farr((B, H, Lq, Dv)))
    dlse = data.draw(st.one_of(st.none(), farr((B, H, Lq))))
    kw = dict(scale=data.draw(scales()), softcap=data.draw(softcaps()))

    r0, g0 = run(q, k, v, mask, dout, dlse=dlse, **kw)
    r1, g1 = run(q, k, v, mask, dout, dlse=dlse, bias=bias, **kw)

    nonempty = broadcast_mask(bmask, B, H).any(axis=-1)
    assert_close(r1.out, r0.out, 1e-12, what="out")
    np.testing.assert_array_equal(np.isneginf(r1.lse), ~nonempty)
    np.testing.assert_allclose(r1.lse[nonempty], r0.lse[nonempty] + c, rtol=1e-12,
                               atol=1e-12 * (1.0 + abs(c)))
    assert_close(g1.dq, g0.dq, 1e-11, what="dq")
    assert_close(g1.dk, g0.dk, 1e-11, what="dk")
    assert_close(g1.dv, g0.dv, 1e-12, what="dv")
    # Each row of dS sums to dlse_i on a non-empty row (sum_j P_ij (dP_ij - D_i) = 0).
    assert np.shape(g1.dbias) == shape
    want = 0.0 if dlse is None else float(np.sum(dlse[nonempty]))
    np.testing.assert_allclose(np.sum(g1.dbias), want, rtol=0, atol=1e-10)
    if shape == (B, H, Lq, Lk):
        row_want = np.zeros((B, H, Lq)) if dlse is None else np.where(nonempty, dlse, 0.0)
        np.testing.assert_allclose(g1.dbias.sum(axis=-1), row_want, rtol=0, atol=1e-11)


# ---- 6. stacked masks ----------------------------------------------------------------------
@PROPS
@given(data=st.data())
def test_stacked_mask_matches_per_head_masks(data):
    B, H, hkv, Lq, Lk, D, Dv = data.draw(dims())
    group = H // hkv
    q, k, v = data.draw(qkv(B, H, hkv, Lq, Lk, D, Dv))
    per_head = [data.draw(dense_masks(1, 1, Lq, Lk, allow_4d=False)) for _ in range(H)]
    # Mask.stack accepts Masks, boolean arrays and CSR arrays alike.
    entries = []
    for m in per_head:
        form = data.draw(st.sampled_from(["mask", "dense", "csr"]))
        entries.append(Mask.from_dense(m) if form == "mask"
                       else m if form == "dense" else sp.csr_array(m))
    stacked = Mask.stack([entries])
    assert stacked.shape == (1, H, Lq, Lk)
    np.testing.assert_array_equal(stacked.to_dense()[0], np.stack(per_head))
    dout = data.draw(farr((B, H, Lq, Dv)))
    dlse = data.draw(st.one_of(st.none(), farr((B, H, Lq))))
    kw = dict(scale=data.draw(scales()), softcap=data.draw(softcaps()))

    r, g = run(q, k, v, stacked, dout, dlse=dlse, **kw)

    dk = np.zeros_like(g.dk)
    dv = np.zeros_like(g.dv)
    tol = 1e-13
    for h in range(H):
        m_h = Mask.from_dense(per_head[h])
        # The whole problem under head h's 2-D mask: head h must agree.
        rf = refattn.forward(q, k, v, m_h, **kw)
        assert_close(rf.out[:, h], r.out[:, h], tol, what=f"out[:, {h}] (full)")
        assert_lse_close(rf.lse[:, h], r.lse[:, h], tol, what=f"lse[:, {h}] (full)")
        # Head h alone, for the gradients.
        j = h // group
        r1, g1 = run(q[:, h:h + 1], k[:, j:j + 1], v[:, j:j + 1], m_h, dout[:, h:h + 1],
                     dlse=None if dlse is None else dlse[:, h:h + 1], **kw)
        assert_close(r1.out[:, 0], r.out[:, h], tol, what=f"out[:, {h}]")
        assert_lse_close(r1.lse[:, 0], r.lse[:, h], tol, what=f"lse[:, {h}]")
        assert_close(g1.dq[:, 0], g.dq[:, h], tol, what=f"dq[:, {h}]")
        dk[:, j] += g1.dk[:, 0]
        dv[:, j] += g1.dv[:, 0]
    assert_close(g.dk, dk, tol, what="dk")
    assert_close(g.dv, dv, tol, what="dv")


# ---- 7. mask round trip --------------------------------------------------------------------
def _assert_canonical(mask: Mask, dense: np.ndarray) -> None:
    lq, lk = dense.shape[-2:]
    groups = dense.reshape(-1, lq, lk)
    stored = list(mask.iter_groups())
    assert len(stored) == groups.shape[0]
    for (b, h, csr), g in zip(stored, groups):
        assert csr.indptr.dtype == np.int32 and csr.indices.dtype == np.int32
        assert csr.shape == (lq, lk)
        assert csr.nnz == int(g.sum())
        assert csr.data.dtype == np.bool_ and np.all(csr.data)
        for i in range(lq):
            row = csr.indices[csr.indptr[i]:csr.indptr[i + 1]]
            assert np.all(np.diff(row) > 0), "indices not strictly increasing within a row"
            np.testing.assert_array_equal(row, np.flatnonzero(g[i]))
        np.testing.assert_array_equal(mask.row_counts(b, h), g.sum(axis=1))
        assert not csr.indices.flags.writeable and not csr.indptr.flags.writeable


@PROPS
@given(b=hnp.arrays(np.bool_, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=MAX_L)))
def test_mask_round_trip_2d(b):
    m = Mask.from_dense(b)
    assert m.ndim == 2 and m.shape == b.shape
    out = m.to_dense()
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, b)
    assert m.nnz == int(b.sum())
    _assert_canonical(m, b)
    mc = Mask.from_csr(sp.csr_array(b))
    assert mc == m
    np.testing.assert_array_equal(mc.to_dense(), b)
    _assert_canonical(mc, b)
    # Also via the raw CSR arrays, and from a scipy csr_matrix.
    csr = sp.csr_array(b)
    assert Mask.from_indices(csr.indptr, csr.indices, b.shape) == m
    assert Mask.from_csr(sp.csr_matrix(b)) == m


@PROPS
@given(b=hnp.arrays(np.bool_, hnp.array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=3)
                    .flatmap(lambda s: st.tuples(st.just(s[0]), st.just(s[1]),
                                                 st.integers(1, MAX_L), st.integers(1, MAX_L)))))
def test_mask_round_trip_4d(b):
    m = Mask.from_dense(b)
    assert m.ndim == 4 and m.shape == b.shape
    assert m.group_shape == b.shape[:2] and m.matrix_shape == b.shape[2:]
    np.testing.assert_array_equal(m.to_dense(), b)
    assert m.nnz == int(b.sum())
    _assert_canonical(m, b)
    for i in range(b.shape[0]):
        for j in range(b.shape[1]):
            assert Mask.from_csr(m.group(i, j)) == Mask.from_dense(b[i, j])
    stacked = Mask.stack([[sp.csr_array(b[i, j]) for j in range(b.shape[1])]
                          for i in range(b.shape[0])])
    assert stacked == m


# ---- 8. row chunking of the oracle ---------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_oracle_row_chunking_does_not_change_results(data):
    B, H, hkv, Lq, Lk, D, Dv = data.draw(dims())
    q, k, v = data.draw(qkv(B, H, hkv, Lq, Lk, D, Dv))
    bmask = data.draw(dense_masks(B, H, Lq, Lk))
    mask = Mask.from_dense(bmask)
    dense_bias = data.draw(st.sampled_from([(B, H, Lq, Lk), (Lq, Lk), (Lq, 1), (1, Lk),
                                            (H, 1, 1), ()]).flatmap(farr))
    sparse_bias = SparseBias([[data.draw(farr((mask.group(b, h).nnz,))) for h in range(H)]
                              for b in range(B)])
    dropout = None
    if data.draw(st.booleans()):
        dropout = Dropout.sample(data.draw(st.floats(0.0, 0.9)), mask, B, H,
                                 seed=data.draw(st.integers(0, 2**32 - 1)))
    dout = data.draw(farr((B, H, Lq, Dv)))
    dlse = data.draw(farr((B, H, Lq)))
    chunk = data.draw(st.sampled_from([1, 3, 7, 13]))
    kw = dict(scale=data.draw(scales()), softcap=data.draw(softcaps()), dropout=dropout)

    def both():
        return [run(q, k, v, mask, dout, dlse=dlse, bias=bias, **kw)
                for bias in (dense_bias, sparse_bias)]

    default = dense_backend.ROW_CHUNK_ELEMENTS
    assert default >= MAX_L * MAX_L  # the reference run below is a single chunk
    ref = both()
    try:
        dense_backend.ROW_CHUNK_ELEMENTS = chunk
        chunks = list(dense_backend._row_chunks(Lq, Lk))
        assert len(chunks) == -(-Lq // max(1, min(Lq, chunk // Lk)))
        small = both()
    finally:
        dense_backend.ROW_CHUNK_ELEMENTS = default

    tol = 1e-13
    for (r0, g0), (r1, g1), name in zip(ref, small, ("dense bias", "SparseBias")):
        assert_close(r1.out, r0.out, tol, what=f"out ({name})")
        assert_lse_close(r1.lse, r0.lse, tol, what=f"lse ({name})")
        assert_close(g1.dq, g0.dq, tol, what=f"dq ({name})")
        assert_close(g1.dk, g0.dk, tol, what=f"dk ({name})")
        assert_close(g1.dv, g0.dv, tol, what=f"dv ({name})")
        assert_dbias_close(g1.dbias, g0.dbias, tol, what=f"dbias ({name})")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, "-q"]))
