"""`refattn.Mask`: canonical form, constructors, broadcasting, and rejection of bad input."""

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from refattn import Mask, RefattnError
from refattn.mask import _index_dtype

from .conftest import random_bool


def test_from_dense_is_canonical(rng):
    b = random_bool(rng, (7, 11), 0.4)
    m = Mask.from_dense(b)
    assert m.shape == (7, 11) and m.ndim == 2 and m.group_shape == (1, 1)
    assert m.nnz == b.sum() and m.density == pytest.approx(b.mean())
    assert m.csr.indices.dtype == m.csr.indptr.dtype == np.int32
    assert m.csr.data.dtype == np.bool_ and m.csr.data.all()
    assert m.csr.has_canonical_format
    np.testing.assert_array_equal(m.to_dense(), b)


def test_arrays_are_read_only(rng):
    m = Mask.from_dense(random_bool(rng, (3, 3)))
    with pytest.raises(ValueError):
        m.csr.indices[0] = 1
    with pytest.raises(ValueError):
        m.csr.indptr[0] = 1


def test_index_dtype_switches_to_int64_past_int32():
    assert _index_dtype(2**31 - 1, 10) == np.int32
    assert _index_dtype(2**31, 10) == np.int64
    assert _index_dtype(10, 2**31) == np.int64


def test_constructors_agree(rng):
    b = random_bool(rng, (5, 6))
    c = sp.csr_array(b)
    m = Mask.from_dense(b)
    assert Mask.from_csr(c) == m
    assert Mask.from_csr(sp.csr_matrix(b)) == m
    assert Mask.from_indices(c.indptr, c.indices, (5, 6)) == m
    assert Mask.full(5, 6) == Mask.from_dense(np.ones((5, 6), bool))
    assert Mask.empty(5, 6) == Mask.from_dense(np.zeros((5, 6), bool))
    assert Mask.empty(5, 6).nnz == 0


def test_equality_compares_structure(rng):
    b = random_bool(rng, (4, 4))
    assert Mask.from_dense(b) == Mask.from_dense(b.copy())
    b2 = b.copy()
    b2[0, 0] = not b2[0, 0]
    assert Mask.from_dense(b) != Mask.from_dense(b2)
    assert Mask.full(2, 3) != Mask.full(3, 2)
    assert Mask.full(2, 2) != "mask"
    with pytest.raises(TypeError):
        hash(Mask.full(2, 2))


def test_stack_and_broadcasting(rng):
    heads = [Mask.from_dense(random_bool(rng, (3, 4))) for _ in range(3)]
    m = Mask.stack([heads])
    assert m.shape == (1, 3, 3, 4) and m.ndim == 4 and m.group_shape == (1, 3)
    assert m.nnz == sum(h.nnz for h in heads)
    for b in range(5):  # batch axis broadcasts
        for h in range(3):
            assert m.group(b, h) is heads[h].csr
    np.testing.assert_array_equal(m.to_dense()[0, 1], heads[1].to_dense())
    d = random_bool(rng, (2, 3, 3, 4))
    assert Mask.from_dense(d) == Mask.stack([[Mask.from_dense(d[i, j]) for j in range(3)] for i in range(2)])
    np.testing.assert_array_equal(Mask.from_dense(d).to_dense(), d)
    with pytest.raises(RefattnError, match="groups; use .group"):
        m.csr
    m.check_compatible(batch=7, heads=3, lq=3, lk=4)
    with pytest.raises(RefattnError, match=r"group shape \(Bm, Hm\) = \(1, 3\)"):
        m.check_compatible(batch=1, heads=6, lq=3, lk=4)
    with pytest.raises(RefattnError, match=r"\(Lq, Lk\) = \(3, 4\) does not match"):
        m.check_compatible(batch=1, heads=3, lq=4, lk=4)


@pytest.mark.parametrize("indptr, indices, shape, message", [
    ([0, 2, 3], [1, 0, 2], (2, 3), "unsorted column indices in row 0"),
    ([0, 2, 3], [1, 1, 2], (2, 3), "duplicate column indices in row 0"),
    ([0, 1, 2], [0, 3], (2, 3), r"column index 3 at row 1 is out of range \[0, 3\)"),
    ([0, 1, 2], [0, -1], (2, 3), r"column index -1 at row 1 is out of range"),
    ([0, 1], [0], (2, 3), r"indptr must have length Lq \+ 1 = 3, got 2"),
    ([1, 1, 2], [0, 1], (2, 3), r"indptr\[0\] must be 0"),
    ([0, 2, 1], [0, 1], (2, 3), "indptr must be non-decreasing; it decreases at row 1"),
    ([0, 1, 3], [0, 1], (2, 3), r"indptr\[-1\] must equal len\(indices\) = 2"),
    ([0, 1, 2], [0.0, 1.0], (2, 3), "indices must have an integer dtype"),
    ([0, 1, 2], [0, 1], (0, 3), "must be >= 1"),
    ([0, 1, 2], [0, 1], (2,), r"must be a pair \(Lq, Lk\)"),
])
def test_malformed_csr_is_rejected(indptr, indices, shape, message):
    with pytest.raises(RefattnError, match=message):
        Mask.from_indices(np.array(indptr), np.array(indices), shape)


def test_unsorted_scipy_csr_is_rejected_not_repaired():
    c = sp.csr_array((np.ones(2, bool), np.array([2, 0]), np.array([0, 2])), shape=(1, 3))
    with pytest.raises(RefattnError, match="unsorted"):
        Mask.from_csr(c)


