"""`explain`: the tiled kernel on a small problem, step by step, as text (``refattn explain``).

It draws the mask with the tile grid, the block layout, the key blocks that one query
block visits, and for one row a table of the online-softmax statistics after each
block (from `refattn.study.trace`), ending with the check against the dense oracle; with
``backward``, ``D``, the row of ``dS`` per visited block and ``dq`` against the oracle.
Every line fits 80 columns. ``png`` draws the mask with the block grid (refattn's own
PNG writer: no plotting library needed). spec/trace.md describes it.
"""
# ruff: noqa: E741  (I, J, l, O: the notation of the paper and the spec)

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

import numpy as np

from ..attention import backward as attention_backward
from ..attention import forward as attention_forward
from ..errors import RefattnError
from .draw import draw, write_png
from .trace import num, trace

WIDTH = 80
#: The largest mask side drawn a character per entry (larger ones are aggregated).
MAX_PICTURE = 64
#: explain traces every tile of the problem: keep it small.
MAX_ENTRIES = 1 << 22
#: Agreement with the oracle that counts as a match (float64 against float64).
RTOL = ATOL = 1e-12


@dataclass(frozen=True)
class Explanation:
    """What `explain` prints, line by line, and whether every check against the oracle held."""

    lines: tuple[str, ...]
    ok: bool

    def __str__(self) -> str:
        return "\n".join(self.lines)


def _positive(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise RefattnError(f"explain: {name} must be an int >= 1, got {value!r}")
    return int(value)


def explain(pattern, *, lq: int = 16, lk: int | None = None, block_q: int = 4, block_k: int | None = None,
            row: int | None = None, backward: bool = False, dim: int = 4, heads: int | None = None,
            head: int = 0, seed: int = 0, max_size: int = MAX_PICTURE, png=None) -> Explanation:
    """The tiled kernel on one small problem, step by step (spec/trace.md).

    ``pattern`` is a `refattn.patterns.Pattern`. The inputs are drawn from
    ``numpy.random.default_rng(seed)``: q, k, v standard normal, then dout; a
    content-dependent pattern chooses its keys from these q and k. The result holds the
    mask with its block grid, the block layout, the key blocks visited by ``row``'s query
    block, ``row``'s online-softmax statistics per block checked against the dense oracle,
    and with ``backward`` its ``D``, ``dS`` per block and ``dq``; ``png`` also writes the
    mask with the block grid to that path."""
    lq = _positive(lq, "lq")
    lk = lq if lk is None else _positive(lk, "lk")
    bq = _positive(block_q, "block_q")
    bk = bq if block_k is None else _positive(block_k, "block_k")
    dim = _positive(dim, "dim")
    if lq * lk > MAX_ENTRIES:
        raise RefattnError(f"explain: Lq * Lk = {lq * lk}: explain records every tile; keep Lq * Lk <= {MAX_ENTRIES}")
    row = lq // 2 if row is None else row
    if not 0 <= row < lq:
        raise RefattnError(f"explain: row {row} is out of range: the rows are 0 .. {lq - 1}")
    mask = None if pattern.content_dependent else pattern.mask(lq, lk, heads=heads)
    nheads = heads or (1 if mask is None else mask.group_shape[1])
    if not 0 <= head < nheads:
        raise RefattnError(f"explain: head {head} is out of range: this problem has {nheads} head(s)")
    h = head
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, nheads, lq, dim))
    k = rng.standard_normal((1, nheads, lk, dim))
    v = rng.standard_normal((1, nheads, lk, dim))
    dout = rng.standard_normal((1, nheads, lq, dim))
    if mask is None:        # a content-dependent pattern chooses its keys from this q and k
        mask = pattern.mask(lq, lk, heads=heads, q=q, k=k)
    t = trace(q, k, v, mask, block_q=bq, block_k=bk, backward=backward, dout=dout if backward else None)
    oracle = attention_forward(q, k, v, mask)

    out: list[str] = []
    emit = out.append
    where = f" head {h} of {nheads}," if nheads > 1 else ""
    for line in textwrap.wrap(f"refattn explain: {pattern!r}", WIDTH, subsequent_indent="  "):
        emit(line)
    emit(f"Lq={lq} Lk={lk} D={dim},{where} blocks {bq} x {bk}; q, k, v ~ N(0, 1), seed {seed}")
    emit("")
    out.extend(_mask_section(mask, h, bq, bk, min(max_size, MAX_PICTURE), row))
    emit("")
    out.extend(_layout_section(t, h, row))
    emit("")
    out.extend(_visits_section(t, h, row))
    emit("")
    lines, ok = _row_section(t, oracle, h, row)
    out.extend(lines)
    if backward:
        emit("")
        lines, good = _backward_section(t, q, k, v, mask, oracle, dout, h, row)
        out.extend(lines)
        ok &= good
    if png is not None:
        width, height = write_png(mask, png, h=h, grid=(bq, bk))
        grid = "with the block grid" if max(lq, lk) <= 256 else "too large for a block grid"
        emit("")
        emit(f"wrote {png} ({width} x {height} pixels, {grid})")
    return Explanation(tuple(out), bool(ok))


