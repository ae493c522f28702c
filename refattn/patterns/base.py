"""Base class and registry of attention patterns.

A pattern is a frozen dataclass of parameters with a registry ``name``; its
``mask(lq, lk)`` builds a `refattn.Mask` in O(nnz) time and memory.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from ..errors import RefattnError
from ..mask import Mask, _check_dim

_REGISTRY: dict[str, type[Pattern]] = {}


class Pattern:
    """Base of every pattern. Subclasses are ``@register``-ed frozen dataclasses."""

    name: ClassVar[str] = ""

    def mask(self, lq: int, lk: int) -> Mask:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict:
        """``{"name": ..., **parameters}`` with JSON-compatible values."""
        out = {"name": self.name}
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            out[f.name] = val.tolist() if isinstance(val, np.ndarray) else val
        return out


def register(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: add a pattern class to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"pattern name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """Every registered pattern name, sorted."""
    return sorted(_REGISTRY)


def get(name: str, **params) -> Pattern:
    """The pattern ``name`` built with ``params``; `RefattnError` for an unknown name
    or parameter."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise RefattnError(f"pattern: unknown pattern {name!r}; known: {names()}")
    cls = _REGISTRY[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise RefattnError(f"pattern {name!r}: unknown parameter(s) {unknown}; it takes {allowed}")
    return cls(**params)


def from_dict(d: dict) -> Pattern:
    """Inverse of `Pattern.to_dict`."""
    if not isinstance(d, dict) or "name" not in d:
        raise RefattnError(f"pattern: expected a dict with a 'name' key, got {d!r}")
    params = dict(d)
    return get(params.pop("name"), **params)


def check_lengths(lq, lk) -> tuple[int, int]:
    return _check_dim(lq, "lq"), _check_dim(lk, "lk")


def rows_from_ranges(lo: np.ndarray, hi: np.ndarray, lq: int, lk: int) -> Mask:
    """The mask whose row i allows the contiguous keys ``lo[i] <= j < hi[i]`` (clipped to
    ``[0, Lk)``; an empty range gives an empty row). O(Lq + nnz)."""
    lo = np.clip(lo, 0, lk).astype(np.int64)
    hi = np.clip(hi, 0, lk).astype(np.int64)
    counts = np.maximum(hi - lo, 0)
    indptr = np.zeros(lq + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    indices = np.arange(indptr[-1], dtype=np.int64) - np.repeat(indptr[:-1] - lo, counts)
    return Mask.from_indices(indptr, indices, (lq, lk))
