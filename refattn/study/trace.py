"""Traces of the ``tiled`` backend: the online softmax and its backward, tile by tile.

    t = refattn.study.trace.trace(q, k, v, mask, block_q=4, block_k=4, backward=True, dout=dout)
    t.query_block(0, 0, 1).steps     # key blocks J of query block I = 1, in order, with their kind
    t.row(0, 0, 7)                    # row 7's running max, sum, rescale and output after each block
    print(t.format_row(0, 0, 7))      # the same as a table
    t.save("trace.json")              # or .npz; refattn.study.trace.load reads it back

`trace` runs the real kernel (`refattn.backends.tiled`, in float64) with a `Recorder`,
which is shown the state of every tile the kernel visits and copies it; the recorder
changes no number (the results are bitwise those of ``refattn.forward(...,
backend="tiled")``). What is recorded and what each field means: spec/trace.md.
"""
# ruff: noqa: E741  (I, J, l, O: the notation of the paper and the spec)

from __future__ import annotations

import json
from dataclasses import dataclass, fields

import numpy as np

from ..attention import _check_grads, _check_result
from ..backends import configure, tiled
from ..backends._host import block_size
from ..contract import HOST, check_backward_inputs, make_problem
from ..errors import RefattnError

__all__ = ["BackwardTile", "BackwardTrace", "QueryBlockTrace", "Recorder", "TileStep", "Trace",
           "load", "trace"]

#: Kinds of a tile in a trace: visited with no element mask, visited with it, never visited.
KINDS = ("full", "partial", "skipped")
_LETTER = {"full": "F", "partial": "P", "skipped": "."}


def _copy(x) -> np.ndarray:
    return np.array(x, dtype=np.float64, copy=True)


# ---- the recorder: what the kernel shows ------------------------------------------------
class Recorder:
    """Receives the tiled kernel's state at each visited tile (the hook protocol of
    ``refattn.backends.tiled.forward`` / ``backward``, argument ``recorder``) and keeps
    copies. `trace` turns what it holds into a `Trace`."""

    def __init__(self):
        self.forward: dict[tuple[int, int, int], list[TileStep]] = {}
        self.D: np.ndarray | None = None
        self.backward: list[BackwardTile] = []

    def forward_tile(self, b, h, I, J, full, rows, cols, S, m_old, m_new, alpha, l, O):
        """After the online-softmax update of tile ``(I, J)`` of group ``(b, h)``: scores
        ``S`` (``-inf`` off the mask), ``m_old``, ``m_new``, ``alpha``, and the updated
        ``l`` and unnormalised ``O``."""
        S = _copy(S)
        step = TileStep(J=int(J), kind="full" if full else "partial", keys=(cols.start, cols.stop), s=S,
                        block_max=S.max(axis=1), m_old=_copy(m_old), m=_copy(m_new), alpha=_copy(alpha),
                        l=_copy(l), o=_copy(O))
        self.forward.setdefault((int(b), int(h), int(I)), []).append(step)

    def backward_rowsums(self, D):
        """``D = rowsum(dO * O)``, shape ``(B, H, Lq)``, before any tile."""
        self.D = _copy(D)

    def backward_tile(self, b, h, I, J, full, rows, cols, P, dP, dS):
        """Tile ``(I, J)`` of the backward: ``P``, ``dP`` and ``dS`` (the gradient with
        respect to the scores ``S``, before a softcap's chain rule)."""
        self.backward.append(BackwardTile(b=int(b), h=int(h), I=int(I), J=int(J),
                                          kind="full" if full else "partial",
                                          rows=(rows.start, rows.stop), keys=(cols.start, cols.stop),
                                          p=_copy(P), dp=_copy(dP), ds=_copy(dS)))


# ---- the trace: plain data ----------------------------------------------------------------
@dataclass(eq=False)
class TileStep:
    """Key block ``J`` of a query block, in the kernel's order. Per row of the query block
    (arrays of length ``rows``), after this block: ``block_max = rowmax(S_J)``, the running
    max ``m`` (``m_old`` before the block), ``alpha = exp(m_old - m)`` (0 while the row has
    no allowed key yet), the running sum ``l`` and the *unnormalised* partial output ``o``
    (``rows x Dv``; `o_normalised` is ``o / l``). ``s`` is the tile's scores, ``-inf`` on
    removed entries. A ``"skipped"`` block (an empty tile: never visited) has only ``J``,
    ``kind`` and ``keys`` (the key columns ``[start, stop)``)."""

    J: int
    kind: str
    keys: tuple[int, int]
    s: np.ndarray | None = None
    block_max: np.ndarray | None = None
    m_old: np.ndarray | None = None
    m: np.ndarray | None = None
    alpha: np.ndarray | None = None
    l: np.ndarray | None = None
    o: np.ndarray | None = None

    @property
    def visited(self) -> bool:
        return self.kind != "skipped"

    @property
    def o_normalised(self) -> np.ndarray | None:
        """``o / l``: the output the row would have if the keys stopped here (0 where ``l = 0``)."""
        if self.o is None:
            return None
        nonempty = self.l > 0
        return np.where(nonempty[:, None], self.o / np.where(nonempty, self.l, 1)[:, None], 0.0)


