"""The cuda backend: the reduced cross-backend matrix under Numba's CUDA simulator, its
device-array path, block sizes, availability, and a compile of its kernels for a real GPU.

On a real GPU the backend also joins the whole matrix (test_backend_matrix.py); under the
simulator (about 60 us per (query, key) pair, and a Python thread per CUDA thread) each
axis of the matrix is covered once, on small shapes with blocks smaller than the shapes,
so that tiles, partial tiles and the transposed walk are all exercised.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import refattn
from refattn import Mask, RefattnError, backends, patterns
from refattn.patterns.examples import example

from .test_backend_matrix import FEATURES, RECT, SHAPES, SQUARE, assert_agrees, run_case

pytestmark = pytest.mark.skipif("cuda" not in backends.names(), reason="cuda backend unavailable here")

if "cuda" in backends.names():
    from numba import cuda as numba_cuda

    from refattn.backends import cuda as cuda_backend

    SIMULATED = cuda_backend.simulated()
else:  # pragma: no cover - the module is skipped
    SIMULATED = False

#: Blocks smaller than the test shapes: several tiles per row and column.
SMALL = {"block_q": 8, "block_k": 8}


# ---- the matrix, each axis once ---------------------------------------------------------

@pytest.mark.parametrize("pattern_name", [n for n in patterns.names() if example(n, *SQUARE[:2]) is not None])
def test_every_pattern(pattern_name):
    run_case("cuda", pattern_name, "everything", SQUARE, options=SMALL, batch=1)


@pytest.mark.parametrize("feature", FEATURES)
def test_every_feature(feature):
    run_case("cuda", "sliding_window", feature, RECT, options=SMALL, batch=1)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_shape(shape):
    """Default block sizes (64 x 64 here): the 70 x 70 shape spans two blocks each way."""
    run_case("cuda", "sliding_window", "gqa", shape, batch=1)


@pytest.mark.parametrize("pattern_name, feature", [("causal", "dropout"), ("bigbird", "sparse_bias"),
                                                   ("global_tokens", "dense_bias_broadcast"),
                                                   ("random", "alibi_top_left"), ("block_sparse", "mqa")])
def test_features_on_more_patterns(pattern_name, feature):
    shape = SQUARE if pattern_name == "bigbird" else RECT
    run_case("cuda", pattern_name, feature, shape, options=SMALL, batch=2)


@settings(max_examples=6, deadline=None)
@given(data=st.data(), lq=st.integers(1, 11), lk=st.integers(1, 11), density=st.floats(0, 1),
       feature=st.sampled_from(sorted(FEATURES)), per_head=st.booleans())
def test_random_masks(data, lq, lk, density, feature, per_head):
    """Hypothesis-drawn masks, empty rows and empty masks included."""
    H, Hkv, build, with_dlse = FEATURES[feature]
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    mask = Mask.from_dense(rng.random((1, H, lq, lk) if per_head else (lq, lk)) < density)
    q, k, v = rng.standard_normal((1, H, lq, 3)), rng.standard_normal((1, Hkv, lk, 3)), rng.standard_normal((1, Hkv, lk, 2))
    dout = rng.standard_normal((1, H, lq, 2))
    dlse = rng.standard_normal((1, H, lq)) if with_dlse else None
    assert_agrees("cuda", q, k, v, mask, build(rng, mask, 1, H, lq, lk), dout, dlse, {"block_q": 4, "block_k": 4})


@pytest.mark.parametrize("bq, bk, shape", [(1, 1, (5, 6, 2, 3)), (3, 5, SQUARE), (8, 4, SQUARE), (4, 8, SQUARE),
                                           (16, 16, SQUARE), (32, 2, RECT)])
def test_block_sizes(bq, bk, shape):
    """Every block size agrees with the oracle (hence with each other) to rounding; a
    block may be larger or smaller than the other one, and than the matrix."""
    name = "bigbird" if shape == SQUARE else "sliding_window"
    run_case("cuda", name, "everything", shape, options={"block_q": bq, "block_k": bk}, batch=1)


@pytest.mark.parametrize("feature", ["plain", "everything"])
def test_float32_compute(rng, feature):
    H, Hkv, build, with_dlse = FEATURES[feature]
    Lq, Lk, D, Dv = RECT
    mask = patterns.SlidingWindow(4, 2).mask(Lq, Lk)
    q, k, v = rng.standard_normal((1, H, Lq, D)), rng.standard_normal((1, Hkv, Lk, D)), rng.standard_normal((1, Hkv, Lk, Dv))
    kwargs = build(rng, mask, 1, H, Lq, Lk)
    dout = rng.standard_normal((1, H, Lq, Dv))
    ref = refattn.forward(q, k, v, mask, **kwargs)
    got = refattn.forward(q, k, v, mask, backend="cuda", compute_dtype="float32", options=SMALL, **kwargs)
    assert got.out.dtype == np.float32 and got.lse.dtype == np.float32
    np.testing.assert_allclose(got.out, ref.out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.lse, ref.lse, rtol=1e-5, atol=1e-5)
    g = refattn.backward(q, k, v, ref.out, ref.lse, dout, mask, backend="cuda", compute_dtype="float32",
                         options=SMALL, **kwargs)
    gref = refattn.backward(q, k, v, ref.out, ref.lse, dout, mask, **kwargs)
    for name in ("dq", "dk", "dv"):
        assert getattr(g, name).dtype == np.float32
        np.testing.assert_allclose(getattr(g, name), getattr(gref, name), rtol=1e-4, atol=1e-4)
    # that the kernels compute in float32, not float64, is checked on their PTX
    # (test_cuda_build.py): the simulator's arithmetic is NumPy's and Python's


def test_repeated_calls_give_the_same_bits(rng):
    """No atomics: a second run reproduces every bit. Meaningful on a GPU, where the blocks
    run in another order each time; the simulator runs them in one order."""
    q, k, v = rng.standard_normal((3, 1, 4, 16, 4))
    mask = example("bigbird", 16, 16, seed=0).mask(16, 16)
    dout = rng.standard_normal(q.shape)
    runs = []
    for _ in range(2):
        r = refattn.forward(q, k, v, mask, backend="cuda", options=SMALL)
        g = refattn.backward(q, k, v, r.out, r.lse, dout, mask, backend="cuda", options=SMALL)
        runs.append([x.tobytes() for x in (r.out, r.lse, g.dq, g.dk, g.dv)])
    assert runs[0] == runs[1]


# ---- device arrays ----------------------------------------------------------------------

def _problem(rng, dtype=np.float64, B=1, H=2, Hkv=1, Lq=9, Lk=11, D=4, Dv=3):
    q = rng.standard_normal((B, H, Lq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Lk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Lk, Dv)).astype(dtype)
    mask = patterns.SlidingWindow(3, 2).mask(Lq, Lk)
    return q, k, v, mask, rng.standard_normal((B, H, Lq, Dv)).astype(dtype)


def _is_device(x):
    return cuda_backend.DEVICE_ARRAYS.owns(x)


def test_device_arrays_in_give_device_arrays_out(rng):
    q, k, v, mask, dout = _problem(rng)
    host = refattn.forward(q, k, v, mask, backend="cuda", options=SMALL)
    dq_, dk_, dv_ = (numba_cuda.to_device(x) for x in (q, k, v))
    r = refattn.forward(dq_, dk_, dv_, mask, backend="cuda", options=SMALL)
    assert _is_device(r.out) and _is_device(r.lse)
    assert np.array_equal(r.out.copy_to_host(), host.out) and np.array_equal(r.lse.copy_to_host(), host.lse)
    g_host = refattn.backward(q, k, v, host.out, host.lse, dout, mask, backend="cuda", options=SMALL)
    g = refattn.backward(dq_, dk_, dv_, r.out, r.lse, numba_cuda.to_device(dout), mask, backend="cuda",
                         options=SMALL)
    for name in ("dq", "dk", "dv"):
        assert _is_device(getattr(g, name))
        assert np.array_equal(getattr(g, name).copy_to_host(), getattr(g_host, name))


def test_device_and_host_arrays_mix(rng):
    """Host arrays in a device call are checked on the host and copied over; results stay
    on the device. dbias comes back in the host layout of the bias."""
    q, k, v, mask, dout = _problem(rng)
    bias = rng.standard_normal((1, 2, 9, 11))
    ref = refattn.forward(q, k, v, mask, bias=bias)
    r = refattn.forward(numba_cuda.to_device(q), k, v, mask, bias=bias, backend="cuda", options=SMALL)
    assert _is_device(r.out)
    np.testing.assert_allclose(r.out.copy_to_host(), ref.out, rtol=1e-13, atol=1e-13)
    g = refattn.backward(q, numba_cuda.to_device(k), v, ref.out, ref.lse, dout, mask, bias=bias,
                         backend="cuda", options=SMALL)
    gref = refattn.backward(q, k, v, ref.out, ref.lse, dout, mask, bias=bias)
    assert _is_device(g.dq) and isinstance(g.dbias, np.ndarray)
    np.testing.assert_allclose(g.dq.copy_to_host(), gref.dq, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(g.dbias, gref.dbias, rtol=1e-12, atol=1e-13)


def test_device_inputs_of_another_dtype_are_converted_on_the_device(rng):
    q, k, v, mask, dout = _problem(rng, np.float16)
    ref = refattn.forward(q, k, v, mask)                    # float16 inputs, exactly converted
    r = refattn.forward(*(numba_cuda.to_device(x) for x in (q, k, v)), mask, backend="cuda", options=SMALL)
    assert r.out.dtype == np.float64
    np.testing.assert_allclose(r.out.copy_to_host(), ref.out, rtol=1e-13, atol=1e-13)


def _swap_axes_1_2(x):
    """A view of 4-D device array ``x`` with axes 1 and 2 swapped (no copy): Numba's own
    ``transpose`` takes 2-D arrays only, the simulator's is NumPy's."""
    if SIMULATED:
        return x.transpose((0, 2, 1, 3))
    from numba.cuda.cudadrv.devicearray import DeviceNDArray
    shape, strides = list(x.shape), list(x.strides)
    shape[1], shape[2], strides[1], strides[2] = shape[2], shape[1], strides[2], strides[1]
    return DeviceNDArray(tuple(shape), tuple(strides), x.dtype, gpu_data=x.gpu_data)


def test_strided_device_inputs_are_used_in_place(rng):
    """A BSHD array viewed as BHSD (what torch's transpose gives) is read with its strides."""
    q, k, v, mask, dout = _problem(rng)
    bshd = [numba_cuda.to_device(np.ascontiguousarray(x.transpose(0, 2, 1, 3))) for x in (q, k, v)]
    views = [_swap_axes_1_2(x) for x in bshd]
    assert not views[0].is_c_contiguous()
    r = refattn.forward(*views, mask, backend="cuda", options=SMALL)
    np.testing.assert_allclose(r.out.copy_to_host(), refattn.forward(q, k, v, mask).out, rtol=1e-13, atol=1e-13)


def test_device_inputs_are_validated(rng):
    q, k, v, mask, dout = _problem(rng)
    bad = q.copy()
    bad[0, 1, 4, 2] = np.nan
    with pytest.raises(RefattnError, match=r"q: non-finite value nan at index \[0, 1, 4, 2\]"):
        refattn.forward(numba_cuda.to_device(bad), k, v, mask, backend="cuda", options=SMALL)
    with pytest.raises(RefattnError, match="k: expected a 4-D array"):
        refattn.forward(numba_cuda.to_device(q), numba_cuda.to_device(k[0]), v, mask, backend="cuda")
    r = refattn.forward(q, k, v, mask)
    lse = r.lse.copy()
    lse[0, 0, 3] = -np.inf
    with pytest.raises(RefattnError, match=r"lse: lse\[0, 0, 3\] = -inf, but row 3 has allowed keys"):
        refattn.backward(numba_cuda.to_device(q), k, v, r.out, numba_cuda.to_device(lse), dout, mask,
                         backend="cuda")
    d = dout.copy()
    d[0, 1, 8, 0] = np.inf
    with pytest.raises(RefattnError, match=r"dout: non-finite value inf at index \[0, 1, 8, 0\]"):
        refattn.backward(numba_cuda.to_device(q), k, v, r.out, r.lse, numba_cuda.to_device(d), mask,
                         backend="cuda")


class OnDevice:
    """What CuPy arrays and torch CUDA tensors look like from here."""
    __cuda_array_interface__ = {"shape": (1, 1, 2, 2), "typestr": "<f8", "data": (0, False), "version": 3}


class RequiresGrad:
    """A torch CUDA tensor that requires grad: reading its interface raises RuntimeError."""
    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")


@pytest.mark.parametrize("device_array", [OnDevice(), RequiresGrad()], ids=["cai", "requires_grad"])
def test_device_arrays_are_refused_by_host_backends(rng, device_array):
    """Never copied to the host behind the caller's back: q, k, v, out, lse, dout, dlse
    and a bias alike."""
    x = np.zeros((1, 1, 2, 2))
    with pytest.raises(RefattnError, match="k: a CUDA device array, but this call runs on the host"):
        refattn.forward(x, device_array, x, backend="cpu")
    with pytest.raises(RefattnError, match="bias: a CUDA device array"):
        refattn.forward(x, x, x, bias=device_array, backend="dense")
    r = refattn.forward(x, x, x)
    with pytest.raises(RefattnError, match="dout: a CUDA device array"):
        refattn.backward(x, x, x, r.out, r.lse, device_array, backend="sparse")


@pytest.mark.skipif(not SIMULATED, reason="on a real GPU these arrays are taken")
def test_the_simulator_says_which_device_arrays_it_takes():
    x = np.zeros((1, 1, 2, 2))
    with pytest.raises(RefattnError, match="v: a CUDA device array, but backend 'cuda' runs on Numba's CUDA "
                                           "simulator here, which takes only its own arrays"):
        refattn.forward(x, x, OnDevice(), backend="cuda")


def test_device_out_lse_with_host_inputs_stay_on_the_device(rng):
    """Any device array among the backward's arrays puts the call on the device."""
    q, k, v, mask, dout = _problem(rng)
    r = refattn.forward(q, k, v, mask)
    g = refattn.backward(q, k, v, numba_cuda.to_device(r.out), numba_cuda.to_device(r.lse), dout, mask,
                         backend="cuda", options=SMALL)
    assert _is_device(g.dq)
    np.testing.assert_allclose(g.dq.copy_to_host(), refattn.backward(q, k, v, r.out, r.lse, dout, mask).dq,
                               rtol=1e-12, atol=1e-13)


def test_device_path_with_every_feature(rng):
    """dlse, dropout, a sparse bias and softcap on the device path, against the oracle."""
    q, k, v, mask, dout = _problem(rng, H=2, Hkv=2)
    kw = {"softcap": 2.0, "bias": refattn.SparseBias([[rng.standard_normal(mask.nnz)] * 2]),
          "dropout": refattn.Dropout.sample(0.25, mask, 1, 2, seed=3)}
    dlse = rng.standard_normal((1, 2, 9))
    ref = refattn.forward(q, k, v, mask, **kw)
    gref = refattn.backward(q, k, v, ref.out, ref.lse, dout, mask, dlse=dlse, **kw)
    dev = [numba_cuda.to_device(x) for x in (q, k, v)]
    r = refattn.forward(*dev, mask, backend="cuda", options=SMALL, **kw)
    g = refattn.backward(*dev, r.out, r.lse, numba_cuda.to_device(dout), mask, dlse=numba_cuda.to_device(dlse),
                         backend="cuda", options=SMALL, **kw)
    np.testing.assert_allclose(r.out.copy_to_host(), ref.out, rtol=1e-12, atol=1e-13)
    for name in ("dq", "dk", "dv"):
        np.testing.assert_allclose(getattr(g, name).copy_to_host(), getattr(gref, name), rtol=1e-11, atol=1e-12)
    for a, b in zip(g.dbias, gref.dbias):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-12)


