"""refattn.model: hand-written backward passes against finite differences and torch autograd,
counter-based dropout, side-effect-free forwards, saved bytes (selective vs all, O(L d))."""

from __future__ import annotations

import numpy as np
import pytest

from refattn import Mask, patterns
from refattn.train.model import (
    GELU, Attention, Block, Context, Dropout, LayerNorm, Linear, Stack, keep_mask, saved_bytes,
)

B, L, DM, H, HKV, DFF = 2, 8, 8, 2, 1, 16
D = DM // H
WINDOW = patterns.get("sliding_window", left=4, right=0)
CTX = Context(seed=3, call=5, train=True)


def _rng(*key):
    return np.random.default_rng(list(key))


def _randomize(params: dict, rng) -> None:
    """Non-trivial parameters (biases, gamma, beta included), in place, so that every
    gradient term is exercised."""
    for a in params.values():
        a[...] = rng.standard_normal(a.shape) * 0.5 + (1.0 if a.ndim == 1 else 0.0) * rng.standard_normal() * 0.1


def _leaves(saved):
    if isinstance(saved, np.ndarray):
        yield saved
    elif isinstance(saved, dict):
        for v in saved.values():
            yield from _leaves(v)
    else:
        for v in saved:
            yield from _leaves(v)


# ---- finite differences -------------------------------------------------------------------
def _analytic(mod, x, ctx, R, fwd_kw):
    mod.zero_grad()
    y, saved = mod.forward(x, ctx, **fwd_kw)
    dx = mod.backward(R, saved, ctx)
    return dx, {k: g.copy() for k, g in _grads(mod).items()}


def _params(mod):
    return dict(mod.params()) if isinstance(mod, Stack) else mod.params


def _grads(mod):
    return dict(mod.grads()) if isinstance(mod, Stack) else mod.grads


def _fd_errors(mod, x, ctx, R, *, fwd_kw=None, eps=1e-5, rng=None, dx=None, grads=None):
    """Relative errors of random projections ``<grad, V>`` against central finite differences
    of ``loss = sum(forward(x) * R)``, for dx and for every parameter. ``dx`` / ``grads``
    override the analytic values (to check that this check fails on a wrong gradient)."""
    fwd_kw = fwd_kw or {}
    rng = rng or _rng(11)
    a_dx, a_grads = _analytic(mod, x, ctx, R, fwd_kw)
    dx = a_dx if dx is None else dx
    grads = a_grads if grads is None else grads

    def loss(xx):
        return float(np.sum(mod.forward(xx, ctx, **fwd_kw)[0] * R))

    def rel(an, fd):  # the floor: a gradient that is 0 exactly (attention's bk) has FD noise ~1e-9
        return abs(an - fd) / max(abs(an), abs(fd), 1e-2)

    errs = {}
    V = rng.standard_normal(x.shape)
    errs["x"] = rel(np.sum(dx * V), (loss(x + eps * V) - loss(x - eps * V)) / (2 * eps))
    for name, p in _params(mod).items():
        V = rng.standard_normal(p.shape)
        keep = p.copy()
        p += eps * V
        lp = loss(x)
        p[...] = keep - eps * V
        lm = loss(x)
        p[...] = keep
        errs[name] = rel(np.sum(grads[name] * V), (lp - lm) / (2 * eps))
    return errs


def _case(name):
    """(module, input shape, forward kwargs) of the finite-difference cases."""
    if name == "linear":
        return Linear(DM, DFF, seed=1), (B, L, DM), {}
    if name == "layernorm":
        return LayerNorm(DM), (B, L, DM), {}
    if name == "gelu":
        return GELU(), (B, L, DM), {}
    if name == "dropout":
        return Dropout(0.3, layer=2, index=1), (B, L, DM), {}
    if name == "attention":
        return Attention(DM, H, HKV, pattern=WINDOW, seed=2), (B, L, DM), {}
    if name == "attention-mha-dense":
        return Attention(DM, H, H, seed=2), (B, L, DM), {}
    if name.startswith("block-"):
        return Block(DM, H, HKV, DFF, pattern=WINDOW, dropout=0.2, layer=1), (B, L, DM), \
            {"save": name.split("-")[1]}
    if name == "stack":
        return Stack(3, DM, H, HKV, DFF, pattern=WINDOW, dropout=0.2), (B, L, DM), {}
    raise AssertionError(name)


