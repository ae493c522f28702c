"""`refattn.draw.draw`: cell pictures and block aggregation."""

import numpy as np
import pytest

from refattn import Mask, RefattnError, patterns
from refattn.draw import draw


def test_cells(rng):
    b = rng.random((5, 7)) < 0.5
    pic = draw(Mask.from_dense(b))
    assert pic.splitlines() == ["".join("#" if x else "." for x in row) for row in b]


def test_blocks_aggregate_full_partial_empty():
    # 10 x 10 causal drawn at most 5 wide: 2 x 2 blocks; diagonal blocks are partial.
    pic = draw(patterns.Causal().mask(10, 10), max_size=5).splitlines()
    assert pic == ["+....", "#+...", "##+..", "###+.", "####+"]


def test_ragged_last_block_counts_only_its_cells():
    # 5 x 5 at max_size 3: blocks of 2 x 2 and a last block of 1 cell, which is full.
    m = Mask.full(5, 5)
    assert draw(m, max_size=3).splitlines() == ["###"] * 3


def test_groups_and_errors(rng):
    st = Mask.stack([[Mask.full(2, 2), Mask.empty(2, 2)]])
    assert draw(st, h=1) == "..\n.."
    with pytest.raises(RefattnError, match="expected a refattn.Mask"):
        draw(np.ones((2, 2), bool))
    with pytest.raises(RefattnError, match="max_size must be an int >= 1"):
        draw(st, max_size=0)
