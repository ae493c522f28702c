"""`refattn.trace`: the tiled kernel's online softmax and backward, recorded tile by tile."""

import math

import numpy as np
import pytest

import refattn
from refattn import ALiBi, Dropout, RefattnError, patterns
from refattn.backends import configure, tiled
from refattn.blocks import FULL, PARTIAL, blocks
from refattn.contract import make_problem
from refattn.study.trace import Recorder, Trace, load, trace

CASES = [  # (pattern, Lq, Lk, block_q, block_k)
    (patterns.SlidingWindow(left=3, right=0), 16, 16, 4, 4),
    (patterns.Causal(), 13, 11, 4, 3),                      # ragged blocks, Lq > Lk: empty rows
    (patterns.Dense(), 7, 9, 16, 16),                       # one block larger than the sequence
    (patterns.Strided(stride=4), 16, 16, 2, 4),
    (patterns.BigBird(block=2, num_window_blocks=1, num_global_blocks=1, num_random_blocks=1, seed=3), 12, 12, 4, 2),
]


def _inputs(rng, lq, lk, H=2, Hkv=1, D=3, Dv=2):
    q = rng.standard_normal((2, H, lq, D))
    k = rng.standard_normal((2, Hkv, lk, D))
    v = rng.standard_normal((2, Hkv, lk, Dv))
    return q, k, v


def _row_dims(t):
    B, H, lq, _ = t.shape
    return [(b, h, i) for b in range(B) for h in range(H) for i in range(lq)]


@pytest.mark.parametrize("pat,lq,lk,bq,bk", CASES)
def test_finals_equal_the_oracle(rng, pat, lq, lk, bq, bk):
    q, k, v = _inputs(rng, lq, lk)
    mask = pat.mask(lq, lk)
    t = trace(q, k, v, mask, block_q=bq, block_k=bk)
    oracle = refattn.forward(q, k, v, mask)
    np.testing.assert_allclose(t.out, oracle.out, rtol=1e-13, atol=1e-14)
    np.testing.assert_array_equal(np.isneginf(t.lse), np.isneginf(oracle.lse))
    fin = np.isfinite(oracle.lse)
    np.testing.assert_allclose(t.lse[fin], oracle.lse[fin], rtol=1e-13, atol=1e-14)
    # the per-query-block finals are slices of the whole
    for qb in t.forward:
        np.testing.assert_array_equal(qb.lse, t.lse[qb.b, qb.h, qb.rows[0]:qb.rows[1]])
        np.testing.assert_array_equal(qb.out, t.out[qb.b, qb.h, qb.rows[0]:qb.rows[1]])


@pytest.mark.parametrize("pat,lq,lk,bq,bk", CASES)
def test_last_m_and_l_give_lse_and_out(rng, pat, lq, lk, bq, bk):
    q, k, v = _inputs(rng, lq, lk)
    t = trace(q, k, v, pat.mask(lq, lk), block_q=bq, block_k=bk)
    for qb in t.forward:
        last = qb.visited[-1] if qb.visited else None
        if last is not None:
            np.testing.assert_array_equal(qb.m, last.m)
            np.testing.assert_array_equal(qb.l, last.l)
        empty = qb.l == 0
        assert np.isneginf(qb.m[empty]).all() and np.isneginf(qb.lse[empty]).all()
        assert (qb.out[empty] == 0).all()
        ok = ~empty
        np.testing.assert_array_equal(qb.lse[ok], qb.m[ok] + np.log(qb.l[ok]))        # lse = m + log l
        if last is not None:
            np.testing.assert_array_equal(qb.out[ok], last.o[ok] / qb.l[ok, None])    # out = O / l
            np.testing.assert_array_equal(last.o_normalised[ok], qb.out[ok])