@dataclass(eq=False)
class QueryBlockTrace:
    """Query block ``I`` (rows ``[start, stop)``) of group ``(b, h)``: every key block in
    order (`TileStep`), the final running ``m`` and ``l`` (``-inf`` and 0 for a row with
    no allowed key), and the kernel's results ``lse = m + log l`` and ``out = o / l``."""

    b: int
    h: int
    I: int
    rows: tuple[int, int]
    steps: list[TileStep]
    m: np.ndarray
    l: np.ndarray
    lse: np.ndarray
    out: np.ndarray

    @property
    def visited(self) -> list[TileStep]:
        return [s for s in self.steps if s.visited]

    @property
    def kinds(self) -> str:
        """One letter per key block: ``F`` full, ``P`` partial, ``.`` skipped."""
        return "".join(_LETTER[s.kind] for s in self.steps)


@dataclass(eq=False)
class BackwardTile:
    """Tile ``(I, J)`` of group ``(b, h)`` in the backward: ``p = exp(S - L)``,
    ``dp = dO V_J^T`` (times the dropout scale), and ``ds = p * (dp - D)`` (plus
    ``dlse * p``), the gradient with respect to the scores; all ``rows x keys``, 0 on
    removed entries."""

    b: int
    h: int
    I: int
    J: int
    kind: str
    rows: tuple[int, int]
    keys: tuple[int, int]
    p: np.ndarray
    dp: np.ndarray
    ds: np.ndarray


@dataclass(eq=False)
class BackwardTrace:
    """``D = rowsum(dO * O)`` ``(B, H, Lq)``, the visited tiles in the kernel's order (key
    blocks outside, their query blocks inside), and the results ``dq``, ``dk``, ``dv``."""

    D: np.ndarray
    tiles: list[BackwardTile]
    dq: np.ndarray
    dk: np.ndarray
    dv: np.ndarray

    def tile(self, b: int, h: int, I: int, J: int) -> BackwardTile | None:
        """Tile ``(I, J)`` of group ``(b, h)``, or None if the kernel skipped it."""
        for t in self.tiles:
            if (t.b, t.h, t.I, t.J) == (b, h, I, J):
                return t
        return None

    def ds(self, b: int, h: int, shape: tuple[int, int]) -> np.ndarray:
        """The ``dS`` tiles of group ``(b, h)`` assembled into an ``(Lq, Lk)`` array (0 off
        the visited tiles)."""
        out = np.zeros(shape)
        for t in self.tiles:
            if (t.b, t.h) == (b, h):
                out[t.rows[0]:t.rows[1], t.keys[0]:t.keys[1]] = t.ds
        return out


