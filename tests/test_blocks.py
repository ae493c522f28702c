"""Block layouts (refattn/blocks.py, spec/blocks.md) against brute force over tiles of
the dense mask, and the FlexAttention export against torch's create_block_mask."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refattn import Mask, RefattnError
from refattn.blocks import (
    EMPTY,
    FULL,
    PARTIAL,
    BlockLayout,
    FlexBlockArrays,
    _group_tiles,
    blocks,
    to_flex_block_mask,
    to_layout,
)

from .conftest import random_bool


def cdiv(a, b):
    return -(-a // b)


# ---- brute force: one loop over the tiles of the dense matrix ------------------------------


def brute_tiles(d, bq, bk):
    """(indptr, indices, full, counts, states) of one 2-D boolean matrix, tile by tile."""
    lq, lk = d.shape
    nbq, nbk = cdiv(lq, bq), cdiv(lk, bk)
    indptr, indices, full, counts = [0], [], [], []
    states = np.zeros((nbq, nbk), dtype=np.int8)
    for i in range(nbq):
        for j in range(nbk):
            tile = d[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]   # slicing clips at the edge
            c = int(tile.sum())
            if c:
                indices.append(j)
                full.append(bool(tile.all()))
                counts.append(c)
                states[i, j] = FULL if tile.all() else PARTIAL
        indptr.append(len(indices))
    return indptr, indices, full, counts, states


def brute_flex(d4, bq, bk):
    """torch's rule restated on a dense [B, H, Lq, Lk] array: pad with False to whole
    tiles; full = all bq*bk entries allowed; indices = listed blocks, then the rest."""
    b, h, lq, lk = d4.shape
    nbq, nbk = cdiv(lq, bq), cdiv(lk, bk)
    padded = np.zeros((b, h, nbq * bq, nbk * bk), dtype=bool)
    padded[:, :, :lq, :lk] = d4
    sums = padded.reshape(b, h, nbq, bq, nbk, bk).sum(axis=(3, 5))
    full = sums == bq * bk
    partial = (sums > 0) & ~full
    out = {}
    for prefix, sel in (("", partial), ("full_", full)):
        for axis, grid in (("kv", sel), ("q", np.swapaxes(sel, -1, -2))):
            num = grid.sum(-1)
            idx = np.zeros(grid.shape, dtype=np.int64)
            for pos in np.ndindex(grid.shape[:-1]):
                row = grid[pos]
                idx[pos] = [*np.flatnonzero(row), *np.flatnonzero(~row)]
            out[f"{prefix}{axis}_num_blocks"], out[f"{prefix}{axis}_indices"] = num, idx
    return out


def assert_layout_matches(layout, mask, bq, bk):
    dense = mask.to_dense()
    d4 = dense if mask.ndim == 4 else dense[None, None]
    lq, lk = mask.matrix_shape
    assert (layout.block_q, layout.block_k) == (bq, bk)
    assert layout.shape == (lq, lk) and layout.group_shape == mask.group_shape
    assert (layout.nbq, layout.nbk) == (cdiv(lq, bq), cdiv(lk, bk))
    assert len(layout.groups) == d4.shape[0] * d4.shape[1]
    states = np.zeros(d4.shape[:2] + (layout.nbq, layout.nbk), dtype=np.int8)
    n_full = n_partial = 0
    for b, h, g in layout.iter_groups():
        indptr, indices, full, counts, st_ = brute_tiles(d4[b, h], bq, bk)
        assert g.indptr.dtype == np.int64 and g.indices.dtype == np.int64
        assert g.full.dtype == np.bool_ and g.counts.dtype == np.int64
        assert g.indptr.tolist() == indptr
        assert g.indices.tolist() == indices
        assert g.full.tolist() == full
        assert g.counts.tolist() == counts
        assert layout.group(b, h) is g
        states[b, h] = st_
        n_full += sum(full)
        n_partial += len(full) - sum(full)
    assert np.array_equal(layout.to_dense(), states if mask.ndim == 4 else states[0, 0])
    assert layout.num_full() == n_full and layout.num_partial() == n_partial
    assert layout.num_nonempty() == n_full + n_partial


# ---- strategies ------------------------------------------------------------------------------


@st.composite
def dense_masks(draw, max_len=11, four_d=None):
    """Boolean arrays (Lq, Lk) or (Bm, Hm, Lq, Lk): hypothesis-drawn bits, or a seeded
    random draw at a chosen density (so that full tiles are common too)."""
    lq = draw(st.integers(1, max_len))
    lk = draw(st.integers(1, max_len))
    four = draw(st.booleans()) if four_d is None else four_d
    lead = (draw(st.integers(1, 2)), draw(st.integers(1, 3))) if four else ()
    shape = lead + (lq, lk)
    if draw(st.booleans()):
        return draw(hnp.arrays(np.bool_, shape))
    density = draw(st.sampled_from([0.0, 0.2, 0.6, 0.9, 0.97, 1.0]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return random_bool(rng, shape, density)


block_sizes = st.integers(1, 13)


# ---- blocks ------------------------------------------------------------------------------------


@settings(max_examples=250, deadline=None)
@given(d=dense_masks(), bq=block_sizes, bk=block_sizes)
def test_blocks_match_brute_force(d, bq, bk):
    m = Mask.from_dense(d)
    layout = blocks(m, bq, bk)
    assert isinstance(layout, BlockLayout)
    assert_layout_matches(layout, m, bq, bk)
    assert m.blocks(bq, bk) == layout


@settings(max_examples=100, deadline=None)
@given(d=dense_masks(four_d=False), bq=block_sizes, bk=block_sizes)
def test_compiled_bincount_and_unique_paths_agree(d, bq, bk):
    m = Mask.from_dense(d)
    lq, lk = m.shape
    a = _group_tiles(m.csr.indptr, m.csr.indices, lq, lk, bq, bk, method="bincount")
    for method in ("unique", "compiled"):
        b = _group_tiles(m.csr.indptr, m.csr.indices, lq, lk, bq, bk, method=method)
        for x, y in zip(a, b):
            assert x.dtype == y.dtype and np.array_equal(x, y), method


def test_causal_example_ragged_edges():
    m = Mask.from_dense(np.tril(np.ones((5, 5), dtype=bool)))
    layout = m.blocks(2)            # block_k defaults to block_q
    assert (layout.block_q, layout.block_k, layout.nbq, layout.nbk) == (2, 2, 3, 3)
    assert layout.to_dense().tolist() == [[PARTIAL, EMPTY, EMPTY],
                                          [FULL, PARTIAL, EMPTY],
                                          [FULL, FULL, FULL]]
    g = layout.group(0, 0)
    assert g.indptr.tolist() == [0, 1, 3, 6]
    assert g.indices.tolist() == [0, 0, 1, 0, 1, 2]
    assert g.counts.tolist() == [3, 4, 3, 2, 2, 1]


@pytest.mark.parametrize("lq,lk,bq,bk", [(1, 1, 1, 1), (7, 5, 3, 2), (4, 9, 8, 16), (6, 6, 6, 6)])
def test_empty_and_full_masks(lq, lk, bq, bk):
    nbq, nbk = cdiv(lq, bq), cdiv(lk, bk)
    e = blocks(Mask.empty(lq, lk), bq, bk)
    g = e.group(0, 0)
    assert g.indptr.tolist() == [0] * (nbq + 1) and g.indices.size == g.full.size == g.counts.size == 0
    assert e.num_full() == e.num_partial() == 0
    assert not e.to_dense().any()
    f = blocks(Mask.full(lq, lk), bq, bk)
    # Every tile of the full mask is full, ragged edge tiles included.
    assert f.num_full() == nbq * nbk and f.num_partial() == 0
    assert f.group(0, 0).counts.sum() == lq * lk
    assert f.group(3, 5) is f.group(0, 0)        # size-1 axes broadcast


def test_four_d_groups_and_group_errors():
    rng = np.random.default_rng(5)
    d = random_bool(rng, (2, 3, 6, 7), 0.5)
    d[1, 2] = True
    m = Mask.from_dense(d)
    layout = m.blocks(4, 3)
    assert_layout_matches(layout, m, 4, 3)
    assert layout.group(1, 2).full.all()
    assert layout.to_dense().shape == (2, 3, 2, 3)
    with pytest.raises(RefattnError, match="BlockLayout.group: b must be an int in"):
        layout.group(2, 0)
    with pytest.raises(RefattnError, match="BlockLayout.group: h must be"):
        layout.group(0, -1)
    with pytest.raises(RefattnError, match="BlockLayout.group: h must be"):
        layout.group(0, True)
    one_head = Mask.stack([[Mask.full(3, 3)]]).blocks(2)
    assert one_head.group(9, 9) is one_head.groups[0]


def test_layout_arrays_are_read_only():
    g = Mask.full(4, 4).blocks(2).group(0, 0)
    for a in g:
        with pytest.raises(ValueError):
            a[...] = 0


def test_large_sparse_mask_costs_follow_nnz():
    """A 200000 x 200000 diagonal with 1 x 1 tiles has 4e10 tiles: only the nnz path fits."""
    n = 200_000
    m = Mask.from_indices(np.arange(n + 1), np.arange(n), (n, n))
    layout = m.blocks(1)
    g = layout.group(0, 0)
    assert layout.nbq == layout.nbk == n
    assert np.array_equal(g.indices, np.arange(n)) and g.full.all()
    layout = m.blocks(64, 48)
    assert layout.num_partial() + layout.num_full() == layout.group(0, 0).indices.size


# ---- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3, True, False, 2.0, "4", None, np.bool_(True)])
def test_block_sizes_validated(bad):
    m = Mask.full(4, 4)
    if bad is not None:
        with pytest.raises(RefattnError, match="blocks: block_q"):
            blocks(m, bad, 2)
        with pytest.raises(RefattnError, match="to_layout: block_q"):
            to_layout(m, bad)
    with pytest.raises(RefattnError, match="blocks: block_k"):
        blocks(m, 2, bad if bad is not None else "x")
    with pytest.raises(RefattnError, match="to_layout: block_k"):
        m.to_layout(2, bad if bad is not None else 0.5)
    with pytest.raises(RefattnError, match=r"to_flex_block_mask: block_size"):
        m.to_flex_block_mask(bad)
    with pytest.raises(RefattnError, match=r"to_flex_block_mask: block_size\[1\] \(kv\)"):
        m.to_flex_block_mask((2, bad))


def test_other_bad_arguments():
    m = Mask.full(4, 4)
    assert blocks(m, np.int64(2), np.int32(3)).block_k == 3
    for fn in (lambda x: blocks(x, 2), lambda x: to_layout(x, 2), lambda x: to_flex_block_mask(x)):
        with pytest.raises(RefattnError, match="mask must be a refattn.Mask"):
            fn(np.ones((4, 4), dtype=bool))
    with pytest.raises(RefattnError, match="block_size must be an int or a pair"):
        m.to_flex_block_mask((2, 2, 2))
    four = Mask.stack([[m, m], [m, m]])
    with pytest.raises(RefattnError, match="to_layout: the mask has Bm = 2"):
        four.to_layout(2)
    with pytest.raises(RefattnError, match="to_layout: heads=3 does not match"):
        Mask.stack([[m, m]]).to_layout(2, heads=3)
    with pytest.raises(RefattnError, match="to_layout: heads"):
        m.to_layout(2, heads=0)
    with pytest.raises(RefattnError, match="to_flex_block_mask: batch=3 does not match"):
        four.to_flex_block_mask(2, batch=3)
    with pytest.raises(RefattnError, match="to_flex_block_mask: heads=1 does not match"):
        four.to_flex_block_mask(2, heads=1)


# ---- to_layout -----------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(d=dense_masks(), bq=block_sizes, bk=block_sizes, heads=st.sampled_from([None, 1, 3]))
def test_to_layout_matches_brute_force(d, bq, bk, heads):
    if d.ndim == 4:
        d = d[:1]                                   # a layout is per head: Bm == 1
    m = Mask.from_dense(d)
    d3 = d[0] if d.ndim == 4 else d[None]
    hm = d3.shape[0]
    if heads is not None and hm not in (1, heads):
        with pytest.raises(RefattnError, match="heads"):
            m.to_layout(bq, bk, heads=heads)
        return
    lay = m.to_layout(bq, bk, heads=heads)
    want = np.stack([(brute_tiles(x, bq, bk)[4] != EMPTY) for x in d3]).astype(np.int64)
    want = np.broadcast_to(want, (heads or hm,) + want.shape[1:])
    assert lay.dtype == np.int64 and lay.flags.writeable
    assert np.array_equal(lay, want)


def test_to_layout_example():
    causal = Mask.from_dense(np.tril(np.ones((6, 6), dtype=bool)))
    assert causal.to_layout(3).tolist() == [[[1, 0], [1, 1]]]
    assert to_layout(causal, 2, 3, heads=2).shape == (2, 3, 2)


# ---- FlexAttention arrays, without torch ---------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(d=dense_masks(max_len=9), bq=st.integers(1, 10), bk=st.integers(1, 10),
       square=st.booleans())
def test_flex_arrays_match_torch_rule(d, bq, bk, square):
    m = Mask.from_dense(d)
    block_size = bq if square else (bq, bk)
    bk = bq if square else bk
    f = m.to_flex_block_mask(block_size)
    d4 = d if d.ndim == 4 else d[None, None]
    want = brute_flex(d4, bq, bk)
    assert f.seq_lengths == m.matrix_shape and f.block_size == (bq, bk)
    for name in FlexBlockArrays.ARRAYS:
        got = getattr(f, name)
        assert got.dtype == np.int32, name
        assert np.array_equal(got, want[name]), name


def test_flex_ragged_tiles_are_never_full():
    f = Mask.full(5, 5).to_flex_block_mask(2)
    # refattn: all 9 tiles full; torch: only the 4 whole 2 x 2 tiles are.
    assert Mask.full(5, 5).blocks(2).num_full() == 9
    assert f.full_kv_num_blocks.tolist() == [[[2, 2, 0]]]
    assert f.kv_num_blocks.tolist() == [[[1, 1, 3]]]
    assert f.kv_indices.tolist() == [[[[2, 0, 1], [2, 0, 1], [0, 1, 2]]]]


def test_flex_broadcast_batch_and_heads():
    rng = np.random.default_rng(11)
    d = random_bool(rng, (1, 2, 7, 5), 0.5)
    m = Mask.from_dense(d)
    f = m.to_flex_block_mask((3, 2), batch=3)
    assert f.kv_indices.shape == (3, 2, 3, 3) and f.q_indices.shape == (3, 2, 3, 3)
    want = brute_flex(np.broadcast_to(d, (3, 2, 7, 5)), 3, 2)
    for name in FlexBlockArrays.ARRAYS:
        assert np.array_equal(getattr(f, name), want[name]), name
    f2 = Mask.from_dense(d[0, 0]).to_flex_block_mask(4, batch=2, heads=3)
    assert f2.kv_num_blocks.shape == (2, 3, 2)


# ---- PyTorch oracle ------------------------------------------------------------------------------


def _torch_block_mask(d4, block_size, batch=None, heads=None):
    torch = pytest.importorskip("torch")
    from torch.nn.attention.flex_attention import create_block_mask

    bm, hm, lq, lk = d4.shape
    dt = torch.from_numpy(np.ascontiguousarray(d4))
    b, h = batch or bm, heads or hm

    def mask_mod(bi, hi, q, kv):
        return dt[bi if bm > 1 else 0, hi if hm > 1 else 0, q, kv]

    return create_block_mask(mask_mod, b, h, lq, lk, device="cpu", BLOCK_SIZE=block_size)


ORACLE_CASES = [
    # (shape of the dense mask, density, block_size, batch, heads)
    ((9, 13), 0.4, (4, 2), None, None),
    ((16, 16), 0.9, 4, None, None),
    ((16, 16), 1.0, 8, None, None),          # every tile full
    ((5, 5), 1.0, 2, None, None),            # ragged edges: torch calls them partial
    ((7, 11), 0.0, 3, None, None),           # empty
    ((2, 3, 9, 6), 0.5, (2, 5), None, None),
    ((1, 2, 6, 10), 0.8, (3, 3), 2, None),   # broadcast over batch
    ((6, 4), 0.95, (16, 16), 2, 3),          # one ragged tile; broadcast both axes
    ((12, 12), "causal", 4, None, None),
]


def _case_mask(shape, density):
    rng = np.random.default_rng(sum(shape) + 7)
    if density == "causal":
        return np.tril(np.ones(shape, dtype=bool))
    return random_bool(rng, shape, density)


@pytest.mark.oracle
@pytest.mark.parametrize("shape,density,block_size,batch,heads", ORACLE_CASES)
def test_flex_export_equals_torch_create_block_mask(shape, density, block_size, batch, heads):
    torch = pytest.importorskip("torch")
    d = _case_mask(shape, density)
    m = Mask.from_dense(d)
    d4 = d if d.ndim == 4 else d[None, None]
    ref = _torch_block_mask(d4, block_size, batch, heads)
    ours = m.to_flex_block_mask(block_size, batch=batch, heads=heads)
    assert tuple(ref.seq_lengths) == ours.seq_lengths
    assert tuple(ref.BLOCK_SIZE) == ours.block_size
    for name in FlexBlockArrays.ARRAYS:
        t = getattr(ref, name)
        assert t.dtype == torch.int32, name
        assert np.array_equal(t.numpy(), getattr(ours, name)), name


@pytest.mark.oracle
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize("shape,density,block_size,batch,heads", ORACLE_CASES[:7])
def test_to_torch_block_mask(shape, density, block_size, batch, heads):
    torch = pytest.importorskip("torch")
    from torch.nn.attention.flex_attention import flex_attention

    import refattn
    from refattn.blocks import to_torch_block_mask

    d = _case_mask(shape, density)
    m = Mask.from_dense(d)
    d4 = d if d.ndim == 4 else d[None, None]
    ref = _torch_block_mask(d4, block_size, batch, heads)
    tb = to_torch_block_mask(m, block_size, batch=batch, heads=heads)
    for name in FlexBlockArrays.ARRAYS:
        assert torch.equal(getattr(tb, name), getattr(ref, name)), name
    # Its mask_mod reproduces the mask exactly: flex_attention (eager) equals the oracle.
    b, h = batch or d4.shape[0], heads or d4.shape[1]
    lq, lk = m.matrix_shape
    rng = np.random.default_rng(3)
    q = rng.standard_normal((b, h, lq, 4))
    k = rng.standard_normal((b, h, lk, 4))
    v = rng.standard_normal((b, h, lk, 4))
    out = flex_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v),
                         block_mask=tb)
    want = refattn.forward(q, k, v, m).out
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-10, atol=1e-12)



def _rule_cases():
    """(pattern, the same rule as a FlexAttention mask_mod over tensors, Lq, Lk)."""
    from refattn import patterns as P
    return [
        (P.Causal(), lambda b, h, q, kv: kv <= q + 5, 27, 32),                      # bottom_right offset 5
        (P.SlidingWindow(7, 0), lambda b, h, q, kv: (q - kv >= 0) & (q - kv <= 7), 100, 100),
        (P.SlidingWindow(3, 4, "top_left"), lambda b, h, q, kv: (kv - q >= -3) & (kv - q <= 4), 40, 70),
        (P.PrefixLM(20), lambda b, h, q, kv: (kv < 20) | (kv <= q), 64, 64),
        (P.ChunkedCausal(16), lambda b, h, q, kv: (q // 16 == kv // 16) & (kv <= q), 70, 70),
        (P.SinkWindow(4, 16), lambda b, h, q, kv: (kv <= q) & ((kv < 4) | (q - kv < 16)), 90, 90),
        (P.Strided(8), lambda b, h, q, kv: (kv <= q) & ((q - kv < 8) | ((q - kv) % 8 == 0)), 64, 64),
    ]


@pytest.mark.oracle
@pytest.mark.parametrize("case", range(7))
@pytest.mark.parametrize("block_size", [8, (16, 8)])
def test_flex_export_equals_create_block_mask_for_the_same_rule(case, block_size):
    """A pattern's export equals FlexAttention's own block mask for the rule written as a
    mask_mod (not derived from our mask): the rule, the tiling and the padding all agree."""
    torch = pytest.importorskip("torch")
    from torch.nn.attention.flex_attention import create_block_mask

    pattern, mask_mod, lq, lk = _rule_cases()[case]
    ref = create_block_mask(mask_mod, 1, 1, lq, lk, device="cpu", BLOCK_SIZE=block_size)
    ours = pattern.mask(lq, lk).to_flex_block_mask(block_size, batch=1, heads=1)
    for name in FlexBlockArrays.ARRAYS:
        t = getattr(ref, name)
        assert t.dtype == torch.int32, name
        assert np.array_equal(t.numpy(), getattr(ours, name)), (pattern, name)


def test_layout_is_computed_once_per_mask_and_block_size():
    """A mask is a value, so its layout is kept with it: the second call returns the same
    object, and it equals a layout computed afresh from an equal mask."""
    m = Mask.from_dense(np.tril(np.ones((37, 37), dtype=bool)))
    first = m.blocks(8, 4)
    assert m.blocks(8, 4) is first
    assert blocks(m, 8, 4) is first
    fresh = Mask.from_dense(np.tril(np.ones((37, 37), dtype=bool))).blocks(8, 4)
    assert fresh is not first and fresh == first
    assert m.blocks(4, 8) is not first and m.blocks(4, 8) != first
