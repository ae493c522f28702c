"""``refattn verify``: an attention implementation against the golden suite, a row per case."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time

from .. import verify
from ..verify.isolate import verify_case_isolated
from ._common import Progress, RowPrinter, check_writable
from .golden import SUITE_RULE

NO_BACKWARD = "backward not checked: no backward given"


def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check an attention implementation against the golden suite",
                       description="Run IMPL (module:function, in the calling convention of spec/verify.md) "
                       "on every golden case and judge each tensor by spec/tolerance.md. IMPL is imported as "
                       "`python -m` would: the current folder comes first on the import path. Prints a row "
                       "per case as it finishes; exits 0 only if no case fails or errs and at least one "
                       "passes (a case IMPL cannot express is reported as unsupported, never as passed).")
    p.add_argument("impl", metavar="IMPL", help="the forward function, module:function (e.g. refattn.adapters:cpu)")
    p.add_argument("--backward", metavar="IMPL", default=None,
                   help="the backward function (default: the forward's `backward` attribute, if any)")
    p.add_argument("--golden", default=None, metavar="DIR", help=SUITE_RULE)
    p.add_argument("--dtype", default="float32", choices=list(verify.DTYPES),
                   help="the dtype the inputs are given in and the kernel is judged for (default float32)")
    p.add_argument("--filter", default=None, metavar="EXPR", help="only these cases (shell patterns over ids)")
    p.add_argument("--layout", default="bhsd", choices=list(verify.LAYOUTS),
                   help="axis order of q, k, v, out (default bhsd)")
    p.add_argument("--framework", default="numpy", choices=list(verify.FRAMEWORKS),
                   help="give the implementation NumPy arrays (default) or torch tensors")
    p.add_argument("--isolate", action="store_true",
                   help="run each case in a child process: a crash (segfault, abort, exit) is that case's ERROR")
    p.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="a case that runs longer is killed and is an ERROR (implies --isolate)")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="also write the verdicts as JSON (an error's whole traceback included)")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _fmt(x: float | None) -> str:
    return "-" if x is None else ("inf" if x == float("inf") else f"{x:.3g}")


def _row(r: verify.CaseVerdict, seconds: float) -> list[str]:
    """The failing tensor, else the one nearest its bound; an error's whole message."""
    t = r.first_failure or r.worst
    note = r.message or (t.note if t else "")
    if r.status != "error":
        note = note.splitlines()[0][:100] if note else ""
    return [r.case_id, r.status.upper() if r.status != "pass" else "pass", t.name if t else "-",
            _fmt(t.error) if t else "-", _fmt(t.allowed) if t else "-", _fmt(t.ratio) if t else "-",
            f"{seconds:.2f}", note]


def _finite(x):
    """Strict JSON has no NaN or Infinity: those go as strings."""
    return x if not isinstance(x, float) or math.isfinite(x) else str(x)


def cmd_verify(args) -> int:
    if "" not in sys.path and os.getcwd() not in sys.path:     # as `python -m`: the current folder first
        sys.path.insert(0, os.getcwd())
    check_writable(args.json, "--json")
    impl = verify.load_impl(args.impl, args.backward)
    gdir, entries = verify.plan(args.golden, args.dtype, args.filter, args.layout, args.framework)
    checked = "forward and backward" if impl.backward is not None else f"forward only; {NO_BACKWARD}"
    isolate = args.isolate or args.timeout is not None
    if isolate:
        checked += "; each case in a child process" + (f", {args.timeout:g} s at most" if args.timeout else "")
    print(f"{impl.name} ({args.dtype}, {args.layout}, {args.framework}) against {len(entries)} case(s) of "
          f"{gdir}: {checked}. Each row shows the failing tensor, else the one nearest its bound.", flush=True)
    headers = ["case", "status", "tensor", "error", "allowed", "ratio", "time s", "note"]
    ids = [str(e.get("id", "?")) if isinstance(e, dict) else "?" for e in entries]
    table = RowPrinter(headers, [max(map(len, ids), default=4), 11, 6, 9, 9, 9, 6, 0])
    progress = Progress(lines_when_piped=False)
    results, seconds, interrupted = [], [], False
    for i, (cid, entry) in enumerate(zip(ids, entries)):
        progress(i, len(entries), cid)
        t0 = time.perf_counter()
        try:
            if isolate:
                r = verify_case_isolated(args.impl, args.backward, gdir, entry, args.dtype, args.layout,
                                         args.framework, timeout=args.timeout)
            else:
                r = verify.verify_case(impl, gdir, entry, args.dtype, args.layout, args.framework)
        except KeyboardInterrupt:       # stop the run, keep what was judged
            progress.clear()
            interrupted = True
            break
        progress.clear()
        seconds.append(time.perf_counter() - t0)
        table.row(_row(r, seconds[-1]))
        results.append(r)
    count = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error", "unsupported")}
    print(f"{count['pass']} passed, {count['fail']} failed, {count['error']} errors, "
          f"{count['unsupported']} unsupported, of {len(results)} case(s)"
          + ("" if impl.backward is not None else f"; {NO_BACKWARD}")
          + (f"; interrupted: {len(entries) - len(results)} case(s) not run" if interrupted else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"impl": impl.name, "dtype": args.dtype, "layout": args.layout, "framework": args.framework,
                       "golden": str(gdir), "backward_checked": impl.backward is not None,
                       "cases": [{"id": r.case_id, "status": r.status, "seconds": round(secs, 6),
                                  "message": r.message,
                                  **({"traceback": r.traceback} if r.traceback else {}),
                                  "tensors": [{k: _finite(v) for k, v in {**dataclasses.asdict(t),
                                                                          "ratio": t.ratio}.items()}
                                              for t in r.tensors]} for r, secs in zip(results, seconds)]},
                      f, indent=1, allow_nan=False)
    if interrupted:
        return 130                      # as a shell reports SIGINT
    return 0 if count["pass"] and not (count["fail"] or count["error"]) else 1