@dataclass(eq=False)
class Trace:
    """A run of the tiled kernel: the shape ``(B, H, Lq, Lk)``, ``dim_v``, the block sizes,
    ``scale``; ``forward``, one `QueryBlockTrace` per ``(b, h, I)`` in that order; the
    results ``out`` and ``lse``; and ``backward`` (a `BackwardTrace`) or None."""

    shape: tuple[int, int, int, int]
    dim_v: int
    block_q: int
    block_k: int
    scale: float
    forward: list[QueryBlockTrace]
    out: np.ndarray
    lse: np.ndarray
    backward: BackwardTrace | None = None

    @property
    def nbq(self) -> int:
        return -(-self.shape[2] // self.block_q)

    @property
    def nbk(self) -> int:
        return -(-self.shape[3] // self.block_k)

    def _check_group(self, b, h):
        B, H = self.shape[:2]
        for val, n, name in ((b, B, "b"), (h, H, "h")):
            if isinstance(val, (bool, np.bool_)) or not isinstance(val, (int, np.integer)) or not 0 <= val < n:
                raise RefattnError(f"trace: {name} must be an int in [0, {n}), got {val!r}")

    def query_block(self, b: int, h: int, I: int) -> QueryBlockTrace:
        """The trace of query block ``I`` of group ``(b, h)``."""
        self._check_group(b, h)
        if isinstance(I, (bool, np.bool_)) or not isinstance(I, (int, np.integer)) or not 0 <= I < self.nbq:
            raise RefattnError(f"trace: query block I must be an int in [0, {self.nbq}), got {I!r}")
        return self.forward[(b * self.shape[1] + h) * self.nbq + I]

    def layout(self, b: int = 0, h: int = 0) -> list[str]:
        """The block layout of group ``(b, h)`` as the kernel walked it: one string per
        query block, a letter per key block (``F`` full, ``P`` partial, ``.`` skipped)."""
        return [self.query_block(b, h, qb).kinds for qb in range(self.nbq)]

    def row(self, b: int, h: int, i: int) -> list[dict]:
        """Row ``i``'s online-softmax statistics after each *visited* key block, in order:
        dicts with ``J``, ``kind``, ``keys``, ``block_max``, ``m_old``, ``m``, ``alpha``,
        ``l`` (floats) and ``o`` (unnormalised), ``o_normalised`` (arrays of length Dv)."""
        self._check_group(b, h)
        lq = self.shape[2]
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or not 0 <= i < lq:
            raise RefattnError(f"trace: row i must be an int in [0, {lq}), got {i!r}")
        qb = self.query_block(b, h, i // self.block_q)
        r = i - qb.rows[0]
        table = []
        for s in qb.visited:
            table.append({"J": s.J, "kind": s.kind, "keys": s.keys, "block_max": float(s.block_max[r]),
                          "m_old": float(s.m_old[r]), "m": float(s.m[r]), "alpha": float(s.alpha[r]),
                          "l": float(s.l[r]), "o": s.o[r].copy(), "o_normalised": s.o_normalised[r]})
        return table

    # ---- text -------------------------------------------------------------------------------
    def format_row(self, b: int, h: int, i: int, *, digits: int = 5, width: int = 80,
                   components: int = 3) -> str:
        """`row` as a table: per visited key block its keys, kind, ``rowmax(S_J)``, the new
        running max, ``alpha``, ``l`` and the first (up to ``components``, as many as fit in
        ``width`` columns) components of the normalised partial output ``O / l``."""
        rows = self.row(b, h, i)
        keys = [f"{r['keys'][0]}-{r['keys'][1] - 1}" for r in rows]
        base = ["J", "keys", "kind", "block max", "m_new", "alpha", "l"]
        body = [[str(r["J"]), kk, r["kind"], num(r["block_max"], digits), num(r["m"], digits),
                 num(r["alpha"], digits), num(r["l"], digits)] for r, kk in zip(rows, keys)]
        dv = self.dim_v
        for n in range(min(components, dv), -1, -1):
            headers = base + [f"O/l[{c}]" for c in range(n)]
            cells = [row + [num(r["o_normalised"][c], digits) for c in range(n)] for row, r in zip(body, rows)]
            text = table(headers, cells, align="rrlrrrr" + "r" * n)
            if n == 0 or max(len(line) for line in text.splitlines()) <= width:
                return text
        return text  # pragma: no cover

    def format(self) -> str:
        """A compact summary: shape and blocks, then per ``(b, h, I)`` the kinds of the key
        blocks and the query block's ``lse``."""
        B, H, lq, lk = self.shape
        lines = [f"Trace of the tiled kernel: B={B} H={H} Lq={lq} Lk={lk} Dv={self.dim_v}, scale={self.scale:.6g}",
                 (f"blocks {self.block_q} x {self.block_k} ({self.nbq} x {self.nbk} tiles), "
                  f"backward: {'yes' if self.backward else 'no'}")]
        for qb in self.forward:
            visited = len(qb.visited)
            lse = " ".join(num(x, 4) for x in qb.lse[:4]) + (" ..." if qb.lse.size > 4 else "")
            lines.append(f"b={qb.b} h={qb.h} I={qb.I} rows {qb.rows[0]}-{qb.rows[1] - 1}: {qb.kinds} "
                         f"({visited} visited)  lse {lse}")
        if self.backward is not None:
            lines.append(f"backward: {len(self.backward.tiles)} tile(s), key blocks outside: " + " ".join(
                f"({t.I},{t.J})" for t in self.backward.tiles[:8]) + (" ..." if len(self.backward.tiles) > 8 else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    # ---- data ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The trace as nested dicts and lists of ints, floats, strings, tuples and arrays
        (`from_dict` reads it back)."""
        return _to_plain(self)

    @classmethod
    def from_dict(cls, d: dict) -> Trace:
        return _from_plain(cls, d)

    def save(self, path) -> None:
        """Write the trace to ``path``: JSON for ``.json`` (arrays as nested lists,
        ``-inf`` as the string ``"-inf"``), NumPy ``.npz`` for ``.npz`` (one array per
        leaf, keys like ``forward/1/steps/0/m``). `load` reads either."""
        path = str(path)
        try:
            if path.endswith(".json"):
                with open(path, "w") as f:
                    json.dump(_jsonable(self.to_dict()), f, allow_nan=False)
            elif path.endswith(".npz"):
                np.savez_compressed(path, **_flatten(self.to_dict()))
            else:
                raise RefattnError(f"trace.save: the path must end in .json or .npz, got {path!r}")
        except OSError as e:
            raise RefattnError(f"trace.save: cannot write {path}: {e.strerror}") from None

    def __eq__(self, other) -> bool:
        if not isinstance(other, Trace):
            return NotImplemented
        return _same(self.to_dict(), other.to_dict())

    __hash__ = None


def load(path) -> Trace:
    """Read a trace written by `Trace.save` (``.json`` or ``.npz``)."""
    path = str(path)
    try:
        if path.endswith(".json"):
            with open(path) as f:
                return Trace.from_dict(json.load(f))
        if path.endswith(".npz"):
            with np.load(path) as z:
                return Trace.from_dict(_unflatten({k: z[k] for k in z.files}))
    except OSError as e:
        raise RefattnError(f"trace.load: cannot read {path}: {e.strerror}") from None
    raise RefattnError(f"trace.load: the path must end in .json or .npz, got {path!r}")


# ---- running the kernel -----------------------------------------------------------------------
def _block(value, name: str) -> int:
    return block_size(value, f"trace: {name}")


def trace(q, k, v, mask=None, *, block_q, block_k, scale=None, softcap=None, bias=None, dropout=None,
          dout=None, dlse=None, backward: bool = False) -> Trace:
    """Run the ``tiled`` backend (float64) on these inputs, as ``refattn.forward`` does
    (same arguments, validated the same way), and with ``backward=True`` its backward
    for the upstream gradient ``dout`` (required then) and optional ``dlse``, recording
    every tile it visits. Returns a `Trace`; its ``out``, ``lse`` (and ``backward.dq``,
    ``dk``, ``dv``) are bitwise those of ``refattn.forward(..., backend="tiled")``."""
    bq, bk = _block(block_q, "block_q"), _block(block_k, "block_k")
    if not backward and (dout is not None or dlse is not None):
        raise RefattnError("trace: dout and dlse are for the backward; pass backward=True")
    if backward and dout is None:
        raise RefattnError("trace: backward=True needs dout, the gradient of out")
    p = make_problem(q, k, v, mask, scale=scale, softcap=softcap, bias=bias, dropout=dropout)
    config = configure(tiled, "tiled", np.float64, {"block_q": bq, "block_k": bk})
    rec = Recorder()
    with np.errstate(over="ignore", invalid="ignore"):  # as refattn.forward: an overflow is an error below
        res = _check_result(tiled.forward(p, config, recorder=rec), p, HOST, config.compute_dtype)
        grads = None
        if backward:
            args = check_backward_inputs(p, res.out, res.lse, dout, dlse)
            grads = _check_grads(tiled.backward(p, *args, config, recorder=rec), HOST, config.compute_dtype)
    B, H, lq, lk = p.batch, p.heads, p.lq, p.lk
    nbq, nbk = -(-lq // bq), -(-lk // bk)
    forward = []
    for b in range(B):
        for h in range(H):
            for I in range(nbq):
                r0, r1 = I * bq, min(lq, (I + 1) * bq)
                seen = {s.J: s for s in rec.forward.get((b, h, I), [])}
                steps = [seen.get(J) or TileStep(J=J, kind="skipped", keys=(J * bk, min(lk, (J + 1) * bk)))
                         for J in range(nbk)]
                last = [s for s in steps if s.visited]
                m = last[-1].m if last else np.full(r1 - r0, -np.inf)
                lsum = last[-1].l if last else np.zeros(r1 - r0)
                forward.append(QueryBlockTrace(b=b, h=h, I=I, rows=(r0, r1), steps=steps, m=m, l=lsum,
                                               lse=res.lse[b, h, r0:r1].copy(), out=res.out[b, h, r0:r1].copy()))
    bwd = None
    if grads is not None:
        bwd = BackwardTrace(D=rec.D, tiles=rec.backward, dq=grads.dq, dk=grads.dk, dv=grads.dv)
    return Trace(shape=(B, H, lq, lk), dim_v=p.dim_v, block_q=bq, block_k=bk, scale=float(p.scale),
                 forward=forward, out=res.out, lse=res.lse, backward=bwd)


# ---- text helpers (also used by `refattn explain`) ---------------------------------------------
def num(x: float, digits: int = 5) -> str:
    """A number for a table: fixed point with ``digits`` decimals for magnitudes in
    ``[1e-4, 1e5)``, exponent notation otherwise, ``0``, ``-inf``, ``inf``, ``nan``."""
    x = float(x)
    if not np.isfinite(x):
        return "nan" if np.isnan(x) else ("-inf" if x < 0 else "inf")
    if x == 0:
        return "0"
    if 1e-4 <= abs(x) < 1e5:
        return f"{x:.{digits}f}"
    return f"{x:.{max(1, digits - 2)}e}"


def table(headers: list[str], rows: list[list[str]], *, align: str | None = None, indent: int = 2) -> str:
    """Columns two spaces apart; ``align`` a letter per column, ``l`` or ``r`` (default r)."""
    align = align or "r" * len(headers)
    widths = [max([len(h)] + [len(r[c]) for r in rows]) for c, h in enumerate(headers)]

    def line(cells):
        parts = [s.ljust(w) if a == "l" else s.rjust(w) for s, w, a in zip(cells, widths, align)]
        return (" " * indent + "  ".join(parts)).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in rows])


# ---- to and from plain data ------------------------------------------------------------------------
_CLASSES = {"Trace": Trace, "QueryBlockTrace": QueryBlockTrace, "TileStep": TileStep,
            "BackwardTrace": BackwardTrace, "BackwardTile": BackwardTile}
_LISTS = {("Trace", "forward"): QueryBlockTrace, ("QueryBlockTrace", "steps"): TileStep,
          ("BackwardTrace", "tiles"): BackwardTile}


def _to_plain(obj):
    d = {}
    for f in fields(obj):
        x = getattr(obj, f.name)
        if isinstance(x, list):
            x = [_to_plain(e) for e in x]
        elif type(x).__name__ in _CLASSES:
            x = _to_plain(x)
        elif isinstance(x, np.ndarray):
            x = x.copy()
        d[f.name] = x
    return d


def _from_plain(cls, d: dict):
    kw = {}
    for f in fields(cls):
        x = d.get(f.name)
        if (cls.__name__, f.name) in _LISTS:
            x = [_from_plain(_LISTS[cls.__name__, f.name], e) for e in x]
        elif f.name == "backward":
            x = None if x is None else _from_plain(BackwardTrace, x)
        elif x is None:
            pass
        elif f.name in ("shape", "rows", "keys"):
            x = tuple(int(e) for e in np.asarray(x).tolist())
        elif f.name == "kind":
            x = str(np.asarray(x).item())
        elif f.name == "scale":
            x = float(_number(np.asarray(x).tolist()))
        elif f.type in ("int",):
            x = int(np.asarray(x).item())
        else:
            x = np.vectorize(_number, otypes=[np.float64])(np.asarray(x, dtype=object)) \
                if not isinstance(x, np.ndarray) or x.dtype == object else x.astype(np.float64)
        kw[f.name] = x
    return cls(**kw)


def _number(x) -> float:
    return float(x)  # float("-inf") reads the strings JSON holds for non-finite values


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not np.isfinite(x):
        return "nan" if np.isnan(x) else ("-inf" if x < 0 else "inf")
    if isinstance(x, (np.integer, np.floating)):
        return _jsonable(x.item())
    return x


def _flatten(x, prefix: str = "") -> dict:
    out = {}
    items = x.items() if isinstance(x, dict) else enumerate(x)
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (dict, list)):
            if isinstance(v, list) and not v:
                out[key + "/[]"] = np.zeros(0)
            out.update(_flatten(v, key + "/"))
        elif v is not None:
            out[key] = np.asarray(v)
    return out


def _unflatten(flat: dict):
    root: dict = {}
    for key, value in flat.items():
        parts = key.split("/")
        node = root
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if parts[-1] != "[]":
            node[parts[-1]] = value

    def fix(node):
        if not isinstance(node, dict):
            return node
        if node and all(k.isdigit() for k in node):
            return [fix(node[str(i)]) for i in range(len(node))]
        return {k: fix(v) for k, v in node.items()} if node else []

    return fix(root)


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
    return a == b
