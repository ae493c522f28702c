"""``exp`` written out in arithmetic, for the compiled kernels.

Why not ``math.exp``: inside a Numba loop it is a call into the C library, one value at a
time (about 2 ns in float32, 3.4 ns in float64 on the project's machine), and the
library's last bit may differ between machines. This one is plain IEEE arithmetic: LLVM
vectorises a loop of it without ``fastmath`` (no reassociation is needed), and, compiled
without fused multiply-adds, it gives the same bits on every x86-64 machine.

The method (Cody and Waite's range reduction, then a polynomial):

* ``k = floor(x log2(e) + 1/2)``, the integer nearest to ``x / ln 2``;
* ``r = (x - k ln2_hi) - k ln2_lo``, with ``ln 2 = ln2_hi + ln2_lo`` split so that
  ``k ln2_hi`` is exact: ``|r| <= ln(2) / 2`` up to rounding;
* ``exp(r)`` by its Taylor polynomial of degree 13 (float64; the remainder is below
  ``0.35^14 / 14! < 5e-18``) or 7 (float32; below ``5e-9``), evaluated by Horner's rule;
* times ``2^k``, applied as two exact powers of two ``2^(k//2) 2^(k - k//2)`` built from
  their bit patterns, so that a result in the subnormal range is rounded once.

Inputs below ``-745.2`` (float64) or ``-103.98`` (float32), ``-inf`` included, give 0;
inputs above the overflow threshold give ``inf``; NaN gives NaN. Measured error against
a correctly rounded exp: at most 2 units in the last place (tests/test_exp.py).
"""

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


@intrinsic
def _f64_from_bits(typingctx, bits):
    """The float64 whose bit pattern is the int64 ``bits``."""
    if bits != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(types.int64), codegen


@intrinsic
def _f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the int64 ``bits``."""
    if bits != types.int64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return types.float32(types.int64), codegen


_LOG2E = 1.4426950408889634
_LN2_HI_64 = 6.93147180369123816490e-01   # ln 2 to 32 bits: k * _LN2_HI_64 is exact for |k| < 2^20
_LN2_LO_64 = 1.90821492927058770002e-10
_LN2_HI_32 = 0.693145751953125            # ln 2 to 16 bits
_LN2_LO_32 = 1.428606765330187045e-06


@numba.njit(cache=True, nogil=True, inline="always")
def exp64(x):  # pragma: no cover - compiled
    """``exp(x)`` for a float64 ``x`` (module docstring). Branch-free (the argument is
    clamped into range and the edge cases selected at the end), so that a loop of it
    vectorises."""
    xc = min(max(x, -745.2), 709.8)
    kf = np.floor(xc * _LOG2E + 0.5)
    r = (xc - kf * _LN2_HI_64) - kf * _LN2_LO_64
    p = 1.0 / 6227020800.0
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    k = np.int64(kf)
    ka = k >> 1                                  # floor(k / 2); ka, k - ka in [-538, 512]
    y = (p * _f64_from_bits((ka + 1023) << 52)) * _f64_from_bits((k - ka + 1023) << 52)
    y = 0.0 if x < -745.2 else y
    y = np.inf if x > 709.8 else y
    return x if x != x else y


@numba.njit(cache=True, nogil=True, inline="always")
def exp32(x):  # pragma: no cover - compiled
    """``exp(x)`` for a float32 ``x``, computed in float32 (module docstring); branch-free
    as `exp64`."""
    lo, hi = np.float32(-103.98), np.float32(88.73)
    xc = min(max(x, lo), hi)
    kf = np.floor(xc * np.float32(_LOG2E) + np.float32(0.5))
    r = (xc - kf * np.float32(_LN2_HI_32)) - kf * np.float32(_LN2_LO_32)
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    k = np.int64(kf)
    ka = k >> 1                                  # ka, k - ka in [-75, 64]
    y = (p * _f32_from_bits((ka + 127) << 23)) * _f32_from_bits((k - ka + 127) << 23)
    y = np.float32(0.0) if x < lo else y
    y = np.float32(np.inf) if x > hi else y
    return x if x != x else y


def exp(x):
    """``exp`` of a float32 or float64 scalar, in its own precision (compiled code only)."""
    raise NotImplementedError("refattn.backends._exp.exp is for compiled code")


@overload(exp)
def _exp_overload(x):
    if x == types.float64:
        return lambda x: exp64(x)
    if x == types.float32:
        return lambda x: exp32(x)
    return None
