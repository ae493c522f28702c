"""`refattn.analysis`: stats, hops, diameter and reachability against brute force written
here (dense arrays, a plain-Python BFS), the known connectivity of the classic sparse
patterns, and rejection of bad input."""

import math
from collections import deque

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from refattn import Mask, RefattnError, patterns
from refattn.study import analysis
from refattn.study.analysis import MaskStats, diameter, hops, reachability, stats

PROPS = settings(max_examples=60, deadline=None)


def bool_matrices(max_lq=8, max_lk=8, square=False):
    """Random boolean (Lq, Lk) arrays, sizes from 1, densities from empty to full."""
    def build(shape):
        return hnp.arrays(np.bool_, shape)
    if square:
        return st.integers(1, max_lq).flatmap(lambda n: build((n, n)))
    return st.tuples(st.integers(1, max_lq), st.integers(1, max_lk)).flatmap(build)


# ---- brute force, sharing no code with refattn.analysis ------------------------------------

def brute_hops(dense, src, dst):
    """Plain BFS on the dense mask: from key j one layer reaches every query i with dense[i, j]."""
    n = dense.shape[0]
    dist = {src: 0}
    queue = deque([src])
    while queue:
        j = queue.popleft()
        for i in range(n):
            if dense[i, j] and i not in dist:
                dist[i] = dist[j] + 1
                queue.append(i)
    return dist.get(dst, math.inf)


def brute_diameter(dense, pairs):
    n = dense.shape[0]
    keep = (lambda s, d: s != d) if pairs == "all" else (lambda s, d: s < d)
    values = [brute_hops(dense, s, d) for s in range(n) for d in range(n) if keep(s, d)]
    return max(values, default=0)


def dense_power(dense, k):
    """Boolean matrix power by repeated dense products (exactly k layers)."""
    out = np.eye(dense.shape[0], dtype=bool)
    for _ in range(k):
        out = (out.astype(np.int64) @ dense.astype(np.int64)) > 0
    return out


# ---- stats -----------------------------------------------------------------------------------

@PROPS
@given(bool_matrices())
def test_stats_matches_dense(dense):
    s = stats(Mask.from_dense(dense))
    counts = dense.sum(axis=1)
    lq, lk = dense.shape
    assert s == MaskStats(lq=lq, lk=lk, nnz=int(dense.sum()), density=dense.sum() / dense.size,
                          row_min=int(counts.min()), row_mean=dense.sum() / lq,
                          row_max=int(counts.max()), empty_rows=int((counts == 0).sum()))
    d = s.to_dict()
    assert list(d) == ["lq", "lk", "nnz", "density", "row_min", "row_mean", "row_max", "empty_rows"]
    assert all(type(v) in (int, float) for v in d.values())


def test_stats_is_frozen():
    s = stats(Mask.full(2, 3))
    with pytest.raises(AttributeError):
        s.nnz = 0


def test_stats_of_a_pattern():
    s = stats(patterns.SlidingWindow(left=2, right=0).mask(6, 6))
    assert s.to_dict() == {"lq": 6, "lk": 6, "nnz": 15, "density": 15 / 36, "row_min": 1,
                           "row_mean": 2.5, "row_max": 3, "empty_rows": 0}


# ---- hops, diameter, reachability against brute force ----------------------------------------

@PROPS
@given(bool_matrices(max_lq=7, square=True))
def test_hops_matches_brute_force(dense):
    m = Mask.from_dense(dense)
    n = dense.shape[0]
    for src in range(n):
        for dst in range(n):
            assert hops(m, src, dst) == brute_hops(dense, src, dst), (src, dst)


@PROPS
@given(bool_matrices(max_lq=7, square=True))
def test_diameter_matches_brute_force(dense):
    m = Mask.from_dense(dense)
    for pairs in ("all", "causal"):
        got = diameter(m, pairs=pairs)
        assert got == brute_diameter(dense, pairs), pairs
        assert isinstance(got, int) or got == math.inf


