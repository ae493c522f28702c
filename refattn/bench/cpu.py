"""CPU benchmark: refattn's backend (default ``cpu``) against NumPy, refattn's ``sparse``
backend, torch SDPA and compiled FlexAttention, in one table.

Run by hand: ``refattn bench cpu [options]`` or ``python benchmarks/bench_cpu.py [options]``.

Cases (B = 1, Hkv = H, D = Dv = 64; each in forward and forward+backward, float32 and
float64, H = 1 and 8): dense causal at n = 1024, 4096, 8192; sliding window
left = right = 256 at n = 4096 .. 1,048,576; BigBird (block 64) and strided (stride 128,
causal) at n = 16384.

Inputs are standard normal from ``numpy.random.default_rng(0)``, drawn once per
(n, H, dtype) in that dtype (q, k, v, dout in this order) and shared by every route
(torch gets them through ``torch.from_numpy``, no copy). Every route is called once to
warm up (compile, caches) and then ``--repeat`` times; the table shows the median.
A peer's result is checked against refattn's (max|diff| / max|refattn| within 1e-3 in
float32, 1e-9 in float64, on out and, forward+backward, dq, dk, dv); "!" marks a
disagreement.

GFLOP/s counts useful FLOPs on the mask's nonzeros: forward 4*nnz*D per head,
forward+backward 12*nnz*D (forward 4*nnz*D plus backward 8*nnz*D), nnz being one
head's mask; see `refattn.bench.useful_flops`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from .. import backends, patterns
from ..attention import backward, forward
from . import (FLOP_CONVENTION, MODES, PEERS, TOLERANCE, BenchMask, Rule, available_memory, finish_report, row_done,
               compare, dependency_missing, format_table, free_memory, gflops, installed_peers, machine_info,
               machine_line, refattn_route, roofline, setup_torch, time_calls, useful_flops)

D = 64
WINDOW = 256
STRIDE = 128
DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
#: Share of the memory available at the start of a row that refattn's route may take.
MEMORY_SHARE = 0.8


# ---- the patterns' rules, as FlexAttention mask_mods (spec/patterns.md) ---------------------
def causal_rule(b, h, q_idx, kv_idx):
    """causal at Lq == Lk: ``kv <= q``."""
    return q_idx >= kv_idx


def window_rule(b, h, q_idx, kv_idx):
    """sliding_window(left=right=256) at Lq == Lk: ``-256 <= kv - q <= 256``."""
    return (q_idx - kv_idx <= WINDOW) & (kv_idx - q_idx <= WINDOW)


def strided_rule(b, h, q_idx, kv_idx):
    """strided(stride=128, causal): ``kv <= q`` and (``q - kv < 128`` or ``(q - kv) % 128 == 0``)."""
    diff = q_idx - kv_idx
    return (diff >= 0) & ((diff < STRIDE) | (diff % STRIDE == 0))


@dataclass(frozen=True)
class Case:
    """One pattern of the benchmark: its refattn pattern, default sizes and flex rule."""

    name: str
    pattern: dict
    sizes: tuple[int, ...]
    rule: Rule | None = None  # None: flex looks the mask up in a dense tensor
    causal: bool = False  # exactly SDPA's is_causal

    def mask(self, n: int) -> BenchMask:
        params = dict(self.pattern)
        m = patterns.get(params.pop("name"), **params).mask(n, n)
        return BenchMask(m, rule=self.rule, causal=self.causal)


CASES = {
    "causal": Case("causal", {"name": "causal"}, (1024, 4096, 8192), causal_rule, causal=True),
    "window": Case("window", {"name": "sliding_window", "left": WINDOW, "right": WINDOW},
                   (4096, 16384, 65536, 262144, 1048576), window_rule),
    "bigbird": Case("bigbird", {"name": "bigbird", "block": 64, "seed": 0}, (16384,)),
    "strided": Case("strided", {"name": "strided", "stride": STRIDE}, (16384,), strided_rule),
}


# ---- arguments -----------------------------------------------------------------------------
def _choices(allowed):
    """An argparse type: a comma-separated subset of ``allowed``, in the order given."""

    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}")
        return list(dict.fromkeys(items))

    return parse


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, comma-separated, got {text!r}")
    return values


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark a refattn backend on the CPU against NumPy, refattn's sparse "
        "backend, torch SDPA and compiled FlexAttention; print one table. GFLOP/s: "
        + FLOP_CONVENTION + ".",
        epilog="Cases: causal n=" + ",".join(map(str, CASES["causal"].sizes))
        + "; window (sliding_window left=right=256) n=" + ",".join(map(str, CASES["window"].sizes))
        + "; bigbird (block 64, seed 0) and strided (stride 128) n=16384. B=1, Hkv=H, D=Dv=64.",
    )
    p.add_argument("--cases", type=_choices(list(CASES)), default=list(CASES),
                   help=f"which cases, comma-separated (default {','.join(CASES)})")
    p.add_argument("--sizes", type=_ints, nargs="+", default=None, metavar="N",
                   help="sequence lengths n for every chosen case, instead of each case's own "
                   "(comma- or space-separated)")
    p.add_argument("--dtypes", type=_choices(list(DTYPES)), default=list(DTYPES),
                   help="compute dtypes (default float32,float64)")
    p.add_argument("--heads", type=_ints, default=[1, 8], help="query heads H = Hkv (default 1,8)")
    p.add_argument("--modes", type=_choices(list(MODES)), default=list(MODES),
                   help="fwd (forward) and/or fwdbwd (forward then backward) (default both)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed calls per route after one warm-up; the table shows the median (default 3)")
    p.add_argument("--backend", default="cpu", help="the refattn backend under test (default cpu)")
    p.add_argument("--peers", type=_choices(list(PEERS)), default=None,
                   help=f"peers to compare with, comma-separated among {','.join(PEERS)} "
                   "(default: every one whose dependencies are installed)")
    p.add_argument("--max-peer-seconds", type=_positive_float, default=30.0,
                   help="skip a peer whose single call, extrapolated from its earlier rows, "
                   "would take longer than this (default 30)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write every raw result (all times, errors, skip reasons) to FILE, "
                   "rewritten after each row")
    p.add_argument("--markdown", action="store_true",
                   help="print the table as Markdown (for benchmarks/RESULTS.md)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: this process's cores)")
    p.add_argument("--roofline-size", type=int, default=2048,
                   help="matrix size of the BLAS roofline measurement (default 2048)")
    return p


def _check_args(parser, args) -> None:
    """Usage errors argparse cannot see: unknown backend, peers whose dependencies are missing."""
    if args.repeat < 1:
        parser.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.backend not in backends.names():
        parser.error(f"--backend: unknown refattn backend {args.backend!r}; available here: "
                     f"{', '.join(backends.names())}")
    if args.peers is None:
        args.peers = installed_peers()
    for name in args.peers:
        why = dependency_missing(PEERS[name].needs)
        if why is not None:
            parser.error(f"--peers {name}: {why}")
    args.sizes = None if args.sizes is None else [n for group in args.sizes for n in group]


# ---- the run -------------------------------------------------------------------------------
def first_call_times(backend: str, dtypes) -> dict[str, dict[str, float]]:
    """Seconds of the backend's very first forward and backward per dtype, on a tiny
    causal problem (n = 128, H = 1, D = 64): Numba compile or cache load included."""
    mask = CASES["causal"].mask(128).mask
    out = {}
    for name in dtypes:
        dt = DTYPES[name]
        rng = np.random.default_rng(0)
        q, k, v, dout = (rng.standard_normal((1, 1, 128, D), dtype=dt) for _ in range(4))
        t0 = time.perf_counter()
        r = forward(q, k, v, mask, backend=backend, compute_dtype=dt)
        t1 = time.perf_counter()
        backward(q, k, v, r.out, r.lse, dout, mask, backend=backend, compute_dtype=dt)
        out[name] = {"forward_s": t1 - t0, "backward_s": time.perf_counter() - t1}
    return out


def refattn_bytes(n: int, heads: int, itemsize: int, mode: str) -> int:
    """Rough peak memory of a row beyond the mask, per element of one ``(1, H, n, D)`` array:
    forward 7 itemsizes (q, k, v, dout, refattn's out and its working memory, a peer's out
    while refattn's is kept); forward+backward 12 itemsizes plus 24 bytes (the gradients,
    and the float64 copies of out and dout that ``refattn.backward`` makes). Measured on
    the ``cpu`` backend at n = 131072, H = 8: forward peaks at 1.25 arrays above its
    inputs, backward at 9 (float32) or 5 (float64) arrays."""
    elems = heads * n * D
    return elems * (7 * itemsize if mode == "fwd" else 12 * itemsize + 24)


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2f}" if ms < 10 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"


def _span(values: list[float]) -> str:
    lo, hi = f"{min(values):.1f}", f"{max(values):.1f}"
    return lo if lo == hi else f"{lo}-{hi}"


def _short_error(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:  # inductor wraps the real cause in pages of IR
        if "Error:" in ln or "supported" in ln:
            return ln[:200]
    return f"{type(e).__name__}: {(lines[0] if lines else '')[:200]}"


class Runner:
    """Runs the rows and keeps the results (``self.rows``, JSON-able)."""

    def __init__(self, args):
        self.args = args
        self.route = refattn_route(args.backend)
        self.rows: list[dict] = []
        self.history: dict[tuple, tuple[float, float]] = {}  # (peer, dtype, mode) -> (work, s)
        self.failed: dict[tuple, str] = {}  # (peer, dtype, mode) -> why it failed
        self.flex_first: dict[str, dict] = {}  # dtype -> the first flex warm-up

    def run_case(self, case: Case, n: int, emit) -> None:
        t0 = time.perf_counter()
        bm = case.mask(n)
        print(f"[{case.name} n={n}] mask: nnz={bm.nnz} built in {time.perf_counter() - t0:.2f} s",
              file=sys.stderr, flush=True)
        for heads in self.args.heads:
            for dname in self.args.dtypes:
                self.run_inputs(case, bm, n, heads, dname, emit)
        bm.free()
        del bm
        free_memory()

    def run_inputs(self, case, bm, n, heads, dname, emit) -> None:
        dt = DTYPES[dname]
        budget = available_memory()
        budget = math.inf if budget is None else MEMORY_SHARE * budget
        fits = {m: refattn_bytes(n, heads, dt.itemsize, m) <= budget for m in self.args.modes}
        arrays = None
        if any(fits.values()):
            rng = np.random.default_rng(0)
            arrays = [rng.standard_normal((1, heads, n, D), dtype=dt) for _ in range(4)]
        for mode in self.args.modes:
            row = self.new_row(case, bm, n, heads, dname, mode)
            if not fits[mode]:
                need = refattn_bytes(n, heads, dt.itemsize, mode) / 2**30
                row["refattn"] = {"status": "skipped",
                                  "reason": f"needs ~{need:.0f} GiB, more than {MEMORY_SHARE:.0%} "
                                  "of the memory available"}
                row["peers"] = {p: {"status": "skipped", "reason": "refattn did not run"}
                                for p in self.args.peers}
            else:
                self.run_row(row, bm, arrays, dt, mode)
            self.rows.append(row)
            emit(row)
        del arrays
        free_memory()

    def new_row(self, case, bm, n, heads, dname, mode) -> dict:
        flops = useful_flops(bm.nnz, heads, D, D, mode)
        return {"case": case.name, "pattern": case.pattern, "n": n, "heads": heads,
                "kv_heads": heads, "d": D, "dv": D, "dtype": dname, "mode": mode,
                "nnz": bm.nnz, "flops": flops, "refattn": {}, "peers": {}}

    def run_row(self, row, bm, arrays, dt, mode) -> None:
        q, k, v, dout = arrays
        repeat = self.args.repeat
        t = time_calls(lambda: self.route(q, k, v, bm, dout, dt, mode), repeat)
        ref = t.result
        row["refattn"] = {"status": "ok", "backend": self.args.backend, "ms": t.median_s * 1e3,
                          "times_ms": [x * 1e3 for x in t.times_s], "first_ms": t.first_s * 1e3,
                          "gflops": gflops(row["flops"], t.median_s)}
        t.result = None
        for name in self.args.peers:
            row["peers"][name] = self.run_peer(name, row, bm, arrays, dt, mode, ref, t.median_s)
            free_memory()
        del ref

    def run_peer(self, name, row, bm, arrays, dt, mode, ref, ref_s) -> dict:
        peer = PEERS[name]
        q, k, v, dout = arrays
        key = (name, dt.name, mode)
        reason = self.failed.get(key) or peer.skip(bm, row["heads"], dt, mode)
        work = peer.work(bm, row["heads"])
        estimate = None
        if reason is None and key in self.history:
            w0, s0 = self.history[key]
            estimate = s0 * work / w0
            if estimate > self.args.max_peer_seconds:
                reason = (f"a call would take more than --max-peer-seconds "
                          f"{self.args.max_peer_seconds:g} (extrapolated from its earlier rows)")
        if reason is not None:
            return {"status": "skipped", "reason": reason,
                    **({"estimated_s": estimate} if estimate is not None else {})}
        try:
            t0 = time.perf_counter()
            if peer.setup is not None:
                peer.setup(bm)
            setup_s = time.perf_counter() - t0
            t = time_calls(lambda: peer.run(q, k, v, bm, dout, dt, mode), self.args.repeat)
        except Exception as e:  # a peer that fails is reported, not fatal
            why = _short_error(e)
            if not isinstance(e, MemoryError):  # a smaller problem may still fit
                self.failed[key] = why  # not retried for this dtype and mode
            print(f"  {name} failed ({dt.name}, {mode}): {why}", file=sys.stderr, flush=True)
            return {"status": "error", "reason": why}
        err, ok = compare(ref, t.result, dt)
        t.result = None
        if key not in self.history or work >= self.history[key][0]:
            self.history[key] = (work, t.median_s)
        res = {"status": "ok", "ms": t.median_s * 1e3, "times_ms": [x * 1e3 for x in t.times_s],
               "first_ms": t.first_s * 1e3, "setup_s": setup_s, "ratio": t.median_s / ref_s,
               "max_rel_err": err, "agrees": ok}
        if name == "flex" and dt.name not in self.flex_first:
            self.flex_first[dt.name] = {"first_s": t.first_s, "case": row["case"], "n": row["n"],
                                        "heads": row["heads"]}
        return res


# ---- printing ------------------------------------------------------------------------------
def table(rows: list[dict], peers: list[str], markdown: bool) -> str:
    headers = ["case", "n", "H", "dtype", "mode", "nnz", "refattn ms", "GFLOP/s"]
    for p in peers:
        headers += [f"{p} ms", f"{p} x"]
    body = []
    for r in rows:
        ref = r["refattn"]
        cells = [r["case"], str(r["n"]), str(r["heads"]), r["dtype"], r["mode"], str(r["nnz"])]
        if ref.get("status") == "ok":
            cells += [_fmt_ms(ref["ms"] / 1e3), f"{ref['gflops']:.1f}"]
        else:
            cells += ["-", "-"]
        for p in peers:
            res = r["peers"].get(p, {})
            if res.get("status") == "ok":
                mark = "" if res["agrees"] else "!"
                cells += [_fmt_ms(res["ms"] / 1e3) + mark, f"{res['ratio']:.2f}"]
            else:
                cells += ["-", "-"]
        body.append(cells)
    return format_table(headers, body, markdown=markdown, left=1)


def footnotes(rows: list[dict], peers: list[str], runner: Runner) -> list[str]:
    tol = ", ".join(f"{TOLERANCE[DTYPES[d]]:g} ({d})" for d in DTYPES)
    notes = [
        "x = peer ms / refattn ms (> 1: refattn is faster); each ms is the median of the timed calls.",
        f"! = the peer disagrees with refattn: max|diff| / max|refattn| above {tol}.",
    ]
    skipped = [r for r in rows if r["refattn"].get("status") != "ok"]
    for reason in dict.fromkeys(r["refattn"]["reason"] for r in skipped):
        notes.append(f"refattn -: {reason}")
    for p in peers:
        reasons = dict.fromkeys(r["peers"][p]["reason"] for r in rows
                                if r["refattn"].get("status") == "ok"
                                and r["peers"].get(p, {}).get("status") != "ok")
        for reason in reasons:
            notes.append(f"{p} -: {reason}")
    for dname, f in runner.flex_first.items():
        later = [r["peers"]["flex"]["first_ms"] / 1e3 for r in rows if r["dtype"] == dname
                 and r["peers"].get("flex", {}).get("status") == "ok"][1:]
        notes.append(f"flex first call in {dname} (torch.compile, or a load from its cache): "
                     f"{f['first_s']:.1f} s ({f['case']} n={f['n']} H={f['heads']})"
                     + ("; each new shape or mask compiles again: later first calls "
                        + _span(later) + " s" if later else "") + ".")
    return notes


def main(argv=None, prog: str | None = None) -> int:
    """Run the CPU benchmark; print the header, the table and its notes. Returns 0."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    _check_args(parser, args)
    out = sys.stdout
    use_torch = any(p in ("sdpa", "flex") for p in args.peers)
    if use_torch:
        setup_torch(args.threads, cache_dir=".torchinductor_cache")

    print(f"refattn bench cpu: backend {args.backend!r} against {', '.join(args.peers) or 'no peers'}",
          file=out)
    print(f"GFLOP/s convention: {FLOP_CONVENTION}.", file=out)
    first = first_call_times(args.backend, args.dtypes)
    info = machine_info()
    print(machine_line(info), file=out)
    if use_torch:
        print(f"TORCHINDUCTOR_CACHE_DIR={os.environ.get('TORCHINDUCTOR_CACHE_DIR')}", file=out)
    roof = roofline(args.roofline_size)
    print("roofline (NumPy BLAS matmul %d^3, best of 3): " % args.roofline_size
          + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in roof.items()), file=out)
    print(f"refattn {args.backend!r} first call (n=128 causal, compile or cache load included): "
          + "; ".join(f"{d} forward {t['forward_s']:.2f} s, backward {t['backward_s']:.2f} s"
                      for d, t in first.items()), file=out)
    print(file=out, flush=True)

    runner = Runner(args)
    doc = {"convention": FLOP_CONVENTION, "machine": info, "roofline_gflops": roof,
           "first_call_s": first, "args": {k: v for k, v in vars(args).items()},
           "rows": runner.rows, "flex_first_call": runner.flex_first}

    def emit(row):
        row_done(row, doc, args.json)

    for name in args.cases:
        case = CASES[name]
        for n in args.sizes or case.sizes:
            runner.run_case(case, n, emit)

    finish_report(out, table(runner.rows, args.peers, args.markdown), footnotes(runner.rows, args.peers, runner),
                  doc, args.json)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
