"""The cpu backend beyond the cross-backend matrix: bitwise reproducibility for any thread
count, both ways of computing a tile, block sizes, memory, and the index dtypes."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numba
import numpy as np
import pytest

import refattn
from refattn import ALiBi, Dropout, SparseBias, patterns
from refattn.backends import cpu
from refattn.patterns.examples import example

from .test_backend_matrix import SQUARE, run_case

# One script computes forward and backward on a fixed set of problems and prints the
# sha256 of every output's bytes; it runs under different thread counts.
HASH_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys
    import numba, numpy as np
    import refattn
    from refattn import ALiBi, Dropout, SparseBias, patterns

    def problems():
        rng = np.random.default_rng(7)
        for name, params, L, feats in [
            ("causal", {}, 300, "plain"),
            ("sliding_window", {"left": 40, "right": 17}, 333, "everything"),
            ("random", {"per_row": 9, "seed": 3}, 257, "sparse_bias"),
            ("bigbird", {"block": 16, "seed": 1}, 256, "alibi"),
            ("strided", {"stride": 16}, 300, "plain"),
        ]:
            for dtype in ("float64", "float32"):
                H, Hkv = 4, 2
                m = patterns.get(name, **params).mask(L, L, heads=H)
                q = rng.standard_normal((2, H, L, 24))
                k, v = rng.standard_normal((2, 2, Hkv, L, 24))
                dout = rng.standard_normal(q.shape)
                kw = {}
                if feats == "everything":
                    kw = dict(softcap=3.0, bias=rng.standard_normal((2, 1, L, L)),
                              dropout=Dropout.sample(0.25, m, 2, H, seed=4))
                elif feats == "sparse_bias":
                    kw = dict(bias=SparseBias([[rng.standard_normal(m.group(b, h).nnz) for h in range(H)]
                                               for b in range(2)]))
                elif feats == "alibi":
                    kw = dict(bias=ALiBi(ALiBi.default_slopes(H)))
                dlse = rng.standard_normal((2, H, L)) if feats == "everything" else None
                yield f"{name}-{dtype}", (q, k, v, m, dout, dlse, kw, dtype)

    out = {"threads": numba.get_num_threads()}
    for key, (q, k, v, m, dout, dlse, kw, dtype) in problems():
        opts = dict(backend="cpu", compute_dtype=dtype, options={"block_q": 32, "block_k": 16})
        r = refattn.forward(q, k, v, m, **opts, **kw)
        g = refattn.backward(q, k, v, r.out, r.lse, dout, m, dlse=dlse, **opts, **kw)
        h = hashlib.sha256()
        for x in (r.out, r.lse, g.dq, g.dk, g.dv):
            h.update(np.ascontiguousarray(x).tobytes())
        leaves = [] if g.dbias is None else [g.dbias] if isinstance(g.dbias, np.ndarray) else \\
            [x for row in g.dbias for x in row]
        for x in leaves:
            h.update(np.ascontiguousarray(x).tobytes())
        out[key] = h.hexdigest()
    print(json.dumps(out))
""")


