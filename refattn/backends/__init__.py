"""Backends: interchangeable implementations of the one contract (refattn.contract).

Each backend module provides ``forward(problem) -> Result`` and
``backward(problem, out, lse, dout, dlse) -> Grads`` over validated input, where
``out``, ``lse``, ``dout`` and ``dlse`` (or None) are float64.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import RefattnError

# name -> (module, short description). Later backends register here.
_BACKENDS: dict[str, tuple[str, str]] = {
    "dense": ("refattn.backends.dense", "float64 dense oracle, the executable spec"),
}


def names() -> list[str]:
    """Names of the backends available on this machine, in registration order."""
    return [n for n in _BACKENDS if _unavailable_reason(n) is None]


def describe() -> dict[str, str]:
    """``{name: description}`` for every available backend."""
    return {n: _BACKENDS[n][1] for n in names()}


def _unavailable_reason(name: str) -> str | None:
    return None  # every backend registered so far needs only the core dependencies


def get(name: str) -> ModuleType:
    """The backend module ``name``; `RefattnError` if unknown or unavailable here."""
    if not isinstance(name, str) or name not in _BACKENDS:
        raise RefattnError(f"backend: unknown backend {name!r}; known: {list(_BACKENDS)}")
    why = _unavailable_reason(name)
    if why is not None:
        raise RefattnError(f"backend: {name!r} is not available here: {why}")
    return importlib.import_module(_BACKENDS[name][0])