FD_CASES = ["linear", "layernorm", "gelu", "dropout", "attention", "attention-mha-dense",
            "block-all", "block-selective", "stack"]


@pytest.mark.parametrize("name", FD_CASES)
def test_gradients_match_finite_differences(name):
    mod, shape, kw = _case(name)
    rng = _rng(1, len(name))
    _randomize(_params(mod), rng)
    x = rng.standard_normal(shape)
    R = rng.standard_normal(shape[:-1] + (mod.forward(x, CTX, **kw)[0].shape[-1],))
    errs = _fd_errors(mod, x, CTX, R, fwd_kw=kw)
    assert set(errs) == {"x", *_params(mod)}
    bad = {k: e for k, e in errs.items() if not e < 1e-6}
    assert not bad, bad


def test_finite_difference_check_catches_a_wrong_gradient():
    mod, shape, kw = _case("block-all")
    rng = _rng(2)
    _randomize(mod.params, rng)
    x = rng.standard_normal(shape)
    R = rng.standard_normal(shape)
    dx, grads = _analytic(mod, x, CTX, R, kw)
    grads["attn.wk"] = grads["attn.wk"] * (1 + 1e-4)
    errs = _fd_errors(mod, x, CTX, R, fwd_kw=kw, dx=dx * (1 + 1e-4), grads=grads)
    assert errs["x"] > 1e-5 and errs["attn.wk"] > 1e-5 and errs["fc1.w"] < 1e-6


