"""Content-dependent masks cost what the mask costs, not Lq x Lk (spec/patterns.md,
"Content-dependent patterns", Cost).

Each pattern is built at lengths where a dense ``Lq x Lk`` boolean array alone would
exceed the bound asserted here: peak traced memory at most 64 bytes per unit of work
(a nonzero, a scored candidate or an lsh chunk pair), 256 bytes per position and 64 bytes
per score of the row budget, which the test lowers to 2**14 so that the row blocking is
exercised at these sizes.
"""

import tracemalloc

import numpy as np
import pytest

from refattn import patterns
from refattn.patterns import _assemble

BUDGET = 2**14

CASES = [   # (id, lq, lk, pattern, work(mask) -> units of work)
    ("lsh", 16384, 16384, patterns.Lsh(buckets=1024, hashes=1), lambda m: m.nnz),
    ("lsh-chunk", 16384, 16384, patterns.Lsh(buckets=64, hashes=2, chunk=16), lambda m: 2 * 2 * 16384 * 16),
    ("lsh-qk", 16384, 16384, patterns.Lsh(buckets=1024, hashes=2, shared_qk=False, causal=True),
     lambda m: m.nnz),
    ("routing", 16384, 16384, patterns.Routing(clusters=256, iterations=2), lambda m: m.nnz),
    ("topk-base", 16384, 16384, patterns.TopK(8, base=patterns.SlidingWindow(32, 0)), lambda m: 33 * 16384),
    ("topk-all", 512, 32768, patterns.TopK(4), lambda m: m.nnz),
    ("nsa", 16384, 16384, patterns.NsaSelect(32, 2), lambda m: m.nnz),
    ("moba", 16384, 16384, patterns.Moba(32, 2), lambda m: m.nnz),
]


@pytest.mark.parametrize("lq,lk,p,work", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_content_masks_are_built_without_an_lq_by_lk_array(monkeypatch, lq, lk, p, work):
    monkeypatch.setattr(_assemble, "ROW_BUDGET", BUDGET)
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((lq, 16)), rng.standard_normal((lk, 16))
    tracemalloc.start()
    try:
        m = p.mask(lq, lk, q=q, k=k)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    bound = 64 * work(m) + 256 * (lq + lk) + 64 * BUDGET
    assert bound < lq * lk, "the case must be sparse enough for the bound to mean something"
    assert peak <= bound, f"peak {peak / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB (nnz {m.nnz})"


def test_row_blocking_gives_the_same_masks(monkeypatch):
    """The row budget changes how rows are grouped, never the result."""
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal((2, 4, 40, 6)), rng.standard_normal((2, 2, 40, 6))
    ps = [patterns.Lsh(8, hashes=2), patterns.Lsh(8, hashes=2, chunk=6, causal=True),
          patterns.Lsh(8, shared_qk=False), patterns.Routing(5, iterations=3, causal=True),
          patterns.TopK(5), patterns.TopK(3, base=patterns.Causal()), patterns.NsaSelect(4, 3),
          patterns.Moba(4, 3)]
    wide = [p.mask(40, 40, q=q, k=k) for p in ps]
    for budget in (1, 7, 64):
        monkeypatch.setattr(_assemble, "ROW_BUDGET", budget)
        for p, m in zip(ps, wide):
            assert p.mask(40, 40, q=q, k=k) == m, (p, budget)
