"""DeepSpeed's block-sparse ``SparsityConfig`` layouts (deepspeed/ops/sparse_attention/
sparsity_config.py): ``deepspeed_fixed``, ``deepspeed_variable``, ``deepspeed_bigbird`` and
``deepspeed_bslongformer``, parameter for parameter.

Each pattern's ``layout(seq_len, heads)`` returns the int64 ``[heads, nb, nb]`` array
DeepSpeed's ``make_layout(seq_len)`` returns for ``num_heads = heads``, built by the same
steps in the same order. DeepSpeed draws random blocks with Python's global ``random``;
refattn draws with ``random.Random(seed)``, making the same ``sample`` calls in the same
order, so its layout equals DeepSpeed's after ``random.seed(seed)`` (spec/patterns.md).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from ..errors import RefattnError
from ..mask import Mask
from .base import Pattern, check_bool, check_int, keep, register
from .block_sparse import mask_from_layout
from .stochastic import check_seed

ATTENTIONS = ("bidirectional", "unidirectional")


def _check_attention(value, name: str) -> str:
    if value not in ATTENTIONS:
        raise RefattnError(f"{name} must be one of {ATTENTIONS}, got {value!r}")
    return value


def _int_tuple(values, name: str, lowest: int = 0) -> tuple:
    try:
        seq = list(values)
    except TypeError:
        raise RefattnError(f"{name} must be a list of ints, got {values!r}") from None
    return tuple(check_int(v, f"{name}[...]", lowest) for v in seq)


def _check_global_ranges(starts: tuple, ends, name: str):
    if ends is None:
        return None
    ends = _int_tuple(ends, f"{name}.global_block_end_indices")
    if len(ends) != len(starts):
        raise RefattnError(f"{name}: global_block_indices and global_block_end_indices must have "
                           f"the same length, got {len(starts)} and {len(ends)}")
    for s, e in zip(starts, ends):
        if s >= e:
            raise RefattnError(f"{name}: global block start {s} must be < its end {e}")
    return ends


class _DeepSpeedLayout(Pattern):
    """Shared by the four: the element mask is the block layout expanded (``block`` x
    ``block`` tiles); ``Lq == Lk`` and a multiple of ``block``, as DeepSpeed requires."""

    def _layout_head(self, layout: np.ndarray, h: int, rng: random.Random) -> None:  # pragma: no cover
        raise NotImplementedError

    def layout(self, seq_len: int, heads: int = 1) -> np.ndarray:
        """DeepSpeed's ``make_layout(seq_len)`` for ``num_heads = heads``: int64 ``[heads, nb, nb]``."""
        seq_len = check_int(seq_len, "seq_len", 1)
        heads = check_int(heads, "heads", 1)
        if seq_len % self.block:
            raise RefattnError(f"{self.name}: the sequence length {seq_len} must be a multiple of "
                               f"block = {self.block} (as in DeepSpeed)")
        nb = seq_len // self.block
        layout = np.zeros((heads, nb, nb), np.int64)
        rng = random.Random(self.seed) if hasattr(self, "seed") else None
        for h in range(heads if self.different_layout_per_head else 1):
            self._layout_head(layout, h, rng)
        if not self.different_layout_per_head:
            layout[1:] = layout[0]
        return layout

    def _build_heads(self, lq: int, lk: int, heads: int | None) -> Mask:
        if lq != lk:
            raise RefattnError(f"{self.name} is a self-attention layout: need Lq == Lk, got ({lq}, {lk})")
        if heads is None or not self.different_layout_per_head:
            return mask_from_layout(self.layout(lq, 1)[0].astype(bool), self.block, lq, lk, self.name)
        return Mask.stack([[mask_from_layout(lay.astype(bool), self.block, lq, lk, self.name)
                            for lay in self.layout(lq, heads)]])


def _local_windows(layout, h, start, end, unidirectional):
    """DeepSpeed's local window over block rows and columns ``[start, end)``."""
    for row in range(start, end):
        layout[h, row, start:(row + 1 if unidirectional else end)] = 1


