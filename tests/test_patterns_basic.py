"""The basic patterns and the registry (the full library comes with issue [2/9])."""

import numpy as np
import pytest

from refattn import Mask, RefattnError, patterns


@pytest.mark.parametrize("lq, lk", [(1, 1), (4, 4), (3, 7), (7, 3), (1, 9)])
@pytest.mark.parametrize("align", ["top_left", "bottom_right"])
def test_causal_rule(lq, lk, align):
    off = 0 if align == "top_left" else lk - lq
    i, j = np.meshgrid(np.arange(lq), np.arange(lk), indexing="ij")
    expected = j <= i + off
    m = patterns.Causal(align=align).mask(lq, lk)
    np.testing.assert_array_equal(m.to_dense(), expected)
    assert m == Mask.from_dense(expected)


def test_default_alignment_is_bottom_right():
    assert patterns.Causal().align == "bottom_right"
    assert patterns.get("causal").mask(2, 5) == patterns.Causal(align="bottom_right").mask(2, 5)


def test_dense():
    assert patterns.get("dense").mask(3, 5) == Mask.full(3, 5)


def test_registry():
    assert {"dense", "causal"} <= set(patterns.names())
    assert patterns.names() == sorted(patterns.names())
    with pytest.raises(RefattnError, match="unknown pattern 'nope'"):
        patterns.get("nope")
    with pytest.raises(RefattnError, match=r"unknown parameter\(s\) \['window'\]; it takes \['align'\]"):
        patterns.get("causal", window=3)
    with pytest.raises(RefattnError, match="align must be one of"):
        patterns.Causal(align="middle")


def test_to_dict_round_trip():
    p = patterns.Causal(align="top_left")
    assert p.to_dict() == {"name": "causal", "align": "top_left"}
    assert patterns.from_dict(p.to_dict()) == p
    with pytest.raises(RefattnError, match="expected a dict with a 'name' key"):
        patterns.from_dict({"align": "top_left"})


@pytest.mark.parametrize("lq, lk", [(0, 3), (3, 0), (2.0, 3), (True, 3)])
def test_bad_lengths(lq, lk):
    with pytest.raises(RefattnError, match="must be"):
        patterns.Causal().mask(lq, lk)
