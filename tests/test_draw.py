"""`refattn.draw`: cell pictures, block aggregation, and PNG pictures."""

import struct
import zlib

import numpy as np
import pytest

from refattn import Mask, RefattnError, patterns
from refattn.study.draw import draw, picture, png_bytes, write_png


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


def decode_png(data):
    """A minimal decoder for the 8-bit grayscale, filter-0 PNGs refattn writes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, colour) == (8, 0) and b"IEND" in chunks
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, w + 1)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:]


def test_png_round_trip_and_picture(tmp_path):
    m = patterns.SlidingWindow(1, 0).mask(5, 7)
    img = picture(m, max_size=7)
    np.testing.assert_array_equal(img, np.where(m.to_dense(), 0, 255))   # 1 pixel per cell
    np.testing.assert_array_equal(decode_png(png_bytes(img)), img)
    big = picture(m, max_size=70)                                        # magnified x10
    assert big.shape == (50, 70) and (big[::10, ::10] == img).all()
    assert write_png(m, tmp_path / "a.png", max_size=70) == (70, 50)
    np.testing.assert_array_equal(decode_png((tmp_path / "a.png").read_bytes()), big)


def test_picture_aggregates_and_draws_the_grid():
    m = patterns.Causal().mask(8, 8)
    agg = picture(m, max_size=4)                                         # 2x2 cells per pixel
    np.testing.assert_array_equal(agg[0], [64, 255, 255, 255])          # 3 of 4 allowed on the diagonal
    g = picture(m, max_size=16, grid=(4, 4))
    assert (g[8, :] == 128).all() and (g[:, 8] == 128).all()
    with pytest.raises(RefattnError, match="grid sizes must be ints >= 1"):
        picture(m, grid=(0, 4))
    with pytest.raises(RefattnError, match="picture: expected a refattn.Mask"):
        picture(np.ones((2, 2)))
