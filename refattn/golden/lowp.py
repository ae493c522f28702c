"""Plain attention computed in a low precision T, emulated exactly: the baseline of the
golden-vector tolerance policy.

A kernel that computes in dtype ``T`` passes on a tensor when
``max|x_kernel - x_gold| <= factor * max|x_naiveT - x_gold| + atol_T``, where ``x_gold`` is
the float64 oracle's result and ``x_naiveT`` is what this module returns: the *naive*
(non-tiled) attention of spec/semantics.md and spec/backward.md with its inputs and every
intermediate rounded to ``T``.

    naive_forward(p, dtype) -> Result(out, lse)
    naive_backward(p, out, lse, dout, dlse, dtype) -> Grads(dq, dk, dv, dbias)
    baseline_errors(p, out_gold, lse_gold, grads_gold, dout, dlse, dtype) -> {name: max abs error}
    round_to(x, dtype) -> x rounded to nearest-even in dtype, as float64

``p`` is a validated `refattn.contract.Problem` (``make_problem``); ``dtype`` is float64,
float32, float16 or ``ml_dtypes.bfloat16``. Results are float64 arrays holding
T-representable values (``dbias`` in the oracle's layout).

The rounding model
------------------
``R(x)`` is round-to-nearest-even to T, with T's subnormals, overflowing to +-inf (T's
IEEE rounding; computed by `round_to`, not by ``astype``: ml_dtypes converts float64 to
bfloat16 through float32 and so rounds twice). Throughout, ``R`` is applied to the
**exact** real result of an operation on T values, whatever the machine:

1. Inputs are rounded first: q, k, v, dout, dlse, dense and `SparseBias` values, `ALiBi`
   slopes, ``scale``, ``softcap`` and the dropout factor ``R(1 / (1 - p))``.
2. Every sum (``Q K^T``, ``P~ V``, ``dO V^T``, ``dS K``, ``dS^T Q``, ``P~^T dO``, the row sum
   ``l`` of ``E``, ``D = rowsum(dO * O)``, the dbias sums) is the exact sum of the exact
   products of its T operands, rounded once to T: "multiply-accumulate in higher precision,
   round the result" (tensor cores, torch's matmuls), free of BLAS and summation order.
   Implementation: the float64 matmul ``s`` with the error bound ``(n+2) 2^-52 |a||b|``
   (0 where every product is a multiple of ``2^e`` and ``|a||b| < 2^(53+e)``: then ``s`` is
   exact); where ``s +- bound`` round to different T values (near or at a midpoint), the
   sum is redone exactly (``math.fsum``; where that is a midpoint, its remainder's sign).
   dbias sums run over many blocks: they are kept exactly, as int64 digits (`_ExactSum`).
3. Every elementwise result is rounded: ``scale * QK``, the softcap's ``S0 / c``,
   ``tanh``, ``c * tanh``, ``+ bias``, ``S - m`` (``m`` the row max, exact),
   ``exp(S - m)``, ``P = E / l``, ``P * R(1/(1-p))``, ``log l``, ``LSE = m + log l``,
   ``dP * R(1/(1-p))``, ``dP - D``, ``P * (dP - D)``, ``dLSE * P`` and its sum with the
   former, ``T * T``, ``1 - T^2``, ``dS * (1 - T^2)``, ``scale * (dS K)``, ``scale * (dS^T Q)``.
   ``*`` of T values is exact in float64; ``+``, ``-`` of T values are exact in float64
   or else the smaller operand is below a quarter of T's spacing at the larger (T has at
   most 24 bits), so rounding the float64 result is exact rounding; ``/`` is checked
   against a bound as in 2.
   ``exp``, ``tanh``, ``log`` take numpy's float64 value, trusted to 16 ulp (every libm
   and SIMD path numpy uses is within 4), with the same check; where it cannot decide,
   the function is evaluated with `decimal` at 120 digits.
4. The naive algorithm, per query row: all its scores ``S`` (scale -> softcap -> bias ->
   mask), ``m = max_j S`` over the allowed keys, ``E = R(exp(R(S - m)))``, ``l = R(sum_j E)``,
   ``P = R(E / l)``, ``P~ = R(P * R(1/(1-p))) * Z``, ``O = R(P~ V)``,
   ``LSE = R(m + R(log l))``. Masked entries are removed (``P = 0`` exactly); a row with
   no allowed key has ``O = 0``, ``LSE = -inf`` and no gradient.
5. The backward is the backward of this forward, not of the given ``out``/``lse``: it
   recomputes the naive ``P`` from the rounded scores with the row's ``m`` and ``l`` (not
   from ``lse``), and ``D = R(sum_d dO * O)`` uses the naive forward's own ``O``. The
   ``out`` and ``lse`` arguments are validated (shapes, ``-inf`` exactly on empty rows)
   and otherwise unused. Per (row, allowed key), with ``dO = R(dout)``:
   ``dP = R(dO V^T)``, with dropout ``dP = R(dP * R(1/(1-p))) * Z``;
   ``dS = R(P * R(dP - D))``, with ``dlse``: ``dS = R(dS + R(R(dLSE) * P))``;
   ``dbias = R(sum of dS over the bias's broadcast axes)`` (ALiBi: ``sum dS * (-|j - i'|)``);
   softcap: ``dS0 = R(dS * R(1 - R(T * T)))``; ``dQ = R(scale * R(dS0 K))``;
   ``dK = R(scale * R(dS0^T Q))``, ``dV = R(P~^T dO)``, where for GQA the sums run over the
   query rows of every head of the kv head's group at once (one rounding).
6. dtype float64: the same algorithm in plain float64 (no rounding step, numpy's
   matmuls and sums); it differs from the oracle by about 1e-15 relative.

A result that overflows T (``+-inf``, NaN) is an error: the naive T computation does not
represent the problem. Memory: blocks of at most ``BLOCK_ELEMENTS`` scores, rows of one
(b, h) for the forward and dQ, columns of one (b, kv head) for dK and dV; never a
``B*H*Lq*Lk`` array. A dbias whose bias is broadcast along some axis is accumulated in
``_ExactSum``'s digits: 14 int64 per dbias entry for float32 and bfloat16, 5 for float16.
"""

