"""The oracle's forward against an independent, straightforward formulation.

`reference_attention` below is written from spec/semantics.md without sharing code
with refattn: a Python loop over (batch, head, query row) that gathers the allowed keys
with a boolean index, so it exercises neither the chunking, the CSR scatter, nor the
matrix products of the oracle.
"""

import math
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

import refattn
from refattn import ALiBi, Dropout, Mask, SparseBias, patterns
from refattn.backends import dense as dense_backend

from .conftest import random_bool, random_qkv


def reference_attention(q, k, v, allowed, scale=None, softcap=None, bias=None, keep=None, p=0.0):
    """allowed: bool (B, H, Lq, Lk); bias: float (B, H, Lq, Lk) or None; keep: bool like allowed."""
    B, H, Lq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out = np.zeros((B, H, Lq, Dv))
    lse = np.full((B, H, Lq), -np.inf)
    for b in range(B):
        for h in range(H):
            g = h * Hkv // H
            for i in range(Lq):
                js = np.flatnonzero(allowed[b, h, i])
                if js.size == 0:
                    continue
                s = np.array([scale * float(np.dot(q[b, h, i].astype(np.float64),
                                                   k[b, g, j].astype(np.float64))) for j in js])
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                if bias is not None:
                    s = s + bias[b, h, i, js]
                top = s.max()
                w = np.exp(s - top)
                lse[b, h, i] = top + math.log(math.fsum(w))
                prob = w / math.fsum(w)
                if keep is not None:
                    prob = prob * keep[b, h, i, js] / (1 - p)
                out[b, h, i] = prob @ v[b, g, js].astype(np.float64)
    return out, lse


def _broadcast_mask(mask: Mask, B, H):
    lq, lk = mask.matrix_shape
    d = mask.to_dense()
    return np.broadcast_to(d if d.ndim == 4 else d[None, None], (B, H, lq, lk))


def _check(q, k, v, mask, **kw):
    r = refattn.forward(q, k, v, mask, **kw)
    B, H = q.shape[:2]
    allowed = _broadcast_mask(mask, B, H)
    bias, keep, p = None, None, 0.0
    b = kw.get("bias")
    Lq, Lk = mask.matrix_shape
    if isinstance(b, np.ndarray):
        bias = np.broadcast_to(b, (B, H, Lq, Lk))
    elif isinstance(b, ALiBi):
        off = 0 if b.align == "top_left" else Lk - Lq
        i = np.arange(Lq)[:, None] + off
        j = np.arange(Lk)[None, :]
        bias = np.broadcast_to(-b.slopes[None, :, None, None] * np.abs(j - i), (B, H, Lq, Lk))
    elif isinstance(b, SparseBias):
        bias = np.zeros((B, H, Lq, Lk))
        for bb in range(B):
            for hh in range(H):
                rows, cols = np.nonzero(allowed[bb, hh])  # C order == CSR order
                bias[bb, hh, rows, cols] = b.grid.at(bb, hh)
    d = kw.get("dropout")
    if d is not None:
        keep, p = np.zeros((B, H, Lq, Lk), bool), d.p
        for bb in range(B):
            for hh in range(H):
                rows, cols = np.nonzero(allowed[bb, hh])
                keep[bb, hh, rows, cols] = d.grid.at(bb, hh)
    out, lse = reference_attention(q, k, v, allowed, kw.get("scale"), kw.get("softcap"), bias, keep, p)
    np.testing.assert_allclose(r.out, out, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(np.isneginf(r.lse), np.isneginf(lse))
    fin = np.isfinite(lse)
    np.testing.assert_allclose(r.lse[fin], lse[fin], rtol=1e-13, atol=1e-13)
    assert r.out.dtype == r.lse.dtype == np.float64
    return r


@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 1, 1, 1),      # L = 1, D = 1
    (2, 4, 2, 7, 7, 5, 3),      # GQA, Dv != D
    (1, 3, 1, 4, 9, 4, 4),      # MQA, Lq < Lk
    (1, 2, 2, 9, 4, 3, 6),      # Lq > Lk
    (1, 1, 1, 1, 33, 8, 8),     # decoding, Lq = 1
])
def test_forward_matches_reference(shape, rng):
    B, H, Hkv, Lq, Lk, D, Dv = shape
    q, k, v = random_qkv(rng, B, H, Hkv, Lq, Lk, D, Dv)
    _check(q, k, v, Mask.from_dense(random_bool(rng, (Lq, Lk), 0.6)))
    _check(q, k, v, Mask.full(Lq, Lk))


@pytest.mark.parametrize("feature", ["scale", "softcap", "dense_bias", "sparse_bias", "alibi_tl",
                                     "alibi_br", "dropout", "stacked_mask", "causal_tl", "causal_br",
                                     "all_empty", "everything"])
