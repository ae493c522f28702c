"""``refattn checkpoint``: checkpoint schedules compared on a transformer stack."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from .. import patterns
from ..errors import RefattnError
from ..train import checkpoint, model
from ._common import RowPrinter, check_writable, nonnegative_int, param, positive_int


def add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="compare checkpoint schedules on a transformer stack",
                       description="Run forward and backward of a pre-LN transformer stack under each "
                       "schedule (spec/checkpointing.md) and print: peak saved activations from the "
                       "ledger, peak traced allocation, forward calls, extra forward steps, wall time, "
                       "and whether the gradients equal those of `none` bit for bit.")
    p.add_argument("--layers", type=positive_int, default=8, help="number of blocks (default 8)")
    p.add_argument("--seq", type=positive_int, default=256, help="sequence length n (default 256)")
    p.add_argument("--dim", type=positive_int, default=64, help="model width d_model (default 64)")
    p.add_argument("--heads", type=positive_int, default=4, help="query heads (default 4)")
    p.add_argument("--kv-heads", type=positive_int, default=None, help="kv heads (default: --heads)")
    p.add_argument("--ff", type=positive_int, default=None, help="MLP width (default 4 * --dim)")
    p.add_argument("--batch", type=positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--pattern", default="sliding_window", help="attention pattern (default sliding_window)")
    p.add_argument("--param", type=param, action="append", default=[], metavar="KEY=VALUE",
                   help="a pattern parameter (default for sliding_window: left=32, right=0)")
    p.add_argument("--backend", default="cpu", help="attention backend (default cpu)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                   help="model and compute dtype (default float64)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout probability (default 0.1)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="weights, inputs and dropout seed")
    p.add_argument("--schedule", default="all",
                   help="none, uniform:K, sqrt, binomial:S, selective, a comma-separated list, or all")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the rows as JSON")


def cmd_checkpoint(args) -> int:
    if not 0 <= args.dropout < 1:
        raise RefattnError(f"--dropout must be in [0, 1), got {args.dropout}")
    check_writable(args.json, "--json")
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        raise RefattnError(f"--heads {args.heads} must be a multiple of --kv-heads {kv_heads}")
    if args.dim % args.heads:
        raise RefattnError(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    params = dict(args.param)
    if args.pattern == "sliding_window" and not params:
        params = {"left": 32, "right": 0}
    pattern = patterns.get(args.pattern, **params)
    schedules = checkpoint.expand_schedules(args.schedule, args.layers)
    dt = np.dtype(args.dtype)
    stack = model.Stack(args.layers, args.dim, args.heads, args.kv_heads or args.heads, args.ff or 4 * args.dim,
                        pattern=pattern, backend=args.backend, compute_dtype=dt, dropout=args.dropout,
                        seed=args.seed, dtype=dt)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, args.seq, args.dim)).astype(dt)
    target = rng.standard_normal(x.shape).astype(dt)
    ctx = model.Context(seed=args.seed, call=0, train=True)

    def dloss(y):  # loss = sum(y * target): its gradient is the fixed target
        return target

    print(f"refattn checkpoint: {args.layers} layers, n = {args.seq}, d_model = {args.dim}, heads = {args.heads}/"
          f"{args.kv_heads or args.heads}, pattern = {pattern.to_dict()}, backend = {args.backend}, {args.dtype}, "
          f"dropout = {args.dropout}", flush=True)
    mb = 2 ** 20
    headers = ["schedule", "ledger peak MB", "traced peak MB", "forward calls", "extra forwards", "time s",
               "grads == none"]
    table = RowPrinter(headers, [max(map(len, schedules))] + [len(h) for h in headers[1:]], right=True)
    checkpoint.measure(stack, x, ctx, "none", dloss)        # warm-up: compiled kernels, first allocations
    rows, reference = [], None
    for spec in ["none"] + [s for s in schedules if s != "none"]:
        row, grads = checkpoint.measure(stack, x, ctx, spec, dloss)
        if reference is None:
            reference = grads
        row.grads_equal_none = all(a.tobytes() == b.tobytes() for a, b in zip(grads, reference))
        if spec in schedules:
            rows.append(row)
            table.row([row.schedule, f"{row.ledger_peak_bytes / mb:.1f}", f"{row.traced_peak_bytes / mb:.1f}",
                       str(row.forward_calls), str(row.extra_forwards), f"{row.seconds:.2f}",
                       "yes" if row.grads_equal_none else "NO"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                       "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=1, default=str)
    return 0 if all(r.grads_equal_none for r in rows) else 1
