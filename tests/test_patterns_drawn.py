"""Random, block-level and library-layout patterns against brute-force definitions.

The draw is re-implemented from spec/patterns.md ("The random draw") in plain Python
integers in tests/reference_draw.py, independently of the compiled one in
refattn.patterns._draw."""

import random as pyrandom

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn import Mask, RefattnError, patterns

from .reference_draw import reference_draw


def rows_to_dense(rows, lk):
    out = np.zeros((len(rows), lk), bool)
    for i, r in enumerate(rows):
        out[i, list(r)] = True
    return out


def assert_mask(m, dense, p):
    np.testing.assert_array_equal(m.to_dense(), dense, err_msg=repr(p))
    assert patterns.from_dict(p.to_dict()) == p


# ---- random ---------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(lq=st.integers(1, 30), lk=st.integers(1, 30), per_row=st.integers(0, 8),
       seed=st.integers(0, 2**64 - 1), causal=st.booleans(), head=st.integers(0, 3))
def test_random_matches_the_specified_draw(lq, lk, per_row, seed, causal, head):
    p = patterns.Random(per_row, seed, causal)
    n = [min(max(i + lk - lq + 1, 0), lk) if causal else lk for i in range(lq)]
    rows = [reference_draw(seed, head, i, n[i], per_row) for i in range(lq)]
    m = p.mask(lq, lk, heads=head + 1)
    assert m.shape == (1, head + 1, lq, lk)
    assert_mask(Mask.from_csr(m.group(0, head)), rows_to_dense(rows, lk), p)
    np.testing.assert_array_equal(m.row_counts(0, head), np.minimum(per_row, n))
    assert p.mask(lq, lk) == Mask.from_csr(m.group(0, 0))        # heads=None is head 0


def test_random_is_uniform_enough():
    """Each key is drawn about equally often (a chi-square bound far from failing)."""
    m = patterns.Random(4, seed=7).mask(20000, 16)
    freq = np.bincount(m.csr.indices, minlength=16)
    expected = 20000 * 4 / 16
    assert ((freq - expected) ** 2 / expected).sum() < 60       # 15 dof: p ~ 1e-7 at 60


def test_random_heads_differ_and_seeds_differ():
    m = patterns.Random(3, seed=1).mask(64, 64, heads=2)
    assert (m.group(0, 0) != m.group(0, 1)).nnz > 0
    assert patterns.Random(3, seed=1).mask(64, 64) != patterns.Random(3, seed=2).mask(64, 64)