def test_batch_varying_mask_and_bias(rng):
    """A mask and a dense bias that differ per batch (their b axis indexed), GQA."""
    B, H, Hkv, L = 2, 4, 2, 12
    dense = rng.random((B, 1, L, L)) < 0.5
    mask = Mask.from_dense(dense)
    q, k, v = rng.standard_normal((B, H, L, 3)), rng.standard_normal((B, Hkv, L, 3)), rng.standard_normal((B, Hkv, L, 2))
    kw = {"bias": rng.standard_normal((B, 1, L, L))}
    assert_agrees("cuda", q, k, v, mask, kw, rng.standard_normal((B, H, L, 2)), None, {"block_q": 4, "block_k": 8})


# ---- sizes, options, availability ---------------------------------------------------------

def test_default_block_sizes_fit_shared_memory():
    from refattn.backends import _cuda_kernels as K
    assert cuda_backend.block_sizes(np.float32, 64, 64) == (64, 64)
    assert cuda_backend.block_sizes(np.float64, 64, 64) == (32, 32)
    assert cuda_backend.block_sizes(np.float32, 256, 256) == (16, 16)
    for dt in (np.float32, np.float64):
        isz = np.dtype(dt).itemsize
        for d, dv in ((1, 1), (64, 64), (128, 64), (256, 256), (512, 8)):
            bq, bk = cuda_backend.block_sizes(dt, d, dv)
            # the largest that fit: doubling either no longer fits (or passes 64)
            assert bk == 64 or K.forward_shared_bytes(isz, bq, 2 * bk, d, dv) > K.SHARED_BYTES
            assert bq == 64 or K.dkdv_shared_bytes(isz, 2 * bq, bk, d, dv) > K.SHARED_BYTES
    # with block_q given, block_k is the largest that fits both kernels with it
    assert cuda_backend.block_sizes(np.float32, 16, 16, block_q=256) == (256, 16)