@PROPS
@given(bool_matrices(max_lq=7, square=True), st.integers(0, 9))
def test_reachability_is_the_boolean_power(dense, k):
    r = reachability(Mask.from_dense(dense), k)
    assert isinstance(r, sp.csr_array) and r.dtype == np.bool_ and r.shape == dense.shape
    assert r.has_sorted_indices and r.data.all()
    np.testing.assert_array_equal(r.toarray(), dense_power(dense, k))


@PROPS
@given(bool_matrices(max_lq=6, square=True))
def test_hops_is_the_least_power_that_connects(dense):
    """hops(j, i) = min {K : M**K has (i, j)}; a shortest path has at most n - 1 edges."""
    m = Mask.from_dense(dense)
    n = dense.shape[0]
    powers = [reachability(m, k).toarray() for k in range(n)]
    for src in range(n):
        for dst in range(n):
            least = next((k for k in range(n) if powers[k][dst, src]), math.inf)
            assert hops(m, src, dst) == least


@PROPS
@given(bool_matrices(max_lq=6, square=True), st.integers(0, 6))
def test_with_the_diagonal_exactly_k_is_within_k(dense, k):
    np.fill_diagonal(dense, True)
    m = Mask.from_dense(dense)
    r = reachability(m, k).toarray()
    n = dense.shape[0]
    within = np.array([[hops(m, j, i) <= k for j in range(n)] for i in range(n)])
    np.testing.assert_array_equal(r, within)


def test_reachability_small_cases():
    m = patterns.SlidingWindow(left=1, right=0).mask(5, 5)
    np.testing.assert_array_equal(reachability(m, 0).toarray(), np.eye(5, dtype=bool))
    np.testing.assert_array_equal(reachability(m, 1).toarray(), m.to_dense())
    assert reachability(Mask.empty(4, 4), 3).nnz == 0
    # The strictly-lower shift: exactly k layers move information exactly k positions.
    shift = Mask.from_dense(np.eye(5, k=-1, dtype=bool))
    np.testing.assert_array_equal(reachability(shift, 2).toarray(), np.eye(5, k=-2, dtype=bool))
    assert reachability(shift, 5).nnz == 0


# ---- known facts about patterns --------------------------------------------------------------

@pytest.mark.parametrize("n", [4, 9, 33])
def test_global_token_connects_every_pair_within_two_hops(n):
    m = (patterns.GlobalTokens(indices=(0,)) | patterns.SlidingWindow(left=1, right=1)).mask(n, n)
    # Any key -> the global row 0 -> any query; 1 -> 3 is not one hop, so exactly 2.
    assert diameter(m, pairs="all") == 2
    assert all(hops(m, s, d) <= 2 for s in range(n) for d in range(n))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 40))
def test_strided_connects_every_causal_pair_within_two_hops(s, n):
    """j -> k -> i with k = i - (i - j) % s: k - j is a multiple of s (strided part) and
    i - k < s (local part). One hop suffices iff i - j < s or s | (i - j), which fails for
    some pair exactly when s >= 2 and n - 1 >= s + 1."""
    m = patterns.Strided(stride=s).mask(n, n)
    expected = 0 if n == 1 else 2 if (s >= 2 and n >= s + 2) else 1
    assert diameter(m, pairs="causal") == expected


def test_strided_64_by_8():
    m = patterns.Strided(stride=8).mask(64, 64)
    assert diameter(m, pairs="causal") == 2
    assert diameter(m, pairs="all") == math.inf        # causal: no path backwards


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 8), st.data(), st.integers(1, 40))
def test_fixed_causal_diameter(block, data, n):
    """With a summary column, j -> (last position of j's block, a summary column) -> i.
    Without one, blocks are islands. One hop suffices everywhere iff there is a single
    block or every column is a summary column."""
    summary = data.draw(st.integers(0, block))
    m = patterns.Fixed(block=block, summary=summary).mask(n, n)
    if n == 1:
        expected = 0
    elif n <= block or summary == block:
        expected = 1
    elif summary == 0:
        expected = math.inf
    else:
        expected = 2
    assert diameter(m, pairs="causal") == expected


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 10), st.integers(1, 40))
def test_causal_sliding_window_hops(w, n):
    """A window of w keys (diagonal included) moves information at most w - 1 positions per
    layer, so 0 -> n - 1 takes ceil((n - 1) / (w - 1)) layers; with w = 1 it never arrives."""
    m = patterns.SlidingWindow(left=w - 1, right=0).mask(n, n)
    if n == 1:
        expected = 0
    elif w == 1:
        expected = math.inf
    else:
        expected = math.ceil((n - 1) / (w - 1))
    assert hops(m, 0, n - 1) == expected
    assert diameter(m, pairs="causal") == expected     # the farthest pair is the worst
    assert hops(m, n - 1, 0) == (0 if n == 1 else math.inf)