# ---- block_sparse ---------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(lq=st.integers(1, 30), lk=st.integers(1, 30), block=st.integers(1, 7), data=st.data())
def test_block_sparse(lq, lk, block, data):
    nbq, nbk = -(-lq // block), -(-lk // block)
    heads = data.draw(st.sampled_from([None, 1, 3]))
    shape = (nbq, nbk) if heads is None else (heads, nbq, nbk)
    layout = np.array(data.draw(st.lists(st.booleans(), min_size=int(np.prod(shape)),
                                         max_size=int(np.prod(shape))))).reshape(shape)
    p = patterns.BlockSparse(layout, block)
    i, j = np.arange(lq)[:, None] // block, np.arange(lk)[None, :] // block
    m = p.mask(lq, lk)
    if heads is None:
        assert_mask(m, layout[i, j], p)
    else:
        assert m.shape == (1, heads, lq, lk)
        np.testing.assert_array_equal(m.to_dense()[0], layout[:, i, j])
        assert patterns.from_dict(p.to_dict()) == p


def test_block_sparse_errors():
    with pytest.raises(RefattnError, match=r"does not fit Lq = 5, Lk = 8 with block = 4; need \(2, 2\)"):
        patterns.BlockSparse(np.ones((1, 2), bool), 4).mask(5, 8)
    with pytest.raises(RefattnError, match="only 0/1"):
        patterns.BlockSparse([[2]], 4)
    with pytest.raises(RefattnError, match=r"\[nbq, nbk\] or \[H, nbq, nbk\]"):
        patterns.BlockSparse(np.ones(3, bool), 4)
    with pytest.raises(RefattnError, match="the layout has 2 heads, but heads = 3"):
        patterns.BlockSparse(np.ones((2, 1, 1), bool), 4).mask(4, 4, heads=3)
    p = patterns.BlockSparse([[1, 0]], 2)
    assert hash(p) == hash(patterns.BlockSparse(np.array([[True, False]]), 2))
    assert p != patterns.BlockSparse([[1, 1]], 2)


# ---- bigbird ---------------------------------------------------------------------------

def reference_bigbird(n, block, W, G, R, seed, head):
    nb = -(-n // block)
    glob = set(range(min((G + 1) // 2, nb))) | set(range(max(nb - G // 2, 0), nb))
    allowed = []
    for I in range(nb):
        if I in glob:
            allowed.append(set(range(nb)))
            continue
        window = {J for J in range(I - W // 2, I + W // 2 + 1) if 0 <= J < nb}
        free = [J for J in range(nb) if J not in window and J not in glob]
        rand = {free[r] for r in reference_draw(seed, head, I, len(free), R)}
        allowed.append(window | glob | rand)
    return np.array([[j // block in allowed[i // block] for j in range(n)] for i in range(n)])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), block=st.integers(1, 5), W=st.sampled_from([1, 3, 5]),
       G=st.integers(0, 3), R=st.integers(0, 3), seed=st.integers(0, 1000), head=st.integers(0, 2))
def test_bigbird(n, block, W, G, R, seed, head):
    p = patterns.BigBird(block, W, G, R, seed)
    m = p.mask(n, n, heads=head + 1)
    assert_mask(Mask.from_csr(m.group(0, head)), reference_bigbird(n, block, W, G, R, seed, head), p)


def test_bigbird_itc_structure():
    """With 2 global blocks, 3 window blocks: the original ITC layout. Blocks 0 and nb - 1
    are global; block 1 sees {0, 1, 2, nb - 1} and nb - 2 sees {0, nb - 3, nb - 2, nb - 1}
    (as HF BigBird), the others their 3 window blocks and the 2 globals; plus R random."""
    nb, R = 12, 2
    layout = patterns.BigBird(1, 3, 2, R, seed=5).mask(nb, nb).to_dense()
    assert layout[0].all() and layout[-1].all() and layout[:, 0].all() and layout[:, -1].all()
    assert (layout[2:-2].sum(axis=1) == 2 + 3 + R).all()
    assert layout[1].sum() == layout[-2].sum() == 4 + R
    assert layout[1, :3].all() and layout[-2, -3:].all()
    with pytest.raises(RefattnError, match="must be odd"):
        patterns.BigBird(4, num_window_blocks=2)
    with pytest.raises(RefattnError, match="need Lq == Lk"):
        patterns.BigBird(4).mask(8, 12)


# ---- longformer --------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(lq=st.integers(1, 30), lk=st.integers(1, 30), window=st.integers(0, 12),
       dilation=st.integers(1, 4), data=st.data())
def test_longformer(lq, lk, window, dilation, data):
    glob = data.draw(st.lists(st.integers(0, max(lq, lk) - 1), max_size=3, unique=True))
    p = patterns.Longformer(window, dilation, glob)
    w, o = window // 2, lk - lq
    dense = np.array([[(abs(j - i - o) <= w * dilation and (j - i - o) % dilation == 0)
                       or i in glob or j in glob for j in range(lk)] for i in range(lq)])
    assert_mask(p.mask(lq, lk), dense, p)


# ---- neighborhood_2d ---------------------------------------------------------------------

def natten_axis(q, kv, length, k, d, causal):
    """NATTEN's per-axis rule, written as in its FlexAttention mask_mod."""
    if q % d != kv % d:
        return False
    qd, kvd = q // d, kv // d
    if causal:
        return 0 <= qd - kvd < k
    g = q % d
    glen = length // d + 1 - ((g + (d - length % d)) // d)
    left, right = k // 2, k // 2 + k % 2 - 1
    centre = min(max(qd, left), glen - 1 - right)
    return 0 <= centre - kvd <= left or 0 <= kvd - centre <= right


@settings(max_examples=50, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), data=st.data())
def test_neighborhood_2d(h, w, data):
    d = data.draw(st.integers(1, min(h, w)))
    k = data.draw(st.integers(1, min(h, w) // d))
    causal = data.draw(st.booleans())
    p = patterns.Neighborhood2D(h, w, k, d, causal)
    n = h * w
    dense = np.array([[natten_axis(i // w, j // w, h, k, d, causal) and natten_axis(i % w, j % w, w, k, d, causal)
                       for j in range(n)] for i in range(n)])
    m = p.mask(n, n)
    assert_mask(m, dense, p)
    if not causal:
        assert (m.row_counts() == k * k).all()


def test_neighborhood_2d_errors():
    with pytest.raises(RefattnError, match=r"kernel \* dilation = 6 must be <= min\(height, width\) = 5"):
        patterns.Neighborhood2D(5, 8, 3, 2)
    with pytest.raises(RefattnError, match="need Lq == Lk == 20"):
        patterns.Neighborhood2D(4, 5, 3).mask(20, 21)


# ---- DeepSpeed layouts: DeepSpeed's loops, transcribed with Python's global random ----

def ds_setup(seq_len, block, heads):
    return np.zeros((heads, seq_len // block, seq_len // block), np.int64)


def ds_fixed(cfg, seq_len, heads):
    lay = ds_setup(seq_len, cfg["block"], heads)
    L, G, P = cfg["num_local_blocks"], cfg["num_global_blocks"], cfg["num_different_global_patterns"]
    uni, horiz = cfg["attention"] == "unidirectional", cfg["horizontal_global_attention"]
    nb = lay.shape[1]
    for h in range(heads if cfg["different_layout_per_head"] else 1):
        for i in range(0, nb, L):
            end = min(i + L, nb)
            for row in range(i, end):
                for col in range(i, row + 1 if uni else end):
                    lay[h, row, col] = 1
        first = L - (1 + h % P) * G
        end = nb - (nb % L)
        for i in range(first, end, L):
            lay[h, (i if uni else 0):, i:i + G] = 1
            if horiz:
                lay[h, i:i + G, :] = 1
        if end < nb:
            start = min(end + first, nb - G)
            lay[h, (start if uni else 0):, start:start + G] = 1
            if horiz:
                lay[h, start:start + G, :] = 1
    if not cfg["different_layout_per_head"]:
        lay[1:] = lay[0]
    return lay


def ds_global(lay, h, starts, ends, horiz, uni):
    nb = lay.shape[1]
    if ends is None:
        for idx in starts:
            if idx < nb:
                if horiz:
                    lay[h, idx, :] = 1
                lay[h, (idx if uni else 0):, idx] = 1
    else:
        for s, e in zip(starts, ends):
            if s < nb:
                e = min(e, nb)
                if horiz:
                    lay[h, s:e, :] = 1
                lay[h, (s if uni else 0):, s:e] = 1


def ds_variable(cfg, seq_len, heads):
    pyrandom.seed(cfg["seed"])
    lay = ds_setup(seq_len, cfg["block"], heads)
    nb, uni = lay.shape[1], cfg["attention"] == "unidirectional"
    for h in range(heads if cfg["different_layout_per_head"] else 1):
        for row in range(nb):
            lay[h, row, pyrandom.sample(range(nb), cfg["num_random_blocks"])] = 1
        s = e = 0
        for size in cfg["local_window_blocks"]:
            e = min(e + size, nb)
            for row in range(s, e):
                for col in range(s, row + 1 if uni else e):
                    lay[h, row, col] = 1
            s += size
        for i in range(s, nb, size):
            e = min(i + size, nb)
            for row in range(i, e):
                for col in range(i, row + 1 if uni else e):
                    lay[h, row, col] = 1
        ds_global(lay, h, cfg["global_block_indices"], cfg["global_block_end_indices"],
                  cfg["horizontal_global_attention"], uni)
    if not cfg["different_layout_per_head"]:
        lay[1:] = lay[0]
    return lay


def ds_bigbird(cfg, seq_len, heads):
    pyrandom.seed(cfg["seed"])
    lay = ds_setup(seq_len, cfg["block"], heads)
    nb, uni = lay.shape[1], cfg["attention"] == "unidirectional"
    for h in range(heads if cfg["different_layout_per_head"] else 1):
        for row in range(nb):
            rng = range(0, row + 1) if uni else range(0, nb)
            lay[h, row, pyrandom.sample(rng, min(cfg["num_random_blocks"], len(rng)))] = 1
        w = cfg["num_sliding_window_blocks"] // 2
        for row in range(nb):
            lay[h, row, max(0, row - w):min(row + w + 1, nb)] = 1
        lay[h, :cfg["num_global_blocks"], :] = 1
        lay[h, :, :cfg["num_global_blocks"]] = 1
        if uni:
            lay[h] = np.tril(lay[h])
    if not cfg["different_layout_per_head"]:
        lay[1:] = lay[0]
    return lay


def ds_bslongformer(cfg, seq_len, heads):
    lay = ds_setup(seq_len, cfg["block"], heads)
    nb = lay.shape[1]
    for h in range(heads if cfg["different_layout_per_head"] else 1):
        w = cfg["num_sliding_window_blocks"] // 2
        for row in range(nb):
            lay[h, row, max(0, row - w):min(row + w + 1, nb)] = 1
        ds_global(lay, h, cfg["global_block_indices"], cfg["global_block_end_indices"], True, False)
        if cfg["attention"] == "unidirectional":
            lay[h] = np.tril(lay[h])
    if not cfg["different_layout_per_head"]:
        lay[1:] = lay[0]
    return lay


attentions = st.sampled_from(["bidirectional", "unidirectional"])


@st.composite
def fixed_configs(draw):
    G = draw(st.integers(1, 3))
    L = G * draw(st.integers(1, 4))
    attention = draw(attentions)
    per_head = draw(st.booleans())
    return dict(block=draw(st.integers(1, 3)), num_local_blocks=L, num_global_blocks=G, attention=attention,
                horizontal_global_attention=attention == "bidirectional" and draw(st.booleans()),
                num_different_global_patterns=draw(st.integers(1, L // G)) if per_head else 1,
                different_layout_per_head=per_head)


@st.composite
def global_spans(draw):
    starts = draw(st.lists(st.integers(0, 12), max_size=3, unique=True))
    if draw(st.booleans()):
        return dict(global_block_indices=starts, global_block_end_indices=None)
    return dict(global_block_indices=starts,
                global_block_end_indices=[s + draw(st.integers(1, 3)) for s in starts])


@st.composite
def variable_configs(draw):
    attention = draw(attentions)
    return dict(block=draw(st.integers(1, 3)), num_random_blocks=draw(st.integers(0, 2)),
                local_window_blocks=draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)),
                **draw(global_spans()), attention=attention,
                horizontal_global_attention=attention == "bidirectional" and draw(st.booleans()),
                different_layout_per_head=draw(st.booleans()), seed=draw(st.integers(0, 99)))


@st.composite
def bigbird_configs(draw):
    return dict(block=draw(st.integers(1, 3)), num_random_blocks=draw(st.integers(0, 2)),
                num_sliding_window_blocks=draw(st.integers(0, 4)), num_global_blocks=draw(st.integers(0, 2)),
                attention=draw(attentions), different_layout_per_head=draw(st.booleans()),
                seed=draw(st.integers(0, 99)))


@st.composite
def bslongformer_configs(draw):
    return dict(block=draw(st.integers(1, 3)), num_sliding_window_blocks=draw(st.integers(0, 4)),
                **draw(global_spans()), attention=draw(attentions),
                different_layout_per_head=draw(st.booleans()))


@pytest.mark.parametrize("name, configs, reference", [
    ("deepspeed_fixed", fixed_configs(), ds_fixed),
    ("deepspeed_variable", variable_configs(), ds_variable),
    ("deepspeed_bigbird", bigbird_configs(), ds_bigbird),
    ("deepspeed_bslongformer", bslongformer_configs(), ds_bslongformer),
])
def test_deepspeed_layouts(name, configs, reference):
    @settings(max_examples=40, deadline=None)
    @given(cfg=configs, nb=st.integers(4, 12), heads=st.integers(1, 3))
    def check(cfg, nb, heads):
        p = patterns.get(name, **cfg)
        seq_len = nb * cfg["block"]
        want = reference(cfg, seq_len, heads)
        np.testing.assert_array_equal(p.layout(seq_len, heads), want)
        m = p.mask(seq_len, seq_len, heads=heads)
        grid = m.to_dense().reshape(-1, seq_len, seq_len)
        pos = np.arange(seq_len) // cfg["block"]
        for h in range(heads if m.ndim == 4 else 1):
            np.testing.assert_array_equal(grid[h], want[h][pos[:, None], pos[None, :]].astype(bool))
        assert patterns.from_dict(p.to_dict()) == p
    check()


@pytest.mark.parametrize("call, message", [
    (lambda: patterns.DeepSpeedFixed(num_local_blocks=4, num_global_blocks=3), "must be a multiple"),
    (lambda: patterns.DeepSpeedFixed(attention="unidirectional", horizontal_global_attention=True),
     "needs attention='bidirectional'"),
    (lambda: patterns.DeepSpeedFixed(num_different_global_patterns=2), "needs different_layout_per_head"),
    (lambda: patterns.DeepSpeedFixed(num_different_global_patterns=5, different_layout_per_head=True),
     "must be <= num_local_blocks // num_global_blocks = 4"),
    (lambda: patterns.DeepSpeedVariable(local_window_blocks=[]), "must not be empty"),
    (lambda: patterns.DeepSpeedVariable(global_block_indices=[0, 4], global_block_end_indices=[2]),
     "the same length"),
    (lambda: patterns.DeepSpeedBSLongformer(global_block_indices=[3], global_block_end_indices=[3]),
     "start 3 must be < its end 3"),
    (lambda: patterns.DeepSpeedBigBird(attention="causal"), "attention must be one of"),
    (lambda: patterns.DeepSpeedBigBird(block=4).mask(30, 30), "multiple of block = 4"),
    (lambda: patterns.DeepSpeedBigBird(block=4, num_random_blocks=3).mask(8, 8), "num_random_blocks = 3 exceeds"),
    (lambda: patterns.DeepSpeedBSLongformer(block=4).mask(8, 12), "need Lq == Lk"),
    (lambda: patterns.Random(2, seed=2**64), "seed must be an int in \\[0, 2\\*\\*64 - 1\\]"),
    (lambda: patterns.Random(-1), "per_row must be an int in \\[0, 2\\*\\*40\\]"),
])
def test_drawn_parameter_errors(call, message):
    with pytest.raises(RefattnError, match=message):
        call()