def test_sizes_that_do_not_fit_are_refused(rng):
    with pytest.raises(RefattnError, match="need .* bytes of shared memory .* choose smaller blocks"):
        cuda_backend.block_sizes(np.float64, 128, 128, 64, 64)
    with pytest.raises(RefattnError, match="head dims are too large for this backend"):
        cuda_backend.block_sizes(np.float64, 4096, 4096)
    q = np.zeros((1, 1, 2, 4))
    with pytest.raises(RefattnError, match="need .* bytes of shared memory"):
        refattn.forward(q, q, q, backend="cuda", options={"block_q": 256, "block_k": 256})


@pytest.mark.parametrize("value", [0, 257, True, 2.0, "8"])
def test_block_options_are_validated(value):
    q = np.zeros((1, 1, 2, 4))
    with pytest.raises(RefattnError, match=r"options\['block_q'\] must be None .* or an int in \[1, 256\]"):
        refattn.forward(q, q, q, backend="cuda", options={"block_q": value})


def test_the_mask_keeps_its_device_arrays(rng):
    q, k, v, mask, _ = _problem(rng)
    refattn.forward(q, k, v, mask, backend="cuda", options=SMALL)
    keys = [key for key in mask._layouts if key[0] == "cuda"]
    assert [key[1:3] for key in keys] == [(8, 8)]
    cached = mask._layouts[keys[0]]
    refattn.forward(q, k, v, mask, backend="cuda", options=SMALL)
    assert mask._layouts[keys[0]] is cached


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


