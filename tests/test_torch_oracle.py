"""Cross-check the float64 oracle against PyTorch's attention implementations.

Everything here runs in float64 on the CPU and is compared with tight tolerances
(rtol=1e-10, atol=1e-12): both sides compute the same float64 sums in slightly
different orders, so they agree to a few ulps.

* ``torch.nn.functional.scaled_dot_product_attention`` (SDPA), forward and autograd
  (dq, dk, dv, and d(attn_mask) for a float mask), on every CPU SDPA backend that
  accepts the case (MATH always; FLASH_ATTENTION only when D == Dv and there is no
  attention mask or GQA, otherwise it reports "No available kernel" and that
  combination is skipped).
* The log-sum-exp against ``torch.logsumexp`` of the masked scores built in torch.
* FlexAttention (``torch.nn.attention.flex_attention``) run eagerly, not wrapped in
  ``torch.compile``: score_mod for softcap and ALiBi, block masks from mask_mods,
  out and lse. Public ``flex_attention`` refuses backward on CPU in torch 2.13
  ("FlexAttention does not support backward on CPU"), so the gradient tests call the
  flex_attention higher-order op underneath it directly; its CompositeExplicitAutograd
  and backward implementations are the dense math reference that the public function
  would run, and its autograd includes the gradient of lse, so ``dlse`` and the
  gradient of captured score_mod buffers (ALiBi slopes, a dense bias) are checked too.

Dropout is not compared: torch draws its own keep-mask, which cannot be fed in.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402
from torch.nn.attention.flex_attention import (  # noqa: E402
    AuxRequest,
    create_block_mask,
    flex_attention,
)

import refattn  # noqa: E402
from refattn import ALiBi, Mask, patterns  # noqa: E402

pytestmark = [
    pytest.mark.oracle,
    # Known, harmless torch UserWarnings: eager flex is "unfused", the lower-right
    # causal bias "will produce NaNs" for Lq > Lk (it does not in 2.13: rows are 0),
    # and CPU SDPA explains why it did not pick a fused kernel.
    pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning"),
    pytest.mark.filterwarnings("ignore:Lower right causal bias will produce NaNs:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*kernel not used because:UserWarning"),
    pytest.mark.filterwarnings("ignore:Memory efficient kernel not used:UserWarning"),
]

RTOL = 1e-10
ATOL = 1e-12

SDPA_BACKENDS = [
    pytest.param(SDPBackend.MATH, id="math"),
    pytest.param(SDPBackend.FLASH_ATTENTION, id="flash"),
]


# ---- helpers ------------------------------------------------------------------------
def _t(rng, *shape, grad=True):
    return torch.tensor(rng.standard_normal(shape), dtype=torch.float64, requires_grad=grad)


def _qkv(rng, B=2, H=2, Hkv=None, Lq=7, Lk=9, D=8, Dv=None, grad=True):
    Hkv = H if Hkv is None else Hkv
    Dv = D if Dv is None else Dv
    return (_t(rng, B, H, Lq, D, grad=grad), _t(rng, B, Hkv, Lk, D, grad=grad),
            _t(rng, B, Hkv, Lk, Dv, grad=grad))


def _np(x):
    return x.detach().numpy()


def assert_close(actual, expected, rtol=RTOL, atol=ATOL, what=""):
    actual = _np(actual) if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = _np(expected) if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


def assert_lse_close(actual, expected, rtol=RTOL, atol=ATOL):
    """-inf on exactly the same rows, close elsewhere (no inf arithmetic: RuntimeWarning
    is an error in this suite)."""
    actual = _np(actual) if isinstance(actual, torch.Tensor) else np.asarray(actual)
    expected = _np(expected) if isinstance(expected, torch.Tensor) else np.asarray(expected)
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(np.isneginf(actual), np.isneginf(expected), err_msg="lse -inf rows")
    fin = np.isfinite(expected)
    assert np.all(np.isfinite(actual[fin]))
    np.testing.assert_allclose(actual[fin], expected[fin], rtol=rtol, atol=atol, err_msg="lse")


def _sdpa(backend, *args, **kwargs):
    """SDPA restricted to one backend; skip when that backend cannot take the case."""
    with sdpa_kernel([backend]):
        try:
            return F.scaled_dot_product_attention(*args, **kwargs)
        except RuntimeError as e:
            if backend != SDPBackend.MATH and "No available kernel" in str(e):
                pytest.skip(f"{backend.name} has no CPU kernel for this case")
            raise


def _check_sdpa(backend, q, k, v, mask, rng, *, ref_kwargs=None, **sdpa_kwargs):
    """Run SDPA (forward + autograd with a random dout) and refattn on the same inputs
    and compare out, dq, dk, dv. Returns (torch out, refattn Result, refattn Grads)."""
    ref_kwargs = ref_kwargs or {}
    out = _sdpa(backend, q, k, v, **sdpa_kwargs)
    dout = torch.tensor(rng.standard_normal(tuple(out.shape)), dtype=torch.float64)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    qn, kn, vn = _np(q), _np(k), _np(v)
    r = refattn.forward(qn, kn, vn, mask, **ref_kwargs)
    g = refattn.backward(qn, kn, vn, r.out, r.lse, _np(dout), mask, **ref_kwargs)
    assert_close(out, r.out, what="out")
    assert_close(dq, g.dq, what="dq")
    assert_close(dk, g.dk, what="dk")
    assert_close(dv, g.dv, what="dv")
    return out, r, g


# ---- 1. SDPA ------------------------------------------------------------------------
@pytest.mark.parametrize("backend", SDPA_BACKENDS)
@pytest.mark.parametrize("B,H,Lq,Lk,D", [(1, 1, 1, 1, 1), (2, 3, 7, 9, 8), (1, 2, 33, 17, 16),
                                          (2, 1, 64, 64, 4)])
def test_sdpa_dense(backend, B, H, Lq, Lk, D):
    rng = np.random.default_rng(100 + Lq)
    q, k, v = _qkv(rng, B=B, H=H, Lq=Lq, Lk=Lk, D=D)
    _check_sdpa(backend, q, k, v, None, rng)


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
@pytest.mark.parametrize("scale", [0.125, 1.0, 2.5, -0.7])
def test_sdpa_custom_scale(backend, scale):
    rng = np.random.default_rng(1)
    q, k, v = _qkv(rng, Lq=6, Lk=11, D=8)
    _check_sdpa(backend, q, k, v, None, rng, scale=scale, ref_kwargs={"scale": scale})


@pytest.mark.parametrize("D,Dv", [(8, 3), (4, 16), (1, 5)])
def test_sdpa_dv_differs(D, Dv):
    """MATH only: CPU flash requires D == Dv ("Flash attention requires q,k,v to have the
    same last dimension")."""
    backend = SDPBackend.MATH
    rng = np.random.default_rng(2)
    q, k, v = _qkv(rng, Lq=5, Lk=12, D=D, Dv=Dv)
    _check_sdpa(backend, q, k, v, None, rng)


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
@pytest.mark.parametrize("per_group", [False, True], ids=["shared", "per_bh"])
@pytest.mark.parametrize("density", [0.2, 0.5, 0.9])
def test_sdpa_bool_mask_with_empty_row(backend, per_group, density):
    """A random boolean attn_mask (True = attend) with one fully masked row per group.

    Torch 2.13 on CPU returns out = 0 and zero gradients on a fully masked row
    (torch._safe_softmax in the math backend), which is refattn's convention too; this
    is asserted explicitly so that a change on either side is noticed."""
    rng = np.random.default_rng(int(density * 10) + 7 * per_group)
    B, H, Lq, Lk = 2, 3, 10, 13
    q, k, v = _qkv(rng, B=B, H=H, Lq=Lq, Lk=Lk, D=4)
    shape = (B, H, Lq, Lk) if per_group else (Lq, Lk)
    m = rng.random(shape) < density
    m[..., 3, :] = False                 # a fully masked row
    m[..., 5, :] = True                  # and a full one
    if per_group:
        m[1, 2, 7, :] = False            # an empty row in one group only
    out, r, g = _check_sdpa(backend, q, k, v, Mask.from_dense(m), rng, attn_mask=torch.from_numpy(m))
    empty = ~m.any(axis=-1)
    empty_bh = np.broadcast_to(empty, (B, H, Lq))
    assert np.all(_np(out)[empty_bh] == 0.0), "torch: fully masked row is not 0"
    assert np.all(r.out[empty_bh] == 0.0)
    assert np.all(np.isneginf(r.lse[empty_bh])) and np.all(np.isfinite(r.lse[~empty_bh]))
    assert np.all(g.dq[empty_bh] == 0.0)


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
@pytest.mark.parametrize("Lq,Lk", [(5, 5), (4, 11), (11, 4), (1, 9), (9, 1), (64, 33)])
def test_sdpa_is_causal_is_top_left(backend, Lq, Lk):
    """SDPA's is_causal masks with torch.ones(Lq, Lk).tril(): top-left alignment."""
    rng = np.random.default_rng(Lq * 100 + Lk)
    q, k, v = _qkv(rng, Lq=Lq, Lk=Lk, D=4)
    mask = patterns.Causal(align="top_left").mask(Lq, Lk)
    assert np.array_equal(mask.to_dense(), np.tril(np.ones((Lq, Lk), dtype=bool)))
    _check_sdpa(backend, q, k, v, mask, rng, is_causal=True)


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
@pytest.mark.parametrize("Lq,Lk", [(5, 5), (4, 11), (11, 4), (1, 9), (9, 1), (33, 64)])
def test_sdpa_causal_lower_right_is_bottom_right(backend, Lq, Lk):
    """torch.nn.attention.bias.causal_lower_right is refattn's default bottom_right.

    For Lq > Lk the first Lq - Lk rows have no allowed key; torch warns that they
    "will produce NaNs", but in 2.13 they come out 0 with zero gradient, as in refattn."""
    rng = np.random.default_rng(Lq * 100 + Lk + 1)
    q, k, v = _qkv(rng, Lq=Lq, Lk=Lk, D=4)
    mask = patterns.Causal(align="bottom_right").mask(Lq, Lk)
    assert mask == patterns.Causal().mask(Lq, Lk)  # bottom_right is the default
    assert np.array_equal(mask.to_dense(), np.tril(np.ones((Lq, Lk), dtype=bool), k=Lk - Lq))
    out, r, g = _check_sdpa(backend, q, k, v, mask, rng, attn_mask=causal_lower_right(Lq, Lk))
    n_empty = max(0, Lq - Lk)
    assert not torch.isnan(out).any()
    assert np.all(_np(out)[:, :, :n_empty] == 0.0)
    assert np.all(np.isneginf(r.lse[:, :, :n_empty]))
    assert np.all(np.isfinite(r.lse[:, :, n_empty:]))


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
@pytest.mark.parametrize("H,Hkv", [(4, 2), (6, 3), (4, 1), (3, 1), (4, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_gqa(backend, H, Hkv, causal):
    """enable_gqa=True: query head h reads kv head h // (H // Hkv) in both; dk, dv sum
    over the query heads of a group."""
    rng = np.random.default_rng(H * 10 + Hkv + causal)
    q, k, v = _qkv(rng, B=2, H=H, Hkv=Hkv, Lq=9, Lk=7, D=4)
    mask = patterns.Causal(align="top_left").mask(9, 7) if causal else None
    _check_sdpa(backend, q, k, v, mask, rng, enable_gqa=True, is_causal=causal)


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
@pytest.mark.parametrize("bias_shape", [(2, 3, 6, 10), (6, 10), (1, 3, 1, 10), (2, 1, 6, 1), (10,)])
def test_sdpa_float_mask_is_dense_bias(backend, bias_shape):
    """A float attn_mask is added to the scaled scores: refattn's dense bias with every key
    allowed. Its autograd gradient (summed over broadcast axes) is refattn's dbias.
    CPU flash takes a float mask only when the mask does not require grad, so dbias is
    compared on MATH only."""
    rng = np.random.default_rng(len(bias_shape) + sum(bias_shape))
    q, k, v = _qkv(rng, B=2, H=3, Lq=6, Lk=10, D=4)
    bias_grad = backend == SDPBackend.MATH
    bias = _t(rng, *bias_shape, grad=bias_grad)
    if backend == SDPBackend.FLASH_ATTENTION and len(bias_shape) < 2:
        # torch 2.13 quirk: CPU flash indexes attn_mask.size(-2), so a 1-D (Lk,) float
        # mask (broadcastable, and accepted by MATH) raises IndexError instead.
        with pytest.raises(IndexError, match="Dimension out of range"):
            _sdpa(backend, q, k, v, attn_mask=bias)
        return
    out = _sdpa(backend, q, k, v, attn_mask=bias)
    dout = torch.tensor(rng.standard_normal(tuple(out.shape)), dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v, bias) if bias_grad else (q, k, v), dout)
    dq, dk, dv = grads[:3]
    qn, kn, vn, bn = _np(q), _np(k), _np(v), _np(bias)
    r = refattn.forward(qn, kn, vn, None, bias=bn)
    g = refattn.backward(qn, kn, vn, r.out, r.lse, _np(dout), None, bias=bn)
    assert_close(out, r.out, what="out")
    assert_close(dq, g.dq, what="dq")
    assert_close(dk, g.dk, what="dk")
    assert_close(dv, g.dv, what="dv")
    assert g.dbias.shape == bias_shape
    if bias_grad:
        assert_close(grads[3], g.dbias, what="dbias")


@pytest.mark.parametrize("backend", SDPA_BACKENDS)
def test_sdpa_float_mask_with_scale_and_gqa(backend):
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng, B=1, H=4, Hkv=2, Lq=8, Lk=8, D=16)
    bias = rng.standard_normal((1, 4, 8, 8))
    _check_sdpa(backend, q, k, v, None, rng, attn_mask=torch.from_numpy(bias), scale=0.3,
                enable_gqa=True, ref_kwargs={"bias": bias, "scale": 0.3})


# ---- 2. LSE against torch.logsumexp of the masked scores ------------------------------
def _torch_scores(q, k, scale, softcap=None, bias=None):
    G = q.shape[1] // k.shape[1]
    S = scale * (q @ torch.repeat_interleave(k, G, dim=1).transpose(-2, -1))
    if softcap is not None:
        S = softcap * torch.tanh(S / softcap)
    if bias is not None:
        S = S + bias
    return S


def _alibi_dense(slopes, Lq, Lk, align):
    off = 0 if align == "top_left" else Lk - Lq
    i = torch.arange(Lq, dtype=torch.float64)[:, None] + off
    j = torch.arange(Lk, dtype=torch.float64)[None, :]
    return -torch.tensor(slopes)[:, None, None] * (j - i).abs()


@pytest.mark.parametrize(
    "case",
    ["dense", "random_mask", "causal_tl", "causal_br_lq_gt_lk", "softcap", "bias", "alibi_br",
     "alibi_tl_softcap_gqa", "all_empty"],
)
def test_lse_matches_torch_logsumexp(case):
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    B, H, Hkv, Lq, Lk, D = 2, 4, 2, 12, 9, 8
    q, k, v = _qkv(rng, B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, grad=False)
    scale, softcap, tbias, rbias = 1 / math.sqrt(D), None, None, None
    allowed = np.ones((Lq, Lk), dtype=bool)
    if case == "random_mask":
        allowed = rng.random((B, H, Lq, Lk)) < 0.4
        allowed[0, 1, 2] = False
    elif case == "causal_tl":
        allowed = patterns.Causal(align="top_left").mask(Lq, Lk).to_dense()
    elif case == "causal_br_lq_gt_lk":
        allowed = patterns.Causal(align="bottom_right").mask(Lq, Lk).to_dense()
    elif case == "softcap":
        softcap, scale = 2.0, 1.7
    elif case == "bias":
        rbias = rng.standard_normal((1, H, Lq, Lk)) * 3
        tbias = torch.from_numpy(rbias)
    elif case == "alibi_br":
        rbias = ALiBi(ALiBi.default_slopes(H))
        tbias = _alibi_dense(rbias.slopes, Lq, Lk, "bottom_right")
        allowed = patterns.Causal().mask(Lq, Lk).to_dense()
    elif case == "alibi_tl_softcap_gqa":
        softcap = 0.8
        rbias = ALiBi(rng.random(H), align="top_left")
        tbias = _alibi_dense(rbias.slopes, Lq, Lk, "top_left")
    elif case == "all_empty":
        allowed = np.zeros((Lq, Lk), dtype=bool)
    S = _torch_scores(q, k, scale, softcap, tbias)
    S = S.masked_fill(~torch.from_numpy(allowed), -math.inf)
    want = torch.logsumexp(S, dim=-1)
    r = refattn.forward(_np(q), _np(k), _np(v), Mask.from_dense(allowed), scale=scale,
                        softcap=softcap, bias=rbias)
    assert_lse_close(r.lse, want)
    # The output is the softmax of the same scores; torch's softmax of an all -inf row
    # is NaN, so compare only rows with an allowed key.
    nonempty = torch.isfinite(want)
    P = torch.where(nonempty[..., None], torch.softmax(S, dim=-1), 0.0)
    out = P @ torch.repeat_interleave(v, H // Hkv, dim=1)
    assert_close(out, r.out, what="out")


# ---- 3. FlexAttention, eager ----------------------------------------------------------
@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Eager flex still traces score_mod/mask_mod with dynamo (backend "eager"), and each
    new closure is a recompile; start every test from an empty cache so the recompile
    limit is never reached."""
    torch._dynamo.reset()
    yield


def _flex_hop():
    try:
        from torch._higher_order_ops.flex_attention import flex_attention as hop
        from torch.nn.attention.flex_attention import _apply_kernel_options
    except ImportError as e:  # pragma: no cover - private API moved
        pytest.skip(f"flex_attention higher-order op not importable: {e}")
    return hop, _apply_kernel_options


def _flex_public(q, k, v, score_mod, block_mask, scale, enable_gqa):
    """Public eager flex_attention: (out, natural-log lse). No gradients on CPU."""
    with torch.no_grad():
        out, aux = flex_attention(q.detach(), k.detach(), v.detach(), score_mod=score_mod,
                                  block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                                  return_aux=AuxRequest(lse=True))
    return out, aux.lse


def _flex_grad(q, k, v, score_mod, block_mask, scale, buffers=()):
    """The flex_attention HOP called directly (under the public function): differentiable
    out and lse (the HOP returns lse in log2 units; the public function multiplies by
    ln 2, as done here). ``buffers`` are passed to score_mod after (b, h, q, kv)."""
    hop, apply_kernel_options = _flex_hop()
    kernel_options = apply_kernel_options(q, k, v, True, None)
    out, lse2, _ = hop(q, k, v, score_mod, block_mask.as_tuple(), scale, kernel_options,
                       tuple(buffers), ())
    return out, lse2 * math.log(2.0)


def _mask_setup(kind, B, H, Lq, Lk, rng):
    """(refattn Mask, dense bool array, mask_mod, block-mask B, block-mask H)."""
    if kind == "none":
        dense = np.ones((Lq, Lk), dtype=bool)

        def mm(b, h, qi, kv):
            return qi >= 0
        return None, dense, mm, None, None
    if kind in ("causal_tl", "causal_br"):
        off = 0 if kind == "causal_tl" else Lk - Lq
        pat = patterns.Causal(align="top_left" if kind == "causal_tl" else "bottom_right")

        def mm(b, h, qi, kv):
            return kv <= qi + off
        mask = pat.mask(Lq, Lk)
        return mask, mask.to_dense(), mm, None, None
    if kind == "sliding":
        w = 3

        def mm(b, h, qi, kv):
            return (kv <= qi) & (qi - kv < w)
        dense = np.array([[j <= i and i - j < w for j in range(Lk)] for i in range(Lq)])
        return Mask.from_dense(dense), dense, mm, None, None
    if kind == "random":
        dense = rng.random((Lq, Lk)) < 0.35
        dense[1] = False
        table = torch.from_numpy(dense)

        def mm(b, h, qi, kv):
            return table[qi, kv]
        return Mask.from_dense(dense), dense, mm, None, None
    if kind == "random_per_bh":
        dense = rng.random((B, H, Lq, Lk)) < 0.5
        dense[0, H - 1, Lq - 1] = False
        table = torch.from_numpy(dense)

        def mm(b, h, qi, kv):
            return table[b, h, qi, kv]
        return Mask.from_dense(dense), dense, mm, B, H
    raise AssertionError(kind)


def _score_setup(kind, H, Lq, Lk, rng):
    """(score_mod, refattn kwargs, buffers for the HOP path, score_mod taking them)."""
    if kind == "plain":
        def sm(s, b, h, qi, kv):
            return s
        return sm, {}, (), None
    if kind == "softcap":
        cap = 1.5

        def sm(s, b, h, qi, kv):
            return cap * torch.tanh(s / cap)
        return sm, {"softcap": cap}, (), None
    if kind.startswith("alibi"):
        align = "top_left" if kind.endswith("tl") else "bottom_right"
        off = 0 if align == "top_left" else Lk - Lq
        slopes_np = ALiBi.default_slopes(H) if kind.endswith("br") else rng.random(H) * 0.8
        slopes = torch.from_numpy(slopes_np)
        cap = 2.0 if kind.startswith("alibi_softcap") else None

        def sm(s, b, h, qi, kv):
            if cap is not None:
                s = cap * torch.tanh(s / cap)
            return s - slopes[h] * torch.abs(kv - (qi + off))

        def sm_buf(s, b, h, qi, kv, sl):
            if cap is not None:
                s = cap * torch.tanh(s / cap)
            return s - sl[h] * torch.abs(kv - (qi + off))
        kw = {"bias": ALiBi(slopes_np, align=align)}
        if cap is not None:
            kw["softcap"] = cap
        return sm, kw, (slopes_np,), sm_buf
    if kind == "dense_bias":
        bias_np = rng.standard_normal((1, H, Lq, Lk))
        bias = torch.from_numpy(bias_np)

        def sm(s, b, h, qi, kv):
            return s + bias[0, h, qi, kv]

        def sm_buf(s, b, h, qi, kv, bb):
            return s + bb[0, h, qi, kv]
        return sm, {"bias": bias_np}, (bias_np,), sm_buf
    raise AssertionError(kind)


FLEX_CASES = [
    # (score kind, mask kind, B, H, Hkv, Lq, Lk, D, Dv, scale)
    ("plain", "none", 1, 2, 2, 8, 8, 4, 4, None),
    ("softcap", "none", 2, 2, 2, 9, 13, 8, 8, None),
    ("softcap", "causal_tl", 1, 3, 3, 16, 11, 8, 5, 0.9),
    ("alibi_br", "causal_br", 2, 4, 2, 7, 19, 4, 4, None),
    ("alibi_br", "causal_br", 1, 4, 4, 12, 5, 4, 4, None),   # Lq > Lk: empty first rows
    ("alibi_tl", "none", 1, 3, 1, 10, 6, 8, 3, 0.4),
    ("alibi_softcap_tl", "random", 1, 2, 2, 12, 10, 4, 4, None),
    ("plain", "random_per_bh", 2, 4, 2, 9, 14, 16, 8, None),
    ("softcap", "sliding", 1, 2, 1, 64, 64, 16, 16, None),
    ("dense_bias", "random", 1, 3, 3, 6, 7, 4, 2, 1.3),
]
FLEX_IDS = [f"{c[0]}-{c[1]}-B{c[2]}H{c[3]}Hkv{c[4]}-{c[5]}x{c[6]}" for c in FLEX_CASES]


def _flex_problem(case, seed):
    sk, mk, B, H, Hkv, Lq, Lk, D, Dv, scale = case
    rng = np.random.default_rng(seed)
    q, k, v = _qkv(rng, B=B, H=H, Hkv=Hkv, Lq=Lq, Lk=Lk, D=D, Dv=Dv)
    mask, dense, mm, bB, bH = _mask_setup(mk, B, H, Lq, Lk, rng)
    sm, ref_kw, bufs, sm_buf = _score_setup(sk, H, Lq, Lk, rng)
    block_mask = create_block_mask(mm, bB, bH, Lq, Lk, device="cpu")
    if scale is not None:
        ref_kw = {**ref_kw, "scale": scale}
    return rng, (q, k, v), mask, dense, sm, block_mask, ref_kw, bufs, sm_buf, scale


@pytest.mark.parametrize("case", FLEX_CASES, ids=FLEX_IDS)
def test_flex_forward_out_and_lse(case):
    rng, (q, k, v), mask, dense, sm, block_mask, ref_kw, _, _, scale = _flex_problem(case, 11)
    H, Hkv = case[3], case[4]
    out, lse = _flex_public(q, k, v, sm, block_mask, scale, enable_gqa=H != Hkv)
    r = refattn.forward(_np(q), _np(k), _np(v), mask, **ref_kw)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert_close(out, r.out, what="out")
    assert_lse_close(lse, r.lse)
    # empty rows: 0 output and -inf lse in both
    empty = np.broadcast_to(~dense.any(axis=-1), r.lse.shape)
    assert np.all(_np(out)[empty] == 0.0)


@pytest.mark.parametrize("use_dlse", [False, True], ids=["no_dlse", "dlse"])
@pytest.mark.parametrize("case", FLEX_CASES, ids=FLEX_IDS)
def test_flex_gradients(case, use_dlse):
    """loss = sum(out * dout) + sum(lse * dlse) over the rows with an allowed key; torch's
    autograd gradients vs refattn.backward(..., dlse=dlse). dlse is passed to refattn on
    every row (its value on an empty row must not matter). Captured score_mod tensors
    (ALiBi slopes, a dense bias) are HOP buffers here, so their gradient is refattn's
    dbias (for ALiBi: with respect to the slopes)."""
    rng, (q, k, v), mask, _, sm, block_mask, ref_kw, bufs, sm_buf, scale = _flex_problem(case, 23)
    D = case[7]
    scale_used = 1.0 / math.sqrt(D) if scale is None else scale
    tbufs = tuple(torch.tensor(b, dtype=torch.float64, requires_grad=True) for b in bufs)
    out, lse = _flex_grad(q, k, v, sm_buf if tbufs else sm, block_mask, scale_used, tbufs)
    dout = torch.tensor(rng.standard_normal(tuple(out.shape)), dtype=torch.float64)
    dlse = torch.tensor(rng.standard_normal(tuple(lse.shape)), dtype=torch.float64)
    nonempty = torch.isfinite(lse.detach())
    loss = (out * dout).sum()
    if use_dlse:
        loss = loss + (torch.where(nonempty, lse, 0.0) * dlse).sum()
    grads = torch.autograd.grad(loss, (q, k, v, *tbufs))
    qn, kn, vn = _np(q), _np(k), _np(v)
    r = refattn.forward(qn, kn, vn, mask, **ref_kw)
    assert_close(out, r.out, what="out")
    assert_lse_close(lse, r.lse)
    g = refattn.backward(qn, kn, vn, r.out, r.lse, _np(dout), mask,
                         dlse=_np(dlse) if use_dlse else None, **ref_kw)
    assert_close(grads[0], g.dq, what="dq")
    assert_close(grads[1], g.dk, what="dk")
    assert_close(grads[2], g.dv, what="dv")
    if tbufs:
        assert_close(grads[3], g.dbias, what="dbias")
    else:
        assert g.dbias is None


def test_flex_public_refuses_cpu_backward():
    """Documents why the gradient tests go through the HOP: in torch 2.13 the public
    flex_attention raises on CPU inputs that require grad. If this starts passing, the
    gradient tests can switch to the public function."""
    rng = np.random.default_rng(0)
    q, k, v = _qkv(rng, B=1, H=1, Lq=4, Lk=4, D=4)
    with pytest.raises(NotImplementedError, match="does not support backward on CPU"):
        flex_attention(q, k, v)


def test_flex_empty_rows_and_empty_dlse_ignored():
    """A mask with several fully masked rows: flex and refattn give out 0 / lse -inf /
    zero dq there, and refattn ignores arbitrary (even huge) dlse on those rows."""
    rng = np.random.default_rng(3)
    B, H, Lq, Lk = 1, 2, 10, 6
    q, k, v = _qkv(rng, B=B, H=H, Lq=Lq, Lk=Lk, D=4)
    dense = rng.random((Lq, Lk)) < 0.5
    dense[[0, 4, 9]] = False
    table = torch.from_numpy(dense)
    block_mask = create_block_mask(lambda b, h, qi, kv: table[qi, kv], None, None, Lq, Lk,
                                   device="cpu")
    out, lse = _flex_grad(q, k, v, lambda s, b, h, qi, kv: s, block_mask, 0.5)
    dout = torch.tensor(rng.standard_normal(tuple(out.shape)), dtype=torch.float64)
    dlse = torch.tensor(rng.standard_normal(tuple(lse.shape)), dtype=torch.float64)
    nonempty = torch.isfinite(lse.detach())
    loss = (out * dout).sum() + (torch.where(nonempty, lse, 0.0) * dlse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    mask = Mask.from_dense(dense)
    qn, kn, vn = _np(q), _np(k), _np(v)
    r = refattn.forward(qn, kn, vn, mask, scale=0.5)
    wild = _np(dlse).copy()
    wild[:, :, [0, 4, 9]] = 1e300
    g = refattn.backward(qn, kn, vn, r.out, r.lse, _np(dout), mask, scale=0.5, dlse=wild)
    assert np.all(np.isneginf(_np(lse)[:, :, [0, 4, 9]]))
    assert np.all(_np(out)[:, :, [0, 4, 9]] == 0.0)
    assert np.all(g.dq[:, :, [0, 4, 9]] == 0.0)
    assert_close(dq, g.dq, what="dq")
    assert_close(dk, g.dk, what="dk")
    assert_close(dv, g.dv, what="dv")