def _hashes(threads: int) -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS=str(threads))
    res = subprocess.run([sys.executable, "-c", HASH_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_bitwise_identical_for_any_thread_count():
    """NUMBA_NUM_THREADS = 1, 2 and 3 (more threads than this machine has cores is
    allowed, and splits the work unevenly) give the same bits, output by output."""
    runs = {t: _hashes(t) for t in (1, 2, 3)}
    assert [runs[t].pop("threads") for t in (1, 2, 3)] == [1, 2, 3]
    assert len(runs[1]) == 10
    assert runs[1] == runs[2] == runs[3]


def _everything(rng, L=77, H=4, Hkv=2, D=12):
    m = patterns.get("sliding_window", left=20, right=9).mask(L, L)
    q = rng.standard_normal((2, H, L, D))
    k, v = rng.standard_normal((2, 2, Hkv, L, D))
    kw = dict(softcap=2.5, bias=rng.standard_normal((2, 1, L, L)), dropout=Dropout.sample(0.2, m, 2, H, seed=1))
    return q, k, v, m, kw, rng.standard_normal(q.shape), rng.standard_normal((2, H, L))


def _digest(r, g) -> str:
    h = hashlib.sha256()
    for x in (r.out, r.lse, g.dq, g.dk, g.dv, g.dbias):
        h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_bitwise_identical_across_runs_and_set_num_threads(rng, dtype):
    q, k, v, m, kw, dout, dlse = _everything(rng)
    opts = dict(backend="cpu", compute_dtype=dtype, options={"block_q": 16, "block_k": 8})
    digests = []
    before = numba.get_num_threads()
    try:
        for threads in (1, numba.config.NUMBA_NUM_THREADS, 1):
            numba.set_num_threads(threads)
            r = refattn.forward(q, k, v, m, **opts, **kw)
            g = refattn.backward(q, k, v, r.out, r.lse, dout, m, dlse=dlse, **opts, **kw)
            digests.append(_digest(r, g))
    finally:
        numba.set_num_threads(before)
    assert digests[0] == digests[1] == digests[2]


@pytest.mark.parametrize("density", [0.0, 2.0], ids=["every_partial_tile_dense", "every_partial_tile_by_entry"])
@pytest.mark.parametrize("pattern_name", ["sliding_window", "random", "bigbird", "global_tokens", "strided"])
def test_both_ways_of_computing_a_partial_tile(monkeypatch, pattern_name, density):
    """Partial tiles go the BLAS way or entry by entry depending on their density; each
    way alone agrees with the oracle on every feature."""
    monkeypatch.setattr(cpu, "DENSE_TILE_MIN_DENSITY", density)
    run_case("cpu", pattern_name, "everything", SQUARE, options={"block_q": 4, "block_k": 8})
    if example(pattern_name, 13, 21) is not None:
        run_case("cpu", pattern_name, "everything", (13, 21, 4, 3), options={"block_q": 8, "block_k": 4})


def test_the_two_ways_are_both_used_by_default():
    m = (patterns.get("causal") | patterns.get("random", per_row=2, seed=0, causal=False)).mask(256, 256)
    p = refattn.contract.make_problem(*np.zeros((3, 1, 1, 256, 4)), m)
    plan = cpu._plan(p, refattn.backends.configure(cpu, "cpu", None, {"block_q": 64, "block_k": 64}))
    full, dense = plan.tiles[2], plan.tiles[3]
    assert full.any() and (dense & ~full).any() and (~dense).any()


@pytest.mark.parametrize("block", [(1, 1), (3, 5), (8, 4), (16, 16), (64, 64), (100, 7)])
@pytest.mark.parametrize("pattern_name", ["causal", "sliding_window", "bigbird", "random", "document"])
def test_block_sizes(pattern_name, block):
    run_case("cpu", pattern_name, "everything", SQUARE, options={"block_q": block[0], "block_k": block[1]})


def test_options_are_validated(rng):
    q, k, v = rng.standard_normal((3, 1, 1, 4, 2))
    with pytest.raises(refattn.RefattnError, match=r"options\['block_k'\] must be an int in \[1, 4096\]"):
        refattn.forward(q, k, v, backend="cpu", options={"block_k": 0})
    with pytest.raises(refattn.RefattnError, match="compute_dtype: backend 'cpu' computes in"):
        refattn.forward(q, k, v, backend="cpu", compute_dtype=np.float16)


def test_float32_results_are_float32_and_close(rng):
    q, k, v, m, kw, dout, dlse = _everything(rng)
    r32 = refattn.forward(q, k, v, m, backend="cpu", compute_dtype=np.float32, **kw)
    r64 = refattn.forward(q, k, v, m, **kw)
    assert r32.out.dtype == r32.lse.dtype == np.float32
    np.testing.assert_allclose(r32.out, r64.out, rtol=1e-4, atol=1e-4)
    g32 = refattn.backward(q, k, v, r64.out, r64.lse, dout, m, dlse=dlse, backend="cpu",
                           compute_dtype=np.float32, **kw)
    g64 = refattn.backward(q, k, v, r64.out, r64.lse, dout, m, dlse=dlse, **kw)
    for name in ("dq", "dk", "dv", "dbias"):
        a, b = getattr(g32, name), getattr(g64, name)
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-4 * np.abs(b).max())


def test_gqa_with_per_head_masks_and_sparse_bias_per_head(rng):
    """Query heads of one kv head with different masks: dK/dV sum over them in order."""
    L, H = 40, 6
    m = patterns.get("random", per_row=5, seed=2).mask(L, L, heads=H)
    q = rng.standard_normal((1, H, L, 8))
    k, v = rng.standard_normal((2, 1, 2, L, 8))
    bias = SparseBias([[rng.standard_normal(m.group(0, h).nnz) for h in range(H)]])
    dout = rng.standard_normal(q.shape)
    ref = refattn.forward(q, k, v, m, bias=bias)
    got = refattn.forward(q, k, v, m, bias=bias, backend="cpu", options={"block_q": 8, "block_k": 8})
    np.testing.assert_allclose(got.out, ref.out, rtol=0, atol=1e-13)
    gr = refattn.backward(q, k, v, ref.out, ref.lse, dout, m, bias=bias)
    gc = refattn.backward(q, k, v, ref.out, ref.lse, dout, m, bias=bias, backend="cpu")
    for a, b in zip([gc.dq, gc.dk, gc.dv] + list(gc.dbias[0]), [gr.dq, gr.dk, gr.dv] + list(gr.dbias[0])):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * max(1.0, np.abs(b).max()))