@pytest.mark.skipif(not SIMULATED, reason="there is a real GPU here")
def test_without_a_gpu_or_the_simulator_cuda_is_not_listed():
    r = _python("""
        import refattn
        print(refattn.backends.names())
        try:
            refattn.forward([[[[1.0]]]], [[[[1.0]]]], [[[[1.0]]]], backend="cuda")
        except refattn.RefattnError as e:
            print(e)
        """, NUMBA_ENABLE_CUDASIM="0")
    assert r.returncode == 0, r.stderr
    listed, message = r.stdout.splitlines()
    assert "cuda" not in listed and "'cpu'" in listed
    assert message.startswith("backend: 'cuda' is not available here: Numba finds no usable CUDA GPU")
    assert "NUMBA_ENABLE_CUDASIM=1" in message


def test_refattn_run_on_cuda(capsys):
    """The CLI's main job on the cuda backend (default block sizes: one tile here)."""
    import json

    from refattn.cli import main
    argv = ["run", "--lq", "12", "--heads", "2", "--kv-heads", "1", "--dim", "4", "--pattern", "causal",
            "--backward", "--json"]
    assert main(argv) == 0
    ref = json.loads(capsys.readouterr().out)
    assert main([*argv, "--backend", "cuda"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["backend"] == "cuda"
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert got[name]["sum"] == pytest.approx(ref[name]["sum"], rel=1e-12, abs=1e-12)
