"""Shared helpers for the test suite."""

import ctypes
import os

import numpy as np
import pytest


def _cuda_driver_present() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


# Without a CUDA driver the cuda backend's tests run on Numba's CUDA simulator (read when
# numba.cuda is first imported, so set before any test module imports it). An explicit
# NUMBA_ENABLE_CUDASIM in the environment is left as it is.
if "NUMBA_ENABLE_CUDASIM" not in os.environ and not _cuda_driver_present():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"


def random_qkv(rng, B=1, H=2, Hkv=None, Lq=5, Lk=None, D=3, Dv=None, dtype=np.float64):
    """Standard-normal q, k, v (float64 draw, then cast)."""
    Hkv = Hkv or H
    Lk = Lk or Lq
    Dv = Dv or D
    q = rng.standard_normal((B, H, Lq, D)).astype(dtype)
    k = rng.standard_normal((B, Hkv, Lk, D)).astype(dtype)
    v = rng.standard_normal((B, Hkv, Lk, Dv)).astype(dtype)
    return q, k, v


def random_bool(rng, shape, density=0.6):
    return rng.random(shape) < density


@pytest.fixture
def rng():
    return np.random.default_rng(20261123)
