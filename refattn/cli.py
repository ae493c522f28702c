"""The ``refattn`` command line.

Each subcommand is a small pair of functions: ``add_<name>(subparsers)`` declares its
arguments and ``cmd_<name>(args) -> int`` runs it. `COMMANDS` lists them; adding a
subcommand means adding a pair there. Exit status: 0 success, 1 a refattn error
(bad input: the message goes to stderr), 2 a usage error (argparse).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import ml_dtypes
import numpy as np

from . import __version__, analysis, backends, patterns
from .alignment import ALIGNMENTS, DEFAULT_ALIGN
from .attention import backward, forward
from .draw import draw, write_png
from .errors import RefattnError
from .mask import Mask
from .patterns.content import sample_inputs

DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}


def _int_at_least(lowest: int):
    """An argparse type: an integer >= ``lowest``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < lowest:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lowest}, got {text!r}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)
_nonneg_int = _int_at_least(0)


def checksum(x: np.ndarray) -> dict:
    """A summary that identifies an array: its float64 sum over finite entries, the number
    of -inf entries, and the sha256 of its float64 little-endian bytes (bitwise: it can
    differ between machines in the last bit of ``exp``; compare sums across machines)."""
    x = np.ascontiguousarray(x, dtype="<f8")
    finite = np.isfinite(x)
    return {
        "sum": float(x[finite].sum()),
        "neg_inf": int(np.isneginf(x).sum()),
        "sha256": hashlib.sha256(x.tobytes()).hexdigest()[:16],
    }


# ---- refattn run ------------------------------------------------------------------------
def add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run attention on seeded random inputs and print shapes, nnz, time and checksums",
        description="Run attention forward (and --backward) on inputs drawn from "
        "numpy.random.default_rng(SEED): q, k, v, each standard normal in float64 and then "
        "cast to --dtype, then dout, standard normal in float64. --align applies to "
        "--pattern causal only.",
    )
    p.add_argument("--batch", type=_positive_int, default=1, help="B (default 1)")
    p.add_argument("--heads", type=_positive_int, default=1, help="query heads H (default 1)")
    p.add_argument("--kv-heads", type=_positive_int, default=None,
                   help="key/value heads Hkv, dividing H (default: H)")
    p.add_argument("--lq", type=_positive_int, default=128, help="query length (default 128)")
    p.add_argument("--lk", type=_positive_int, default=None, help="key length (default: --lq)")
    p.add_argument("--dim", type=_positive_int, default=64, help="head dim D (default 64)")
    p.add_argument("--dim-v", type=_positive_int, default=None, help="value dim Dv (default: D)")
    p.add_argument("--pattern", choices=["dense", "causal"], default="dense",
                   help="mask pattern (default dense)")
    p.add_argument("--align", choices=ALIGNMENTS, default=DEFAULT_ALIGN,
                   help=f"causal alignment when Lq != Lk (default {DEFAULT_ALIGN})")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="input dtype (default float32)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default 0)")
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


# ---- refattn patterns ---------------------------------------------------------------------
def add_patterns(sub) -> None:
    sub.add_parser("patterns", help="list the registered patterns",
                   description="List every registered pattern with its parameters and a one-line description.")


def cmd_patterns(args) -> int:
    for name in patterns.names():
        cls = patterns.base._REGISTRY[name]
        params = ", ".join(f.name for f in dataclasses.fields(cls))
        para = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        first = para.split(". ")[0].rstrip(".").replace("``", "")
        print(f"{name:<24} ({params})  {first}")
    return 0


# ---- refattn show -------------------------------------------------------------------------
def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)  # 3, [0, 9], true, "top_left"
    except json.JSONDecodeError:
        return key, value  # a bare word: a string, e.g. align=top_left


