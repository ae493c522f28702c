"""The oracle's hand-written backward against central finite differences (float64).

For the loss ``l = sum(dout * out) + sum(dlse * lse over rows with an allowed key)``,
every gradient the backward returns (dq, dk, dv, dbias) is compared element by element
with ``(l(x + eps) - l(x - eps)) / (2 eps)``. Each feature of the contract has a case.
"""

import numpy as np
import pytest

import refattn
from refattn import ALiBi, Dropout, Mask, SparseBias, patterns

from .conftest import random_bool, random_qkv

EPS = 1e-6
# Central differences at eps = 1e-6 on O(1) values have truncation error ~eps^2 and
# cancellation error ~1e-16 / eps = 1e-10, so 1e-7 separates right from wrong by ~100x.
ATOL = 1e-7


def _loss(q, k, v, mask, kw, dout, dlse):
    kw = _rebuild(kw)
    r = refattn.forward(q, k, v, mask, **kw)
    finite = np.isfinite(r.lse)
    return float(np.sum(dout * r.out) + np.sum(np.where(finite, r.lse, 0.0) * dlse))


def _rebuild(kw):
    """Bias objects copy their values, so cases give a factory that is called anew for
    every evaluation: in-place perturbations of the parameter then count."""
    return dict(kw, bias=kw["bias"]()) if callable(kw.get("bias")) else kw


def _numeric_grad(f, x):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + EPS
        up = f()
        x[idx] = old - EPS
        down = f()
        x[idx] = old
        g[idx] = (up - down) / (2 * EPS)
    return g


def _case(name, rng):
    """(q, k, v, mask, kwargs, bias_param) for a named feature; bias_param is the array
    whose entries dbias differentiates (or None)."""
    B, H, Hkv, Lq, Lk, D, Dv = 1, 2, 2, 5, 5, 3, 2
    kw, bias_param = {}, None
    if name == "gqa":
        B, H, Hkv = 2, 4, 2
    if name == "mqa":
        H, Hkv = 3, 1
    if name.startswith("lq<lk") or name.startswith("lq>lk"):
        Lq, Lk = (3, 7) if name.startswith("lq<lk") else (7, 3)
    q, k, v = random_qkv(rng, B, H, Hkv, Lq, Lk, D, Dv)
    mask = Mask.from_dense(random_bool(rng, (Lq, Lk), 0.7))
    if name == "scale":
        kw["scale"] = 1.7
    elif name == "softcap":
        kw["softcap"] = 0.8
        q *= 2.0  # push scores into tanh's curved part
    elif name == "dense_bias":
        bias_param = rng.standard_normal((H, Lq, Lk))
        kw["bias"] = bias_param
    elif name == "dense_bias_broadcast":
        bias_param = rng.standard_normal((1, H, 1, Lk))
        kw["bias"] = bias_param
    elif name == "sparse_bias":
        bias_param = rng.standard_normal((B, H, mask.nnz))
        kw["bias"] = lambda: SparseBias(bias_param)
    elif name == "sparse_bias_ragged":
        per_head = [Mask.from_dense(random_bool(rng, (Lq, Lk), 0.5)) for _ in range(H)]
        mask = Mask.stack([per_head])
        bias_param = [[rng.standard_normal(m.nnz) for m in per_head]]
        kw["bias"] = lambda: SparseBias(bias_param)
    elif name.startswith("alibi"):
        bias_param = ALiBi.default_slopes(H) * 3.0
        align = "top_left" if name.endswith("top_left") else "bottom_right"
        kw["bias"] = lambda: ALiBi(bias_param, align=align)
    elif name == "dropout":
        kw["dropout"] = Dropout.sample(0.3, mask, B, H, seed=7)
    elif name == "empty_rows":
        dm = random_bool(rng, (Lq, Lk), 0.7)
        dm[[0, 3]] = False
        mask = Mask.from_dense(dm)
    elif name.startswith("lq"):
        mask = patterns.Causal(align=name.split(":")[1]).mask(Lq, Lk)
    elif name == "everything":
        kw.update(scale=0.9, softcap=1.1, bias=rng.standard_normal((Lq, Lk)),
                  dropout=Dropout.sample(0.2, mask, B, H, seed=3))
        bias_param = kw["bias"]
    return q, k, v, mask, kw, bias_param