# ---- sections ------------------------------------------------------------------------------
def _mask_section(mask, h: int, bq: int, bk: int, max_size: int, row: int) -> list[str]:
    lq, lk = mask.matrix_shape
    mark = f"  <- row {row}"
    if lq > max_size or lk > max_size:
        max_size = min(max_size, WIDTH - 2 - len(mark))
        cq = math.ceil(lq / max_size)
        lines = [(f"mask, aggregated ({cq} x {math.ceil(lk / max_size)} entries per character: "
                  "# full, + partial, . empty):")]
        pic = draw(mask, max_size=max_size, h=h).splitlines()
        lines += ["  " + s + (mark if r == row // cq else "") for r, s in enumerate(pic)]
        return lines
    allowed = mask.group(0, h).toarray()
    lab = len(str(lq - 1))
    nbk = -(-lk // bk)
    grid = lab + 2 + lk + nbk - 1 + len(mark) <= WIDTH
    sep = "|" if grid else ""
    lines = ["mask (# allowed, . removed" + ("; | and - are the block edges):" if grid else "):")]
    widths = [min(lk, (J + 1) * bk) - J * bk for J in range(nbk)]
    if grid and all(len(str(J * bk)) <= bk for J in range(nbk)):
        lines.append(" " * (lab + 2) + "".join(str(J * bk).ljust(w + 1) for J, w in zip(range(nbk), widths)).rstrip())
    for i in range(lq):
        if grid and i and i % bq == 0:
            lines.append(" " * (lab + 2) + "+".join("-" * w for w in widths))
        cells = "".join("#" if a else "." for a in allowed[i])
        text = sep.join(cells[J * bk:(J + 1) * bk] for J in range(nbk))
        lines.append(f"{i:>{lab}}  {text}" + (mark if i == row else ""))
    return lines


def _layout_section(t, h: int, row: int) -> list[str]:
    layout = t.layout(0, h)
    qi = row // t.block_q
    counts = {c: sum(s.count(c) for s in layout) for c in "FP"}
    total = t.nbq * t.nbk
    summary = (f"  {counts['F'] + counts['P']} of {total} tiles visited "
               f"({counts['F']} full, {counts['P']} partial), {total - counts['F'] - counts['P']} skipped")
    lab = len(str(t.nbq - 1))
    if lab + 6 + t.nbk + 12 > WIDTH:
        return ["block layout: too many key blocks to draw (F full, P partial, . empty):", summary,
                f"  query block I={qi}: " + _runs(layout[qi])]
    lines = ["block layout (F full, P partial, . empty: never visited):",
             "  " + "J".rjust(lab + 2) + "  " + "".join(str(J % 10) for J in range(t.nbk))
             + ("  (J mod 10)" if t.nbk > 10 else "")]
    for I, kinds in enumerate(layout):
        lines.append(f"  I={I:<{lab}}  {kinds}" + (f"  <- row {row}" if I == qi else ""))
    lines.append(summary)
    return lines


def _runs(kinds: str) -> str:
    """``F`` / ``P`` / ``.`` letters as runs: ``J=0..3 F, J=4 P, J=5..9 .``."""
    parts, start = [], 0
    for J in range(1, len(kinds) + 1):
        if J == len(kinds) or kinds[J] != kinds[start]:
            parts.append(f"J={start}" + (f"..{J - 1}" if J - 1 > start else "") + f" {kinds[start]}")
            start = J
    return textwrap.shorten(", ".join(parts), WIDTH - 20, placeholder=" ...")


def _visits_section(t, h: int, row: int) -> list[str]:
    qb = t.query_block(0, h, row // t.block_q)
    lines = [f"query block I={qb.I} (rows {qb.rows[0]}-{qb.rows[1] - 1}) walks its key blocks in order:"]
    steps, n = qb.steps, len(qb.steps)
    entries = []  # (J or J range, keys, what), a skipped run on one line
    idx = 0
    while idx < n:
        s, end = steps[idx], idx
        if s.visited:
            what = "full: visited, no mask inside" if s.kind == "full" else "partial: visited, mask applied inside"
        else:
            while end + 1 < n and not steps[end + 1].visited:
                end += 1
            what = f"skipped: empty tile{'s' if end > idx else ''}, never visited"
        js = f"J={s.J}" if end == idx else f"J={s.J}..{steps[end].J}"
        entries.append((js, f"keys {s.keys[0]}-{steps[end].keys[1] - 1}", what))
        idx = end + 1
    w1, w2 = (max(len(e[c]) for e in entries) for c in (0, 1))
    lines += [f"  {a:<{w1}}  {b:<{w2}}  {c}" for a, b, c in entries]
    if not qb.visited:
        lines.append("  (no key block visited: every row of this query block is empty)")
    return lines


def _row_section(t, oracle, h: int, row: int):
    qb = t.query_block(0, h, row // t.block_q)
    r = row - qb.rows[0]
    lines = [f"row {row}, after each visited key block J (S_J: the row's scores in block J):",
             "  block max = rowmax(S_J)        m_new = max(m_old, block max)",
             "  alpha = exp(m_old - m_new)     l = alpha l + rowsum(exp(S_J - m_new))",
             "  O = alpha O + exp(S_J - m_new) V_J, shown normalised: O/l (first components)"]
    if qb.visited:
        lines.append(t.format_row(0, h, row, width=WIDTH))
    else:
        lines.append("  (no visited block)")
    m, lsum, lse, orc = float(qb.m[r]), float(qb.l[r]), float(t.lse[0, h, row]), float(oracle.lse[0, h, row])
    o_row, o_orc = t.out[0, h, row], oracle.out[0, h, row]
    if np.isneginf(lse):
        lines.append(f"final:  m = -inf, l = {num(lsum)}: row {row} has no allowed key, so O = 0 and lse = -inf")
        lse_ok = np.isneginf(orc)
        lines.append(f"oracle: lse = {num(orc)}" + ("  (the same)" if lse_ok else "  DIFFERENT"))
    else:
        diff = abs(lse - orc)
        lse_ok = diff <= ATOL + RTOL * abs(orc)
        lines.append(f"final:  lse = m + log l = {lse:.17g}  (m = {num(m)}, l = {num(lsum)})")
        lines.append(f"oracle: lse = {orc:.17g}  |diff| = {diff:.2g}")
    shown = min(3, o_row.size)
    lines.append(f"out[{row}] = O/l = [{', '.join(num(x) for x in o_row[:shown])}"
                 + (", ...]" if o_row.size > shown else "]"))
    out_diff = float(np.max(np.abs(o_row - o_orc)))
    out_ok = bool(np.allclose(o_row, o_orc, rtol=RTOL, atol=ATOL))
    lines.append(f"out matches the oracle: {'yes' if out_ok else 'NO'} (max |diff| = {out_diff:.2g} over the row)")
    all_ok = bool(np.allclose(t.out, oracle.out, rtol=RTOL, atol=ATOL)) and _lse_close(t.lse, oracle.lse)
    lines.append(f"all {t.shape[2]} rows{'' if t.shape[1] == 1 else ' of every head'}: out and lse match "
                 f"the oracle: {'yes' if all_ok else 'NO'}")
    return lines, bool(lse_ok and out_ok and all_ok)


def _lse_close(a, b) -> bool:
    inf_a, inf_b = np.isneginf(a), np.isneginf(b)
    if not np.array_equal(inf_a, inf_b):
        return False
    return bool(np.allclose(a[~inf_a], b[~inf_b], rtol=RTOL, atol=ATOL))


def _backward_section(t, q, k, v, mask, oracle, dout, h: int, row: int):
    bw = t.backward
    lq, lk = t.shape[2:]
    g = attention_backward(q, k, v, oracle.out, oracle.lse, dout, mask)
    lines = ["backward: dO ~ N(0, 1) (drawn after q, k, v), D = rowsum(dO * O),",
             "  P = exp(S - lse), dP = dO V^T, dS = P * (dP - D); key blocks outside:"]
    order = [f"({x.I},{x.J})" for x in bw.tiles if x.b == 0 and x.h == h]
    if len(order) > 40:
        order = order[:32] + [f"... ({len(order)} tiles)"]
    lines += textwrap.wrap("tiles (I,J) in order: " + " ".join(order), WIDTH - 2, initial_indent="  ",
                           subsequent_indent="    ")
    D, D_orc = float(bw.D[0, h, row]), float(np.sum(dout[0, h, row] * oracle.out[0, h, row]))
    D_ok = abs(D - D_orc) <= ATOL + RTOL * abs(D_orc)
    lines.append(f"D[{row}] = {D:.17g}  oracle {D_orc:.17g}  |diff| = {abs(D - D_orc):.2g}")
    # the oracle's dS on this row, from the equations, densely
    allowed = mask.group(0, h).toarray()[row]
    S = t.scale * (k[0, h] @ q[0, h, row])
    lse = oracle.lse[0, h, row]
    P = np.where(allowed, np.exp(np.where(allowed, S, -np.inf) - lse), 0.0) if np.isfinite(lse) else np.zeros(lk)
    dS_orc = P * (v[0, h] @ dout[0, h, row] - D_orc)
    dS = bw.ds(0, h, (lq, lk))[row]
    lines.append(f"dS on row {row}, per visited key block (. a removed entry, dS = 0 there):")
    qb = t.query_block(0, h, row // t.block_q)
    labels = [f"  J={s.J} keys {s.keys[0]}-{s.keys[1] - 1}:" for s in qb.visited]
    pad = max(map(len, labels), default=0)
    per_line = max(1, (WIDTH - pad) // 11)
    for s, label in zip(qb.visited, labels):
        vals = [f"{dS[j]:+.3e}" if allowed[j] else "." for j in range(*s.keys)]
        for c in range(0, len(vals), per_line):
            lines.append((label if c == 0 else "").ljust(pad) + "".join(x.rjust(11) for x in vals[c:c + per_line]))
    ds_diff = float(np.max(np.abs(dS - dS_orc)))
    ds_ok = bool(np.allclose(dS, dS_orc, rtol=RTOL, atol=ATOL))
    lines.append(f"dS row matches the oracle's P * (dP - D): {'yes' if ds_ok else 'NO'} (max |diff| = {ds_diff:.2g})")
    dq, dq_orc = bw.dq[0, h, row], g.dq[0, h, row]
    shown = min(3, dq.size)
    more = ", ...]" if dq.size > shown else "]"
    lines.append(f"dq[{row}]        = [{', '.join(f'{x:+.6e}' for x in dq[:shown])}{more}")
    lines.append(f"oracle dq[{row}] = [{', '.join(f'{x:+.6e}' for x in dq_orc[:shown])}{more}")
    dq_ok = bool(np.allclose(bw.dq, g.dq, rtol=RTOL, atol=ATOL))
    kv_ok = bool(np.allclose(bw.dk, g.dk, rtol=RTOL, atol=ATOL) and np.allclose(bw.dv, g.dv, rtol=RTOL, atol=ATOL))
    lines.append(f"dq matches the oracle: {'yes' if dq_ok else 'NO'} (max |diff| = "
                 f"{float(np.max(np.abs(dq - dq_orc))):.2g} on the row); dk, dv: {'yes' if kv_ok else 'NO'}")
    return lines, bool(D_ok and ds_ok and dq_ok and kv_ok)
