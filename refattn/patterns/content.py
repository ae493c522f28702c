"""Content-dependent patterns: the keys are chosen from the values of q and k.

`lsh` (Reformer), `routing` (Routing Transformer), `topk`, `nsa_select` (DeepSeek NSA's
selection branch) and `moba` (MoBA). Each selection is a pure function of the
parameters, the seed and the inputs, computed in float64 in the order spec/patterns.md
("Content-dependent patterns") states, so the same inputs give the same mask on every
machine (up to the last bit of numpy's exp in grouped nsa_select); the mask is the
realized selection, and gradients flow through attention on it only. The masks are
assembled straight as CSR (`_assemble`): no ``Lq x Lk`` array is built; `topk` without
a base scores every (query, key) pair, in blocks of rows.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import numpy as np

from ..alignment import DEFAULT_ALIGN
from ..errors import RefattnError
from ..mask import Mask
from . import _assemble, _dots
from ._draw import draw, hash_normals
from ._inputs import Inputs
from .base import Pattern, check_bool, check_int, check_lengths, keep, query_positions, register, rows_from_ranges
from .stochastic import check_seed


#: Bounds of the parameters whose cost is not the mask's size: hashing costs ``hashes x
#: buckets / 2 x D`` per position, clustering ``iterations x clusters x D`` (spec/patterns.md,
#: "Parameters"). Far past the published settings (Reformer: 8 rounds, tens to thousands of
#: buckets), and short of a run that does not end.
MAX_BUCKETS = 2**14
MAX_HASHES = 64
MAX_ITERATIONS = 1000


# ---- float64 arithmetic in the stated order -----------------------------------------------------
def ordered_dots(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``x @ y.T`` for ``x (n, D)``, ``y (m, D)``, summed in increasing d with every product
    and sum rounded (compiled, `_dots`; no BLAS, whose summation order depends on the
    machine)."""
    return _finite_scores(_dots.all_pairs(x, y))