def test_empty_mask_is_disconnected():
    m = Mask.empty(5, 5)
    assert diameter(m, pairs="all") == math.inf
    assert diameter(m, pairs="causal") == math.inf
    assert hops(m, 0, 4) == math.inf
    assert hops(m, 3, 3) == 0                 # no layer needed to reach yourself
    assert diameter(Mask.empty(1, 1)) == 0    # no pairs at all


def test_full_mask_is_one_hop():
    m = Mask.full(6, 6)
    assert diameter(m) == diameter(m, pairs="causal") == 1


def test_long_sequence_is_fast():
    # O(n + nnz) per query: 20 000 positions, ~1.3 M entries, 313 layers of BFS.
    m = patterns.SlidingWindow(left=64, right=0).mask(20_000, 20_000)
    assert hops(m, 0, 19_999) == math.ceil(19_999 / 64)


# ---- 4-D masks -------------------------------------------------------------------------------

def test_group_selection_in_a_4d_mask():
    causal = patterns.SlidingWindow(left=1, right=0).mask(6, 6)
    dense = Mask.full(6, 6)
    m = Mask.stack([[causal, dense]])
    assert hops(m, 0, 5) == 5 and hops(m, 0, 5, h=1) == 1
    assert hops(m, 0, 5, b=3) == 5                       # the batch axis broadcasts
    assert diameter(m, h=1) == 1 and diameter(m) == math.inf
    assert stats(m, h=1).nnz == 36 and stats(m).nnz == 11
    np.testing.assert_array_equal(reachability(m, 2, h=1).toarray(), np.ones((6, 6), bool))
    with pytest.raises(RefattnError, match=r"^hops: h must be an int in \[0, 2\)"):
        hops(m, 0, 1, h=2)
    with pytest.raises(RefattnError, match=r"^stats: h must be an int in \[0, 2\), got -1"):
        stats(m, h=-1)


# ---- errors ----------------------------------------------------------------------------------

def test_non_square_masks_are_rejected():
    m = Mask.full(3, 5)
    assert stats(m).lk == 5                              # stats takes any shape
    for call in (lambda: hops(m, 0, 1), lambda: diameter(m), lambda: reachability(m, 1)):
        with pytest.raises(RefattnError, match=r"mask must be square \(Lq == Lk\).*\(3, 5\)"):
            call()


@pytest.mark.parametrize("name", ["src", "dst"])
@pytest.mark.parametrize("bad", [-1, 4, 10, True, False, 1.0, "0", None, np.bool_(True)])
def test_bad_positions_are_rejected(name, bad):
    m = Mask.full(4, 4)
    args = {"src": 0, "dst": 0, name: bad}
    with pytest.raises(RefattnError, match=rf"^hops: {name} must be"):
        hops(m, **args)


def test_numpy_integer_positions_are_accepted():
    m = patterns.SlidingWindow(left=1, right=0).mask(4, 4)
    assert hops(m, np.int64(0), np.int32(3)) == 3


@pytest.mark.parametrize("bad", [-1, True, 1.5, "2", None])
def test_bad_layers_are_rejected(bad):
    with pytest.raises(RefattnError, match="^reachability: layers must be an int >= 0"):
        reachability(Mask.full(3, 3), bad)


