"""``refattn run``: attention on seeded random inputs; shapes, nnz, time and checksums."""

from __future__ import annotations

import json
import time

import numpy as np

from .. import backends, patterns
from .._version import __version__
from ..alignment import ALIGNMENTS, DEFAULT_ALIGN
from ..attention import backward, forward
from ..errors import RefattnError
from ._common import DTYPES, checksum, nonnegative_int, positive_int


def add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run attention on seeded random inputs and print shapes, nnz, time and checksums",
        description="Run attention forward (and --backward) on inputs drawn from "
        "numpy.random.default_rng(SEED): q, k, v, each standard normal in float64 and then "
        "cast to --dtype, then dout, standard normal in float64. --align applies to "
        "--pattern causal only.",
    )
    p.add_argument("--batch", type=positive_int, default=1, help="B (default 1)")
    p.add_argument("--heads", type=positive_int, default=1, help="query heads H (default 1)")
    p.add_argument("--kv-heads", type=positive_int, default=None,
                   help="key/value heads Hkv, dividing H (default: H)")
    p.add_argument("--lq", type=positive_int, default=128, help="query length (default 128)")
    p.add_argument("--lk", type=positive_int, default=None, help="key length (default: --lq)")
    p.add_argument("--dim", type=positive_int, default=64, help="head dim D (default 64)")
    p.add_argument("--dim-v", type=positive_int, default=None, help="value dim Dv (default: D)")
    p.add_argument("--pattern", choices=["dense", "causal"], default="dense",
                   help="mask pattern (default dense)")
    p.add_argument("--align", choices=ALIGNMENTS, default=DEFAULT_ALIGN,
                   help=f"causal alignment when Lq != Lk (default {DEFAULT_ALIGN})")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="input dtype (default float32)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="random seed (default 0)")
    p.add_argument("--backend", default="dense",
                   help=f"backend, one of {backends.registered()} where available (default dense)")
    p.add_argument("--compute-dtype", choices=["float64", "float32"], default=None,
                   help="precision the backend computes in (default: the backend's, float64)")
    p.add_argument("--backward", action="store_true", help="also run the backward")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def _make_inputs(args):
    H = args.heads
    Hkv = args.kv_heads or H
    Lk = args.lk or args.lq
    Dv = args.dim_v or args.dim
    rng = np.random.default_rng(args.seed)
    dt = DTYPES[args.dtype]
    q = rng.standard_normal((args.batch, H, args.lq, args.dim)).astype(dt)
    k = rng.standard_normal((args.batch, Hkv, Lk, args.dim)).astype(dt)
    v = rng.standard_normal((args.batch, Hkv, Lk, Dv)).astype(dt)
    dout = rng.standard_normal((args.batch, H, args.lq, Dv))
    pat = patterns.get(args.pattern, **({"align": args.align} if args.pattern == "causal" else {}))
    return q, k, v, dout, pat


def cmd_run(args) -> int:
    if args.pattern != "causal" and args.align != DEFAULT_ALIGN:
        raise RefattnError(f"--align applies only to --pattern causal, not {args.pattern!r}")
    q, k, v, dout, pat = _make_inputs(args)
    mask = pat.mask(q.shape[2], k.shape[2])
    report = {
        "refattn": __version__,
        "backend": args.backend,
        "pattern": pat.to_dict(),
        "dtype": args.dtype,
        "compute_dtype": args.compute_dtype or str(np.dtype(backends.get(args.backend).COMPUTE_DTYPES[0])),
        "q": list(q.shape), "k": list(k.shape), "v": list(v.shape),
        "nnz": mask.nnz, "density": mask.density,
    }
    t0 = time.perf_counter()
    r = forward(q, k, v, mask, backend=args.backend, compute_dtype=args.compute_dtype)
    report["forward_s"] = time.perf_counter() - t0
    report["out"] = checksum(r.out)
    report["lse"] = checksum(r.lse)
    if args.backward:
        t0 = time.perf_counter()
        g = backward(q, k, v, r.out, r.lse, dout, mask, backend=args.backend,
                     compute_dtype=args.compute_dtype)
        report["backward_s"] = time.perf_counter() - t0
        for name in ("dq", "dk", "dv"):
            report[name] = checksum(getattr(g, name))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"refattn {__version__}  backend={args.backend}  pattern={pat.to_dict()}  dtype={args.dtype}"
          f"  compute={report['compute_dtype']}")
    print(f"q {tuple(q.shape)}  k {tuple(k.shape)}  v {tuple(v.shape)}")
    print(f"mask nnz={mask.nnz}  density={mask.density:.6g}")
    print(f"forward   {report['forward_s'] * 1e3:10.2f} ms")
    if args.backward:
        print(f"backward  {report['backward_s'] * 1e3:10.2f} ms")
    for name in ("out", "lse", "dq", "dk", "dv"):
        if name in report:
            c = report[name]
            extra = f"  -inf={c['neg_inf']}" if c["neg_inf"] else ""
            print(f"{name:<4} sum={c['sum']:+.17g}  sha256={c['sha256']}{extra}")
    return 0