# ---- torch autograd --------------------------------------------------------------------
def _torch_block(torch, blk: Block, P: dict, x, ctx, dense_mask):
    """The same block written with torch functional ops on the same weights; attention
    as an explicit masked softmax; dropout fed the same keep-masks."""
    F = torch.nn.functional
    Bx, Lx, d = x.shape
    a = blk.attn

    def heads(t, n):
        return t.reshape(Bx, Lx, n, a.head_dim).transpose(1, 2)

    def drop(t, mod):
        if not mod.active(ctx):
            return t
        keep = torch.from_numpy(keep_mask(ctx.seed, mod.layer, ctx.call, mod.index, tuple(t.shape), mod.p))
        return t * keep / (1 - mod.p)

    h1 = F.layer_norm(x, (d,), P["ln1.gamma"], P["ln1.beta"], blk.ln1.eps)
    q = heads(h1 @ P["attn.wq"] + P["attn.bq"], a.n_heads)
    k = heads(h1 @ P["attn.wk"] + P["attn.bk"], a.n_kv_heads).repeat_interleave(a.n_heads // a.n_kv_heads, 1)
    v = heads(h1 @ P["attn.wv"] + P["attn.bv"], a.n_kv_heads).repeat_interleave(a.n_heads // a.n_kv_heads, 1)
    s = (a.scale * q @ k.transpose(-1, -2)).masked_fill(~dense_mask, float("-inf"))
    o = (torch.softmax(s, dim=-1) @ v).transpose(1, 2).reshape(Bx, Lx, -1)
    hh = x + drop(o @ P["attn.wo"] + P["attn.bo"], blk.drop1)
    m = F.layer_norm(hh, (d,), P["ln2.gamma"], P["ln2.beta"], blk.ln2.eps)
    m = F.gelu(m @ P["fc1.w"] + P["fc1.b"]) @ P["fc2.w"] + P["fc2.b"]
    return hh + drop(m, blk.drop2)


@pytest.mark.oracle
@pytest.mark.parametrize("what", ["block-all", "block-selective", "stack"])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_matches_torch_autograd(what, p):
    torch = pytest.importorskip("torch")
    rng = _rng(3)
    if what == "stack":
        mod, save = Stack(3, DM, H, HKV, DFF, pattern=WINDOW, dropout=p, seed=4), "all"
        blocks = mod.blocks
    else:
        mod, save = Block(DM, H, HKV, DFF, pattern=WINDOW, dropout=p, layer=2), what.split("-")[1]
        blocks = [mod]
    _randomize(_params(mod), rng)
    x = rng.standard_normal((B, L, DM))
    R = rng.standard_normal((B, L, DM))
    dx, grads = _analytic(mod, x, CTX, R, {"save": save})
    y = mod.forward(x, CTX, save=save)[0]

    xt = torch.tensor(x, requires_grad=True)
    dense = torch.from_numpy(WINDOW.mask(L, L).to_dense())
    Pt = [{k: torch.tensor(a, requires_grad=True) for k, a in b.params.items()} for b in blocks]
    yt = xt
    for b, P in zip(blocks, Pt):
        yt = _torch_block(torch, b, P, yt, CTX, dense)
    (yt * torch.from_numpy(R)).sum().backward()

    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    prefix = (lambda i: f"blocks.{i}.") if what == "stack" else (lambda i: "")
    for i, P in enumerate(Pt):
        for k, t in P.items():
            np.testing.assert_allclose(grads[prefix(i) + k], t.grad.numpy(), rtol=1e-10, atol=1e-12,
                                       err_msg=prefix(i) + k)


# ---- dropout ---------------------------------------------------------------------------
def test_dropout_mask_is_a_pure_function_of_seed_layer_call_index():
    x = _rng(4).standard_normal((4, 256, 64))
    p = 0.3
    drop = Dropout(p, layer=2, index=1)
    y, s = drop.forward(x, CTX)
    y2, s2 = drop.forward(x, Context(seed=3, call=5, train=True))       # a recompute: same ctx
    assert np.array_equal(s["keep"], s2["keep"]) and np.array_equal(y, y2)
    # the documented generator
    g = np.random.Generator(np.random.PCG64(np.random.SeedSequence([3, 2, 5, 1])))
    assert np.array_equal(s["keep"], g.random(x.shape) >= p)
    # any other counter gives another mask
    others = [Dropout(p, layer=2, index=1).forward(x, Context(3, 6, True))[1]["keep"],   # call
              Dropout(p, layer=3, index=1).forward(x, CTX)[1]["keep"],                   # layer
              Dropout(p, layer=2, index=0).forward(x, CTX)[1]["keep"],                   # index
              Dropout(p, layer=2, index=1).forward(x, Context(4, 5, True))[1]["keep"]]   # seed
    for k in others:
        assert 0.5 < np.mean(k == s["keep"]) < 0.65                   # independent: 0.7^2 + 0.3^2 = 0.58
    # keep rate and scaling
    keep = s["keep"]
    assert abs(keep.mean() - (1 - p)) < 4 * np.sqrt(p * (1 - p) / keep.size)
    np.testing.assert_allclose(y[keep], x[keep] / (1 - p), rtol=1e-15)
    assert np.all(y[~keep] == 0)
    dy = _rng(5).standard_normal(x.shape)
    np.testing.assert_allclose(drop.backward(dy, s, CTX), np.where(keep, dy / (1 - p), 0), rtol=1e-15)


def test_dropout_is_identity_in_eval_and_at_p0():
    x = _rng(6).standard_normal((2, 3, 4))
    for drop, ctx in ((Dropout(0.5), Context(0, 0, train=False)), (Dropout(0.0), CTX)):
        y, s = drop.forward(x, ctx)
        assert y is x and s == {} and saved_bytes(s) == 0
        assert drop.backward(x, s, ctx) is x
    blk = Block(DM, H, HKV, DFF, dropout=0.5)
    xb = _rng(7).standard_normal((B, L, DM))
    ref = Block(DM, H, HKV, DFF, dropout=0.0)
    assert np.array_equal(blk.forward(xb, Context(1, 1, False))[0], ref.forward(xb, CTX)[0])
    assert not np.array_equal(blk.forward(xb, CTX)[0], ref.forward(xb, CTX)[0])


def test_dropout_rejects_p_out_of_range():
    for p in (-0.1, 1.0):
        with pytest.raises(ValueError):
            Dropout(p)


# ---- no side effects, accumulation ----------------------------------------------------
def test_forward_has_no_side_effects_and_backward_accumulates():
    st = Stack(3, DM, H, HKV, DFF, pattern=WINDOW, dropout=0.3, seed=1)
    rng = _rng(8)
    _randomize(dict(st.params()), rng)
    before = {k: a.copy() for k, a in st.params()}
    x = rng.standard_normal((B, L, DM))
    x0 = x.copy()
    y1, s1 = st.forward(x, CTX)
    y2, s2 = st.forward(x, CTX)
    assert np.array_equal(y1, y2)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(s1), _leaves(s2)))
    assert np.array_equal(x, x0)
    assert all(np.array_equal(a, before[k]) for k, a in st.params())
    assert all(not g.any() for _, g in st.grads())                 # forward touches no grad
    dy = rng.standard_normal(y1.shape)
    dx1 = st.backward(dy, s1, CTX)
    once = {k: g.copy() for k, g in st.grads()}
    dx2 = st.backward(dy, s1, CTX)                                       # saved dicts are reusable
    assert np.array_equal(dx1, dx2) and np.array_equal(x, x0)
    for k, g in st.grads():
        assert np.array_equal(g, 2 * once[k]), k
    assert all(np.array_equal(a, before[k]) for k, a in st.params())
    st.zero_grad()
    assert all(not g.any() for _, g in st.grads())