def test_alibi_broadcast_batch_dbias(rng):
    L = 30
    q, k, v = rng.standard_normal((3, 3, 2, L, 5))
    dout = rng.standard_normal(q.shape)
    bias = ALiBi([0.3, 0.1], "top_left")
    m = patterns.get("causal").mask(L, L)
    r = refattn.forward(q, k, v, m, bias=bias)
    gr = refattn.backward(q, k, v, r.out, r.lse, dout, m, bias=bias)
    gc = refattn.backward(q, k, v, r.out, r.lse, dout, m, bias=bias, backend="cpu")
    assert gc.dbias.shape == (2,)
    np.testing.assert_allclose(gc.dbias, gr.dbias, rtol=1e-12)


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np
    import refattn
    from refattn import patterns
    n, D = 65536, 16
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 1, n, D)) for _ in range(4))
    m = patterns.SlidingWindow(32, 32).mask(n, n)
    small = patterns.SlidingWindow(32, 32).mask(256, 256)
    r = refattn.forward(q[:, :, :256], k[:, :, :256], v[:, :, :256], small, backend="cpu")
    refattn.backward(q[:, :, :256], k[:, :, :256], v[:, :, :256], r.out, r.lse, dout[:, :, :256], small,
                     backend="cpu")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = refattn.forward(q, k, v, m, backend="cpu")
    g = refattn.backward(q, k, v, r.out, r.lse, dout, m, backend="cpu")
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024)
""")


def test_long_sliding_window_memory_is_o_of_nnz_plus_n_d():
    """At Lq = Lk = 65,536 one float64 score matrix is 32 GiB; forward plus backward grows
    the process's peak resident memory by under 256 MiB (outputs and gradients are 40 MiB,
    the mask's CSR 17 MiB). Numba's allocations are invisible to tracemalloc, so the peak
    is read from the kernel (ru_maxrss) in a fresh process."""
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    grew = int(res.stdout.strip().splitlines()[-1])
    assert grew < 256 * 2**20, f"peak grew by {grew / 2**20:.0f} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_int64_indices_give_the_same_bits(rng, dtype):
    """Masks past 2**31 - 1 entries hold int64 indices; the kernels compiled for them give
    the same bits as for int32 (run on a small mask whose arrays are widened by hand)."""
    q, k, v, m, kw, dout, dlse = _everything(rng)
    p = refattn.contract.make_problem(q, k, v, m, **kw)
    config = refattn.backends.configure(cpu, "cpu", dtype, {"block_q": 16, "block_k": 8})
    narrow = cpu._plan(p, config)
    indptr, indices, base, gid = narrow.mask
    wide = cpu.Plan((indptr, indices.astype(np.int64), base, gid), narrow.tiles, narrow.nnz)
    results = []
    for plan in (narrow, wide):
        r = cpu._forward(p, config, plan)
        out, lse, dout64, dlse64 = refattn.contract.check_backward_inputs(p, r.out, r.lse, dout, dlse)
        results.append(_digest(r, cpu._backward(p, out, lse, dout64, dlse64, config, plan)))
    assert indices.dtype == np.int32
    assert results[0] == results[1]


@pytest.mark.parametrize("B, H, Hkv, Lq, Lk, D, Dv", [
    (2, 4, 2, 1, 300, 256, 128),     # decoding with a long KV cache, D = 256
    (1, 2, 1, 130, 70, 256, 1),      # Dv = 1, more queries than keys
    (2, 3, 3, 65, 65, 1, 300),       # D = 1, Dv wider than a tile
])
def test_edge_head_dims(rng, B, H, Hkv, Lq, Lk, D, Dv):
    m = patterns.get("sliding_window", left=40, right=3).mask(Lq, Lk)
    q = rng.standard_normal((B, H, Lq, D))
    k, v = rng.standard_normal((B, Hkv, Lk, D)), rng.standard_normal((B, Hkv, Lk, Dv))
    kw = dict(softcap=2.0, dropout=Dropout.sample(0.1, m, B, H, seed=1))
    ref = refattn.forward(q, k, v, m, **kw)
    got = refattn.forward(q, k, v, m, backend="cpu", **kw)
    dout = rng.standard_normal(ref.out.shape)
    gr = refattn.backward(q, k, v, ref.out, ref.lse, dout, m, **kw)
    gc = refattn.backward(q, k, v, ref.out, ref.lse, dout, m, backend="cpu", **kw)
    finite = np.isfinite(ref.lse)            # Lq > Lk, bottom-right: the first rows are empty
    assert np.array_equal(np.isfinite(got.lse), finite) and (got.lse[~finite] == -np.inf).all()
    for a, b in [(got.out, ref.out), (got.lse[finite], ref.lse[finite]), (gc.dq, gr.dq), (gc.dk, gr.dk),
                 (gc.dv, gr.dv)]:
        assert np.max(np.abs(a - b)) <= 1e-12 * max(1.0, np.max(np.abs(b)))


def test_masks_of_any_make_up_share_one_compiled_kernel(rng):
    """A one-group mask (its own frozen index array), a stack (indices concatenated) and a
    mask from dense run the same compiled kernels: a second argument type would compile
    them all again, about 100 s on a 2-core machine."""
    kernels = (cpu._forward_kernel, cpu._dq_kernel, cpu._dkdv_kernel)
    q, k, v = (rng.standard_normal((1, 2, 12, 4)) for _ in range(3))
    masks = [patterns.Causal().mask(12, 12), patterns.Random(3, seed=1).mask(12, 12, heads=2),
             refattn.Mask.from_dense(rng.random((12, 12)) < 0.5)]
    seen = None
    for m in masks:
        r = refattn.forward(q, k, v, m, backend="cpu")
        refattn.backward(q, k, v, r.out, r.lse, np.ones_like(r.out), m, backend="cpu")
        sigs = [set(f.signatures) for f in kernels]
        assert seen is None or sigs == seen, "a mask of another make-up compiled a new signature"
        seen = sigs
