"""Every registered pattern has an example, builds at awkward lengths, and computes the
same attention through the oracle as its mask given densely."""

import numpy as np
import pytest

import refattn
from refattn import Mask, patterns
from refattn.patterns.examples import example, names_with_examples

SHAPES = [(1, 1), (1, 9), (9, 1), (7, 7), (16, 16), (13, 21), (21, 13), (30, 30)]


def test_every_registered_pattern_has_an_example():
    assert names_with_examples() == patterns.names()
    for name in patterns.names():
        assert example(name, 16, 16) is not None, name
    with pytest.raises(KeyError, match="add one"):
        example("no_such_pattern", 4, 4)


@pytest.mark.parametrize("name", patterns.names())
def test_examples_build_at_many_shapes(name, rng):
    for lq, lk in SHAPES:
        p = example(name, lq, lk)
        q, k = rng.standard_normal((1, 2, lq, 4)), rng.standard_normal((1, 2, lk, 4))
        if p is None:
            assert lq != lk or name in ("neighborhood_2d", "deepspeed_fixed", "deepspeed_variable",
                                        "deepspeed_bigbird", "deepspeed_bslongformer")
            continue
        m = p.mask(lq, lk, heads=2, q=q, k=k)
        assert m.matrix_shape == (lq, lk)
        assert patterns.from_dict(p.to_dict()) == p
        assert p.mask(lq, lk, heads=2, q=q, k=k) == m           # deterministic
        if not p.content_dependent:                             # the inputs' values are unused
            assert p.mask(lq, lk, heads=2) == m


@pytest.mark.parametrize("name", patterns.names())
def test_forward_through_the_oracle(name, rng):
    """Attention under each pattern (with two heads) equals attention with the same mask
    given densely; empty rows are exactly the rows with -inf LSE."""
    L = 16
    p = example(name, L, L)
    q, k, v = (rng.standard_normal((1, 2, L, 4)) for _ in range(3))
    m = p.mask(L, L, heads=2, q=q, k=k)
    a = refattn.forward(q, k, v, m)
    dense = m.to_dense()
    b = refattn.forward(q, k, v, Mask.stack([[Mask.from_dense(d) for d in dense.reshape(-1, L, L)]]))
    np.testing.assert_array_equal(a.out, np.broadcast_to(b.out, a.out.shape))
    counts = dense.reshape(-1, L, L).sum(-1)
    assert np.array_equal(np.isfinite(a.lse[0]), np.broadcast_to(counts > 0, (2, L)))
