"""Patterns drawn at random from a seed: `random` keys per row and BigBird's blocks.

Both use refattn's own draw (`_draw`, spec/patterns.md "The random draw"), a pure
function of ``(seed, head, row, step)``, so every head of every library that implements
the ten-line definition gets the same mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..alignment import DEFAULT_ALIGN
from ..errors import RefattnError
from ..mask import Mask, _index_dtype
from ._draw import draw
from .base import (Pattern, _finish, check_bool, check_int, keep, query_positions, register,
                   rows_from_block_csr)


def check_seed(seed, name: str) -> int:
    return check_int(seed, name, 0, 2**64 - 1)


def _per_head(build, heads: int | None) -> Mask:
    """``build(h)`` for head 0 (``heads=None``) or stacked for heads ``0 .. heads - 1``."""
    if heads is None:
        return build(0)
    return Mask.stack([[build(h) for h in range(heads)]])


@register
@dataclass(frozen=True)
class Random(Pattern):
    """``per_row`` keys per query row, drawn without replacement from ``0 .. n_i - 1``
    (``n_i = Lk``, or ``min(i' + 1, Lk)`` when ``causal``) by refattn's seeded draw; a row
    with fewer candidates takes them all. Head ``h`` draws with ``head = h``."""

    per_row: int
    seed: int = 0
    causal: bool = False
    name = "random"

    def __post_init__(self):
        keep(self, "per_row", check_int, "random.per_row", 0)
        keep(self, "seed", check_seed, "random.seed")
        keep(self, "causal", check_bool, "random.causal")

    def _draw_head(self, lq: int, lk: int, head: int) -> Mask:
        if self.causal:
            n = np.clip(query_positions(lq, lk, DEFAULT_ALIGN) + 1, 0, lk)
        else:
            n = np.full(lq, lk, np.int64)
        indptr, keys = draw(self.seed, head, n, np.full(lq, self.per_row, np.int64))
        keys = keys.astype(_index_dtype(keys.size, lk))
        return _finish(indptr, keys, lq, lk)

    def _build_heads(self, lq: int, lk: int, heads: int | None) -> Mask:
        return _per_head(lambda h: self._draw_head(lq, lk, h), heads)


def bigbird_global_blocks(num_global_blocks: int, nb: int) -> np.ndarray:
    """The first ``ceil(G / 2)`` and the last ``floor(G / 2)`` blocks, within ``[0, nb)``."""
    first = np.arange(min(-(-num_global_blocks // 2), nb))
    last = np.arange(max(nb - num_global_blocks // 2, 0), nb)
    return np.union1d(first, last).astype(np.int64)


def rank_to_block(rank: np.ndarray, excluded: np.ndarray) -> np.ndarray:
    """The ``rank``-th block (0-based) not in the row's ``excluded`` set: ``excluded`` is a
    row-aligned ``[len(rank), E]`` array, sorted per row, padded with a large sentinel.
    Walking the sorted exclusions in order, each one at or below the running answer
    pushes it up by one."""
    x = rank.copy()
    for c in range(excluded.shape[1]):
        x += excluded[:, c] <= x
    return x


def block_csr_from_pairs(rows: np.ndarray, cols: np.ndarray, nb_rows: int, nb_cols: int):
    """Sorted, de-duplicated block CSR ``(bindptr, bindices)`` from (row, col) pairs."""
    key = np.unique(rows.astype(np.int64) * nb_cols + cols)
    bindptr = np.searchsorted(key, np.arange(nb_rows + 1, dtype=np.int64) * nb_cols)
    return bindptr, key % nb_cols


@register
@dataclass(frozen=True)
class BigBird(Pattern):
    """BigBird ITC at block level (self-attention, ``Lq == Lk``; blocks of ``block``
    positions, the last one possibly shorter). Global blocks, the first
    ``ceil(G / 2)`` and last ``floor(G / 2)``, attend and are attended by every block;
    every other query block ``I`` sees the window ``|I - J| <= num_window_blocks // 2``,
    the global blocks, and ``num_random_blocks`` blocks drawn from the rest."""

    block: int
    num_window_blocks: int = 3
    num_global_blocks: int = 2
    num_random_blocks: int = 3
    seed: int = 0
    name = "bigbird"

    def __post_init__(self):
        keep(self, "block", check_int, "bigbird.block", 1)
        keep(self, "num_window_blocks", check_int, "bigbird.num_window_blocks", 1)
        if self.num_window_blocks % 2 == 0:
            raise RefattnError(f"bigbird.num_window_blocks must be odd (a centred window), "
                               f"got {self.num_window_blocks}")
        keep(self, "num_global_blocks", check_int, "bigbird.num_global_blocks", 0)
        keep(self, "num_random_blocks", check_int, "bigbird.num_random_blocks", 0)
        keep(self, "seed", check_seed, "bigbird.seed")

    def block_csr(self, nb: int, head: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The block layout of head ``head`` for ``nb`` blocks as a block CSR
        ``(bindptr, bindices)``: O(nb * (window + global + random)), never ``nb x nb``."""
        w = self.num_window_blocks // 2
        glob = bigbird_global_blocks(self.num_global_blocks, nb)
        is_global = np.zeros(nb, bool)
        is_global[glob] = True
        blocks = np.arange(nb, dtype=np.int64)
        win = blocks[:, None] + np.arange(-w, w + 1)[None, :]      # window of block I, clipped
        win_ok = (win >= 0) & (win < nb)
        # Random candidates exclude the window and the global blocks; `big` pads the
        # per-row exclusion list and sorts after every real block.
        big = np.int64(nb + 1)
        own_window = np.where(win_ok & ~is_global[np.clip(win, 0, nb - 1)], win, big)
        excluded = np.sort(np.concatenate([own_window, np.broadcast_to(glob, (nb, glob.size))], axis=1),
                           axis=1)
        n_free = nb - (excluded < big).sum(axis=1)
        k = np.where(is_global, 0, self.num_random_blocks)       # global rows see everything
        indptr, rank = draw(self.seed, head, n_free, k)
        owner = np.repeat(blocks, np.diff(indptr))
        rand = rank_to_block(rank, excluded[owner])
        pair_rows = [np.repeat(blocks, win.shape[1])[win_ok.ravel()], np.repeat(blocks, glob.size),
                     owner, np.repeat(glob, nb)]
        pair_cols = [win[win_ok], np.tile(glob, nb), rand, np.tile(blocks, glob.size)]
        return block_csr_from_pairs(np.concatenate(pair_rows), np.concatenate(pair_cols), nb, nb)

    def _head(self, n: int, head: int) -> Mask:
        nb = -(-n // self.block)
        bindptr, bindices = self.block_csr(nb, head)
        return rows_from_block_csr(bindptr, bindices, self.block, n, n)

    def _build_heads(self, lq: int, lk: int, heads: int | None) -> Mask:
        if lq != lk:
            raise RefattnError(f"bigbird is a self-attention pattern: need Lq == Lk, got ({lq}, {lk})")
        return _per_head(lambda h: self._head(lq, h), heads)

