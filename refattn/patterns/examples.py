"""One representative instance of every registered pattern for given lengths.

Test matrices (the cross-backend tests, the golden suite) iterate over every pattern
without knowing each one's parameters: ``example(name, lq, lk)`` picks small parameters
that fit the lengths, or returns None where the pattern cannot apply (a self-attention
layout with ``Lq != Lk``, a grid that does not factor). A new pattern joins every matrix
by adding its line here; ``tests/test_pattern_examples.py`` fails until it does. The
content-dependent ones build with the inputs: ``p.mask(lq, lk, heads=H, q=q, k=k)``
(every pattern accepts them, so callers always pass them).
"""

from __future__ import annotations

import math

import numpy as np

from . import base
from .basic import Causal, Dense
from .block_sparse import BlockSparse
from .content import Lsh, Moba, NsaSelect, Routing, TopK
from .deepspeed import DeepSpeedBigBird, DeepSpeedBSLongformer, DeepSpeedFixed, DeepSpeedVariable
from .global_tokens import GlobalTokens
from .longformer import Longformer
from .neighborhood import Neighborhood2D
from .sparse_transformer import Fixed, Strided, StridedDilated, StridedLocal
from .stochastic import BigBird, Random
from .windows import ChunkedCausal, DilatedSlidingWindow, Document, PrefixLM, SinkWindow, SlidingWindow


def _block_layout(lq: int, lk: int, block: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((-(-lq // block), -(-lk // block))) < 0.5


def _documents(n: int):
    cuts = sorted({max(1, n // 3), max(1, 2 * n // 3)} - {n})
    return Document(lengths=tuple(np.diff([0, *cuts, n]).tolist()), causal=True)


def _grid(n: int):
    h = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    w = n // h
    return Neighborhood2D(h, w, kernel=min(3, h), causal=False) if h >= 2 else None


def _deepspeed(n: int, make):
    block = 2 if n % 2 == 0 else 1
    return make(block) if n // block >= 3 else None


_SELF = {                      # patterns that need Lq == Lk, by their length alone
    "bigbird": lambda n, s: BigBird(block=2, num_window_blocks=3, num_global_blocks=2, num_random_blocks=1, seed=s),
    "document": lambda n, s: _documents(n),
    "neighborhood_2d": lambda n, s: _grid(n),
    "deepspeed_fixed": lambda n, s: _deepspeed(n, lambda b: DeepSpeedFixed(block=b, num_local_blocks=2)),
    "deepspeed_variable": lambda n, s: _deepspeed(n, lambda b: DeepSpeedVariable(
        block=b, num_random_blocks=1, local_window_blocks=(1, 2), global_block_indices=(0,), seed=s)),
    "deepspeed_bigbird": lambda n, s: _deepspeed(n, lambda b: DeepSpeedBigBird(block=b, seed=s)),
    "deepspeed_bslongformer": lambda n, s: _deepspeed(n, lambda b: DeepSpeedBSLongformer(block=b)),
    "lsh": lambda n, s: Lsh(buckets=4, hashes=2, chunk=4, seed=s),
}

_ANY = {                       # patterns defined for any (Lq, Lk)
    "dense": lambda lq, lk, s: Dense(),
    "causal": lambda lq, lk, s: Causal(),
    "sliding_window": lambda lq, lk, s: SlidingWindow(3, 1),
    "dilated_sliding_window": lambda lq, lk, s: DilatedSlidingWindow(4, 2, 2),
    "global_tokens": lambda lq, lk, s: GlobalTokens(sorted({0, min(lq, lk) // 2})),
    "random": lambda lq, lk, s: Random(3, seed=s),
    "block_sparse": lambda lq, lk, s: BlockSparse(_block_layout(lq, lk, 4, s), 4),
    "strided": lambda lq, lk, s: Strided(4),
    "strided_local": lambda lq, lk, s: StridedLocal(3),
    "strided_dilated": lambda lq, lk, s: StridedDilated(3),
    "fixed": lambda lq, lk, s: Fixed(4, 1),
    "longformer": lambda lq, lk, s: Longformer(4, 1, (0,)),
    "prefix_lm": lambda lq, lk, s: PrefixLM(lk // 3),
    "chunked_causal": lambda lq, lk, s: ChunkedCausal(5),
    "sink_window": lambda lq, lk, s: SinkWindow(2, 4),
    "union": lambda lq, lk, s: SlidingWindow(2, 0) | GlobalTokens((0,)),
    "intersection": lambda lq, lk, s: Causal() & SlidingWindow(4, 4),
    "difference": lambda lq, lk, s: Causal() - SlidingWindow(1, 0),
    # Content-dependent: the mask also needs q and k (``mask(lq, lk, heads=H, q=q, k=k)``).
    "routing": lambda lq, lk, s: Routing(clusters=min(3, lq + lk), iterations=3, seed=s),
    "topk": lambda lq, lk, s: TopK(4, base=Causal()),
    "nsa_select": lambda lq, lk, s: NsaSelect(block=4, top_n=3),
    "moba": lambda lq, lk, s: Moba(block=4, top_k=2),
}


def example(name: str, lq: int, lk: int, seed: int = 0) -> base.Pattern | None:
    """A small instance of pattern ``name`` that builds for ``(lq, lk)``, or None where the
    pattern cannot apply to these lengths."""
    lq, lk = base.check_lengths(lq, lk)
    if name in _ANY:
        return _ANY[name](lq, lk, seed)
    if name in _SELF:
        return _SELF[name](lq, seed) if lq == lk else None
    raise KeyError(f"no example for pattern {name!r}: add one to refattn/patterns/examples.py")


def names_with_examples() -> list[str]:
    return sorted({*_ANY, *_SELF})
