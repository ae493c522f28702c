"""Each pattern against an independent brute-force predicate (loops over i, j)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn import Mask, RefattnError, patterns

lengths = st.integers(1, 24)
aligns = st.sampled_from(["top_left", "bottom_right"])


def brute(lq, lk, allowed):
    return np.array([[bool(allowed(i, j)) for j in range(lk)] for i in range(lq)], dtype=bool).reshape(lq, lk)


def offset(align, lq, lk):
    return 0 if align == "top_left" else lk - lq


def check(p, lq, lk, allowed):
    m = p.mask(lq, lk)
    np.testing.assert_array_equal(m.to_dense(), brute(lq, lk, allowed), err_msg=repr(p))
    assert patterns.from_dict(p.to_dict()) == p


@settings(max_examples=60, deadline=None)
@given(lq=lengths, lk=lengths, left=st.integers(0, 30), right=st.integers(0, 30), align=aligns)
def test_sliding_window(lq, lk, left, right, align):
    o = offset(align, lq, lk)
    check(patterns.SlidingWindow(left, right, align), lq, lk, lambda i, j: -left <= j - (i + o) <= right)


@settings(max_examples=60, deadline=None)
@given(lq=lengths, lk=lengths, left=st.integers(0, 30), right=st.integers(0, 30),
       dilation=st.integers(1, 7), align=aligns)
def test_dilated_sliding_window(lq, lk, left, right, dilation, align):
    o = offset(align, lq, lk)
    check(patterns.DilatedSlidingWindow(left, right, dilation, align), lq, lk,
          lambda i, j: -left <= j - (i + o) <= right and (j - (i + o)) % dilation == 0)


@settings(max_examples=40, deadline=None)
@given(lq=lengths, lk=lengths, prefix=st.integers(0, 30))
def test_prefix_lm(lq, lk, prefix):
    o = lk - lq
    check(patterns.PrefixLM(prefix), lq, lk, lambda i, j: j < prefix or j <= i + o)


@settings(max_examples=40, deadline=None)
@given(lq=lengths, lk=lengths, chunk=st.integers(1, 9))
def test_chunked_causal(lq, lk, chunk):
    o = lk - lq
    check(patterns.ChunkedCausal(chunk), lq, lk,
          lambda i, j: j <= i + o and i + o >= 0 and (i + o) // chunk == j // chunk)


@settings(max_examples=40, deadline=None)
@given(lq=lengths, lk=lengths, sinks=st.integers(0, 6), window=st.integers(1, 9))
def test_sink_window(lq, lk, sinks, window):
    o = lk - lq
    check(patterns.SinkWindow(sinks, window), lq, lk,
          lambda i, j: j <= i + o and (j < sinks or 0 <= i + o - j < window))


@settings(max_examples=40, deadline=None)
@given(lens=st.lists(st.integers(1, 6), min_size=1, max_size=5), causal=st.booleans())
def test_document(lens, causal):
    seg = np.repeat(np.arange(len(lens)), lens)
    n = len(seg)
    rule = lambda i, j: seg[i] == seg[j] and (j <= i or not causal)  # noqa: E731
    check(patterns.Document(lengths=lens, causal=causal), n, n, rule)
    check(patterns.Document(segment_ids=seg * 3 + 1, causal=causal), n, n, rule)


@settings(max_examples=40, deadline=None)
@given(lq=lengths, lk=lengths, data=st.data())
def test_global_tokens(lq, lk, data):
    g = data.draw(st.lists(st.integers(0, max(lq, lk) - 1), unique=True, max_size=5))
    check(patterns.GlobalTokens(g), lq, lk, lambda i, j: i in g or j in g)


def _random_pattern(draw):
    choices = [
        patterns.Causal(align=draw(aligns)),
        patterns.SlidingWindow(draw(st.integers(0, 5)), draw(st.integers(0, 5))),
        patterns.GlobalTokens(draw(st.lists(st.integers(0, 5), unique=True, max_size=2))),
        patterns.PrefixLM(draw(st.integers(0, 6))),
        patterns.Dense(),
    ]
    return draw(st.sampled_from(choices))


@settings(max_examples=60, deadline=None)
@given(lq=st.integers(6, 14), lk=st.integers(6, 14), data=st.data())
def test_algebra_laws(lq, lk, data):
    a, b, c = (_random_pattern(data.draw) for _ in range(3))
    A, B, C = (x.mask(lq, lk).to_dense() for x in (a, b, c))
    for pat, expected in [(a | b, A | B), (a & b, A & B), (a - b, A & ~B),
                          ((a | b) & c, (A | B) & C), (a - (b | c), A & ~B & ~C)]:
        np.testing.assert_array_equal(pat.mask(lq, lk).to_dense(), expected)
        assert patterns.from_dict(pat.to_dict()) == pat
    assert (a | b).mask(lq, lk) == (b | a).mask(lq, lk)
    assert (a & (b | c)).mask(lq, lk) == ((a & b) | (a & c)).mask(lq, lk)
    assert (a - a).mask(lq, lk).nnz == 0


def test_mask_algebra_broadcasts_groups(rng):
    per_head = Mask.from_dense(rng.random((1, 3, 4, 5)) < 0.5)
    shared = Mask.from_dense(rng.random((4, 5)) < 0.5)
    u = per_head | shared
    assert u.shape == (1, 3, 4, 5)
    np.testing.assert_array_equal(u.to_dense(), per_head.to_dense() | shared.to_dense())
    with pytest.raises(RefattnError, match=r"shapes \(Lq, Lk\) differ"):
        shared | Mask.full(5, 4)
    with pytest.raises(RefattnError, match="do not broadcast"):
        per_head | Mask.from_dense(np.ones((1, 2, 4, 5), bool))


@pytest.mark.parametrize("call, message", [
    (lambda: patterns.SlidingWindow(-1, 0), "sliding_window.left must be an int in \\[0, 2\\*\\*40\\]"),
    (lambda: patterns.SlidingWindow(1.5, 0), "sliding_window.left must be an int"),
    (lambda: patterns.DilatedSlidingWindow(2, 2, 0), "dilation must be an int in \\[1, 2\\*\\*40\\]"),
    (lambda: patterns.ChunkedCausal(0), "chunk must be an int in \\[1, 2\\*\\*40\\]"),
    (lambda: patterns.SinkWindow(1, 0), "window must be an int in \\[1, 2\\*\\*40\\]"),
    (lambda: patterns.Document(), "exactly one of lengths and segment_ids"),
    (lambda: patterns.Document(segment_ids=[1, 0]), "non-decreasing"),
    (lambda: patterns.Document(lengths=[2, 0]), r"lengths\[...\] must be an int in \[1, 2\*\*40\]"),
    (lambda: patterns.Document(lengths=[2, 3]).mask(4, 4), r"cover 5 positions; need Lq == Lk == 5"),
    (lambda: patterns.GlobalTokens([1, 1]), "must be unique"),
    (lambda: patterns.GlobalTokens([-1]), r"ints in \[0, 2\*\*40\]"),
    (lambda: patterns.GlobalTokens([9]).mask(4, 5), "index 9 is beyond both Lq = 4 and Lk = 5"),
    (lambda: patterns.Union(terms=(patterns.Dense(),)), "terms must be two or more patterns"),
    (lambda: patterns.from_dict({"name": "union", "terms": 3}), "'terms' must be a list"),
])
def test_parameter_errors(call, message):
    with pytest.raises(RefattnError, match=message):
        call()


def test_builders_write_the_final_index_dtype_without_copies():
    m = patterns.SlidingWindow(3, 1).mask(50, 40)
    assert m.csr.indices.dtype == m.csr.indptr.dtype == np.int32
    assert not m.csr.indices.flags.writeable
    # the trusted path must produce exactly what validation would accept
    assert Mask.from_indices(m.csr.indptr, m.csr.indices, m.shape) == m


@settings(max_examples=80, deadline=None)
@given(lq=st.integers(1, 12), lk=st.integers(1, 12), data=st.data())
def test_prefix_and_range_builder(lq, lk, data):
    from refattn.patterns.base import rows_from_prefix_and_range
    ints = st.integers(-3, 15)
    a, lo, hi = (np.array(data.draw(st.lists(ints, min_size=lq, max_size=lq))) for _ in range(3))
    m = rows_from_prefix_and_range(a, lo, hi, lq, lk)
    expected = brute(lq, lk, lambda i, j: j < a[i] or lo[i] <= j < hi[i])
    np.testing.assert_array_equal(m.to_dense(), expected)
    assert Mask.from_indices(m.csr.indptr, m.csr.indices, m.shape) == m


@settings(max_examples=60, deadline=None)
@given(lq=lengths, lk=lengths, stride=st.integers(1, 7), causal=st.booleans())
def test_strided_family(lq, lk, stride, causal):
    o = lk - lq

    def local(i, j):
        return 0 <= i + o - j < stride

    def dilated(i, j):
        return (i + o - j) % stride == 0 and (j <= i + o or not causal)

    check(patterns.StridedLocal(stride), lq, lk, local)
    check(patterns.StridedDilated(stride, causal), lq, lk, dilated)
    check(patterns.Strided(stride, causal), lq, lk,
          lambda i, j: (local(i, j) or (i + o - j) % stride == 0) and (j <= i + o or not causal))


@settings(max_examples=60, deadline=None)
@given(lq=lengths, lk=lengths, block=st.integers(1, 7), data=st.data(), causal=st.booleans())
def test_fixed(lq, lk, block, data, causal):
    summary = data.draw(st.integers(0, block))
    o = lk - lq
    check(patterns.Fixed(block, summary, causal), lq, lk,
          lambda i, j: (((i + o) >= 0 and (i + o) // block == j // block) or j % block >= block - summary)
          and (j <= i + o or not causal))


@pytest.mark.parametrize("call, message", [
    (lambda: patterns.Strided(0), "strided.stride must be an int in \\[1, 2\\*\\*40\\]"),
    (lambda: patterns.Strided(2, causal=1), "strided.causal must be a bool"),
    (lambda: patterns.Fixed(4, 5), "fixed.summary must be <= block = 4"),
    (lambda: patterns.Fixed(0, 0), "fixed.block must be an int in \\[1, 2\\*\\*40\\]"),
])
def test_sparse_transformer_parameter_errors(call, message):
    with pytest.raises(RefattnError, match=message):
        call()
