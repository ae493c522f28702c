"""Connectivity of attention masks: how information flows through stacked layers.

One attention layer lets query ``i`` read key ``j`` iff ``mask[i, j]``; the layer's
output at position ``t`` is the next layer's key (and query) ``t``. Stacking layers
therefore follows paths in the directed graph on positions ``0 .. n-1`` that has an
edge ``j -> i`` for every allowed entry ``(i, j)``. This module measures that graph:

* `stats` - row counts and density of one mask (any ``Lq, Lk``);
* `hops` - the fewest layers through which key ``src`` reaches query ``dst``;
* `diameter` - the worst `hops` over a set of pairs (``"all"`` or ``"causal"``);
* `reachability` - which keys reach which queries through exactly ``K`` layers.

Everything but `stats` stacks self-attention and so needs a square mask
(``Lq == Lk``). The definitions and their costs are written in spec/analysis.md.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.sparse as sp
from scipy.sparse import csgraph

from ..errors import RefattnError
from ..mask import Mask

__all__ = ["PAIRS", "MaskStats", "diameter", "hops", "reachability", "stats"]

#: The pair sets `diameter` can take the worst case over.
PAIRS = ("all", "causal")

# `diameter` runs shortest paths from this many sources at once: the distance block is
# (sources x n) float64, so this bounds its memory at about 32 MiB for any n.
_DISTANCE_BLOCK_ENTRIES = 1 << 22


# ---- validation ------------------------------------------------------------------------

def _group(mask, b, h, fn: str) -> sp.csr_array:
    """The CSR of group ``(b, h)``, with errors that name the calling function."""
    if not isinstance(mask, Mask):
        raise RefattnError(f"{fn}: mask must be a refattn.Mask, got {type(mask).__name__}")
    try:
        return mask.group(b, h)
    except RefattnError as e:
        # Re-word "Mask.group: h must be ..." as this function's own argument error.
        raise RefattnError(f"{fn}: {str(e).removeprefix('Mask.group: ')}") from None


def _square_group(mask, b, h, fn: str) -> sp.csr_array:
    """Like `_group`, for the functions that stack layers: the output of one layer is
    the next layer's keys, which only makes sense when queries and keys are the same
    positions."""
    csr = _group(mask, b, h, fn)
    lq, lk = csr.shape
    if lq != lk:
        raise RefattnError(
            f"{fn}: mask must be square (Lq == Lk) to stack layers, got (Lq, Lk) = ({lq}, {lk})"
        )
    return csr


def _check_position(value, name: str, n: int, fn: str) -> int:
    # bool is an int subclass; True as a position is almost certainly a bug.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise RefattnError(f"{fn}: {name} must be an int in [0, {n}), got {value!r}")
    if not 0 <= value < n:
        raise RefattnError(f"{fn}: {name} must be in [0, {n}), got {value}")
    return int(value)


def _check_layers(value, fn: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise RefattnError(f"{fn}: layers must be an int >= 0, got {value!r}")
    return int(value)


# ---- stats -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MaskStats:
    """Size and row statistics of one ``(Lq, Lk)`` mask matrix.

    ``row_*`` describe the number of allowed keys per query row; ``empty_rows``
    counts rows with none (their output is defined in spec/semantics.md).
    """

    lq: int
    lk: int
    nnz: int
    density: float      # nnz / (lq * lk)
    row_min: int
    row_mean: float     # nnz / lq
    row_max: int
    empty_rows: int

    def to_dict(self) -> dict:
        """The fields as a dict of plain Python ints and floats (JSON-ready)."""
        return dataclasses.asdict(self)


def stats(mask: Mask, *, b: int = 0, h: int = 0) -> MaskStats:
    """Statistics of group ``(b, h)`` of ``mask`` (a 2-D mask has one group).

    Any ``(Lq, Lk)`` is accepted. O(Lq): only the CSR's row pointer is read.

    Raises `RefattnError` if ``mask`` is not a `Mask` or ``(b, h)`` is not a group.
    """
    csr = _group(mask, b, h, "stats")
    lq, lk = (int(x) for x in csr.shape)
    counts = np.diff(csr.indptr.astype(np.int64))
    nnz = int(counts.sum())
    return MaskStats(
        lq=lq, lk=lk, nnz=nnz, density=nnz / (lq * lk),
        row_min=int(counts.min()), row_mean=nnz / lq, row_max=int(counts.max()),
        empty_rows=int(np.count_nonzero(counts == 0)),
    )


# ---- the graph -------------------------------------------------------------------------

def _edges(csr: sp.csr_array) -> sp.csr_array:
    """The graph's adjacency in CSR form: row ``j`` lists the queries ``i`` that read key
    ``j``, i.e. the transpose of the mask (O(n + nnz))."""
    return sp.csr_array(csr.T)


def _successors(edges: sp.csr_array, frontier: np.ndarray) -> np.ndarray:
    """Concatenated adjacency rows of the positions in ``frontier`` (with repeats), in
    O(len(frontier) + their degrees) without a Python loop."""
    starts = edges.indptr[frontier].astype(np.int64)
    lengths = edges.indptr[frontier + 1].astype(np.int64) - starts
    total = int(lengths.sum())
    # Position p of the output reads indices[starts[r] + (p - first output slot of r)].
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return edges.indices[offsets + np.arange(total, dtype=np.int64)]


def _bfs_hops(edges: sp.csr_array, src: int, dst: int) -> int | float:
    """Breadth-first search from ``src``, one frontier per layer, stopping at ``dst``.

    Every position enters the frontier at most once, so the work is O(n + nnz).
    """
    n = edges.shape[0]
    reached = np.zeros(n, dtype=bool)
    reached[src] = True
    slot = np.empty(n, dtype=np.int64)      # scratch for de-duplicating a frontier
    frontier = np.array([src], dtype=np.int64)
    layer = 0
    while frontier.size:
        if reached[dst]:
            return layer
        layer += 1
        new = _successors(edges, frontier)
        new = new[~reached[new]]
        # De-duplicate in O(len(new)) rather than sorting: whichever write wins, exactly
        # one occurrence of each position finds its own index in `slot`.
        order = np.arange(new.size, dtype=np.int64)
        slot[new] = order
        frontier = new[slot[new] == order].astype(np.int64)
        reached[frontier] = True
    return math.inf      # the frontier died out before reaching dst


def hops(mask: Mask, src: int, dst: int, *, b: int = 0, h: int = 0) -> int | float:
    """The fewest stacked attention layers through which key ``src`` reaches query ``dst``.

    One layer lets query ``i`` read key ``j`` iff ``mask[i, j]``, and a layer's output at
    position ``t`` is the next layer's key ``t``. So this is the length of the shortest
    path ``src -> dst`` in the directed graph with an edge ``j -> i`` for every allowed
    ``(i, j)``. ``hops(m, t, t)`` is ``0``: a position needs no layer to reach itself.
    An unreachable ``dst`` gives ``math.inf``. Every layer uses the same mask (group
    ``(b, h)`` of a 4-D mask).

    This is the *fewest* layers. When the mask allows every diagonal entry (every causal
    and window pattern does), any deeper stack also connects the pair; without the
    diagonal a deeper stack may not (see `reachability`).

    Cost: a breadth-first search that stops at ``dst``, O(n + nnz) time and memory.

    Raises `RefattnError` if ``mask`` is not square (``Lq != Lk``) or ``src`` / ``dst``
    is not an int in ``[0, n)``.
    """
    csr = _square_group(mask, b, h, "hops")
    n = csr.shape[0]
    src = _check_position(src, "src", n, "hops")
    dst = _check_position(dst, "dst", n, "hops")
    return _bfs_hops(_edges(csr), src, dst)


def path(mask: Mask, src: int, dst: int, *, b: int = 0, h: int = 0) -> list[int] | None:
    """A shortest chain of positions through which key ``src`` reaches query ``dst``:
    ``[src, t_1, ..., dst]`` with ``hops(mask, src, dst) + 1`` entries, where layer ``k``
    lets query ``t_k`` read key ``t_{k-1}``; ``[src]`` when ``src == dst``; None when
    ``dst`` is unreachable.

    Of the shortest chains it returns the one whose positions are smallest, from ``dst``
    back: each position's predecessor is the smallest position of the previous layer's
    frontier that it reads. O(n + nnz), like `hops`.
    """
    csr = _square_group(mask, b, h, "path")
    n = csr.shape[0]
    src = _check_position(src, "src", n, "path")
    dst = _check_position(dst, "dst", n, "path")
    edges = _edges(csr)
    parent = np.full(n, -1, dtype=np.int64)
    reached = np.zeros(n, dtype=bool)
    reached[src] = True
    frontier = np.array([src], dtype=np.int64)
    while frontier.size and not reached[dst]:
        frontier = np.sort(frontier)
        new = _successors(edges, frontier)
        rows = np.repeat(frontier, np.diff(edges.indptr)[frontier])   # the frontier position each came from
        fresh = ~reached[new]
        new, rows = new[fresh], rows[fresh]
        # the first occurrence of each new position comes from the smallest frontier position
        first_new, first = np.unique(new, return_index=True)
        parent[first_new] = rows[first]
        reached[first_new] = True
        frontier = first_new
    if not reached[dst]:
        return None
    chain = [dst]
    while chain[-1] != src:
        chain.append(int(parent[chain[-1]]))
    return chain[::-1]


def diameter(mask: Mask, *, pairs: str = "all", b: int = 0, h: int = 0) -> int | float:
    """The worst `hops` over a set of ordered pairs ``(src, dst)``; ``math.inf`` if any of
    them is unreachable.

    ``pairs`` chooses the pairs that *should* be connected:

    * ``"all"`` - every ``src != dst``: how many layers until every position sees every
      other. Right for bidirectional masks; a causal mask always gives ``inf`` here,
      because a key never reaches an earlier query.
    * ``"causal"`` - every ``src < dst``: how many layers until every position sees every
      earlier one. Right for causal masks (and meaningful for any mask).

    With no pairs (``n == 1``) the diameter is ``0``.

    Cost: a shortest-path search from every source (SciPy's ``csgraph``, unweighted), so
    O(n * (n + nnz)) time up to a log factor and O(n) memory per source, processed in
    blocks of sources (about 32 MiB of distances at a time). Meant for ``n`` up to a few
    thousand.

    Raises `RefattnError` if ``mask`` is not square or ``pairs`` is not one of `PAIRS`.
    """
    if not isinstance(pairs, str) or pairs not in PAIRS:
        raise RefattnError(f"diameter: pairs must be one of {PAIRS}, got {pairs!r}")
    csr = _square_group(mask, b, h, "diameter")
    n = csr.shape[0]
    edges = _edges(csr)
    dst = np.arange(n)
    worst = 0.0
    block = max(1, _DISTANCE_BLOCK_ENTRIES // n)
    for first in range(0, n, block):
        src = np.arange(first, min(n, first + block))
        dist = csgraph.shortest_path(edges, method="D", directed=True, unweighted=True,
                                     indices=src)
        # Pairs outside the set count as 0, which changes no maximum; so does the "all"
        # case's diagonal, where dist[s, s] is 0 already.
        if pairs == "causal":
            dist = np.where(dst[None, :] > src[:, None], dist, 0.0)
        worst = max(worst, float(dist.max()))
        if math.isinf(worst):                          # nothing can exceed inf: stop early
            return math.inf
    return int(worst)


# ---- reachability ----------------------------------------------------------------------

def _bool_product(a: sp.csr_array, b: sp.csr_array) -> sp.csr_array:
    """Boolean matrix product: (i, j) is True iff a[i, t] and b[t, j] for some t.

    Computed as an integer product (path counts, at most n per entry, so int64 cannot
    overflow) and then reduced to True/False.
    """
    counts = sp.csr_array(a.astype(np.int64) @ b.astype(np.int64))
    counts.eliminate_zeros()
    out = counts.astype(bool)
    out.sort_indices()
    return out


def reachability(mask: Mask, layers: int, *, b: int = 0, h: int = 0) -> sp.csr_array:
    """Which keys reach which queries through exactly ``layers`` stacked layers.

    Entry ``(i, j)`` of the result (a boolean ``scipy.sparse.csr_array`` of shape
    ``(n, n)``, sorted indices, only True stored) is True iff there is a path of exactly
    ``layers`` edges from key ``j`` to query ``i``: the boolean matrix power ``M**layers``
    of the mask ``M``. ``layers == 0`` gives the identity (every position reaches itself,
    as ``hops(m, t, t) == 0``), ``layers == 1`` the mask itself.

    When the mask allows the whole diagonal (every causal and window pattern does), a
    position can idle for a layer, so "exactly K" equals "within K" layers: the entry is
    True iff ``hops(mask, j, i) <= layers``. Without the diagonal the two differ; in
    general ``hops(mask, j, i)`` is the least ``K`` whose power has ``(i, j)``.

    Cost: O(log K) sparse products by repeated squaring; the result may hold up to
    ``n * n`` entries (full connectivity), so this is for masks of modest size.

    Raises `RefattnError` if ``mask`` is not square or ``layers`` is not an int >= 0.
    """
    csr = _square_group(mask, b, h, "reachability")
    layers = _check_layers(layers, "reachability")
    n = csr.shape[0]
    result = sp.csr_array(sp.identity(n, dtype=bool, format="csr"))
    power = sp.csr_array(csr, dtype=bool, copy=True)   # M**(2**t), squared as bits are read
    while layers:
        if layers & 1:
            result = _bool_product(result, power)
        layers >>= 1
        if layers:                                      # skip the last, unused squaring
            power = _bool_product(power, power)
    return result
