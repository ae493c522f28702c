"""Checkpoint schedules on a 32-layer transformer stack at n = 16k (issue [7/9]).

Run by hand: ``python benchmarks/bench_checkpoint.py [--layers 32] [--seq 16384] ...``.
Prints, per schedule, the ledger's peak saved activations and the traced peak, their
ratio to ``none``'s, forward calls, extra forward steps, wall time and its ratio to
``none``'s, and whether the gradients equal ``none``'s bit for bit; then the targets:
``sqrt``'s peak <= about 2 sqrt(L) / L of ``none``'s and its time <= 1.4x ``none``'s.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys

import numpy as np

from refattn import patterns
from refattn.train import checkpoint, model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ff", type=int, default=512)
    p.add_argument("--window", type=int, default=256, help="sliding window: keys i - window .. i")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--backend", default="cpu")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--schedules", default=None, help="comma-separated (default: none, selective, sqrt, "
                   "uniform:L/4, binomial:4)")
    args = p.parse_args(argv)
    L = args.layers
    specs = (args.schedules.split(",") if args.schedules else
             ["none", "selective", "sqrt", f"uniform:{max(1, L // 4)}", "binomial:4"])
    dt = np.dtype(args.dtype)
    stack = model.Stack(L, args.dim, args.heads, args.heads, args.ff,
                        pattern=patterns.get("sliding_window", left=args.window, right=0),
                        backend=args.backend, compute_dtype=dt, dropout=args.dropout, seed=0, dtype=dt)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, args.seq, args.dim)).astype(dt)
    target = rng.standard_normal(x.shape).astype(dt)
    ctx = model.Context(seed=0, call=0)
    print(f"# {L} layers, n = {args.seq}, d_model = {args.dim}, heads = {args.heads}, d_ff = {args.ff}, "
          f"sliding window {args.window}, {args.dtype}, backend {args.backend}, dropout {args.dropout}; "
          f"{platform.processor() or platform.machine()}, numpy {np.__version__}")
    checkpoint.measure(stack, x[:, :256], ctx, "none", lambda y: target[:, :256])   # warm-up: compiled kernels
    rows, ref = [], None
    for spec in specs:
        row, grads = checkpoint.measure(stack, x, ctx, spec, lambda y: target)
        if ref is None:
            ref = grads
        row.grads_equal_none = all(a.tobytes() == b.tobytes() for a, b in zip(grads, ref))
        rows.append(row)
        print(f"  {spec}: {row.seconds:.1f} s", file=sys.stderr, flush=True)
    base = rows[0]
    mb = 2 ** 20
    print("| schedule | ledger peak MB | x none | traced peak MB | x none | forward calls | extra forwards "
          "| time s | x none | grads == none |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r.schedule} | {r.ledger_peak_bytes / mb:.0f} | {r.ledger_peak_bytes / base.ledger_peak_bytes:.3f} "
              f"| {r.traced_peak_bytes / mb:.0f} | {r.traced_peak_bytes / base.traced_peak_bytes:.3f} "
              f"| {r.forward_calls} | {r.extra_forwards} | {r.seconds:.1f} | {r.seconds / base.seconds:.2f} "
              f"| {'yes' if r.grads_equal_none else 'NO'} |")
    sq = next((r for r in rows if r.schedule == "sqrt"), None)
    if sq is not None and base.schedule == "none":
        bound = 2 * math.sqrt(L) / L
        ratio = sq.ledger_peak_bytes / base.ledger_peak_bytes
        t = sq.seconds / base.seconds
        print(f"\ntarget: sqrt peak <= 2 sqrt(L)/L = {bound:.3f} of none: {ratio:.3f} "
              f"({'met' if ratio <= bound else 'NOT met'}); time <= 1.4x none: {t:.2f}x "
              f"({'met' if t <= 1.4 else 'NOT met'})")
    return 0 if all(r.grads_equal_none for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
