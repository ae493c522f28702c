"""What the command modules share: argument types, the pattern inputs of ``show`` and
``paths``, tables (whole or row by row) and progress on stderr."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from ..errors import RefattnError
from ..mask import Mask
from ..patterns.content import sample_inputs

DTYPES = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype(np.float32),
    "float64": np.dtype(np.float64),
}


def int_at_least(lowest: int):
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


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0)


def param(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a JSON value (``3``, ``[0, 9]``, ``true``) or a bare word."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        return key, json.loads(value)  # 3, [0, 9], true, "top_left"
    except json.JSONDecodeError:
        return key, value  # a bare word: a string, e.g. align=top_left
    except RecursionError:
        raise argparse.ArgumentTypeError(f"the value of {key!r} is nested too deeply") from None


def check_writable(path, flag: str) -> None:
    """`RefattnError` before a long job when its output file could not be written at the end."""
    if path is None:
        return
    target = Path(path)
    folder = target.parent
    if target.is_dir():
        raise RefattnError(f"{flag} {path}: is a folder, not a file")
    if not folder.is_dir():
        raise RefattnError(f"{flag} {path}: no such folder {folder}")
    if not os.access(folder, os.W_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise RefattnError(f"{flag} {path}: permission denied")


def add_param(p) -> None:
    p.add_argument("--param", type=param, action="append", default=[], metavar="KEY=VALUE",
                   help="a pattern parameter (JSON value or bare word); repeat for several")


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


# ---- the inputs of content-dependent patterns (show, paths) ------------------------------------
def add_content_inputs(p) -> None:
    p.add_argument("--seed", type=nonnegative_int, default=0,
                   help="content-dependent patterns (lsh, routing, topk, nsa_select, moba): the seed of "
                   "their inputs q, k ~ N(0, 1), numpy.random.default_rng(SEED), q first (default 0)")
    p.add_argument("--dim", type=positive_int, default=16,
                   help="content-dependent patterns: the head dim D of q and k (default 16)")


def build_mask(pat, lq: int, lk: int, heads: int | None, args) -> tuple[Mask, str]:
    """The pattern's mask and a note on its inputs: a content-dependent pattern chooses its
    keys from q, k drawn from --seed (`patterns.content.sample_inputs`)."""
    if not pat.content_dependent:
        return pat.mask(lq, lk, heads=heads), ""
    q, k = sample_inputs(lq, lk, heads=heads or 1, dim=args.dim, seed=args.seed)
    return pat.mask(lq, lk, heads=heads, q=q, k=k), f"  q, k ~ N(0, 1) D={args.dim} seed={args.seed}"


# ---- tables and progress ---------------------------------------------------------------------------
def text_table(headers: list[str], rows: list[list], *, right: bool = False) -> str:
    """Columns two spaces apart, each as wide as its widest cell; left-aligned (trailing
    spaces dropped) or right-aligned."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]
    return "\n".join(_line(line, widths, right) for line in [headers, *cells])


def _line(cells, widths, right: bool) -> str:
    pad = (lambda c, w: c.rjust(w)) if right else (lambda c, w: c.ljust(w))
    return "  ".join(pad(str(c), w) for c, w in zip(cells, widths)).rstrip()


class RowPrinter:
    """A table printed row by row as results come: the header at once, each row when it is
    ready. Column widths are fixed up front (a longer cell widens only its own row)."""

    def __init__(self, headers: list[str], widths: list[int], *, right: bool = False, stream=None):
        self.widths = [max(len(h), w) for h, w in zip(headers, widths)]
        self.right = right
        self.stream = stream or sys.stdout
        self._print(headers)

    def row(self, cells: list) -> None:
        self._print(cells)

    def _print(self, cells) -> None:
        self.stream.write(_line(cells, self.widths, self.right) + "\n")
        self.stream.flush()


class Progress:
    """Which case is running, on stderr, for jobs whose rows come only at the end or whose
    cases take long: on a terminal one line redrawn in place (erased by `clear` before a
    row is printed to stdout), elsewhere a line ``[i/n] case`` per case."""

    def __init__(self, stream=None, *, lines_when_piped: bool = True):
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.lines_when_piped = lines_when_piped
        self._shown = False

    def __call__(self, i: int, n: int, case_id: str) -> None:
        if i >= n:
            self.clear()
            return
        if self.tty:
            width = 30
            done = width * i // max(n, 1)
            self.stream.write(f"\r\x1b[K[{'#' * done}{'.' * (width - done)}] {i + 1}/{n} {case_id:.40}")
            self._shown = True
        elif self.lines_when_piped:
            self.stream.write(f"[{i + 1}/{n}] {case_id}\n")
        self.stream.flush()

    def clear(self) -> None:
        """Erase the in-place line (a terminal only), so that stdout's next row stands alone."""
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