def test_parameter_gradients_appear_when_dx_is_discarded():
    st = Stack(2, DM, H, HKV, DFF, pattern=WINDOW, dropout=0.1)
    rng = _rng(9)
    _randomize(dict(st.params()), rng)
    x = rng.standard_normal((B, L, DM))
    y, saved = st.forward(x, CTX)
    st.backward(rng.standard_normal(y.shape), saved, CTX)
    grads = dict(st.grads())
    assert [k for k, _ in st.grads()] == [k for k, _ in st.params()] and "blocks.1.attn.wq" in grads
    assert all(grads[k] is st.blocks[int(k.split(".")[1])].grads[k.split(".", 2)[2]] for k in grads)
    assert all(np.abs(g).max() > 0 for g in grads.values())


def test_block_grads_share_the_childrens_arrays():
    blk = Block(DM, H, HKV, DFF)
    assert blk.params["attn.wq"] is blk.attn.params["wq"]
    assert blk.grads["fc2.b"] is blk.fc2.grads["b"]
    assert sorted(blk.params) == sorted(blk.grads)


# ---- selective vs all, saved bytes ---------------------------------------------------
def _block_bytes(save, p_active):
    """The documented formula (float64)."""
    N = B * L
    per = 4 * DM + 4 + (H + 2 * HKV) * D + 2 * DFF + ((H * D + H) if save == "all" else 0)
    return 8 * N * per + (2 * N * DM if p_active else 0)


def test_selective_and_all_give_bitwise_identical_gradients():
    rng = _rng(10)
    x = rng.standard_normal((B, L, DM))
    dy = rng.standard_normal((B, L, DM))
    res = {}
    for save in ("all", "selective"):
        blk = Block(DM, H, HKV, DFF, pattern=WINDOW, dropout=0.2, layer=3)
        _randomize(blk.params, _rng(10, 1))
        y, saved = blk.forward(x, CTX, save=save)
        dx = blk.backward(dy, saved, CTX)
        res[save] = (y, dx, {k: g.copy() for k, g in blk.grads.items()}, saved)
    (ya, dxa, ga, sa), (ys, dxs, gs, ss) = res["all"], res["selective"]
    assert np.array_equal(ya, ys) and np.array_equal(dxa, dxs)
    assert all(np.array_equal(ga[k], gs[k]) for k in ga)
    assert set(sa["attn"]) == {"x", "q", "k", "v", "out", "lse"} and set(ss["attn"]) == {"x", "q", "k", "v"}
    assert saved_bytes(sa) - saved_bytes(ss) == sa["attn"]["out"].nbytes + sa["attn"]["lse"].nbytes
    assert saved_bytes(sa) == _block_bytes("all", True)
    assert saved_bytes(ss) == _block_bytes("selective", True)
    assert saved_bytes(Block(DM, H, HKV, DFF).forward(x, CTX)[1]) == _block_bytes("all", False)


