"""The compiled kernels' own exp (refattn/backends/_exp.py): accurate, total, and exact
at the edges."""

import numba
import numpy as np
import pytest

from refattn.backends._exp import exp


@numba.njit(cache=True)
def _apply(x, out):
    for i in range(x.shape[0]):
        out[i] = exp(x[i])


def _exp(x):
    out = np.empty_like(x)
    _apply(x, out)
    return out


def _ulps(got, want_ld, dtype):
    """|got - want| in units in the last place of ``dtype`` at ``want`` (from a longdouble
    reference), with the spacing of the smallest subnormal below it."""
    want = want_ld.astype(dtype)
    spacing = np.spacing(np.abs(want)).astype(np.longdouble)
    return np.abs(got.astype(np.longdouble) - want_ld) / spacing


@pytest.mark.parametrize("dtype, lo, hi", [(np.float64, -745.0, 709.7), (np.float32, -103.9, 88.7)])
def test_within_two_ulps_everywhere(dtype, lo, hi):
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.uniform(lo, hi, 200_000), rng.uniform(-1, 1, 200_000),
                        rng.uniform(-30, 0, 200_000), np.linspace(lo, hi, 100_001)]).astype(dtype)
    got = _exp(x)
    assert got.dtype == dtype
    want = np.exp(x.astype(np.longdouble))
    assert np.longdouble(np.finfo(np.longdouble).eps) < 1e-18     # the reference is finer than float64
    assert np.max(_ulps(got, want, dtype)) <= 2.0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_special_values(dtype):
    x = np.array([-np.inf, np.inf, np.nan, 0.0, -0.0, 1.0, -1e4, 1e4], dtype)
    got = _exp(x)
    assert got[0] == 0 and got[1] == np.inf and np.isnan(got[2])
    assert got[3] == 1 and got[4] == 1
    assert got[5] == np.exp(dtype(1.0)) or abs(got[5] - np.exp(dtype(1.0))) <= np.spacing(dtype(np.e))
    assert got[6] == 0 and got[7] == np.inf


def test_subnormal_results_are_rounded_once():
    """exp(x) for x in the float64 subnormal range: the scaling by 2^k is split into two
    exact powers of two, so the result is the polynomial's value rounded once."""
    x = np.linspace(-745.0, -708.5, 20_001)
    got = _exp(x)
    want = np.exp(x.astype(np.longdouble))
    err = np.abs(got.astype(np.longdouble) - want)
    assert np.all(err <= 2 * np.longdouble(2.0 ** -1074) + 2 * np.spacing(np.abs(want.astype(np.float64))))
    assert got.min() > 0


def test_monotone_on_a_fine_grid():
    x = np.linspace(-20, 0, 400_001)
    assert np.all(np.diff(_exp(x)) >= 0)
    x32 = np.linspace(-20, 0, 400_001, dtype=np.float32)
    assert np.all(np.diff(_exp(x32)) >= 0)