@pytest.mark.parametrize("pat,lq,lk,bq,bk", CASES)
def test_running_statistics_follow_the_equations(rng, pat, lq, lk, bq, bk):
    q, k, v = _inputs(rng, lq, lk)
    t = trace(q, k, v, pat.mask(lq, lk), block_q=bq, block_k=bk)
    for qb in t.forward:
        m_prev = np.full(qb.rows[1] - qb.rows[0], -np.inf)
        for s in qb.visited:
            np.testing.assert_array_equal(s.m_old, m_prev)
            np.testing.assert_array_equal(s.block_max, s.s.max(axis=1))
            np.testing.assert_array_equal(s.m, np.maximum(s.m_old, s.block_max))
            fin = np.isfinite(s.m)
            # alpha = exp(m_old - m_new), 0 while the row has no allowed key yet
            np.testing.assert_array_equal(s.alpha[fin], np.exp(s.m_old[fin] - s.m[fin]))
            assert (s.alpha[~fin] == 0).all() and (s.l[~fin] == 0).all()
            assert s.s.shape == (qb.rows[1] - qb.rows[0], s.keys[1] - s.keys[0])
            m_prev = s.m
        for s in qb.steps:
            if not s.visited:
                assert s.kind == "skipped" and s.m is None and s.l is None and s.o is None