def test_saved_dict_holds_no_array_twice():
    st = Stack(2, DM, H, HKV, DFF, dropout=0.2)
    x = _rng(12).standard_normal((B, L, DM))
    _, saved = st.forward(x, CTX)
    leaves = list(_leaves(saved))
    for i, a in enumerate(leaves):
        for b in leaves[i + 1:]:
            assert not np.shares_memory(a, b)
    assert saved_bytes(saved) == sum(a.nbytes for a in leaves) == 2 * _block_bytes("all", True)


@pytest.mark.parametrize("pattern", [None, WINDOW], ids=["dense", "window"])
def test_attention_saves_linear_in_sequence_length(pattern):
    att = Attention(16, 2, 1, pattern=pattern)
    n_bytes = {}
    for n in (256, 512):
        x = _rng(13, n).standard_normal((1, n, 16))
        _, saved = att.forward(x, CTX)
        assert all(sum(s == n for s in a.shape) <= 1 for a in _leaves(saved))   # nothing n x n
        n_bytes[n] = saved_bytes(saved)
    assert n_bytes[512] == 2 * n_bytes[256]
    assert n_bytes[512] < 512 * 512 * 8 / 6                                 # an n x n float64 array
    assert n_bytes[512] == 8 * 512 * (16 + (2 * 2 + 2 * 1) * 8 + 2)        # x, q, k, v, out, lse


def test_saved_bytes_counts_nested_leaves_and_rejects_other_things():
    s = {"a": np.zeros(3), "b": {"c": np.zeros((2, 2), np.float32), "d": {}}, "e": [np.zeros(5, bool)]}
    assert saved_bytes(s) == 24 + 16 + 5
    with pytest.raises(TypeError):
        saved_bytes({"a": 1.0})


# ---- backends, dtypes, init, validation ----------------------------------------------
def test_cpu_backend_matches_dense():
    rng = _rng(14)
    x = rng.standard_normal((B, L, DM))
    dy = rng.standard_normal((B, L, DM))
    out = {}
    for backend in ("dense", "cpu"):
        blk = Block(DM, H, HKV, DFF, pattern=WINDOW, backend=backend, dropout=0.1, layer=1)
        _randomize(blk.params, _rng(14, 1))
        for save in ("all", "selective"):
            blk.zero_grad()
            y, saved = blk.forward(x, CTX, save=save)
            dx = blk.backward(dy, saved, CTX)
            out[backend, save] = (y, dx, {k: g.copy() for k, g in blk.grads.items()})
    for save in ("all", "selective"):
        (y0, dx0, g0), (y1, dx1, g1) = out["dense", save], out["cpu", save]
        np.testing.assert_allclose(y1, y0, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(dx1, dx0, rtol=1e-12, atol=1e-12)
        for k in g0:
            np.testing.assert_allclose(g1[k], g0[k], rtol=1e-12, atol=1e-12, err_msg=k)


def test_float32_runs_in_float32_and_is_close_to_float64():
    rng = _rng(15)
    x = rng.standard_normal((B, L, DM))
    dy = rng.standard_normal((B, L, DM))
    b64 = Block(DM, H, HKV, DFF, pattern=WINDOW)
    b32 = Block(DM, H, HKV, DFF, pattern=WINDOW, backend="sparse", compute_dtype=np.float32, dtype=np.float32)
    y64, s64 = b64.forward(x, CTX)
    dx64 = b64.backward(dy, s64, CTX)
    y32, s32 = b32.forward(x.astype(np.float32), CTX, save="selective")
    dx32 = b32.backward(dy.astype(np.float32), s32, CTX)
    assert y32.dtype == dx32.dtype == np.float32
    assert all(g.dtype == np.float32 for g in b32.grads.values())
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx32, dx64, rtol=1e-4, atol=1e-4)
    for k, g in b64.grads.items():
        np.testing.assert_allclose(b32.grads[k], g, rtol=1e-3, atol=1e-3, err_msg=k)


