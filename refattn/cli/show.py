"""``refattn patterns`` and ``refattn show``: the registry, and one pattern drawn with its stats."""

from __future__ import annotations

import dataclasses
import json
import re

from .. import patterns
from ..errors import RefattnError
from ..study import analysis
from ..study.draw import draw, write_png
from ._common import add_content_inputs, build_mask, nonnegative_int, param, positive_int


def add_patterns(sub) -> None:
    sub.add_parser("patterns", help="list the registered patterns",
                   description="List every registered pattern with its parameters and a one-line description.")


def cmd_patterns(args) -> int:
    for name in patterns.names():
        cls = patterns.base._REGISTRY[name]
        params = ", ".join(f.name for f in dataclasses.fields(cls))
        print(f"{name:<24} ({params})  {first_sentence(cls.__doc__)}")
    return 0


#: A sentence ends at a single period followed by the end or by a space and a capital
#: letter: not at the ellipsis of a range (``0 .. n - 1``), nor after ``e.g.``.
_SENTENCE_END = re.compile(r"(?<![.\s])\.(?!\.)(?=\s+[A-Z]|\s*$)")


def first_sentence(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, on one line, without its period
    and without the reStructuredText literal marks."""
    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    return _SENTENCE_END.split(para, maxsplit=1)[0].replace("``", "")


def add_show(sub) -> None:
    p = sub.add_parser("show", help="draw a pattern's mask in the terminal, with its stats",
                       description="Draw a pattern's mask, '#' allowed and '.' removed; above "
                       "--max-size cells are aggregated into blocks ('#' full, '+' partial, "
                       "'.' empty). Parameter values are JSON (3, [0, 9], true) or bare words.")
    p.add_argument("name", help="pattern name (see `refattn patterns`)")
    p.add_argument("--lq", type=positive_int, default=32, help="query length (default 32)")
    p.add_argument("--lk", type=positive_int, default=None, help="key length (default: --lq)")
    p.add_argument("--param", type=param, action="append", default=[], metavar="KEY=VALUE",
                   help="a pattern parameter; repeat for several")
    p.add_argument("--max-size", type=positive_int, default=64,
                   help="largest picture side in characters (default 64)")
    p.add_argument("--heads", type=positive_int, default=None,
                   help="number of heads, for patterns that differ per head")
    p.add_argument("--head", type=nonnegative_int, default=0, help="which head to show (default 0)")
    p.add_argument("--png", metavar="FILE", default=None,
                   help="also write the mask as a PNG picture (black allowed, white removed)")
    add_content_inputs(p)


def cmd_show(args) -> int:
    pat = patterns.get(args.name, **dict(args.param))
    lk = args.lk or args.lq
    m, inputs = build_mask(pat, args.lq, lk, args.heads, args)
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
