"""Backends: interchangeable implementations of the one contract (refattn.contract).

Each backend module provides ``forward(problem, config) -> Result`` and
``backward(problem, out, lse, dout, dlse, config) -> Grads`` over validated input, where
``out``, ``lse``, ``dout`` and ``dlse`` (or None) are float64 host arrays (in a call on
the device, see ``DEVICE_ARRAYS`` in ``cuda``, device arrays of any float dtype) and
``config`` is a `Config`; and ``COMPUTE_DTYPES`` (the dtypes it computes in, its default first) and
``OPTIONS`` (``{name: (validator, default)}`` of its own tuning options).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass
from types import MappingProxyType, ModuleType

import numpy as np

from ..errors import RefattnError

# name -> (module, short description). Later backends register here.
_BACKENDS: dict[str, tuple[str, str]] = {
    "dense": ("refattn.backends.dense", "float64 dense oracle, the executable spec"),
    "sparse": ("refattn.backends.sparse", "SciPy: SDDMM on the nonzeros, segmented softmax, SpMM"),
    "tiled": ("refattn.backends.tiled", "FlashAttention-2 in NumPy: tiles, online softmax"),
    "cpu": ("refattn.backends.cpu", "Numba-parallel tiles with BLAS, deterministic for any thread count"),
    "cuda": ("refattn.backends.cuda", "numba.cuda kernels: shared-memory tiles, no atomics"),
}


@dataclass(frozen=True)
class Config:
    """How a backend runs one call: the dtype it computes in and its validated options."""

    compute_dtype: np.dtype
    options: MappingProxyType


def configure(impl: ModuleType, name: str, compute_dtype, options) -> Config:
    """Check ``compute_dtype`` and ``options`` against what backend ``impl`` accepts."""
    allowed = [np.dtype(d) for d in impl.COMPUTE_DTYPES]
    if compute_dtype is None:
        dtype = allowed[0]
    else:
        # np.dtype(None) is float64, and `None in [float64]` is True: a name that is no
        # dtype must be refused here, not turned into None and compared.
        try:
            dtype = np.dtype(compute_dtype)
        except (TypeError, ValueError, SyntaxError):
            dtype = None
        if dtype is None or not any(dtype == d for d in allowed):
            raise RefattnError(f"compute_dtype: backend {name!r} computes in {[str(d) for d in allowed]}, "
                               f"got {compute_dtype!r}")
    given = {} if options is None else options
    if not isinstance(given, dict):
        raise RefattnError(f"options: expected a dict, got {type(given).__name__}")
    unknown = sorted(set(given) - set(impl.OPTIONS))
    if unknown:
        raise RefattnError(f"options: backend {name!r} takes {sorted(impl.OPTIONS) or 'no options'}, "
                           f"got unknown {unknown}")
    resolved = {}
    for key, (check, default) in impl.OPTIONS.items():
        resolved[key] = check(given[key], f"options[{key!r}]") if key in given else default
    return Config(dtype, MappingProxyType(resolved))


def registered() -> list[str]:
    """Every backend refattn has, available here or not (see `names`)."""
    return list(_BACKENDS)


def names() -> list[str]:
    """Names of the backends available on this machine, in registration order."""
    return [n for n in _BACKENDS if _unavailable_reason(n) is None]


def describe() -> dict[str, str]:
    """``{name: description}`` for every available backend."""
    return {n: _BACKENDS[n][1] for n in names()}


def _unavailable_reason(name: str) -> str | None:
    """Why backend ``name`` cannot run here, or None (only ``cuda`` needs more than the
    core dependencies)."""
    return _cuda_unavailable_reason() if name == "cuda" else None


@functools.cache
def _cuda_unavailable_reason() -> str | None:
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed (pip install 'refattn[cuda]')"
    from numba import cuda

    if cuda.is_available():  # a usable GPU and driver, or the simulator
        return None
    return ("Numba finds no usable CUDA GPU or driver (numba.cuda.is_available() is False); "
            "set NUMBA_ENABLE_CUDASIM=1 before starting Python to run it on Numba's CUDA simulator")


def get(name: str) -> ModuleType:
    """The backend module ``name``; `RefattnError` if unknown or unavailable here."""
    if not isinstance(name, str) or name not in _BACKENDS:
        raise RefattnError(f"backend: unknown backend {name!r}; known: {list(_BACKENDS)}")
    why = _unavailable_reason(name)
    if why is not None:
        raise RefattnError(f"backend: {name!r} is not available here: {why}")
    return importlib.import_module(_BACKENDS[name][0])