def test_a_row_by_hand_matches_exactly(rng):
    """Integer inputs and scale 1/2 make every score exact whatever the product order, so the
    running statistics computed here in plain NumPy must equal the trace's bit for bit."""
    lq = lk = 16
    bq, bk = 4, 4
    q = rng.integers(-3, 4, (1, 1, lq, 4)).astype(np.float64)
    k = rng.integers(-3, 4, (1, 1, lk, 4)).astype(np.float64)
    v = rng.standard_normal((1, 1, lk, 3))
    mask = patterns.SlidingWindow(left=5, right=1).mask(lq, lk)
    t = trace(q, k, v, mask, block_q=bq, block_k=bk, scale=0.5)
    allowed = mask.to_dense()
    S_all = np.where(allowed, 0.5 * np.einsum("id,jd->ij", q[0, 0], k[0, 0]), -np.inf)
    for i in (0, 5, 7, 10, 15):
        rows = t.row(0, 0, i)
        m, lsum, o = -np.inf, 0.0, np.zeros(3)
        visited = [J for J in range(lk // bk) if allowed[i // bq * bq:(i // bq + 1) * bq, J * bk:(J + 1) * bk].any()]
        assert [r["J"] for r in rows] == visited
        for r in rows:
            cols = slice(r["J"] * bk, (r["J"] + 1) * bk)
            s = S_all[i, cols]
            m_new = max(m, s.max())
            base = m_new if np.isfinite(m_new) else 0.0
            alpha = np.exp(m - base)
            p = np.exp(s - base)
            lsum = alpha * lsum + p.sum()
            o = alpha * o + p @ v[0, 0, cols]
            assert (r["block_max"], r["m_old"], r["m"], r["alpha"], r["l"]) == (s.max(), m, m_new, alpha, lsum)
            np.testing.assert_allclose(r["o"], o, rtol=1e-15, atol=1e-15)
            m = m_new
        assert t.lse[0, 0, i] == m + math.log(lsum)


def test_first_blocks_of_a_row_by_hand_in_the_worked_example():
    L = 8
    q, k = np.ones((1, 1, L, 1)), np.arange(L, dtype=np.float64).reshape(1, 1, L, 1)
    t = trace(q, k, k.copy(), patterns.SlidingWindow(left=2, right=0).mask(L, L), block_q=4, block_k=4, scale=1)
    r0, r1 = t.row(0, 0, 5)
    assert (r0["m"], r0["l"], r0["alpha"], r0["o"][0]) == (3.0, 1.0, 0.0, 3.0)
    assert r1["alpha"] == math.exp(-2.0) and r1["l"] == math.exp(-2.0) + math.exp(-1.0) + 1.0
    assert r1["o"][0] == math.exp(-2.0) * 3 + (math.exp(-1.0) * 4 + 5)


@pytest.mark.parametrize("bq,bk", [(4, 4), (3, 5), (1, 2), (32, 32)])
def test_kinds_match_the_block_layout(rng, bq, bk):
    lq, lk, H = 12, 14, 2
    mask = patterns.Random(per_row=2, seed=5).mask(lq, lk, heads=H)  # differs per head
    q, k, v = _inputs(rng, lq, lk, H=H, Hkv=2)
    t = trace(q[:1], k[:1], v[:1], mask, block_q=bq, block_k=bk)
    layout = blocks(mask, bq, bk).to_dense()
    letters = {FULL: "F", PARTIAL: "P", 0: "."}
    for h in range(H):
        want = ["".join(letters[x] for x in row) for row in layout.reshape(-1, H, t.nbq, t.nbk)[0, h]]
        assert t.layout(0, h) == want
        for qb in (t.query_block(0, h, i) for i in range(t.nbq)):
            assert [s.J for s in qb.steps] == list(range(t.nbk))
            assert [s.keys for s in qb.steps] == [(J * bk, min(lk, (J + 1) * bk)) for J in range(t.nbk)]


def _features(rng, lq=10, lk=12):
    q, k, v = _inputs(rng, lq, lk, H=4, Hkv=2)
    mask = patterns.SlidingWindow(left=4, right=2).mask(lq, lk)
    return q, k, v, mask, Dropout.sample(0.2, mask, 2, 4, seed=1)


@pytest.mark.parametrize("feature", ["plain", "softcap", "bias", "alibi", "dropout", "dlse"])
def test_results_bitwise_identical_with_and_without_recorder(rng, feature):
    q, k, v, mask, dropout = _features(rng)
    lq, lk = q.shape[2], k.shape[2]
    kw = {"softcap": {"softcap": 1.5}, "bias": {"bias": rng.standard_normal((1, 4, lq, lk))},
          "alibi": {"bias": ALiBi(np.array([0.5, 0.25, 0.125, 0.0625]))}, "dropout": {"dropout": dropout}
          }.get(feature, {})
    opts = {"block_q": 4, "block_k": 3}
    dout = rng.standard_normal((2, 4, lq, 2))
    dlse = rng.standard_normal((2, 4, lq)) if feature == "dlse" else None
    t = trace(q, k, v, mask, block_q=4, block_k=3, backward=True, dout=dout, dlse=dlse, **kw)
    r = refattn.forward(q, k, v, mask, backend="tiled", options=opts, **kw)
    g = refattn.backward(q, k, v, r.out, r.lse, dout, mask, dlse=dlse, backend="tiled", options=opts, **kw)
    assert t.out.tobytes() == r.out.tobytes() and t.lse.tobytes() == r.lse.tobytes()
    for name in ("dq", "dk", "dv"):
        assert getattr(t.backward, name).tobytes() == getattr(g, name).tobytes()
    # the kernel itself, called with and without a recorder
    p = make_problem(q, k, v, mask, **kw)
    config = configure(tiled, "tiled", None, opts)
    with np.errstate(over="ignore", invalid="ignore"):
        a, b = tiled.forward(p, config), tiled.forward(p, config, recorder=Recorder())
        ga = tiled.backward(p, a.out, a.lse, dout, dlse, config)
        gb = tiled.backward(p, a.out, a.lse, dout, dlse, config, recorder=Recorder())
    assert a.out.tobytes() == b.out.tobytes() and a.lse.tobytes() == b.lse.tobytes()
    for x, y in zip(ga[:3], gb[:3]):
        assert x.tobytes() == y.tobytes()
    if feature != "dlse":
        oracle = refattn.forward(q, k, v, mask, **kw)
        np.testing.assert_allclose(t.out, oracle.out, rtol=1e-13, atol=1e-14)


def _dense_dS(q, k, v, mask, out, lse, dout, scale):
    """The oracle's dS = P * (dP - D) from the equations, densely, per (b, h)."""
    B, H = q.shape[:2]
    g = H // k.shape[1]
    allowed = np.broadcast_to(mask.to_dense(), (B, H, q.shape[2], k.shape[2])) if mask.ndim == 2 \
        else mask.to_dense()
    S = scale * np.einsum("bhid,bhjd->bhij", q, np.repeat(k, g, axis=1))
    S = np.where(allowed, S, -np.inf)
    fin = np.isfinite(lse)
    P = np.where(fin[..., None], np.exp(S - np.where(fin, lse, 0)[..., None]), 0.0)
    dP = np.einsum("bhid,bhjd->bhij", dout, np.repeat(v, g, axis=1))
    D = np.sum(dout * out, axis=-1)
    return P * (dP - D[..., None]), D, allowed


@pytest.mark.parametrize("pat,lq,lk,bq,bk", CASES)
def test_backward_D_and_dS_equal_the_oracle(rng, pat, lq, lk, bq, bk):
    q, k, v = _inputs(rng, lq, lk)
    mask = pat.mask(lq, lk)
    dout = rng.standard_normal((2, 2, lq, 2))
    t = trace(q, k, v, mask, block_q=bq, block_k=bk, backward=True, dout=dout)
    bw = t.backward
    np.testing.assert_array_equal(bw.D, np.sum(dout * t.out, axis=-1))       # D = rowsum(dO * O), the kernel's
    oracle = refattn.forward(q, k, v, mask)
    dS, D, allowed = _dense_dS(q, k, v, mask, oracle.out, oracle.lse, dout, t.scale)
    np.testing.assert_allclose(bw.D, D, rtol=1e-13, atol=1e-14)
    for b in range(2):
        for h in range(2):
            got = bw.ds(b, h, (lq, lk))
            np.testing.assert_allclose(got[allowed[b, h]], dS[b, h][allowed[b, h]], rtol=1e-12, atol=1e-14)
            assert (got[~allowed[b, h]] == 0).all()
    g = refattn.backward(q, k, v, oracle.out, oracle.lse, dout, mask)
    for name in ("dq", "dk", "dv"):
        np.testing.assert_allclose(getattr(bw, name), getattr(g, name), rtol=1e-12, atol=1e-13)
    # the kernel's order: key blocks outside, their query blocks inside; only non-empty tiles
    layout = blocks(mask, bq, bk).group(0, 0)
    nonempty = {(qi, int(J)) for qi in range(t.nbq) for J in layout.indices[layout.indptr[qi]:layout.indptr[qi + 1]]}
    order = [(x.I, x.J) for x in bw.tiles if (x.b, x.h) == (0, 0)]
    assert set(order) == nonempty and order == sorted(order, key=lambda ij: (ij[1], ij[0]))
    for x in bw.tiles:
        assert x.p.shape == x.ds.shape == x.dp.shape == (x.rows[1] - x.rows[0], x.keys[1] - x.keys[0])
        assert bw.tile(x.b, x.h, x.I, x.J) is x
        np.testing.assert_array_equal(x.ds, x.p * (x.dp - bw.D[x.b, x.h, x.rows[0]:x.rows[1], None]))


def test_empty_rows_and_an_empty_query_block(rng):
    # causal, bottom-right, Lq = 10 > Lk = 4: rows 0-5 have no key; query block 0 (rows 0-3) is empty
    lq, lk = 10, 4
    q, k, v = _inputs(rng, lq, lk)
    mask = patterns.Causal(align="bottom_right").mask(lq, lk)
    t = trace(q, k, v, mask, block_q=4, block_k=4, backward=True, dout=rng.standard_normal((2, 2, lq, 2)))
    qb0 = t.query_block(0, 0, 0)
    assert qb0.kinds == "." and not qb0.visited
    assert np.isneginf(qb0.m).all() and (qb0.l == 0).all() and np.isneginf(qb0.lse).all() and (qb0.out == 0).all()
    qb1 = t.query_block(0, 0, 1)                  # rows 4-7: rows 4, 5 empty, 6, 7 not
    step = qb1.visited[0]
    assert np.isneginf(step.m[:2]).all() and (step.l[:2] == 0).all() and (step.alpha[:2] == 0).all()
    assert np.isneginf(step.block_max[:2]).all() and (step.o[:2] == 0).all()
    assert np.isfinite(step.m[2:]).all() and (step.l[2:] > 0).all()
    assert np.isneginf(t.lse[:, :, :6]).all() and np.isfinite(t.lse[:, :, 6:]).all()
    assert t.row(0, 0, 4)[0]["m"] == -np.inf and t.row(0, 0, 4)[0]["l"] == 0
    assert t.row(0, 0, 0) == []
    assert (t.backward.ds(0, 0, (lq, lk))[:6] == 0).all() and (t.backward.D[:, :, :6] == 0).all()


def test_save_load_and_compare(tmp_path, rng):
    lq, lk = 10, 4
    q, k, v = _inputs(rng, lq, lk)
    mask = patterns.Causal(align="bottom_right").mask(lq, lk)      # -inf values, skipped blocks
    t = trace(q, k, v, mask, block_q=4, block_k=3, backward=True, dout=rng.standard_normal((2, 2, lq, 2)))
    for name in ("t.json", "t.npz"):
        t.save(tmp_path / name)
        back = load(tmp_path / name)
        assert isinstance(back, Trace) and back == t
        assert back.query_block(1, 1, 2).steps[1].keys == t.query_block(1, 1, 2).steps[1].keys
        assert back.backward.tiles[3].kind == t.backward.tiles[3].kind
    assert Trace.from_dict(t.to_dict()) == t
    t2 = trace(q, k, v, mask, block_q=4, block_k=3)
    assert t2 != t and t2.backward is None and load_roundtrip(tmp_path, t2) == t2
    text = (tmp_path / "t.json").read_text()
    assert '"-inf"' in text and "Infinity" not in text
    with pytest.raises(RefattnError, match="must end in .json or .npz"):
        t.save(tmp_path / "t.txt")
    with pytest.raises(RefattnError, match="must end in .json or .npz"):
        load(tmp_path / "t.txt")


def load_roundtrip(tmp_path, t):
    t.save(tmp_path / "again.npz")
    return load(tmp_path / "again.npz")


def test_text(rng):
    q, k, v = _inputs(rng, 16, 16)
    t = trace(q, k, v, patterns.SlidingWindow(left=3, right=0).mask(16, 16), block_q=4, block_k=4)
    text = str(t)
    assert text == t.format()
    assert "b=0 h=0 I=1 rows 4-7: PP.. (2 visited)" in text and "backward: no" in text
    table = t.format_row(1, 1, 7).splitlines()
    assert table[0].split() == ["J", "keys", "kind", "block", "max", "m_new", "alpha", "l", "O/l[0]", "O/l[1]"]
    assert len(table) == 3 and table[2].split()[:3] == ["1", "4-7", "partial"]
    assert all(len(line) <= 80 for line in text.splitlines() + table)
    assert float(table[2].split()[4]) == pytest.approx(t.row(1, 1, 7)[1]["m"], abs=1e-5)


def test_errors(rng):
    q, k, v = _inputs(rng, 8, 8)
    with pytest.raises(RefattnError, match="block_q must be an int in \\[1, 4096\\]"):
        trace(q, k, v, block_q=0, block_k=4)
    with pytest.raises(RefattnError, match="block_k must be an int in \\[1, 4096\\]"):
        trace(q, k, v, block_q=4, block_k=True)
    with pytest.raises(RefattnError, match="needs dout"):
        trace(q, k, v, block_q=4, block_k=4, backward=True)
    with pytest.raises(RefattnError, match="pass backward=True"):
        trace(q, k, v, block_q=4, block_k=4, dout=np.zeros((2, 2, 8, 2)))
    with pytest.raises(RefattnError, match="dout: expected shape"):
        trace(q, k, v, block_q=4, block_k=4, backward=True, dout=np.zeros((2, 2, 8, 3)))
    with pytest.raises(RefattnError, match="head dim"):
        trace(q, k[..., :2], v, block_q=4, block_k=4)
    t = trace(q, k, v, block_q=4, block_k=4)
    with pytest.raises(RefattnError, match="row i must be an int in"):
        t.row(0, 0, 8)
    with pytest.raises(RefattnError, match="h must be an int in"):
        t.row(0, 2, 0)
    with pytest.raises(RefattnError, match="query block I must be"):
        t.query_block(0, 0, 2)
