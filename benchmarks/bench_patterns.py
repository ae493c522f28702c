"""Pattern construction cost: build time and peak traced memory against the CSR's size.

Run by hand: ``python benchmarks/bench_patterns.py [--sizes 65536 1048576]``. Each size is
built in a fresh process (cold: the allocator has to fault in new pages, as a user's
first call does), after a warm-up build at a tiny size that loads the compiled fill loop.
Target from issue [2/9]: sliding_window left = right = 256 at n = 1,048,576 in <= 2 s with
peak memory <= 1.5x the CSR.
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, tracemalloc
from refattn import patterns
p = patterns.from_dict(json.loads(sys.argv[1])); n = int(sys.argv[2])
p.mask(8, 8)  # load the cached compiled loop
tracemalloc.start()
t = time.perf_counter(); m = p.mask(n, n); dt = time.perf_counter() - t
_, peak = tracemalloc.get_traced_memory(); tracemalloc.stop()
t = time.perf_counter(); p.mask(n, n); warm = time.perf_counter() - t
size = sum(a.nbytes for a in (m.csr.indices, m.csr.indptr, m.csr.data))
print(json.dumps(dict(nnz=m.nnz, cold_s=dt, warm_s=warm, csr_mib=size / 2**20, peak_ratio=peak / size)))
"""

CASES = [
    {"name": "sliding_window", "left": 256, "right": 256},
    {"name": "dilated_sliding_window", "left": 512, "right": 512, "dilation": 2},
    {"name": "sink_window", "sinks": 4, "window": 512},
    {"name": "chunked_causal", "chunk": 512},
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144, 1048576])
    args = ap.parse_args(argv)
    print(f"{'pattern':<24}{'n':>10}{'nnz':>12}{'cold s':>9}{'warm s':>9}{'CSR MiB':>10}{'peak/CSR':>10}")
    for case in CASES:
        for n in args.sizes:
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case), str(n)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout)
            print(f"{case['name']:<24}{n:>10}{r['nnz']:>12}{r['cold_s']:>9.2f}{r['warm_s']:>9.2f}"
                  f"{r['csr_mib']:>10.0f}{r['peak_ratio']:>10.2f}")


if __name__ == "__main__":
    main()
