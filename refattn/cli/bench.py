"""``refattn bench``: a backend against its peers (run by hand; the harnesses are `refattn.bench`)."""

from __future__ import annotations

import argparse

BENCH_TARGETS = ["cpu", "cuda"]


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmark a backend against its peers (run by hand)",
                       description="Benchmark a refattn backend against peer implementations and "
                       "print one table. `refattn bench cpu --help` lists the options of the CPU "
                       "benchmark, `refattn bench cuda --help` those of the GPU benchmark.")
    p.add_argument("target", choices=BENCH_TARGETS,
                   help="what to benchmark: cpu (a CPU backend against NumPy, SciPy and torch on the "
                   "CPU) or cuda (the cuda backend against torch SDPA and FlexAttention on the GPU)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the target's options (see its --help)")


def cmd_bench(args) -> int:
    # imported here: torch, numba.cuda and the peers load only for a benchmark
    if args.target == "cuda":
        from ..bench import cuda as harness
    else:
        from ..bench import cpu as harness

    return harness.main(args.args, prog=f"refattn bench {args.target}")