def test_init_is_deterministic_from_seed_and_layer():
    a, b = Block(DM, H, HKV, DFF, layer=1, seed=7), Block(DM, H, HKV, DFF, layer=1, seed=7)
    assert all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
    c, d = Block(DM, H, HKV, DFF, layer=2, seed=7), Block(DM, H, HKV, DFF, layer=1, seed=8)
    assert not np.array_equal(a.params["attn.wq"], c.params["attn.wq"])
    assert not np.array_equal(a.params["attn.wq"], d.params["attn.wq"])
    st = Stack(3, DM, H, HKV, DFF, seed=7)
    assert [b.layer for b in st.blocks] == [0, 1, 2]
    assert np.array_equal(dict(st.params())["blocks.1.fc1.w"], a.params["fc1.w"])
    assert abs(np.std(Linear(256, 256).params["w"]) - 1 / 16) < 0.005           # N(0, 1/d_in)


def test_per_head_pattern_and_fixed_mask():
    """A per-head pattern is built with heads=H; a fixed refattn.Mask is used as is."""
    x = _rng(16).standard_normal((B, L, DM))
    m = WINDOW.mask(L, L)
    a1, a2 = Attention(DM, H, HKV, pattern=WINDOW), Attention(DM, H, HKV, pattern=m)
    assert isinstance(m, Mask) and np.array_equal(a1.forward(x, CTX)[0], a2.forward(x, CTX)[0])
    att = Attention(DM, H, HKV, pattern=patterns.get("random", per_row=3, seed=1))
    m = att.mask(L)
    assert m.shape == (1, H, L, L) and (m.group(0, 0) != m.group(0, 1)).nnz > 0
    errs = _fd_errors(att, x, CTX, _rng(17).standard_normal((B, L, DM)))
    assert max(errs.values()) < 1e-6


@pytest.mark.parametrize("pattern", [patterns.get("topk", k=3, base=patterns.get("causal")),
                                     patterns.get("moba", block=2, top_k=2)], ids=lambda p: p.name)
def test_content_dependent_pattern_is_chosen_per_call_from_q_and_k(pattern):
    """The mask is chosen from each call's projected q and k (so it differs per batch
    element and per input) and held fixed by the backward: finite differences of the whole
    layer, selection included, match where the perturbation does not change the choice."""
    att = Attention(DM, H, HKV, pattern=pattern, seed=3)
    rng = _rng(18, len(pattern.name))
    _randomize(att.params, rng)
    x = rng.standard_normal((B, L, DM))
    y, saved = att.forward(x, CTX)
    m = att.mask(L, saved["q"], saved["k"])
    assert m.shape == (B, H, L, L) and (m.group(0, 0) != m.group(1, 0)).nnz > 0
    x2 = rng.standard_normal((B, L, DM))
    _, saved2 = att.forward(x2, CTX)
    assert att.mask(L, saved2["q"], saved2["k"]) != m                  # other inputs, other keys
    eps = 1e-6
    for sign in (1, -1):       # the selection is locally constant here, so FD sees no jump
        _, s = att.forward(x + sign * eps * rng.standard_normal(x.shape), CTX)
        assert att.mask(L, s["q"], s["k"]) == m
    errs = _fd_errors(att, x, CTX, rng.standard_normal((B, L, DM)), eps=eps)
    assert max(errs.values()) < 1e-5, errs
    blocks = [Block(DM, H, HKV, DFF, pattern=pattern, layer=0) for _ in range(2)]
    dy = rng.standard_normal((B, L, DM))
    out = [blk.backward(dy, blk.forward(x, CTX, save=save)[1], CTX) for blk, save in zip(blocks, ("all", "selective"))]
    assert np.array_equal(out[0], out[1])


def test_validation():
    with pytest.raises(ValueError):
        Block(DM, H, HKV, DFF).forward(np.zeros((B, L, DM)), CTX, save="some")
    with pytest.raises(TypeError):
        Stack(2, DM, H, HKV, DFF, layer=1)
    with pytest.raises(ValueError):
        Attention(DM, 3, 2)
    for bad in (dict(seed=-1), dict(call=1.5), dict(train=1)):
        with pytest.raises(ValueError):
            Context(**{"seed": 0, "call": 0, "train": True, **bad})