from __future__ import annotations

import math
from decimal import MAX_EMAX, MIN_EMIN, Decimal, localcontext
from fractions import Fraction
from typing import NamedTuple

import ml_dtypes
import numpy as np
import scipy.sparse as sp

from ..alignment import align_offset
from ..bias import ALiBi, SparseBias
from ..contract import DenseBias, Grads, Problem, Result, check_backward_inputs, dbias_result
from ..errors import RefattnError

#: The compute dtypes of the model.
DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))

#: Scores per block (rows * columns).
BLOCK_ELEMENTS = 1 << 20


class Format(NamedTuple):
    """A binary format T: ``p`` significant bits, smallest subnormal ``2**qmin``, largest finite
    ``max``; ``cast``: numpy's float64 -> T conversion where it is IEEE's and the faster way
    (float32; ml_dtypes' bfloat16 cast rounds twice, numpy's float16 cast is slower)."""

    name: str
    p: int
    qmin: int
    max: float
    cast: object


_FORMATS = {
    np.dtype(np.float32): Format("float32", 24, -149, float(np.finfo(np.float32).max), np.float32),
    np.dtype(np.float16): Format("float16", 11, -24, float(np.finfo(np.float16).max), None),
    np.dtype(ml_dtypes.bfloat16): Format("bfloat16", 8, -133, float(ml_dtypes.finfo(ml_dtypes.bfloat16).max),
                                         None),
}


def _format(dtype) -> Format | None:
    """T's `Format`, or None for float64 (no rounding)."""
    try:
        d = np.dtype(dtype)
    except TypeError:
        d = None
    if d not in DTYPES:
        raise RefattnError(f"dtype must be one of {', '.join(map(str, DTYPES))}; got {dtype!r}")
    return _FORMATS.get(d)


# ---- rounding to T ---------------------------------------------------------------------
def round_to(x, dtype) -> np.ndarray:
    """``x`` (float64) rounded to nearest-even in ``dtype``, as float64 (a correct IEEE
    conversion for every supported dtype, bfloat16 included)."""
    return _round(x, _format(dtype))