@pytest.mark.parametrize("bad", ["causual", "ALL", None, 1])
def test_bad_pairs_are_rejected(bad):
    with pytest.raises(RefattnError, match=r"^diameter: pairs must be one of \('all', 'causal'\)"):
        diameter(Mask.full(3, 3), pairs=bad)


@pytest.mark.parametrize("fn", [lambda x: stats(x), lambda x: hops(x, 0, 0),
                                lambda x: diameter(x), lambda x: reachability(x, 1)])
def test_non_masks_are_rejected(fn):
    with pytest.raises(RefattnError, match="mask must be a refattn.Mask, got ndarray"):
        fn(np.ones((3, 3), bool))


def test_public_names():
    assert set(analysis.__all__) == {"PAIRS", "MaskStats", "diameter", "hops", "reachability", "stats"}
    assert analysis.PAIRS == ("all", "causal")


# ---- path ----------------------------------------------------------------------------------

def brute_path(dense, src, dst):
    """A plain BFS from src, layer by layer; each new position's predecessor is the smallest
    position of the previous layer that it reads (dense[new, prev])."""
    n = dense.shape[0]
    parent = {src: None}
    frontier = [src]
    while frontier and dst not in parent:
        nxt = []
        for t in range(n):
            if t in parent:
                continue
            readers = [f for f in sorted(frontier) if dense[t, f]]
            if readers:
                parent[t] = readers[0]
                nxt.append(t)
        frontier = nxt
    if dst not in parent:
        return None
    chain = [dst]
    while parent[chain[-1]] is not None:
        chain.append(parent[chain[-1]])
    return chain[::-1]


@PROPS
@given(bool_matrices(max_lq=7, square=True))
def test_path_is_the_brute_force_chain(dense):
    m = Mask.from_dense(dense)
    n = dense.shape[0]
    for src in range(n):
        for dst in range(n):
            got = analysis.path(m, src, dst)
            assert got == brute_path(dense, src, dst), (src, dst)
            if got is None:
                assert hops(m, src, dst) == math.inf
            else:
                assert len(got) == hops(m, src, dst) + 1 and got[0] == src and got[-1] == dst
                assert all(dense[b, a] for a, b in zip(got, got[1:]))


def test_path_example_and_errors():
    w = patterns.SlidingWindow(2, 0).mask(12, 12)
    assert analysis.path(w, 3, 7) == [3, 5, 7]
    assert analysis.path(w, 11, 0) is None
    with pytest.raises(RefattnError, match="path: dst"):
        analysis.path(w, 0, 12)
    with pytest.raises(RefattnError, match="path"):
        analysis.path(patterns.get("causal").mask(3, 4), 0, 1)


def test_refattn_paths_command(capsys):
    from refattn.cli import main
    assert main(["paths", "--pattern", "sliding_window", "--param", "left=2", "--param", "right=0", "--n", "12",
                 "--from", "3", "--to", "7", "--layers", "2"]) == 0
    out = capsys.readouterr().out
    assert "query 7 reads key 3 directly: no" in out
    assert "fewest layers from key 3 to query 7: 2" in out and "a shortest chain: 3 -> 5 -> 7" in out
    assert "layer 1: query 5 reads key 3" in out and "layer 2: query 7 reads key 5" in out
    grid = out.split("pairs):\n")[1].splitlines()[:12]
    reach = analysis.reachability(patterns.SlidingWindow(2, 0).mask(12, 12), 2).toarray()
    assert [[c == "#" for c in row] for row in grid] == reach.tolist()
    assert main(["paths", "--pattern", "causal", "--n", "8", "--from", "5", "--to", "2"]) == 0
    assert "never reaches query 2" in capsys.readouterr().out
    assert main(["paths", "--pattern", "causal", "--n", "8", "--from", "9", "--to", "2"]) == 1
    assert "--from 9 is out of range: the positions are 0 .. 7 (--n 8)" in capsys.readouterr().err
    assert main(["paths", "--pattern", "causal", "--n", "12", "--from", "3", "--to", "70"]) == 1
    assert "--to 70 is out of range: the positions are 0 .. 11 (--n 12)" in capsys.readouterr().err
