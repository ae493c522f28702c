"""Registers, spills and shared memory of the cuda backend's kernels, without a GPU.

Compiles each attention kernel to PTX for a GPU architecture (default sm_90, Hopper) and
assembles it with nvJitLink (`refattn.backends._cuda_build`), which reports what ptxas
allocated: registers per thread, spill stores and loads, stack frame and shared memory
per thread block. These decide how many thread blocks fit on a multiprocessor
(occupancy), so they are the first thing to read when tuning the kernels. Needs NVVM and
nvJitLink (``pip install "numba-cuda[cu13]"``, in the test extra); no GPU.

    python benchmarks/cuda_resources.py [--cc 9.0] [--dim 64] [--dim-v 64]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "0")  # the simulator compiles nothing

from refattn.backends._cuda_build import report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", default="9.0", help="compute capability, e.g. 9.0 (default), 8.0")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dim-v", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        cc = tuple(int(x) for x in args.cc.split("."))
        assert len(cc) == 2
    except (ValueError, AssertionError):
        parser.error(f"--cc: expected MAJOR.MINOR, got {args.cc!r}")
    dim_v = args.dim if args.dim_v is None else args.dim_v
    try:
        rows = report(cc, args.dim, dim_v)
    except Exception as e:  # NVVM or nvJitLink missing, or a kernel that does not assemble
        print(f"cuda_resources: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"sm_{cc[0]}{cc[1]}, D = {args.dim}, Dv = {dim_v}, default block sizes")
    print("| dtype | kernel | block_q x block_k | threads | registers | spill st/ld (B) | stack (B) | shared (B) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['kernel']} | {r['block_q']} x {r['block_k']} | {r['threads']} | {r['registers']} "
              f"| {r['spill_stores']} / {r['spill_loads']} | {r['stack']} | {r['shared']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