def test_forward_features_match_reference(feature, rng):
    B, H, Hkv, Lq, Lk, D = 2, 4, 2, 6, 8, 4
    q, k, v = random_qkv(rng, B, H, Hkv, Lq, Lk, D)
    mask = Mask.from_dense(random_bool(rng, (Lq, Lk), 0.6))
    kw = {}
    if feature == "scale":
        kw["scale"] = -0.3
    elif feature == "softcap":
        kw["softcap"] = 0.7
    elif feature == "dense_bias":
        kw["bias"] = rng.standard_normal((B, 1, Lq, Lk))
    elif feature == "sparse_bias":
        kw["bias"] = SparseBias(rng.standard_normal((1, H, mask.nnz)))
    elif feature.startswith("alibi"):
        kw["bias"] = ALiBi(ALiBi.default_slopes(H), align="top_left" if feature.endswith("tl") else "bottom_right")
    elif feature == "dropout":
        kw["dropout"] = Dropout.sample(0.4, mask, B, H, seed=11)
    elif feature == "stacked_mask":
        mask = Mask.from_dense(random_bool(rng, (B, H, Lq, Lk), 0.5))
    elif feature.startswith("causal"):
        mask = patterns.Causal(align="top_left" if feature.endswith("tl") else "bottom_right").mask(Lq, Lk)
    elif feature == "all_empty":
        mask = Mask.empty(Lq, Lk)
    elif feature == "everything":
        mask = Mask.from_dense(random_bool(rng, (1, H, Lq, Lk), 0.5))
        kw = dict(scale=0.8, softcap=2.0, bias=rng.standard_normal((Lq, Lk)),
                  dropout=Dropout.sample(0.25, mask, B, H, seed=5))
    r = _check(q, k, v, mask, **kw)
    if feature == "all_empty":
        assert not r.out.any() and np.all(np.isneginf(r.lse))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_low_precision_inputs_are_computed_exactly_in_float64(dtype, rng):
    q, k, v = random_qkv(rng, 1, 2, 1, 5, 6, 4, dtype=dtype)
    r = refattn.forward(q, k, v)
    r64 = refattn.forward(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64))
    assert r.out.dtype == np.float64
    np.testing.assert_array_equal(r.out, r64.out)
    np.testing.assert_array_equal(r.lse, r64.lse)


def test_result_does_not_depend_on_row_chunking(rng, monkeypatch):
    q, k, v = random_qkv(rng, 1, 2, 2, 37, 23, 4)
    mask = Mask.from_dense(random_bool(rng, (37, 23), 0.5))
    bias = SparseBias(rng.standard_normal(mask.nnz))
    r1 = refattn.forward(q, k, v, mask, bias=bias)
    dout = rng.standard_normal(r1.out.shape)
    g1 = refattn.backward(q, k, v, r1.out, r1.lse, dout, mask, bias=bias)
    monkeypatch.setattr(dense_backend, "ROW_CHUNK_ELEMENTS", 50)  # 2 rows per chunk
    r2 = refattn.forward(q, k, v, mask, bias=bias)
    g2 = refattn.backward(q, k, v, r2.out, r2.lse, dout, mask, bias=bias)
    np.testing.assert_allclose(r1.out, r2.out, rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(r1.lse, r2.lse)  # per-row reductions: chunking cannot change them
    for a, b in zip(g1, g2):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-14)


def test_memory_stays_bounded_by_the_row_chunk(rng, monkeypatch):
    """Peak allocation grows with the chunk, not with B * H * Lq * Lk."""
    B, H, L, D = 1, 4, 1024, 16
    q, k, v = random_qkv(rng, B, H, H, L, L, D)
    mask = patterns.Causal().mask(L, L)
    monkeypatch.setattr(dense_backend, "ROW_CHUNK_ELEMENTS", 1 << 15)
    full_scores = B * H * L * L * 8  # 32 MiB: what an unchunked oracle would hold per array
    tracemalloc.start()
    try:
        r = refattn.forward(q, k, v, mask)
        refattn.backward(q, k, v, r.out, r.lse, np.ones(r.out.shape), mask)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < full_scores / 4, f"peak {peak / 2**20:.1f} MiB"


@pytest.mark.slow
def test_long_sequences_fit_in_memory():
    """Lq = Lk = 8192, H = 8, forward + backward on the default chunk (issue [1/9])."""
    rng = np.random.default_rng(0)
    B, H, L, D = 1, 8, 8192, 64
    q, k, v = random_qkv(rng, B, H, H, L, L, D, dtype=np.float32)
    mask = patterns.Causal().mask(L, L)
    tracemalloc.start()
    try:
        r = refattn.forward(q, k, v, mask)
        g = refattn.backward(q, k, v, r.out, r.lse, np.ones(r.out.shape, np.float32), mask)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.all(np.isfinite(g.dq))
    assert peak < 2 * 2**30, f"peak {peak / 2**30:.2f} GiB (the full score array alone is 4 GiB)"