def _round(x, f: Format | None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if f is None:
        return x.copy()
    if f.cast is not None:    # float32: the IEEE conversion
        with np.errstate(over="ignore"):
            return x.astype(f.cast).astype(np.float64)
    return _round_bits(x, f)


def _round_bits(x, f: Format) -> np.ndarray:
    """`_round` from T's parameters alone (float16, bfloat16; tested against numpy's casts)."""
    _, e = np.frexp(x)                              # |x| in [2^(e-1), 2^e)
    qe = np.maximum(e - f.p, f.qmin)                 # exponent of T's spacing at x
    r = np.ldexp(np.rint(np.ldexp(x, -qe)), qe)      # both ldexp exact; rint: ties to even
    return np.where(np.abs(r) > f.max, np.copysign(np.inf, x), r)


def _round_exact(x: Fraction, f: Format) -> float:
    """A rational number rounded to nearest-even in T."""
    if x == 0:
        return 0.0
    a = abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    if a >= Fraction(2) ** e:                        # now 2^(e-1) <= a < 2^e
        e += 1
    qe = max(e - f.p, f.qmin)
    r = math.ldexp(float(round(a / Fraction(2) ** qe)), qe)   # round(Fraction): ties to even
    return math.copysign(math.inf if r > f.max else r, x)


def _certify(s, bound, f: Format, exact) -> np.ndarray:
    """R(x) for values x known to lie in ``[s - bound, s + bound]``: R(s) where both ends round
    alike (rounding is monotone), else ``exact(index)``. Zeros come back as +0; NaN and inf
    (an overflow upstream, reported by the caller) pass through."""
    r = _round(s - bound, f)
    for idx in zip(*np.nonzero((r != _round(s + bound, f)) & np.isfinite(s))):
        r[idx] = exact(idx)
    return r + 0.0


def _low_exponent(x) -> int:
    """The largest e <= 1024 such that every entry of ``x`` is a multiple of ``2**e``."""
    m, e = np.frexp(x[x != 0])
    M = np.ldexp(m, 53).astype(np.int64)                  # x = M 2^(e - 53), M an integer
    low = np.frexp((M & -M).astype(np.float64))[1] - 1     # exponent of M's lowest set bit
    return int((e - 53 + low).min(initial=1024))


def _round_sum(terms, f: Format) -> float:
    """R(exact sum of float64 ``terms``). ``math.fsum`` is the exact sum rounded to float64, and
    R of it is R of the exact sum unless it is itself a T midpoint (nothing else of float64 lies
    between them); then the sign of the exact remainder decides."""
    terms = terms.tolist()
    s = math.fsum(terms)
    lo, hi = _round(np.nextafter(s, -np.inf), f), _round(np.nextafter(s, np.inf), f)
    if lo == hi:
        return float(lo)
    rest = math.fsum(terms + [-s])                          # exact sum - s, its sign exact
    return float(hi if rest > 0 else lo if rest < 0 else _round(s, f))


def _rdot(a, b, f: Format | None) -> np.ndarray:
    """``R(a @ b)`` for 2-D T-valued ``a``, ``b``: each entry the exact sum of exact products,
    rounded once."""
    s = a @ b
    if f is None:
        return s
    # |computed - exact| <= gamma_n |a| |b| in any summation order (FMA or not); doubled.
    # Exact (bound 0) where every product is a multiple of 2^e and |a| |b| < 2^(53 + e):
    # then every partial sum is a float64.
    A = np.abs(a) @ np.abs(b)
    rel = (a.shape[1] + 2) * 2.0 ** -52
    exact = A * (1 + rel) < math.ldexp(1.0, min(1023, 53 + _low_exponent(a) + _low_exponent(b)))
    bound = np.where(exact, 0.0, A * rel)
    return _certify(s, bound, f, lambda ij: _round_sum(a[ij[0]] * b[:, ij[1]], f))


def _rowsum(x, f: Format | None) -> np.ndarray:
    """``R(sum_j x_ij)`` for a 2-D array of exact products."""
    return _rdot(x, np.ones((x.shape[1], 1)), f)[:, 0]


def _rdiv(a, b, f: Format | None) -> np.ndarray:
    """``R(a / b)``, elementwise, for T-valued a, b (b nonzero)."""
    s = a / b
    if f is None:
        return s
    return _certify(s, np.abs(s) * 2.0 ** -52, f, lambda i: _round_exact(Fraction(a[i]) / Fraction(b[i]), f))


def _dec_tanh(x: Decimal) -> Decimal:
    e = (-2 * abs(x)).exp()
    return ((1 - e) / (1 + e)).copy_sign(x)


_FUNCTIONS = {"exp": (np.exp, Decimal.exp), "log": (np.log, Decimal.ln), "tanh": (np.tanh, _dec_tanh)}


def _rfun(name: str, x, f: Format | None) -> np.ndarray:
    """``R(fn(x))`` elementwise for T-valued x: numpy's float64 value, trusted to 16 ulp, where
    that decides the rounding; else `decimal` at 120 digits (exp, tanh, log of a nonzero
    dyadic argument are irrational, so 120 digits are far from any T midpoint)."""
    s = _FUNCTIONS[name][0](x)
    if f is None:
        return s
    return _certify(s, np.abs(s) * 2.0 ** -48 + 2.0 ** -1000, f, lambda i: _exact_function(name, float(x[i]), f))


def _exact_function(name: str, x: float, f: Format) -> float:
    """``R(fn(x))`` from a 120-digit `decimal` evaluation."""
    with localcontext() as ctx:
        ctx.prec, ctx.Emax, ctx.Emin = 120, MAX_EMAX, MIN_EMIN
        return _round_exact(Fraction(_FUNCTIONS[name][1](Decimal(x))), f)


class _ExactSum:
    """Running sums, held exactly, rounded once to T by `result`. The terms must be integer
    multiples of T's smallest subnormal ``2**qmin`` (T values, or T values times integers);
    each is split into signed base-``2**W`` digits of ``term / 2**qmin``, summed in int64.
    For float64 (``f`` None) a plain float64 sum."""

    W = 26

    def __init__(self, shape, f: Format | None):
        self.f = f
        if f is None:
            self.acc = np.zeros(shape)
        else:
            # terms below 2^(log2 max + 1 + 32) / 2^qmin; two more digits for the carries
            self.ndig = -(-(math.ceil(math.log2(f.max)) + 33 - f.qmin) // self.W)
            self.acc = np.zeros((self.ndig + 2,) + tuple(shape), np.int64)

    def add(self, index: tuple, terms, axis: tuple = ()) -> None:
        """``acc[index] += terms.sum(axis)`` (the summed axes kept as size 1, then reshaped to
        ``acc[index]``)."""
        if self.f is None:
            self.acc[index] += terms.sum(axis=axis, keepdims=True).reshape(np.shape(self.acc[index]))
            return
        x = np.ldexp(terms, -self.f.qmin)                   # exact: an integer-valued float64
        if not np.array_equal(x, np.trunc(x)) or np.abs(x).max(initial=0.0) >= 2.0 ** (self.W * self.ndig) \
                or x.size >= 2 ** 27:
            raise AssertionError("_ExactSum: a term is not a multiple of 2**qmin, or out of range, or too many")
        target = self.acc[(slice(None),) + index]
        for k in range(self.ndig):
            digit = np.fmod(x, 2.0 ** self.W)               # exact; |digit| < 2^W, sign of x
            x = (x - digit) * 2.0 ** -self.W                # exact
            # a block holds < 2^27 terms, so this float64 sum of integers < 2^26 is exact
            target[k] += digit.sum(axis=axis, keepdims=True).reshape(target.shape[1:]).astype(np.int64)

    def result(self) -> np.ndarray:
        if self.f is None:
            return self.acc
        f, W, d = self.f, self.W, self.acc

        def carried(d):  # digits 0.. in [0, 2^W), the top one signed
            d = d.copy()
            for k in range(len(d) - 1):
                c = d[k] >> W
                d[k] -= c << W
                d[k + 1] += c
            return d

        pos = carried(d)
        neg = pos[-1] < 0                                   # the value is negative
        mag = np.where(neg, carried(-d), pos)               # |value| in digits, all in [0, 2^W)
        if (mag[-1] >> W).any():
            raise AssertionError("_ExactSum: carry out of the top digit")
        nz = mag != 0
        t = np.where(nz.any(axis=0), len(mag) - 1 - np.argmax(nz[::-1], axis=0), 0)   # the leading digit
        top = np.take_along_axis(mag, t[None], 0)[0]
        below = np.take_along_axis(mag, np.maximum(t - 1, 0)[None], 0)[0]
        sticky = np.take_along_axis(np.logical_or.accumulate(nz, axis=0), np.maximum(t - 2, 0)[None], 0)[0]
        # |value| / 2^qmin lies in [Y, Y + 1) * 2^(W (t - 1)) with Y = top 2^W + below >= 2^26 when
        # t >= 1; T's midpoints there are multiples of 2^(W (t - 1)), so Y + sticky / 2 (exact in
        # float64) rounds as the value does. t = 0: the value is the digit itself.
        y = np.where(t >= 1, (2 * (top * 2 ** W + below) + (sticky & (t >= 2))).astype(np.float64),
                     2.0 * top.astype(np.float64))
        r = _round(np.ldexp(y, W * np.maximum(t - 1, 0) - 1 + f.qmin), f)
        return np.where(neg, -r, r) + 0.0


# ---- the model -------------------------------------------------------------------------
class _Ctx:
    """The problem with its inputs rounded to T (step 1)."""

    def __init__(self, p: Problem, f: Format | None):
        R = self.R = lambda x: _round(x, f)
        self.p, self.f = p, f
        self.q, self.k, self.v = (R(x.astype(np.float64)) for x in (p.q, p.k, p.v))
        self.scale = float(R(p.scale))
        self.softcap = None if p.softcap is None else float(R(p.softcap))
        self.bias = None
        if isinstance(p.bias, DenseBias):
            self.bias = R(p.bias.values)
        elif isinstance(p.bias, SparseBias):
            self.bias = [[R(x) for x in row] for row in p.bias.grid.grid]
        elif isinstance(p.bias, ALiBi):
            self.bias = R(p.bias.slopes)
        self.keep_scale = 1.0
        if p.dropout is not None:   # R(1 / (1 - p)), from the exact value
            inv = Fraction(1) / (1 - Fraction(p.dropout.p))
            self.keep_scale = float(inv) if f is None else _round_exact(inv, f)

    def grid_at(self, leaves, b: int, h: int):
        """The leaf of a (Bv, Hv) grid of per-nonzero values used by (b, h)."""
        return leaves[b if len(leaves) > 1 else 0][h if len(leaves[0]) > 1 else 0]


def _block_chunks(n: int, per: int):
    step = max(1, min(n, BLOCK_ELEMENTS // per))
    for s in range(0, n, step):
        yield slice(s, min(n, s + step))


def _on_nonzeros(csr, values, rows: slice, cols: slice) -> np.ndarray:
    """Per-nonzero ``values`` of the CSR as a dense ``(rows, cols)`` block, 0 elsewhere."""
    return sp.csr_array((values, csr.indices, csr.indptr), shape=csr.shape)[rows, cols].toarray()


def _alibi_distance(p: Problem, rows: slice, cols: slice) -> np.ndarray:
    """``-|j - (i + offset)|`` on the block (integers, exact)."""
    i = np.arange(rows.start, rows.stop, dtype=np.float64)[:, None] + align_offset(p.bias.align, p.lq, p.lk)
    return -np.abs(np.arange(cols.start, cols.stop, dtype=np.float64)[None, :] - i)


def _scores(c: _Ctx, b: int, h: int, rows: slice, cols: slice):
    """The block's scores in spec order (scale -> softcap -> bias), every step rounded; the
    softcap's tanh (None without one); the mask block."""
    p, R, f = c.p, c.R, c.f
    g = h // p.group_size
    S = R(c.scale * _rdot(c.q[b, h, rows], c.k[b, g, cols].T, f))      # S0 = scale * q_i . k_j
    T = None
    if c.softcap is not None:
        T = _rfun("tanh", _rdiv(S, np.full_like(S, c.softcap), f), f)   # T = tanh(S0 / c)
        S = R(c.softcap * T)                                              # S = c * T
    if isinstance(p.bias, DenseBias):
        bb, hb, lqb, lkb = c.bias.shape
        x = c.bias[b if bb > 1 else 0, h if hb > 1 else 0]
        x = x[rows] if lqb > 1 else x
        x = x[:, cols] if lkb > 1 else x
        S = R(S + x)
    elif isinstance(p.bias, SparseBias):
        S = R(S + _on_nonzeros(p.mask.group(b, h), c.grid_at(c.bias, b, h), rows, cols))
    elif isinstance(p.bias, ALiBi):
        S = R(S + R(c.bias[h] * _alibi_distance(p, rows, cols)))      # -slope_h |j - i'|
    allowed = p.mask.group(b, h)[rows, cols].toarray()
    return S, T, allowed


def _exp_scores(c: _Ctx, S, m, allowed) -> np.ndarray:
    """``E = R(exp(R(S - m)))`` on allowed entries, 0 elsewhere (removed entries)."""
    E = np.zeros_like(S)
    d = c.R((S - m[:, None])[allowed])
    E[allowed] = _rfun("exp", d, c.f)
    return E


def _probabilities(c: _Ctx, E, ell, allowed) -> np.ndarray:
    """``P = R(E / l)`` on allowed entries (whose rows are nonempty, l >= 1), 0 elsewhere."""
    P = np.zeros_like(E)
    P[allowed] = _rdiv(E[allowed], np.broadcast_to(ell[:, None], E.shape)[allowed], c.f)
    return P


def _keep(c: _Ctx, b: int, h: int, rows: slice, cols: slice):
    """The keep-mask Z on the block (None without dropout)."""
    if c.p.dropout is None:
        return None
    Z = c.grid_at(c.p.dropout.grid.grid, b, h).astype(np.float64)
    return _on_nonzeros(c.p.mask.group(b, h), Z, rows, cols)


def _dropped(c: _Ctx, x, Z):
    """``R(x * R(1/(1-p))) * Z`` (x itself without dropout)."""
    return x if Z is None else c.R(x * c.keep_scale) * Z


class _Forward(NamedTuple):
    out: np.ndarray
    lse: np.ndarray
    m: np.ndarray  # row max of the scores, -inf on empty rows
    ell: np.ndarray  # l = R(sum_j E_ij), 0 on empty rows


def _forward(c: _Ctx) -> _Forward:
    p, R, f = c.p, c.R, c.f
    B, H, Lq, Lk = p.batch, p.heads, p.lq, p.lk
    out = np.zeros((B, H, Lq, p.dim_v))
    L = np.full((B, H, Lq), -np.inf)
    M = np.full((B, H, Lq), -np.inf)
    Ls = np.zeros((B, H, Lq))
    everything = slice(0, Lk)
    for b in range(B):
        for h in range(H):
            V = c.v[b, h // p.group_size]
            for rows in _block_chunks(Lq, Lk):
                S, _, allowed = _scores(c, b, h, rows, everything)
                nonempty = allowed.any(axis=1)
                m = np.where(allowed, S, -np.inf).max(axis=1)             # row max, exact
                E = _exp_scores(c, S, m, allowed)                         # E = exp(S - m)
                ell = _rowsum(E, f)                                       # l = sum_j E
                P = _probabilities(c, E, ell, allowed)                    # P = E / l
                Pd = _dropped(c, P, _keep(c, b, h, rows, everything))     # P~ = P Z / (1 - p)
                out[b, h, rows] = _rdot(Pd, V, f)                         # O = P~ V
                lse = np.full(m.shape, -np.inf)                           # LSE = m + log l
                lse[nonempty] = R(m[nonempty] + _rfun("log", ell[nonempty], f))
                L[b, h, rows], M[b, h, rows], Ls[b, h, rows] = lse, m, ell
    return _Forward(out, L, M, Ls)


def _dS(c: _Ctx, fw: _Forward, Dsum, dout, dlse, b: int, h: int, rows: slice, cols: slice):
    """The backward's elementwise part on a block: ``P~``, ``dS`` (before the softcap's
    chain rule, = dbias) and ``dS0`` (after it)."""
    p, R, f = c.p, c.R, c.f
    S, T, allowed = _scores(c, b, h, rows, cols)
    m, ell = fw.m[b, h, rows], fw.ell[b, h, rows]
    P = _probabilities(c, _exp_scores(c, S, m, allowed), ell, allowed)      # the forward's P
    Z = _keep(c, b, h, rows, cols)
    Pd = _dropped(c, P, Z)                                                # P~
    dP = _dropped(c, _rdot(dout[b, h, rows], c.v[b, h // p.group_size, cols].T, f), Z)  # dO V^T Z/(1-p)
    dS = R(P * R(dP - Dsum[b, h, rows, None]))                            # dS = P (dP - D)
    if dlse is not None:
        dS = R(dS + R(dlse[b, h, rows, None] * P))                        # + dLSE P
    dS0 = dS if T is None else R(dS * R(1.0 - R(T * T)))                  # softcap: * (1 - T^2)
    return Pd, dS, dS0


def _backward(c: _Ctx, fw: _Forward, dout, dlse) -> Grads:
    p, R, f = c.p, c.R, c.f
    B, H, Hkv, Lq, Lk, G = p.batch, p.heads, p.kv_heads, p.lq, p.lk, p.group_size
    dout = R(dout)
    dlse = None if dlse is None else R(dlse)
    Dsum = np.zeros((B, H, Lq))                                           # D = rowsum(dO * O)
    for b in range(B):
        for h in range(H):
            Dsum[b, h] = _rowsum(dout[b, h] * fw.out[b, h], f)
    dq = np.zeros(c.q.shape)
    dk = np.zeros(c.k.shape)
    dv = np.zeros(c.v.shape)
    acc = _dbias_accumulators(c)
    everything = slice(0, Lk)
    # dQ (and dbias): blocks of query rows of one (b, h), all keys.
    for b in range(B):
        for h in range(H):
            K = c.k[b, h // G]
            for rows in _block_chunks(Lq, Lk):
                _, dS, dS0 = _dS(c, fw, Dsum, dout, dlse, b, h, rows, everything)
                _accumulate_dbias(c, acc, dS, b, h, rows)                 # dbias = dS
                dq[b, h, rows] = R(c.scale * _rdot(dS0, K, f))            # dQ = scale dS0 K
    # dK, dV: blocks of keys of one (b, kv head g), all query rows of the g's G query heads.
    all_rows = slice(0, Lq)
    for b in range(B):
        for g in range(Hkv):
            heads = range(g * G, (g + 1) * G)
            Qs = np.concatenate([c.q[b, h] for h in heads])
            dOs = np.concatenate([dout[b, h] for h in heads])
            for cols in _block_chunks(Lk, G * Lq):
                parts = [_dS(c, fw, Dsum, dout, dlse, b, h, all_rows, cols) for h in heads]
                Pd = np.concatenate([x[0] for x in parts])
                dS0 = np.concatenate([x[2] for x in parts])
                dv[b, g, cols] = _rdot(Pd.T, dOs, f)                      # dV = P~^T dO
                dk[b, g, cols] = R(c.scale * _rdot(dS0.T, Qs, f))         # dK = scale dS0^T Q
    return Grads(dq, dk, dv, _dbias(c, acc))


# ---- dbias, in the layout of the bias that was given -------------------------------------
def _dbias_accumulators(c: _Ctx):
    # Where no axis is broadcast, each entry receives a single dS: a float64 sum is then exact.
    p = c.p
    if isinstance(p.bias, DenseBias):
        full = p.bias.values.shape == (p.batch, p.heads, p.lq, p.lk)
        return _ExactSum(p.bias.values.shape, None if full else c.f)
    if isinstance(p.bias, SparseBias):
        full = p.bias.grid.shape == (p.batch, p.heads)
        return [[_ExactSum(x.shape, None if full else c.f) for x in row] for row in p.bias.grid.grid]
    if isinstance(p.bias, ALiBi):
        return _ExactSum((p.heads,), c.f)
    return None


def _accumulate_dbias(c: _Ctx, acc, dS, b: int, h: int, rows: slice) -> None:
    """Add the block's dS (rows ``rows``, all keys) to the dbias sums."""
    p = c.p
    if isinstance(p.bias, DenseBias):
        bb, hb, lqb, lkb = p.bias.values.shape
        axis = ((0,) if lqb == 1 else ()) + ((1,) if lkb == 1 else ())
        acc.add((b if bb > 1 else 0, h if hb > 1 else 0, rows if lqb > 1 else slice(None)), dS, axis)
    elif isinstance(p.bias, SparseBias):
        csr = p.mask.group(b, h)
        lo, hi = csr.indptr[rows.start], csr.indptr[rows.stop]
        r = np.repeat(np.arange(rows.stop - rows.start), np.diff(csr.indptr[rows.start:rows.stop + 1]))
        c.grid_at(acc, b, h).add((slice(lo, hi),), dS[r, csr.indices[lo:hi]])
    elif isinstance(p.bias, ALiBi):
        acc.add((h,), dS * _alibi_distance(p, rows, slice(0, p.lk)), (0, 1))   # d/dslope = -|j - i'|


def _dbias(c: _Ctx, acc):
    if acc is None:
        return None
    if isinstance(acc, list):
        return dbias_result(c.p, [[a.result() for a in row] for row in acc])
    return dbias_result(c.p, acc.result())


# ---- public ----------------------------------------------------------------------------
def _check_finite(name: str, x, f: Format | None, allow_neginf: bool = False) -> None:
    bad = ~np.isfinite(x)
    if allow_neginf:
        bad &= ~np.isneginf(x)
    if bad.any():
        idx = [int(i) for i in np.unravel_index(int(np.flatnonzero(bad)[0]), x.shape)]
        raise RefattnError(f"naive {f.name if f else 'float64'} {name}: {x[tuple(idx)]} at index {idx}; "
                           "the computation overflows the dtype's range")


def _naive_forward(c: _Ctx) -> _Forward:
    with np.errstate(over="ignore", invalid="ignore"):
        fw = _forward(c)
    _check_finite("lse", fw.lse, c.f, allow_neginf=True)
    _check_finite("out", fw.out, c.f)
    return fw


def _naive_backward(c: _Ctx, fw: _Forward, dout, dlse) -> Grads:
    with np.errstate(over="ignore", invalid="ignore"):
        g = _backward(c, fw, dout, dlse)
    for name in ("dq", "dk", "dv"):
        _check_finite(name, getattr(g, name), c.f)
    for leaf in leaves(g.dbias):
        _check_finite("dbias", leaf, c.f)
    return g


def naive_forward(p: Problem, dtype) -> Result:
    """Plain attention forward with inputs and intermediates rounded to ``dtype``
    (module docstring): ``Result(out, lse)``, float64 arrays of ``dtype`` values."""
    fw = _naive_forward(_Ctx(p, _format(dtype)))
    return Result(fw.out, fw.lse)


def naive_backward(p: Problem, out, lse, dout, dlse, dtype) -> Grads:
    """The backward of `naive_forward` with every intermediate rounded to ``dtype``
    (module docstring, step 5): ``P`` and ``O`` are the naive forward's own; ``out`` and
    ``lse`` are only validated. ``dbias`` in the oracle's layout."""
    c = _Ctx(p, _format(dtype))
    _, _, dout, dlse = check_backward_inputs(p, out, lse, dout, dlse)
    return _naive_backward(c, _naive_forward(c), dout, dlse)


def leaves(x) -> list:
    if x is None:
        return []
    if isinstance(x, np.ndarray):
        return [x]
    return [np.asarray(leaf) for row in x for leaf in row]


def baseline_errors(p: Problem, out_gold, lse_gold, grads_gold, dout, dlse, dtype) -> dict[str, float]:
    """``max|naive - gold|`` per tensor for the naive ``dtype`` computation: keys "out",
    "lse" (over rows with a finite LSE; the naive and gold LSE must be -inf on the same
    rows), "dq", "dk", "dv" and, with a bias, "dbias" (max over its leaves)."""
    c = _Ctx(p, _format(dtype))
    r = _naive_forward(c)
    _, _, dout, dlse = check_backward_inputs(p, r.out, r.lse, dout, dlse)
    g = _naive_backward(c, r, dout, dlse)
    lse_gold = np.asarray(lse_gold, dtype=np.float64)
    if lse_gold.shape != r.lse.shape or not np.array_equal(np.isneginf(r.lse), np.isneginf(lse_gold)):
        raise RefattnError("baseline_errors: the naive and gold LSE are not -inf on the same rows")
    finite = np.isfinite(lse_gold)

    def err(a, gold):
        d = np.abs(np.asarray(a, np.float64) - np.asarray(gold, np.float64))
        return float(d.max(initial=0.0))

    errors = {"out": err(r.out, out_gold), "lse": err(r.lse[finite], lse_gold[finite]),
              "dq": err(g.dq, grads_gold.dq), "dk": err(g.dk, grads_gold.dk), "dv": err(g.dv, grads_gold.dv)}
    if g.dbias is not None:
        errors["dbias"] = max(err(a, b) for a, b in zip(leaves(g.dbias), leaves(grads_gold.dbias)))
    return errors