def ordered_pair_dots(x: np.ndarray, y: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``x[rows[e]] . y[cols[e]]`` for every pair ``e``, in the order of `ordered_dots`."""
    return _finite_scores(_dots.listed_pairs(x, y, rows, cols))


def first_argmax(x: np.ndarray, y: np.ndarray, *, both_signs: bool = False) -> np.ndarray:
    """For each row of ``x``, the first index of the largest of ``x . y_c`` (with
    ``both_signs``: of ``concat(x . y_c, -x . y_c)``), rows taken in blocks of
    `_assemble.ROW_BUDGET` scores."""
    out = np.empty(x.shape[0], np.int64)
    step = _assemble.rows_per_block(y.shape[0] * (2 if both_signs else 1))
    for lo in range(0, x.shape[0], step):
        s = ordered_dots(x[lo:lo + step], y)
        out[lo:lo + step] = np.argmax(np.concatenate([s, -s], axis=1) if both_signs else s, axis=1)
    return out


def _finite_scores(s: np.ndarray) -> np.ndarray:
    if not np.isfinite(s).all():
        raise RefattnError("pattern mask: a score q . k overflows float64; the inputs are too "
                           "large to rank: scale them down")
    return s


def ordered_block_means(k: np.ndarray, block: int, *, partial: bool) -> np.ndarray:
    """Means over consecutive blocks of ``block`` rows of ``k (..., L, D)``: each block's
    rows summed in increasing position, divided by its row count. ``partial``: the last,
    shorter block too (else complete blocks only)."""
    L = k.shape[-2]
    nb = -(-L // block) if partial else L // block
    out = np.empty(k.shape[:-2] + (nb, k.shape[-1]))
    for c in range(nb):
        rows = k[..., c * block:min((c + 1) * block, L), :]
        s = rows[..., 0, :].copy()
        for j in range(1, rows.shape[-2]):
            s += rows[..., j, :]
        out[..., c, :] = s / rows.shape[-2]
    return out


def _unit_exponent_rows(x: np.ndarray) -> np.ndarray:
    """Each row of ``x`` times the power of two that brings its largest magnitude into
    ``[0.5, 1)``. The scaling is exact, so what is computed from the result equals what is
    computed from ``x`` wherever that neither overflows nor underflows, and stays finite
    where it would; used where the result is invariant to scaling a row."""
    _, e = np.frexp(np.max(np.abs(x), axis=1, initial=0.0))
    return np.ldexp(x, -e[:, None])


def _normalized(x: np.ndarray) -> np.ndarray:
    """``x / |x|`` per row, ``|x| = sqrt(x . x)`` summed in increasing d; zero rows stay zero
    (after `_unit_exponent_rows`, so huge and tiny rows normalise too)."""
    x = _unit_exponent_rows(x)
    sq = np.zeros(x.shape[0])
    for d in range(x.shape[1]):
        sq += x[:, d] * x[:, d]
    norm = np.sqrt(sq)
    return np.divide(x, norm[:, None], out=np.zeros_like(x), where=norm[:, None] > 0)


def _causal_limit(causal: bool, lq: int, lk: int) -> np.ndarray | None:
    """The last key ``i'`` each query may see under ``causal`` (default alignment, bottom_right)."""
    return query_positions(lq, lk, DEFAULT_ALIGN) if causal else None


class _ContentPattern(Pattern):
    """A pattern whose mask needs the inputs (``mask(lq, lk, q=..., k=...)``)."""

    @property
    def content_dependent(self) -> bool:
        return True

    def _mask(self, lq: int, lk: int, heads: int | None, inputs) -> Mask:
        return self._build_content(lq, lk, inputs)


# ---- lsh ------------------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class Lsh(_ContentPattern):
    """Reformer's angular LSH: positions hashed by ``argmax(concat(x R, -x R))`` with
    seeded rotations ``R`` per head and round; ``hashes`` rounds are united. ``chunk=None``:
    same bucket in some round; ``chunk=C``: the sorted (round, bucket, position) sequence is
    cut into chunks of C, each attending itself and the previous chunk (cyclically).
    ``shared_qk`` (Reformer's shared query-key space, ``Lq == Lk``, ``k`` unread): a position
    attends itself only when it has no other key."""

    buckets: int
    hashes: int = 1
    chunk: int | None = None
    shared_qk: bool = True
    causal: bool = False
    seed: int = 0
    name = "lsh"

    def __post_init__(self):
        keep(self, "buckets", check_int, "lsh.buckets", 2, MAX_BUCKETS)
        if self.buckets % 2:
            raise RefattnError(f"lsh.buckets must be even (argmax over x R and -x R), got {self.buckets}")
        keep(self, "hashes", check_int, "lsh.hashes", 1, MAX_HASHES)
        if self.chunk is not None:
            keep(self, "chunk", check_int, "lsh.chunk", 1)
        keep(self, "shared_qk", check_bool, "lsh.shared_qk")
        keep(self, "causal", check_bool, "lsh.causal")
        keep(self, "seed", check_seed, "lsh.seed")
        if self.chunk is not None and not self.shared_qk:
            raise RefattnError("lsh.chunk needs shared_qk=True: chunks of separately sorted queries "
                               "and keys would pair unrelated buckets")

    def rotations(self, head: int, dim: int) -> np.ndarray:
        """``R[r]`` of shape ``(hashes, D, buckets / 2)`` for query head ``head``."""
        half = self.buckets // 2
        return np.stack([hash_normals(self.seed, head, r, dim * half).reshape(dim, half)
                         for r in range(self.hashes)])

    def hash(self, x: np.ndarray, head: int) -> np.ndarray:
        """Buckets ``(hashes, n)`` of the rows of ``x (n, D)``: the first index of the
        largest of ``concat(x R, -x R)``."""
        x = _unit_exponent_rows(x)            # the hash is invariant to scaling a row
        return np.stack([first_argmax(x, rot.T, both_signs=True)
                         for rot in self.rotations(head, x.shape[1])])

    def _build_content(self, lq: int, lk: int, inputs: Inputs) -> Mask:
        if self.shared_qk and lq != lk:
            raise RefattnError(f"lsh with shared_qk=True shares positions: need Lq == Lk, got ({lq}, {lk})")
        q = inputs.q
        k = None if self.shared_qk else inputs.need_k(self.name)
        limit = _causal_limit(self.causal, lq, lk)

        def build(b, h):
            qb = self.hash(q[b, h], h)
            if not self.shared_qk:
                kb = self.hash(k[b, inputs.kv_head(h)], h)
                return functools.reduce(operator.or_, (_assemble.same_label(qr, kr, lk, limit)
                                                       for qr, kr in zip(qb, kb)))
            if self.chunk is None:
                allowed = functools.reduce(operator.or_, (_assemble.same_label(qr, qr, lk, limit)
                                                          for qr in qb))
            else:
                allowed = self._chunked(qb, lq, limit)
            return _assemble.drop_self_unless_alone(allowed)
        return inputs.finish(build)

    def _chunked(self, buckets: np.ndarray, n: int, limit: np.ndarray | None) -> Mask:
        """Sort each round by (bucket, position), concatenate the rounds, cut into chunks
        of ``chunk``: an item sees its chunk and the previous one (cyclically)."""
        order = np.concatenate([np.argsort(b, kind="stable") for b in buckets])   # positions
        C, items = self.chunk, order.size
        chunk = np.arange(items) // C
        own = chunk * C
        prev = (chunk - 1) % -(-items // C) * C                   # chunk -1 is the last one
        lo = np.stack([own, prev], axis=1)
        hi = np.minimum(lo + C, items)
        counts, seen = _assemble.expand_ranges(lo, hi)            # item s sees items seen[...]
        rows, cols = np.repeat(order, counts), order[seen]
        if limit is not None:
            keep = cols <= limit[rows]
            rows, cols = rows[keep], cols[keep]
        return _assemble.from_pairs(rows, cols, n, n)


# ---- routing ----------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class Routing(_ContentPattern):
    """The Routing Transformer's spherical k-means on the normalised queries and keys of
    each (batch, head): seeded initial centroids, ``iterations`` Lloyd rounds, then query
    ``i`` attends key ``j`` iff they share the nearest centroid (and ``j <= i'`` with
    ``causal``)."""

    clusters: int
    iterations: int = 10
    causal: bool = False
    seed: int = 0
    name = "routing"

    def __post_init__(self):
        keep(self, "clusters", check_int, "routing.clusters", 1, MAX_BUCKETS)
        keep(self, "iterations", check_int, "routing.iterations", 0, MAX_ITERATIONS)
        keep(self, "causal", check_bool, "routing.causal")
        keep(self, "seed", check_seed, "routing.seed")

    def assign(self, x: np.ndarray, head: int, batch: int) -> np.ndarray:
        """Cluster of each row of the normalised points ``x (N, D)`` (spec order)."""
        n, C = x.shape[0], self.clusters
        if C > n:
            raise RefattnError(f"routing.clusters = {C} exceeds the {n} queries and keys to cluster")
        _, first = draw(self.seed, head, np.array([n]), np.array([C]), first_row=batch)
        mu = x[first].copy()
        for _ in range(self.iterations):
            label = first_argmax(x, mu)
            sums = np.stack([np.bincount(label, weights=x[:, d], minlength=C)    # in increasing p
                             for d in range(x.shape[1])], axis=1)
            norm = np.sqrt(sum(sums[:, d] * sums[:, d] for d in range(x.shape[1])))
            moved = norm > 0                                  # empty clusters and zero sums stay
            mu[moved] = sums[moved] / norm[moved, None]
        return first_argmax(x, mu)

    def _build_content(self, lq: int, lk: int, inputs: Inputs) -> Mask:
        q, k = inputs.q, inputs.need_k(self.name)
        limit = _causal_limit(self.causal, lq, lk)

        def build(b, h):
            x = np.concatenate([_normalized(q[b, h]), _normalized(k[b, inputs.kv_head(h)])])
            label = self.assign(x, h, b)
            return _assemble.same_label(label[:lq], label[lq:], lk, limit)
        return inputs.finish(build)


# ---- topk ---------------------------------------------------------------------------------------
@register
@dataclass(frozen=True)
class TopK(_ContentPattern):
    """Each query keeps the ``k`` keys of highest score ``q_i k_j^T`` among those ``base``
    allows (None: every key); ties go to the lower key index."""

    k: int
    base: Pattern | None = None
    name = "topk"

    def __post_init__(self):
        keep(self, "k", check_int, "topk.k", 0)
        if self.base is not None and not isinstance(self.base, Pattern):
            raise RefattnError(f"topk.base must be a pattern or None, got {self.base!r}")

    @classmethod
    def _from_params(cls, params: dict) -> Pattern:
        params = dict(params)
        if isinstance(params.get("base"), dict):
            from .base import from_dict
            params["base"] = from_dict(params["base"])
        return cls(**params)

    def _build_content(self, lq: int, lk: int, inputs: Inputs) -> Mask:
        q, k = inputs.q, inputs.need_k(self.name)
        if self.base is not None:
            base = self.base._mask(lq, lk, None if inputs.single else inputs.heads, inputs)
            bm, hm = base.group_shape

        def build(b, h):
            qh, kh = q[b, h], k[b, inputs.kv_head(h)]
            if self.base is None:
                return _assemble.from_row_parts(list(self._top_of_all(qh, kh)), lq, lk)
            return self._top_of_candidates(qh, kh, base.group(b % bm, h % hm))
        return inputs.finish(build)

    def _top_of_all(self, qh: np.ndarray, kh: np.ndarray):
        """Every key a candidate: rows in blocks of `_assemble.ROW_BUDGET` scores."""
        lq, lk = qh.shape[0], kh.shape[0]
        keep = min(self.k, lk)
        step = _assemble.rows_per_block(lk)
        for lo in range(0, lq, step):
            best = _assemble.top_of_rows(ordered_dots(qh[lo:lo + step], kh), keep)
            yield np.full(min(step, lq - lo), keep, np.int64), best

    def _top_of_candidates(self, qh: np.ndarray, kh: np.ndarray, base) -> Mask:
        """The base's keys as candidates, scored on its nonzeros only."""
        lq, lk = base.shape
        indptr, indices = base.indptr.astype(np.int64), base.indices
        parts, lo = [], 0
        while lo < lq:     # rows whose candidates fit the budget (at least one row)
            hi = max(lo + 1, int(np.searchsorted(indptr, indptr[lo] + _assemble.ROW_BUDGET, "right")) - 1)
            hi = min(hi, lq)
            ptr = indptr[lo:hi + 1] - indptr[lo]
            cols = indices[indptr[lo]:indptr[hi]]
            rows = np.repeat(np.arange(hi - lo), np.diff(ptr))
            kept = _assemble.top_per_row(ptr, rows, ordered_pair_dots(qh[lo:hi], kh, rows, cols), self.k)
            parts.append((np.bincount(rows[kept], minlength=hi - lo), cols[kept]))
            lo = hi
        return _assemble.from_row_parts(parts, lq, lk)


# ---- block selection: nsa_select, moba ----------------------------------------------------------
def _select_blocks(t: np.ndarray, rank_key, extra: int, block: int, lk: int) -> Mask:
    """Query rows at positions ``t`` keep their current block ``t // block`` and the
    ``extra`` earlier blocks of smallest key (lower block first on ties); then every key
    of a kept block with ``j <= t``. ``t < 0``: an empty row. ``rank_key(lo, hi)`` gives
    the keys of rows ``lo .. hi - 1`` for every block, ``(hi - lo, nb)``; rows are taken
    in blocks of `_assemble.ROW_BUDGET` keys."""
    lq, nb = t.size, -(-lk // block)
    take = min(extra, nb)
    parts = []
    step = _assemble.rows_per_block(nb)
    for lo in range(0, lq, step):
        tt = t[lo:lo + step]
        current = np.where(tt >= 0, tt // block, -1)
        earlier = np.arange(nb)[None, :] < current[:, None]
        key = np.where(earlier, rank_key(lo, lo + tt.size), np.inf)
        chosen = np.argsort(key, axis=1, kind="stable")[:, :take]
        chosen = np.sort(np.where(np.take_along_axis(earlier, chosen, axis=1), chosen, -1), axis=1)
        # Ranges per row: the chosen earlier blocks (complete: they end before t), then
        # the current block up to t; an unused slot (-1) or a row with t < 0 is empty.
        first = np.concatenate([chosen, current[:, None]], axis=1) * block
        last = np.concatenate([first[:, :-1] + block, (tt + 1)[:, None]], axis=1)
        last = np.where(first < 0, first, last)
        parts.append(_assemble.expand_ranges(first, last))
    return _assemble.from_row_parts(parts, lq, lk)


def _check_scale(scale, name: str):
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not math.isfinite(scale) or scale <= 0:
        raise RefattnError(f"{name} must be a finite number > 0 or None, got {scale!r}")
    return float(scale)


@register
@dataclass(frozen=True)
class NsaSelect(_ContentPattern):
    """DeepSeek NSA's selection branch (causal): each query keeps its current key block
    and the ``top_n - 1`` earlier blocks of highest compressed-attention importance
    (softmax of ``scale q_t kbar_c^T``, ``kbar_c`` the block's mean key, over complete past
    blocks, summed over a GQA group, which selects together); then the kept blocks' keys
    ``j <= t``."""

    block: int
    top_n: int
    scale: float | None = None
    name = "nsa_select"

    def __post_init__(self):
        keep(self, "block", check_int, "nsa_select.block", 1)
        keep(self, "top_n", check_int, "nsa_select.top_n", 1)
        _check_scale(self.scale, "nsa_select.scale")

    def _build_content(self, lq: int, lk: int, inputs: Inputs) -> Mask:
        q, k = inputs.q, inputs.need_k(self.name)
        t = query_positions(lq, lk, DEFAULT_ALIGN)
        nb = -(-lk // self.block)
        group = inputs.heads // k.shape[1]
        scale = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        kbar = ordered_block_means(k, self.block, partial=False)          # complete blocks
        nc = kbar.shape[-2]

        def importance(b, g):
            """``rank_key(lo, hi)`` of kv head g's group: minus the importance, smaller first."""
            def rank_key(lo, hi):
                key = np.full((hi - lo, nb), np.inf)
                if group == 1:      # softmax is monotone: the scores order the blocks exactly
                    key[:, :nc] = -ordered_dots(q[b, g, lo:hi], kbar[b, g])
                    return key
                visible = np.arange(nc)[None, :] < ((t[lo:hi] + 1) // self.block)[:, None]
                total = np.zeros((hi - lo, nc))
                for h in range(g * group, (g + 1) * group):     # heads in increasing order
                    with np.errstate(over="ignore"):
                        s = _finite_scores(scale * ordered_dots(q[b, h, lo:hi], kbar[b, g]))
                    s = np.where(visible, s, -np.inf)
                    m = np.max(s, axis=1, initial=-np.inf)
                    e = np.exp(s - np.where(m > -np.inf, m, 0)[:, None])
                    den = np.cumsum(e, axis=1)[:, -1:] if nc else np.zeros((hi - lo, 1))  # in increasing c
                    total += np.divide(e, den, out=np.zeros_like(e), where=den > 0)
                key[:, :nc] = -total
                return key
            return rank_key

        cache = {}

        def build(b, h):
            g = inputs.kv_head(h)
            if (b, g) not in cache:     # the group selects together: one mask for its heads
                cache[b, g] = _select_blocks(t, importance(b, g), self.top_n - 1, self.block, lk)
            return cache[b, g]
        return inputs.finish(build)


def nsa_compress(x, block: int) -> np.ndarray:
    """NSA's compressed keys (or values) by block means: ``x (..., L, D)`` to
    ``(..., L // block, D)``, complete blocks only, summed in increasing position."""
    check_int(block, "block", 1)
    x = np.asarray(x, np.float64)
    if x.ndim < 2 or x.shape[-2] < block:
        raise RefattnError(f"nsa_compress: need (..., L, D) with L >= block = {block}, got shape {x.shape}")
    return ordered_block_means(x, block, partial=False)


def nsa_compressed_mask(lq: int, lk: int, block: int) -> Mask:
    """The compressed branch's ``(Lq, Lk // block)`` mask: query position ``t = i'`` sees
    compressed key ``c`` iff ``(c + 1) * block - 1 <= t`` (complete past blocks)."""
    lq, lk = check_lengths(lq, lk)
    check_int(block, "block", 1)
    if lk < block:
        raise RefattnError(f"nsa_compressed_mask: Lk = {lk} has no complete block of {block}")
    t = query_positions(lq, lk, DEFAULT_ALIGN)
    return rows_from_ranges(np.zeros(lq, np.int64), (t + 1) // block, lq, lk // block)


@register
@dataclass(frozen=True)
class Moba(_ContentPattern):
    """MoBA's block selection (causal): each query keeps its current key block and the
    ``top_k - 1`` earlier blocks of highest gate ``q_i kbar_c^T``, ``kbar_c`` the block's
    mean key; then the kept blocks' keys ``j <= t``. Each head selects for itself."""

    block: int
    top_k: int
    name = "moba"

    def __post_init__(self):
        keep(self, "block", check_int, "moba.block", 1)
        keep(self, "top_k", check_int, "moba.top_k", 1)

    def _build_content(self, lq: int, lk: int, inputs: Inputs) -> Mask:
        q, k = inputs.q, inputs.need_k(self.name)
        t = query_positions(lq, lk, DEFAULT_ALIGN)
        kbar = ordered_block_means(k, self.block, partial=True)

        def build(b, h):
            qh, kbh = q[b, h], kbar[b, inputs.kv_head(h)]
            return _select_blocks(t, lambda lo, hi: -ordered_dots(qh[lo:hi], kbh),
                                  self.top_k - 1, self.block, lk)
        return inputs.finish(build)


def sample_inputs(lq: int, lk: int, *, heads: int = 1, dim: int = 16, seed: int = 0):
    """``q (1, heads, Lq, dim)`` and ``k (1, heads, Lk, dim)``, standard normal from
    ``numpy.random.default_rng(seed)`` (q first): the inputs `refattn show` and
    `refattn explain` give content-dependent patterns."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((1, heads, lq, dim)), rng.standard_normal((1, heads, lk, dim))
