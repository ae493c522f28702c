"""CPU benchmark of a refattn backend against its peers: one table.

Run by hand: ``python benchmarks/bench_cpu.py [options]`` (the same as ``refattn bench cpu``;
``--help`` lists the options). The harness lives in `refattn.bench.cpu`.
"""

import sys

from refattn.bench.cpu import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], prog="bench_cpu.py"))
