"""Pictures of masks: text (a character per cell, or per block above a size) and PNG."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

from ..errors import RefattnError
from ..mask import Mask


def _block_counts(mask: Mask, max_size: int, b: int, h: int, what: str):
    """Allowed cells per picture cell (blocks of ``bq x bk`` matrix cells, so the picture is
    at most ``max_size`` on a side) and the number of matrix cells in each. O(nnz + picture)."""
    if not isinstance(mask, Mask):
        raise RefattnError(f"{what}: expected a refattn.Mask, got {type(mask).__name__}")
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise RefattnError(f"{what}: max_size must be an int >= 1, got {max_size!r}")
    csr = mask.group(b, h)
    lq, lk = mask.matrix_shape
    bq, bk = math.ceil(lq / max_size), math.ceil(lk / max_size)
    nq, nk = math.ceil(lq / bq), math.ceil(lk / bk)
    rows = np.repeat(np.arange(lq), np.diff(csr.indptr))
    counts = np.zeros((nq, nk), np.int64)
    np.add.at(counts, (rows // bq, csr.indices // bk), 1)
    # cells per block, with the ragged last row/column of blocks
    hq = np.minimum(bq, lq - np.arange(nq) * bq)[:, None]
    hk = np.minimum(bk, lk - np.arange(nk) * bk)[None, :]
    return counts, hq * hk, (bq, bk)


def draw(mask: Mask, *, max_size: int = 64, b: int = 0, h: int = 0) -> str:
    """The mask of group ``(b, h)`` as text, a row of characters per query row.

    ``#`` allowed, ``.`` removed. When ``Lq`` or ``Lk`` exceeds ``max_size``, cells are
    aggregated into blocks so the picture is at most ``max_size`` wide and tall:
    ``#`` a full block, ``+`` a partial one, ``.`` an empty one. O(nnz + picture)."""
    counts, cells, _ = _block_counts(mask, max_size, b, h, "draw")
    chars = np.where(counts == 0, ".", np.where(counts == cells, "#", "+"))
    return "\n".join("".join(r) for r in chars)


def png_bytes(gray: np.ndarray) -> bytes:
    """An 8-bit grayscale PNG of ``gray`` (uint8, ``[height, width]``), written directly
    (zlib + CRC chunks): no plotting library needed, one pixel per array element."""
    height, width = gray.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = np.concatenate([np.zeros((height, 1), np.uint8), gray.astype(np.uint8)], axis=1)  # filter 0
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)) + chunk(b"IEND", b""))


def picture(mask: Mask, *, max_size: int = 512, b: int = 0, h: int = 0,
            grid: tuple[int, int] | None = None) -> np.ndarray:
    """The mask of group ``(b, h)`` as a grayscale image (uint8): black allowed, white
    removed, gray the fraction allowed when cells are aggregated (above ``max_size``).
    Small masks are magnified to about ``max_size`` pixels. ``grid=(block_q, block_k)``
    draws mid-gray lines on the tile boundaries (when each cell has at least 2 pixels)."""
    counts, cells, (bq, bk) = _block_counts(mask, max_size, b, h, "picture")
    img = np.rint(255 * (1 - counts / cells)).astype(np.uint8)
    scale = max(1, max_size // max(img.shape))
    img = np.repeat(np.repeat(img, scale, axis=0), scale, axis=1)
    if grid is not None:
        gq, gk = (_check_block(v, "picture: grid") for v in grid)
        if scale >= 2 and bq == bk == 1:
            img[np.arange(gq, counts.shape[0], gq) * scale, :] = 128
            img[:, np.arange(gk, counts.shape[1], gk) * scale] = 128
    return img


def _check_block(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise RefattnError(f"{what} sizes must be ints >= 1, got {value!r}")
    return int(value)


def write_png(mask: Mask, path, **kw) -> tuple[int, int]:
    """Write `picture` ``(mask, **kw)`` to ``path`` as PNG; returns ``(width, height)``."""
    img = picture(mask, **kw)
    try:
        with open(path, "wb") as f:
            f.write(png_bytes(img))
    except OSError as e:
        raise RefattnError(f"cannot write {path}: {e.strerror}") from None
    return img.shape[1], img.shape[0]