CASES = ["plain", "scale", "softcap", "dense_bias", "dense_bias_broadcast", "sparse_bias",
         "sparse_bias_ragged", "alibi:top_left", "alibi:bottom_right", "dropout", "gqa", "mqa",
         "lq<lk:top_left", "lq<lk:bottom_right", "lq>lk:top_left", "lq>lk:bottom_right",
         "empty_rows", "everything"]


@pytest.mark.parametrize("with_dlse", [False, True], ids=["dout", "dout+dlse"])
@pytest.mark.parametrize("name", CASES)
def test_backward_matches_finite_differences(name, with_dlse, rng):
    q, k, v, mask, kw, bias_param = _case(name, rng)
    kw0 = _rebuild(kw)
    r = refattn.forward(q, k, v, mask, **kw0)
    dout = rng.standard_normal(r.out.shape)
    dlse = rng.standard_normal(r.lse.shape) if with_dlse else np.zeros(r.lse.shape)
    g = refattn.backward(q, k, v, r.out, r.lse, dout, mask, dlse=dlse if with_dlse else None, **kw0)

    def loss():
        return _loss(q, k, v, mask, kw, dout, dlse)

    for x, analytic, label in ((q, g.dq, "dq"), (k, g.dk, "dk"), (v, g.dv, "dv")):
        np.testing.assert_allclose(analytic, _numeric_grad(loss, x), rtol=0, atol=ATOL, err_msg=label)
    if bias_param is None:
        assert g.dbias is None
    elif isinstance(bias_param, list):  # ragged sparse bias: dbias comes back ragged
        for row_b, row_p in zip(g.dbias, bias_param):
            for got, param in zip(row_b, row_p):
                np.testing.assert_allclose(got, _numeric_grad(loss, param), rtol=0, atol=ATOL)
    else:
        assert g.dbias.shape == bias_param.shape
        np.testing.assert_allclose(g.dbias, _numeric_grad(loss, bias_param), rtol=0, atol=ATOL,
                                   err_msg="dbias")


def test_empty_rows_get_no_gradient(rng):
    q, k, v = random_qkv(rng, 1, 2, 2, 4, 6, 3, 3)
    dm = random_bool(rng, (4, 6), 0.8)
    dm[1] = False
    m = Mask.from_dense(dm)
    bias = rng.standard_normal((4, 6))
    r = refattn.forward(q, k, v, m, bias=bias)
    dout = np.zeros(r.out.shape)
    dout[:, :, 1] = 5.0  # upstream gradient only on the empty row
    dlse = np.zeros(r.lse.shape)
    dlse[:, :, 1] = 3.0
    g = refattn.backward(q, k, v, r.out, r.lse, dout, m, bias=bias, dlse=dlse)
    for x in (g.dq, g.dk, g.dv, g.dbias):
        assert not np.any(x)


def test_dense_bias_gradient_is_zero_off_the_mask(rng):
    q, k, v = random_qkv(rng, 1, 1, 1, 4, 4, 2)
    dm = random_bool(rng, (4, 4), 0.5)
    m = Mask.from_dense(dm)
    bias = rng.standard_normal((4, 4))
    r = refattn.forward(q, k, v, m, bias=bias)
    g = refattn.backward(q, k, v, r.out, r.lse, rng.standard_normal(r.out.shape), m, bias=bias)
    assert not np.any(g.dbias[~dm])


def test_gradients_are_float64_in_input_shapes(rng):
    q, k, v = random_qkv(rng, 2, 4, 2, 3, 5, 4, 6, dtype=np.float32)
    r = refattn.forward(q, k, v)
    g = refattn.backward(q, k, v, r.out, r.lse, np.ones(r.out.shape, np.float32))
    assert (g.dq.shape, g.dk.shape, g.dv.shape) == (q.shape, k.shape, v.shape)
    assert g.dq.dtype == g.dk.dtype == g.dv.dtype == np.float64
