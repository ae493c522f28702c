"""Pattern construction cost: build time and peak traced memory against the CSR's size.

Run by hand: ``python benchmarks/bench_patterns.py [--sizes 65536 1048576] [--patterns NAME ...]``.
Each size is built ``--repeat`` times, each in a fresh process (cold: the allocator has to
fault in new pages, as a user's first call does), after a warm-up build at a tiny size that
loads the compiled fill loop; "warm" is a second build while the first is still alive.
Target from issue [2/9]: sliding_window left = right = 256 at n = 1,048,576 in <= 2 s with
peak memory <= 1.5x the CSR.
"""

import argparse
import json
import statistics
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
    {"name": "longformer", "window": 512, "dilation": 1, "global_indices": [0, 1]},
    {"name": "random", "per_row": 16, "seed": 0, "causal": False},
    {"name": "bigbird", "block": 64, "num_window_blocks": 3, "num_global_blocks": 2,
     "num_random_blocks": 3, "seed": 0},
    # strided and fixed keep O(n) keys per row (the summary columns grow with n): at
    # n = 1M they hold 1.6e9 and 4.7e9 entries, more than this machine's memory takes twice.
    {"name": "strided", "stride": 1024, "causal": True, "max_n": 262144},
    {"name": "fixed", "block": 1024, "summary": 8, "causal": True, "max_n": 262144},
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[65536, 262144, 1048576])
    ap.add_argument("--repeat", type=int, default=3,
                    help="fresh processes per case; the table shows the median and the worst (default 3)")
    ap.add_argument("--patterns", nargs="+", default=None, metavar="NAME",
                    help="only these patterns (default: every case)")
    args = ap.parse_args(argv)
    print(f"{'pattern':<24}{'n':>10}{'nnz':>12}{'cold s med':>11}{'cold s max':>11}{'warm s':>8}"
          f"{'CSR MiB':>9}{'peak/CSR':>9}")
    for case in CASES:
        if args.patterns and case["name"] not in args.patterns:
            continue
        params = {k: v for k, v in case.items() if k != "max_n"}
        for n in args.sizes:
            if n > case.get("max_n", n):
                print(f"{case['name']:<24}{n:>10}  skipped (more entries than fit twice in memory)")
                continue
            runs = []
            for _ in range(args.repeat):
                out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(params), str(n)],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout))
            r, cold = runs[0], sorted(x["cold_s"] for x in runs)
            print(f"{case['name']:<24}{n:>10}{r['nnz']:>12}{statistics.median(cold):>11.2f}{cold[-1]:>11.2f}"
                  f"{statistics.median(x['warm_s'] for x in runs):>8.2f}{r['csr_mib']:>9.0f}"
                  f"{max(x['peak_ratio'] for x in runs):>9.2f}")

if __name__ == "__main__":
    main()