def test_explicit_zeros_are_rejected():
    c = sp.csr_array((np.array([1.0, 0.0]), np.array([0, 2]), np.array([0, 2])), shape=(1, 3))
    with pytest.raises(RefattnError, match=r"stored entry 1 \(row 0, column 2\) is 0.0; a mask stores only allowed entries"):
        Mask.from_csr(c)


def test_from_csr_rejects_other_formats():
    with pytest.raises(RefattnError, match=r"convert with .tocsr\(\)"):
        Mask.from_csr(sp.coo_array(np.eye(3)))
    with pytest.raises(RefattnError, match="expected a scipy.sparse CSR"):
        Mask.from_csr(np.eye(3, dtype=bool))


def test_from_dense_rejects_non_boolean_and_bad_rank():
    with pytest.raises(RefattnError, match="expected a boolean array, got dtype int64"):
        Mask.from_dense(np.eye(3, dtype=np.int64))
    with pytest.raises(RefattnError, match="expected a 2-D"):
        Mask.from_dense(np.ones((2, 2, 2), bool))


def test_stack_rejects_bad_grids(rng):
    a = Mask.full(2, 3)
    with pytest.raises(RefattnError, match="nested sequence"):
        Mask.stack([a, a])
    with pytest.raises(RefattnError, match="same non-zero length"):
        Mask.stack([[a, a], [a]])
    with pytest.raises(RefattnError, match=r"masks\[0\]\[1\] has shape \(3, 2\)"):
        Mask.stack([[a, Mask.full(3, 2)]])
    with pytest.raises(RefattnError, match="must be 2-D"):
        Mask.stack([[Mask.stack([[a]])]])


def test_constructor_is_private():
    with pytest.raises(TypeError, match="not public"):
        Mask((), (1, 1), (1, 1), 2)


def test_repr():
    assert repr(Mask.full(2, 2)) == "Mask(shape=(2, 2), nnz=4, density=1)"


def test_nan_in_csr_data_is_rejected():
    with pytest.raises(RefattnError, match=r"stored entry 0 \(row 0, column 0\) is nan"):
        Mask.from_csr(sp.csr_array(np.array([[np.nan, 0.0]])))


def test_group_index_is_checked(rng):
    st = Mask.stack([[Mask.full(2, 2), Mask.empty(2, 2)], [Mask.empty(2, 2), Mask.full(2, 2)]])
    assert st.group(1, 1).nnz == 4
    with pytest.raises(RefattnError, match=r"Mask.group: h must be an int in \[0, 2\), got -1"):
        st.group(1, -1)
    with pytest.raises(RefattnError, match=r"Mask.group: b must be an int in \[0, 2\), got 2"):
        st.group(2, 0)
    single = Mask.full(2, 2)
    assert single.group(7, 3) is single.csr  # size-1 axes broadcast to any index
    with pytest.raises(RefattnError, match="b must be any int >= 0"):
        single.group(-1, 0)


@pytest.mark.parametrize("arg", [5, [[Mask.full(1, 1)], 5]])
def test_stack_rejects_non_sequences(arg):
    with pytest.raises(RefattnError, match="Mask.stack: expected"):
        Mask.stack(arg)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), lq=st.integers(1, 6), lk=st.integers(1, 9),
       dtypes=st.sampled_from([(np.int32, np.int32), (np.int32, np.int64), (np.int64, np.int32)]))
def test_compiled_merge_matches_numpy_set_operations(data, lq, lk, dtypes):
    """The row-wise merge behind |, &, - (any index dtypes) against numpy's set routines."""
    from refattn._csr_merge import DIFFERENCE, INTERSECTION, UNION, merge

    def csr(dtype):
        rows = [sorted(data.draw(st.sets(st.integers(0, lk - 1)))) for _ in range(lq)]
        indptr = np.cumsum([0] + [len(r) for r in rows]).astype(dtype)
        return indptr, np.array([j for r in rows for j in r], dtype), rows

    (ap, ai, ra), (bp, bi, rb) = csr(dtypes[0]), csr(dtypes[1])
    for op, fn in ((UNION, np.union1d), (INTERSECTION, np.intersect1d), (DIFFERENCE, np.setdiff1d)):
        indptr, indices = merge(op, ap, ai, bp, bi, lambda nnz: np.dtype(np.int64))
        got = [indices[indptr[r]:indptr[r + 1]].tolist() for r in range(lq)]
        assert got == [fn(x, y).astype(int).tolist() for x, y in zip(ra, rb)]


def test_equality_compares_columns_not_only_row_counts():
    """Two masks with the same count in every row but other columns are unequal (the
    verifier decides with == whether a mask is the causal one)."""
    lower = np.tril(np.ones((5, 5), bool))
    mirrored = lower[:, ::-1]                      # row i: the last i + 1 keys
    a, b = Mask.from_dense(lower), Mask.from_dense(mirrored)
    assert np.array_equal(a.row_counts(0, 0), b.row_counts(0, 0))
    assert a != b and not (a == b)
    assert a == Mask.from_dense(lower.copy())


def test_a_mirrored_causal_mask_is_not_given_as_causal():
    from refattn.verify.frame import is_causal_top_left

    lower = np.tril(np.ones((6, 6), bool))
    assert is_causal_top_left(Mask.from_dense(lower)) is True
    assert is_causal_top_left(Mask.from_dense(np.ones((6, 6), bool))) is False
    assert is_causal_top_left(Mask.from_dense(lower[:, ::-1])) is None
