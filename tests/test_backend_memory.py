"""Neither the sparse nor the tiled route builds an Lq x Lk array."""

import tracemalloc

import numpy as np
import pytest

import refattn
from refattn import patterns


@pytest.mark.parametrize("backend", ["sparse", "tiled"])
def test_long_sliding_window_stays_far_below_one_dense_score_matrix(backend):
    """At Lq = Lk = 65,536 one float64 score matrix is 32 GiB; forward plus backward must
    peak under 1 GiB of traced memory (they need O(nnz + n d): about 0.2 GiB)."""
    n, D = 65536, 16
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 1, n, D)) for _ in range(4))
    m = patterns.SlidingWindow(32, 32).mask(n, n)
    tracemalloc.start()
    try:
        r = refattn.forward(q, k, v, m, backend=backend)
        g = refattn.backward(q, k, v, r.out, r.lse, dout, m, backend=backend)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2**30, f"peak {peak / 2**20:.0f} MiB"
    # The answer itself on 100 rows, against the oracle on just the keys they see:
    # row 30000 + t sees keys 29968 + t .. 30032 + t, local keys t .. t + 64 of the slice.
    rows, keys = slice(30000, 30100), slice(30000 - 32, 30100 + 32)
    shifted = patterns.SlidingWindow(0, 64, "top_left").mask(100, 164)
    want = refattn.forward(q[:, :, rows], k[:, :, keys], v[:, :, keys], shifted)
    np.testing.assert_allclose(r.out[:, :, rows], want.out, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(r.lse[:, :, rows], want.lse, rtol=1e-12)
    assert np.isfinite(g.dq).all() and np.isfinite(g.dk).all() and np.isfinite(g.dv).all()
