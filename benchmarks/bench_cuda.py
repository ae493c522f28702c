"""GPU benchmark of refattn's cuda backend against torch SDPA and compiled FlexAttention: one table.

Run by hand on a machine with an NVIDIA GPU: ``python benchmarks/bench_cuda.py [options]``
(the same as ``refattn bench cuda``; ``--help`` lists the options). The harness lives in
`refattn.bench.cuda`.
"""

import sys

from refattn.bench.cuda import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="bench_cuda.py"))
