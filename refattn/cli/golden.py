"""``refattn golden``: generate, check or list the golden suite (spec/golden-format.md)."""

from __future__ import annotations

import json
import time

from .. import golden
from ..errors import RefattnError
from ._common import Progress, RowPrinter, text_table

#: How ``check`` and ``verify`` find a suite when none is named (`refattn.golden.locate`).
SUITE_RULE = ("the suite's folder, holding manifest.json (default: $REFATTN_GOLDEN, else ./golden, else the "
              "source checkout's golden/, else the built-in suite generated once into the user cache)")


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
    _add_case_source(g)
    g.add_argument("--filter", default=None, metavar="EXPR",
                   help="comma-separated shell patterns over case ids, e.g. 'pattern-*,feature-gqa'")
    c = gsub.add_parser("check", help="verify a suite's checksums and regenerate it",
                        description="Check each case file's size and SHA-256 against the manifest, then "
                        "regenerate the case from its seed: inputs must be equal, outputs within the "
                        "manifest's agreement bound. Prints a row per case as it is checked; exits 0 "
                        "only if every case passes.")
    c.add_argument("dir", nargs="?", default=None, metavar="DIR", help=SUITE_RULE)
    c.add_argument("--golden", default=None, metavar="DIR", help="the same as DIR")
    c.add_argument("--filter", default=None, metavar="EXPR", help="check only these cases (as generate)")
    ls = gsub.add_parser("list", help="list the suite's cases", description="List the cases of a tier or a case "
                         "list, one line each.")
    _add_case_source(ls)
    ls.add_argument("--filter", default=None, metavar="EXPR", help="list only these cases (as generate)")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cs = gsub.add_parser("cases", help="print a tier's case list (JSON), to edit and generate with --cases",
                         description="Print the case list of a tier (spec/golden-format.md, \"Case lists\"): the "
                         "cases as data, each as the manifest records it. Edit it and generate it with "
                         "`refattn golden generate --cases FILE`.")
    _add_case_source(cs)
    cs.add_argument("--filter", default=None, metavar="EXPR", help="only these cases (as generate)")


def _add_case_source(p) -> None:
    source = p.add_mutually_exclusive_group()
    source.add_argument("--tier", default=None, choices=sorted(golden.TIERS),
                        help="a built-in case list (default: core, the suite committed in golden/)")
    source.add_argument("--cases", default=None, metavar="FILE", help="a case list file (refattn golden cases "
                        "writes one)")


def _cases(args) -> list:
    """The cases ``--tier`` or ``--cases`` names (default: the core tier)."""
    if args.cases is not None:
        return golden.read_case_list(args.cases)
    return golden.tier(args.tier or "core")


def cmd_golden(args) -> int:
    if args.golden_command == "list":
        return _list(args)
    if args.golden_command == "cases":
        cases = golden.select(_cases(args), args.filter)
        if not cases:
            raise RefattnError(f"--filter {args.filter!r} selects no case")
        print(json.dumps(golden.case_list(cases, None if args.cases else args.tier or "core"), indent=1))
        return 0
    if args.golden_command == "generate":
        cases = _cases(args)
        written = [c.id for c in golden.select(cases, args.filter)]
        manifest = golden.generate(args.out, args.filter, progress=Progress(), cases=cases)
        entries = {e["id"]: e for e in manifest["cases"]}
        size = sum(entries[cid]["bytes"] for cid in written)
        kept = len(entries) - len(written)
        print(f"wrote {len(written)} case(s), {size / 2**20:.1f} MiB, to {args.out}/cases/; "
              f"{args.out}/manifest.json lists {len(entries)} case(s)"
              + (f" ({kept} kept from before, not regenerated)" if kept else ""))
        return 0
    return _check(args)


def _list(args) -> int:
    cases = golden.select(_cases(args), args.filter)
    rows = [{"id": c.id, "group": c.group, "pattern": c.pattern.to_dict()["name"] if c.pattern else "explicit",
             "shape": "B{B} H{H}/{Hkv} Lq{Lq} Lk{Lk} D{D}/{Dv}".format(**c.shape),
             "features": ",".join(c.features) or "-"} for c in cases]
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        if rows:
            print(text_table(list(rows[0]), [list(r.values()) for r in rows]))
        print(f"{len(rows)} case(s)")
    return 0


def _check(args) -> int:
    if args.dir is not None and args.golden is not None and args.dir != args.golden:
        raise RefattnError(f"name the suite once: DIR {args.dir!r} and --golden {args.golden!r} differ")
    gdir = golden.resolve_golden_dir(args.dir if args.dir is not None else args.golden)
    entries = golden.select_entries(golden.load_manifest(gdir)["cases"], args.filter, str(gdir))
    print(f"refattn golden check: {len(entries)} case(s) of {gdir}: checksums, then each case regenerated "
          f"from its seed by routes {' and '.join(golden.ROUTES)}", flush=True)
    ids = [golden.entry_id(e) for e in entries]
    table = RowPrinter(["status", "case", "time s", "note"], [6, max(map(len, ids), default=4), 6, 0])
    progress = Progress(lines_when_piped=False)
    failed = 0
    for i, (cid, entry) in enumerate(zip(ids, entries)):
        progress(i, len(entries), cid)
        t0 = time.perf_counter()
        r = golden.check_case(gdir, entry)
        progress.clear()
        failed += not r.ok
        table.row(["pass" if r.ok else "FAIL", cid, f"{time.perf_counter() - t0:.2f}", "" if r.ok else r.message])
    progress(len(entries), len(entries), "")
    passed = len(entries) - failed
    print(f"{passed} of {len(entries)} case(s) pass" + ("" if failed else "; the suite is intact"))
    return 0 if entries and not failed else 1