def add_show(sub) -> None:
    p = sub.add_parser("show", help="draw a pattern's mask in the terminal, with its stats",
                       description="Draw a pattern's mask, '#' allowed and '.' removed; above "
                       "--max-size cells are aggregated into blocks ('#' full, '+' partial, "
                       "'.' empty). Parameter values are JSON (3, [0, 9], true) or bare words.")
    p.add_argument("name", help="pattern name (see `refattn patterns`)")
    p.add_argument("--lq", type=_positive_int, default=32, help="query length (default 32)")
    p.add_argument("--lk", type=_positive_int, default=None, help="key length (default: --lq)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="a pattern parameter; repeat for several")
    p.add_argument("--max-size", type=_positive_int, default=64,
                   help="largest picture side in characters (default 64)")
    p.add_argument("--heads", type=_positive_int, default=None,
                   help="number of heads, for patterns that differ per head")
    p.add_argument("--head", type=_nonnegative_int, default=0, help="which head to show (default 0)")
    p.add_argument("--png", metavar="FILE", default=None,
                   help="also write the mask as a PNG picture (black allowed, white removed)")
    _add_content_inputs(p)


def _add_content_inputs(p) -> None:
    p.add_argument("--seed", type=_nonnegative_int, default=0,
                   help="content-dependent patterns (lsh, routing, topk, nsa_select, moba): the seed of "
                   "their inputs q, k ~ N(0, 1), numpy.random.default_rng(SEED), q first (default 0)")
    p.add_argument("--dim", type=_positive_int, default=16,
                   help="content-dependent patterns: the head dim D of q and k (default 16)")


def _build_mask(pat, lq: int, lk: int, heads: int | None, args) -> tuple[Mask, str]:
    """The pattern's mask and a note on its inputs: a content-dependent pattern chooses its
    keys from q, k drawn from --seed (`patterns.content.sample_inputs`)."""
    if not pat.content_dependent:
        return pat.mask(lq, lk, heads=heads), ""
    q, k = sample_inputs(lq, lk, heads=heads or 1, dim=args.dim, seed=args.seed)
    return pat.mask(lq, lk, heads=heads, q=q, k=k), f"  q, k ~ N(0, 1) D={args.dim} seed={args.seed}"


def cmd_show(args) -> int:
    pat = patterns.get(args.name, **dict(args.param))
    lk = args.lk or args.lq
    m, inputs = _build_mask(pat, args.lq, lk, args.heads, args)
    heads = m.group_shape[1]
    if args.head >= heads:
        raise RefattnError(f"--head {args.head} is out of range: this mask has {heads} head(s)")
    st = analysis.stats(m, h=args.head)
    where = f" head={args.head} of {heads}" if heads > 1 else ""
    print(f"{json.dumps(pat.to_dict())}  Lq={args.lq} Lk={lk}{where}{inputs}")
    print(draw(m, max_size=args.max_size, h=args.head))
    print(f"nnz={st.nnz} density={st.density:.6g} row keys min/mean/max="
          f"{st.row_min}/{st.row_mean:.4g}/{st.row_max} empty rows={st.empty_rows}")
    if args.png:
        width, height = write_png(m, args.png, h=args.head)
        print(f"wrote {args.png} ({width} x {height} pixels)")
    return 0


# ---- refattn paths -----------------------------------------------------------------------------
def add_paths(sub) -> None:
    p = sub.add_parser("paths", help="how information travels across stacked layers of a pattern",
                       description="For a pattern's n x n mask used by every layer of a stack: whether "
                       "query --to reads key --from directly, the fewest layers through which it "
                       "reaches it, and a shortest chain of positions (spec/analysis.md). With --layers "
                       "K, also the reachability matrix after K layers.")
    p.add_argument("--pattern", required=True, help="pattern name (see `refattn patterns`)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="a pattern parameter; repeat for several")
    p.add_argument("--n", type=_positive_int, default=16, help="sequence length (default 16)")
    p.add_argument("--from", dest="src", type=_nonnegative_int, required=True, help="the key position")
    p.add_argument("--to", dest="dst", type=_nonnegative_int, required=True, help="the query position")
    p.add_argument("--layers", type=_nonnegative_int, default=None,
                   help="also print which keys reach which queries through exactly this many layers")
    p.add_argument("--heads", type=_positive_int, default=None, help="number of heads, for per-head patterns")
    p.add_argument("--head", type=_nonnegative_int, default=0, help="which head (default 0)")
    p.add_argument("--max-size", type=_positive_int, default=64, help="largest picture side (default 64)")
    _add_content_inputs(p)


def cmd_paths(args) -> int:
    pat = patterns.get(args.pattern, **dict(args.param))
    m, inputs = _build_mask(pat, args.n, args.n, args.heads, args)
    if args.head >= m.group_shape[1]:
        raise RefattnError(f"--head {args.head} is out of range: this mask has {m.group_shape[1]} head(s)")
    src, dst, h = args.src, args.dst, args.head
    chain = analysis.path(m, src, dst, h=h)
    direct = bool(m.group(0, h)[[dst], [src]][0])
    print(f"{json.dumps(pat.to_dict())}  n={args.n}" + (f" head={h}" if m.group_shape[1] > 1 else "") + inputs)
    print(f"query {dst} reads key {src} directly: {'yes' if direct else 'no'}")
    if chain is None:
        print(f"key {src} never reaches query {dst}, through any number of layers")
    else:
        k = len(chain) - 1
        print(f"fewest layers from key {src} to query {dst}: {k}")
        if k:
            print("a shortest chain: " + " -> ".join(map(str, chain)))
            for layer, (a, b) in enumerate(zip(chain, chain[1:]), start=1):
                print(f"  layer {layer}: query {b} reads key {a}")
    if args.layers is not None:
        reach = analysis.reachability(m, args.layers, h=h)
        print(f"\nreachability after exactly {args.layers} layer(s) (row: query, column: key; "
              f"{int(reach.nnz)} of {args.n * args.n} pairs):")
        print(draw(Mask.from_csr(reach), max_size=args.max_size))
    return 0


def _text_table(headers: list[str], rows: list[list], *, right: bool = False) -> str:
    """Columns two spaces apart, each as wide as its widest cell; left-aligned (trailing
    spaces dropped) or right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    pad = (lambda c, w: c.rjust(w)) if right else (lambda c, w: c.ljust(w))
    return "\n".join("  ".join(pad(c, w) for c, w in zip(line, widths)).rstrip() for line in [headers, *cells])


# ---- refattn golden ---------------------------------------------------------------------------
def _progress(stream=None):
    """A progress callback: a bar redrawn in place on a terminal, a line per case otherwise."""
    stream = stream or sys.stderr
    tty = stream.isatty()

    def show(i: int, n: int, case_id: str) -> None:
        if tty:
            width = 30
            done = width * i // max(n, 1)
            end = "\n" if i == n else ""
            stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {i}/{n} {case_id:<40.40}{end}")
        elif i < n:
            stream.write(f"[{i + 1}/{n}] {case_id}\n")
        stream.flush()
    return show


def add_golden(sub) -> None:
    p = sub.add_parser("golden", help="the golden suite: generate, check or list its cases",
                       description="The golden suite (spec/golden-format.md): test vectors for other "
                       "attention implementations.")
    gsub = p.add_subparsers(dest="golden_command", metavar="ACTION")
    gsub.required = True
    g = gsub.add_parser("generate", help="compute the cases and write them with a manifest",
                        description="Compute every case (or the --filter ones) from its seed by two "
                        "independent routes, and write cases/*.npz and manifest.json.")
    g.add_argument("--out", default="golden", help="folder to write (default: golden)")
    g.add_argument("--filter", default=None, metavar="EXPR",
                   help="comma-separated shell patterns over case ids, e.g. 'pattern-*,feature-gqa'")
    c = gsub.add_parser("check", help="verify a suite's checksums and regenerate it",
                        description="Check each case file's size and SHA-256 against the manifest, then "
                        "regenerate the case from its seed: inputs must be equal, outputs within the "
                        "manifest's agreement bound. Exit 0 only if every case passes.")
    c.add_argument("dir", nargs="?", default="golden", help="the suite's folder (default: golden)")
    c.add_argument("--filter", default=None, metavar="EXPR", help="check only these cases (as generate)")
    ls = gsub.add_parser("list", help="list the suite's cases", description="List the cases of the suite.")
    ls.add_argument("--filter", default=None, metavar="EXPR", help="list only these cases (as generate)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")


def cmd_golden(args) -> int:
    from . import golden

    if args.golden_command == "list":
        cases = golden.select(golden.suite(), args.filter)
        rows = [{"id": c.id, "group": c.group, "pattern": c.pattern.to_dict()["name"] if c.pattern else "explicit",
                 "shape": "B{B} H{H}/{Hkv} Lq{Lq} Lk{Lk} D{D}/{Dv}".format(**c.shape),
                 "features": ",".join(c.features) or "-"} for c in cases]
        if args.json:
            print(json.dumps(rows, indent=1))
        else:
            if rows:
                print(_text_table(list(rows[0]), [list(r.values()) for r in rows]))
            print(f"{len(rows)} case(s)")
        return 0
    if args.golden_command == "generate":
        manifest = golden.generate(args.out, args.filter, progress=_progress())
        total = sum(e["bytes"] for e in manifest["cases"])
        print(f"wrote {len(manifest['cases'])} case(s), {total / 2**20:.1f} MiB, to {args.out}/ "
              f"(manifest.json, cases/)")
        return 0
    results = golden.check(args.dir, args.filter, progress=_progress())
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"FAIL {r.case_id}: {r.message}")
    print(f"{len(results) - len(failed)} of {len(results)} case(s) pass" + ("" if failed else "; the suite is intact"))
    return 0 if results and not failed else 1


# ---- refattn verify ---------------------------------------------------------------------------
def add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check an attention implementation against the golden suite",
                       description="Run IMPL (module:function, in the calling convention of spec/verify.md) "
                       "on every golden case and judge each tensor by spec/tolerance.md. Prints a table "
                       "per case; exits 0 only if no case fails and at least one passes (a case IMPL cannot "
                       "express is reported as unsupported, never as passed).")
    p.add_argument("impl", metavar="IMPL", help="the forward function, module:function (e.g. refattn.adapters:cpu)")
    p.add_argument("--backward", metavar="IMPL", default=None,
                   help="the backward function (default: the forward's `backward` attribute, if any)")
    p.add_argument("--golden", default="golden", metavar="DIR", help="the suite's folder (default: golden)")
    p.add_argument("--dtype", default="float32", choices=["float64", "float32", "float16", "bfloat16"],
                   help="the dtype the inputs are given in and the kernel is judged for (default float32)")
    p.add_argument("--filter", default=None, metavar="EXPR", help="only these cases (shell patterns over ids)")
    p.add_argument("--layout", default="bhsd", choices=["bhsd", "bshd"],
                   help="axis order of q, k, v, out (default bhsd)")
    p.add_argument("--framework", default="numpy", choices=["numpy", "torch"],
                   help="give the implementation NumPy arrays (default) or torch tensors")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the verdicts as JSON")


def _fmt(x: float) -> str:
    return "-" if x is None else ("inf" if x == float("inf") else f"{x:.3g}")


def cmd_verify(args) -> int:
    from . import verify

    impl = verify.load_impl(args.impl, args.backward)
    results = verify.verify(impl, args.golden, args.dtype, args.filter, args.layout, args.framework,
                            progress=_progress())
    rows = []
    for r in results:
        t = r.first_failure or r.worst
        rows.append([r.case_id, r.status.upper() if r.status != "pass" else "pass",
                     t.name if t else "-", _fmt(t.error) if t else "-", _fmt(t.allowed) if t else "-",
                     _fmt(t.ratio) if t else "-", (r.message or (t.note if t else "")).splitlines()[0][:100]
                     if (r.message or (t and t.note)) else ""])
    headers = ["case", "status", "tensor", "error", "allowed", "ratio", "note"]
    print(f"{impl.name} ({args.dtype}, {args.layout}, {args.framework}) against {args.golden}/: "
          "the failing tensor, else the one nearest its bound")
    print(_text_table(headers, rows))
    count = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error", "unsupported")}
    print(f"{count['pass']} passed, {count['fail']} failed, {count['error']} errors, "
          f"{count['unsupported']} unsupported, of {len(results)} case(s)")
    if args.json:
        import dataclasses as dc

        def finite(x):  # strict JSON has no NaN or Infinity: those go as strings
            return x if not isinstance(x, float) or math.isfinite(x) else str(x)
        with open(args.json, "w") as f:
            json.dump({"impl": impl.name, "dtype": args.dtype, "layout": args.layout, "framework": args.framework,
                       "cases": [{"id": r.case_id, "status": r.status, "message": r.message,
                                  "tensors": [{k: finite(v) for k, v in {**dc.asdict(t), "ratio": t.ratio}.items()}
                                              for t in r.tensors]} for r in results]},
                      f, indent=1, allow_nan=False)
    return 0 if count["pass"] and not (count["fail"] or count["error"]) else 1


# ---- refattn checkpoint -----------------------------------------------------------------------
def add_checkpoint(sub) -> None:
    p = sub.add_parser("checkpoint", help="compare checkpoint schedules on a transformer stack",
                       description="Run forward and backward of a pre-LN transformer stack under each "
                       "schedule (spec/checkpointing.md) and print: peak saved activations from the "
                       "ledger, peak traced allocation, forward calls, extra forward steps, wall time, "
                       "and whether the gradients equal those of `none` bit for bit.")
    p.add_argument("--layers", type=_positive_int, default=8, help="number of blocks (default 8)")
    p.add_argument("--seq", type=_positive_int, default=256, help="sequence length n (default 256)")
    p.add_argument("--dim", type=_positive_int, default=64, help="model width d_model (default 64)")
    p.add_argument("--heads", type=_positive_int, default=4, help="query heads (default 4)")
    p.add_argument("--kv-heads", type=_positive_int, default=None, help="kv heads (default: --heads)")
    p.add_argument("--ff", type=_positive_int, default=None, help="MLP width (default 4 * --dim)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--pattern", default="sliding_window", help="attention pattern (default sliding_window)")
    p.add_argument("--param", type=_param, action="append", default=[], metavar="KEY=VALUE",
                   help="a pattern parameter (default for sliding_window: left=32, right=0)")
    p.add_argument("--backend", default="cpu", help="attention backend (default cpu)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"],
                   help="model and compute dtype (default float64)")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout probability (default 0.1)")
    p.add_argument("--seed", type=_nonnegative_int, default=0, help="weights, inputs and dropout seed")
    p.add_argument("--schedule", default="all",
                   help="none, uniform:K, sqrt, binomial:S, selective, a comma-separated list, or all")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the rows as JSON")


def cmd_checkpoint(args) -> int:
    from . import checkpoint, model

    if not 0 <= args.dropout < 1:
        raise RefattnError(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.dim % args.heads:
        raise RefattnError(f"--dim {args.dim} must be a multiple of --heads {args.heads}")
    params = dict(args.param)
    if args.pattern == "sliding_window" and not params:
        params = {"left": 32, "right": 0}
    pattern = patterns.get(args.pattern, **params)
    schedules = checkpoint.expand_schedules(args.schedule, args.layers)
    dt = np.dtype(args.dtype)
    stack = model.Stack(args.layers, args.dim, args.heads, args.kv_heads or args.heads, args.ff or 4 * args.dim,
                        pattern=pattern, backend=args.backend, compute_dtype=dt, dropout=args.dropout,
                        seed=args.seed, dtype=dt)
    rng = np.random.default_rng(args.seed)
    x = rng.standard_normal((args.batch, args.seq, args.dim)).astype(dt)
    target = rng.standard_normal(x.shape).astype(dt)
    ctx = model.Context(seed=args.seed, call=0, train=True)

    def dloss(y):  # loss = sum(y * target): its gradient is the fixed target
        return target

    checkpoint.measure(stack, x, ctx, "none", dloss)        # warm-up: compiled kernels, first allocations
    rows, reference = [], None
    for spec in ["none"] + [s for s in schedules if s != "none"]:
        row, grads = checkpoint.measure(stack, x, ctx, spec, dloss)
        if reference is None:
            reference = grads
        row.grads_equal_none = all(a.tobytes() == b.tobytes() for a, b in zip(grads, reference))
        if spec in schedules:
            rows.append(row)
            print(f"  {spec}: {row.seconds:.2f} s", file=sys.stderr, flush=True)
    mb = 2 ** 20
    headers = ["schedule", "ledger peak MB", "traced peak MB", "forward calls", "extra forwards", "time s",
               "grads == none"]
    table = [[r.schedule, f"{r.ledger_peak_bytes / mb:.1f}", f"{r.traced_peak_bytes / mb:.1f}",
              str(r.forward_calls), str(r.extra_forwards), f"{r.seconds:.2f}",
              "yes" if r.grads_equal_none else "NO"] for r in rows]
    print(f"refattn checkpoint: {args.layers} layers, n = {args.seq}, d_model = {args.dim}, heads = {args.heads}/"
          f"{args.kv_heads or args.heads}, pattern = {pattern.to_dict()}, backend = {args.backend}, {args.dtype}, "
          f"dropout = {args.dropout}")
    print(_text_table(headers, table, right=True))
    if args.json:
        import dataclasses as dc
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                       "rows": [dc.asdict(r) for r in rows]}, f, indent=1, default=str)
    return 0 if all(r.grads_equal_none for r in rows) else 1


# ---- refattn bench ------------------------------------------------------------------------
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
        from .bench import cuda as harness
    else:
        from .bench import cpu as harness

    return harness.main(args.args, prog=f"refattn bench {args.target}")


def add_explain(sub) -> None:
    from .explain import add_explain as add

    add(sub)


def cmd_explain(args) -> int:
    from .explain import cmd_explain as run

    return run(args)


COMMANDS = [("run", add_run, cmd_run), ("patterns", add_patterns, cmd_patterns),
            ("show", add_show, cmd_show), ("paths", add_paths, cmd_paths), ("explain", add_explain, cmd_explain),
            ("golden", add_golden, cmd_golden),
            ("verify", add_verify, cmd_verify), ("checkpoint", add_checkpoint, cmd_checkpoint),
            ("bench", add_bench, cmd_bench)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="refattn",
        description="refattn: the reference engine and specification for attention.",
    )
    parser.add_argument("--version", action="version", version=f"refattn {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, add, run in COMMANDS:
        add(sub)
        sub.choices[name].set_defaults(_run=run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args._run(args)
    except RefattnError as e:
        print(f"refattn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`refattn patterns | head`): stop quietly, as other CLIs do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
