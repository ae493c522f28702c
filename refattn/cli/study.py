"""``refattn paths`` and ``refattn explain``: how information travels through a pattern's
layers, and the tiled kernel step by step."""

from __future__ import annotations

import json

from .. import patterns
from ..errors import RefattnError
from ..mask import Mask
from ..study import analysis
from ..study.draw import draw
from ..study.explain import MAX_ENTRIES, MAX_PICTURE, explain
from ._common import add_content_inputs, add_param, build_mask, nonnegative_int, param, positive_int


def add_paths(sub) -> None:
    p = sub.add_parser("paths", help="how information travels across stacked layers of a pattern",
                       description="For a pattern's n x n mask used by every layer of a stack: whether "
                       "query --to reads key --from directly, the fewest layers through which it "
                       "reaches it, and a shortest chain of positions (spec/analysis.md). With --layers "
                       "K, also the reachability matrix after K layers.")
    p.add_argument("--pattern", required=True, help="pattern name (see `refattn patterns`)")
    p.add_argument("--param", type=param, action="append", default=[], metavar="KEY=VALUE",
                   help="a pattern parameter; repeat for several")
    p.add_argument("--n", type=positive_int, default=16, help="sequence length (default 16)")
    p.add_argument("--from", dest="src", type=nonnegative_int, required=True, help="the key position")
    p.add_argument("--to", dest="dst", type=nonnegative_int, required=True, help="the query position")
    p.add_argument("--layers", type=nonnegative_int, default=None,
                   help="also print which keys reach which queries through exactly this many layers")
    p.add_argument("--heads", type=positive_int, default=None, help="number of heads, for per-head patterns")
    p.add_argument("--head", type=nonnegative_int, default=0, help="which head (default 0)")
    p.add_argument("--max-size", type=positive_int, default=64, help="largest picture side (default 64)")
    add_content_inputs(p)


def cmd_paths(args) -> int:
    pat = patterns.get(args.pattern, **dict(args.param))
    m, inputs = build_mask(pat, args.n, args.n, args.heads, args)
    if args.head >= m.group_shape[1]:
        raise RefattnError(f"--head {args.head} is out of range: this mask has {m.group_shape[1]} head(s)")
    src, dst, h = args.src, args.dst, args.head
    for flag, value in (("--from", src), ("--to", dst)):
        if value >= args.n:
            raise RefattnError(f"{flag} {value} is out of range: the positions are 0 .. {args.n - 1} (--n {args.n})")
    chain = analysis.path(m, src, dst, h=h)
    direct = bool(m.group(0, h)[[dst], [src]][0])
    print(f"{json.dumps(pat.to_dict())}  n={args.n}" + (f" head={h}" if m.group_shape[1] > 1 else "") + inputs)
    print(f"query {dst} reads key {src} directly: {'yes' if direct else 'no'}")
    if chain is None:
        print(f"key {src} never reaches query {dst}, through any number of layers")
    else:
        k = len(chain) - 1
        print(f"fewest layers from key {src} to query {dst}: {k}")
        if k:
            print("a shortest chain: " + " -> ".join(map(str, chain)))
            for layer, (a, b) in enumerate(zip(chain, chain[1:]), start=1):
                print(f"  layer {layer}: query {b} reads key {a}")
    if args.layers is not None:
        reach = analysis.reachability(m, args.layers, h=h)
        print(f"\nreachability after exactly {args.layers} layer(s) (row: query, column: key; "
              f"{int(reach.nnz)} of {args.n * args.n} pairs):")
        print(draw(Mask.from_csr(reach), max_size=args.max_size))
    return 0


# ---- refattn explain --------------------------------------------------------------------------
def add_explain(sub) -> None:
    p = sub.add_parser(
        "explain", help="the tiled kernel step by step: tiles visited, online softmax of one row",
        description="Run the tiled backend (FlashAttention-2 in NumPy, float64) with a recorder on "
        "inputs drawn from numpy.random.default_rng(SEED) (q, k, v standard normal, then dout) and "
        "print: the mask with its block grid, the block layout (F full, P partial, . empty: never "
        "visited), the key blocks visited by the chosen row's query block, and for --row a table of "
        "the running max m, the rescale alpha = exp(m_old - m_new), the running sum l and the "
        "normalised partial output O/l after each block, ending with the check against the dense "
        "oracle. --backward adds D = rowsum(dO * O), the row of dS = P * (dP - D) per block and dq. "
        "A content-dependent pattern (lsh, routing, topk, nsa_select, moba) chooses its keys from "
        "these q and k. See spec/trace.md.")
    p.add_argument("--pattern", required=True, help="pattern name (see `refattn patterns`)")
    add_param(p)
    p.add_argument("--lq", type=positive_int, default=16, help="query length (default 16)")
    p.add_argument("--lk", type=positive_int, default=None, help="key length (default: --lq)")
    p.add_argument("--block", type=int, default=4, help="block size block_q (default 4)")
    p.add_argument("--block-k", type=int, default=None, help="key block size block_k (default: --block)")
    p.add_argument("--row", type=int, default=None, help="the query row to follow (default: Lq // 2)")
    p.add_argument("--backward", action="store_true", help="also trace the backward (D, dS, dq)")
    p.add_argument("--dim", type=positive_int, default=4, help="head dim D of q, k, v (default 4)")
    p.add_argument("--heads", type=positive_int, default=None,
                   help="number of heads, for patterns that differ per head")
    p.add_argument("--head", type=nonnegative_int, default=0, help="which head to follow (default 0)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed of the inputs (default 0)")
    p.add_argument("--max-size", type=positive_int, default=MAX_PICTURE,
                   help=f"largest mask side drawn a character per entry, at most {MAX_PICTURE} "
                   f"(default {MAX_PICTURE}); larger masks are aggregated")
    p.add_argument("--png", metavar="FILE", default=None,
                   help="also write the mask with the block grid as a PNG (black allowed, white removed)")


def cmd_explain(args) -> int:
    lq = args.lq
    lk = args.lk or lq
    bq = args.block
    bk = args.block_k if args.block_k is not None else bq
    for name, value in (("--block", bq), ("--block-k", bk)):
        if value < 1:
            raise RefattnError(f"{name} must be >= 1, got {value}")
    if lq * lk > MAX_ENTRIES:
        raise RefattnError(f"Lq * Lk = {lq * lk}: explain records every tile; keep Lq * Lk <= {MAX_ENTRIES}")
    row = lq // 2 if args.row is None else args.row
    if not 0 <= row < lq:
        raise RefattnError(f"--row {row} is out of range: the rows are 0 .. {lq - 1}")
    pat = patterns.get(args.pattern, **dict(args.param))
    heads = args.heads or (1 if pat.content_dependent else pat.mask(lq, lk).group_shape[1])
    if args.head >= heads:
        raise RefattnError(f"--head {args.head} is out of range: this problem has {heads} head(s)")
    result = explain(pat, lq=lq, lk=lk, block_q=bq, block_k=bk, row=row, backward=args.backward, dim=args.dim,
                     heads=args.heads, head=args.head, seed=args.seed, max_size=args.max_size, png=args.png)
    print(result)
    return 0 if result.ok else 1