def _sliding(layout, h, w):
    """DeepSpeed's sliding window: ``|row - col| <= w // 2``."""
    nb = layout.shape[1]
    for row in range(nb):
        layout[h, row, max(0, row - w // 2):min(row + w // 2 + 1, nb)] = 1


def _global_indices(layout, h, starts, ends, horizontal, unidirectional):
    """Variable/BSLongformer global blocks: columns (from their own row down when
    unidirectional) and, with ``horizontal``, rows."""
    nb = layout.shape[1]
    spans = [(s, s + 1) for s in starts] if ends is None else list(zip(starts, ends))
    for s, e in spans:
        if s < nb:
            e = min(e, nb)
            if horizontal:
                layout[h, s:e, :] = 1
            layout[h, (s if unidirectional else 0):, s:e] = 1


@register
@dataclass(frozen=True)
class DeepSpeedFixed(_DeepSpeedLayout):
    """DeepSpeed ``FixedSparsityConfig``: local windows of ``num_local_blocks`` blocks and,
    in every window, ``num_global_blocks`` summary blocks counted from its end (head ``h``
    shifts them by ``h % num_different_global_patterns`` groups)."""

    block: int = 16
    num_local_blocks: int = 4
    num_global_blocks: int = 1
    attention: str = "bidirectional"
    horizontal_global_attention: bool = False
    num_different_global_patterns: int = 1
    different_layout_per_head: bool = False
    name = "deepspeed_fixed"

    def __post_init__(self):
        n = "deepspeed_fixed"
        keep(self, "block", check_int, f"{n}.block", 1)
        keep(self, "num_local_blocks", check_int, f"{n}.num_local_blocks", 1)
        keep(self, "num_global_blocks", check_int, f"{n}.num_global_blocks", 1)
        _check_attention(self.attention, f"{n}.attention")
        keep(self, "horizontal_global_attention", check_bool, f"{n}.horizontal_global_attention")
        keep(self, "num_different_global_patterns", check_int, f"{n}.num_different_global_patterns", 1)
        keep(self, "different_layout_per_head", check_bool, f"{n}.different_layout_per_head")
        if self.num_local_blocks % self.num_global_blocks:
            raise RefattnError(f"{n}: num_local_blocks ({self.num_local_blocks}) must be a multiple of "
                               f"num_global_blocks ({self.num_global_blocks})")
        if self.attention != "bidirectional" and self.horizontal_global_attention:
            raise RefattnError(f"{n}: horizontal_global_attention needs attention='bidirectional'")
        if self.num_different_global_patterns > 1 and not self.different_layout_per_head:
            raise RefattnError(f"{n}: num_different_global_patterns > 1 needs different_layout_per_head")
        if self.num_different_global_patterns > self.num_local_blocks // self.num_global_blocks:
            raise RefattnError(f"{n}: num_different_global_patterns must be <= num_local_blocks // "
                               f"num_global_blocks = {self.num_local_blocks // self.num_global_blocks}")

    def _layout_head(self, layout, h, rng):
        nb, L, G = layout.shape[1], self.num_local_blocks, self.num_global_blocks
        uni = self.attention == "unidirectional"
        for start in range(0, nb, L):
            _local_windows(layout, h, start, min(start + L, nb), uni)
        first = L - (1 + h % self.num_different_global_patterns) * G
        end = nb - nb % L
        starts = list(range(first, end, L))
        if end < nb:                                    # a short last window gets one too
            starts.append(min(end + first, nb - G))
        for s in starts:
            layout[h, (s if uni else 0):, s:s + G] = 1
            if self.horizontal_global_attention:
                layout[h, s:s + G, :] = 1


@register
@dataclass(frozen=True)
class DeepSpeedVariable(_DeepSpeedLayout):
    """DeepSpeed ``VariableSparsityConfig``: random blocks per row, local windows of the
    listed sizes (the last size repeats), global blocks at the listed indices (or ranges)."""

    block: int = 16
    num_random_blocks: int = 0
    local_window_blocks: tuple = (4,)
    global_block_indices: tuple = (0,)
    global_block_end_indices: tuple | None = None
    attention: str = "bidirectional"
    horizontal_global_attention: bool = False
    different_layout_per_head: bool = False
    seed: int = 0
    name = "deepspeed_variable"

    def __post_init__(self):
        n = "deepspeed_variable"
        keep(self, "block", check_int, f"{n}.block", 1)
        keep(self, "num_random_blocks", check_int, f"{n}.num_random_blocks", 0)
        windows = _int_tuple(self.local_window_blocks, f"{n}.local_window_blocks", 1)
        if not windows:
            raise RefattnError(f"{n}.local_window_blocks must not be empty")
        object.__setattr__(self, "local_window_blocks", windows)
        starts = _int_tuple(self.global_block_indices, f"{n}.global_block_indices")
        object.__setattr__(self, "global_block_indices", starts)
        object.__setattr__(self, "global_block_end_indices",
                           _check_global_ranges(starts, self.global_block_end_indices, n))
        _check_attention(self.attention, f"{n}.attention")
        keep(self, "horizontal_global_attention", check_bool, f"{n}.horizontal_global_attention")
        keep(self, "different_layout_per_head", check_bool, f"{n}.different_layout_per_head")
        if self.attention != "bidirectional" and self.horizontal_global_attention:
            raise RefattnError(f"{n}: horizontal_global_attention needs attention='bidirectional'")
        keep(self, "seed", check_seed, f"{n}.seed")

    def _layout_head(self, layout, h, rng):
        nb = layout.shape[1]
        uni = self.attention == "unidirectional"
        if nb < self.num_random_blocks:
            raise RefattnError(f"deepspeed_variable: num_random_blocks = {self.num_random_blocks} exceeds "
                               f"the {nb} blocks of a row")
        for row in range(nb):                           # DeepSpeed ignores `attention` here
            layout[h, row, rng.sample(range(nb), self.num_random_blocks)] = 1
        start = 0
        for size in self.local_window_blocks:
            _local_windows(layout, h, start, min(start + size, nb), uni)
            start += size
        for s in range(start, nb, self.local_window_blocks[-1]):
            _local_windows(layout, h, s, min(s + self.local_window_blocks[-1], nb), uni)
        _global_indices(layout, h, self.global_block_indices, self.global_block_end_indices,
                        self.horizontal_global_attention, uni)


@register
@dataclass(frozen=True)
class DeepSpeedBigBird(_DeepSpeedLayout):
    """DeepSpeed ``BigBirdSparsityConfig``: random blocks, a sliding window of
    ``num_sliding_window_blocks``, the first ``num_global_blocks`` blocks as global rows
    and columns; ``unidirectional`` keeps the lower block triangle."""

    block: int = 16
    num_random_blocks: int = 1
    num_sliding_window_blocks: int = 3
    num_global_blocks: int = 1
    attention: str = "bidirectional"
    different_layout_per_head: bool = False
    seed: int = 0
    name = "deepspeed_bigbird"

    def __post_init__(self):
        n = "deepspeed_bigbird"
        keep(self, "block", check_int, f"{n}.block", 1)
        keep(self, "num_random_blocks", check_int, f"{n}.num_random_blocks", 0)
        keep(self, "num_sliding_window_blocks", check_int, f"{n}.num_sliding_window_blocks", 0)
        keep(self, "num_global_blocks", check_int, f"{n}.num_global_blocks", 0)
        _check_attention(self.attention, f"{n}.attention")
        keep(self, "different_layout_per_head", check_bool, f"{n}.different_layout_per_head")
        keep(self, "seed", check_seed, f"{n}.seed")

    def _layout_head(self, layout, h, rng):
        nb = layout.shape[1]
        uni = self.attention == "unidirectional"
        for what in ("num_random_blocks", "num_sliding_window_blocks", "num_global_blocks"):
            if nb < getattr(self, what):
                raise RefattnError(f"deepspeed_bigbird: {what} = {getattr(self, what)} exceeds the {nb} blocks of a row")
        for row in range(nb):
            population = range(row + 1) if uni else range(nb)
            # DeepSpeed's own call fails when a causal row has fewer blocks than asked for;
            # refattn takes them all there (the same call whenever DeepSpeed's succeeds).
            layout[h, row, rng.sample(population, min(self.num_random_blocks, len(population)))] = 1
        _sliding(layout, h, self.num_sliding_window_blocks)
        layout[h, :self.num_global_blocks, :] = 1
        layout[h, :, :self.num_global_blocks] = 1
        if uni:
            layout[h] = np.tril(layout[h])


@register
@dataclass(frozen=True)
class DeepSpeedBSLongformer(_DeepSpeedLayout):
    """DeepSpeed ``BSLongformerSparsityConfig``: a sliding window of
    ``num_sliding_window_blocks`` plus global rows and columns at the listed block indices
    (or ranges); ``unidirectional`` keeps the lower block triangle."""

    block: int = 16
    num_sliding_window_blocks: int = 3
    global_block_indices: tuple = (0,)
    global_block_end_indices: tuple | None = None
    attention: str = "bidirectional"
    different_layout_per_head: bool = False
    name = "deepspeed_bslongformer"

    def __post_init__(self):
        n = "deepspeed_bslongformer"
        keep(self, "block", check_int, f"{n}.block", 1)
        keep(self, "num_sliding_window_blocks", check_int, f"{n}.num_sliding_window_blocks", 0)
        starts = _int_tuple(self.global_block_indices, f"{n}.global_block_indices")
        object.__setattr__(self, "global_block_indices", starts)
        object.__setattr__(self, "global_block_end_indices",
                           _check_global_ranges(starts, self.global_block_end_indices, n))
        _check_attention(self.attention, f"{n}.attention")
        keep(self, "different_layout_per_head", check_bool, f"{n}.different_layout_per_head")

    def _layout_head(self, layout, h, rng):
        nb = layout.shape[1]
        if nb < self.num_sliding_window_blocks:
            raise RefattnError(f"deepspeed_bslongformer: num_sliding_window_blocks = "
                               f"{self.num_sliding_window_blocks} exceeds the {nb} blocks of a row")
        _sliding(layout, h, self.num_sliding_window_blocks)
        _global_indices(layout, h, self.global_block_indices, self.global_block_end_indices, True, False)
        if self.attention == "unidirectional":
            layout[h] = np.tril(layout[h])
