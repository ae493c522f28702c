"""Base class and registry of attention patterns.

A pattern is a frozen dataclass of parameters with a registry ``name``; its
``mask(lq, lk)`` builds a `refattn.Mask` in O(nnz) time and memory.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
import reprlib
import threading
from typing import ClassVar

import numpy as np

from ..alignment import align_offset
from ..errors import RefattnError, check_allocation, check_dim
from ..mask import Mask, _index_dtype
from ._fill import fill, fill_blocks, fill_two_ranges
from ._inputs import Inputs

_REGISTRY: dict[str, type[Pattern]] = {}


class Pattern:
    """Base of every pattern. Subclasses are ``@register``-ed frozen dataclasses."""

    name: ClassVar[str] = ""

    def mask(self, lq: int, lk: int, *, heads: int | None = None, q=None, k=None) -> Mask:
        """The pattern's `Mask` for ``lq`` queries and ``lk`` keys.

        ``heads``: the number of query heads. A pattern that is the same for every head
        returns one 2-D mask whatever ``heads`` is (it broadcasts over heads); a pattern
        that differs per head (per-head layouts, per-head random draws) returns a
        ``(1, heads, Lq, Lk)`` mask, and with ``heads=None`` its head-0 mask (2-D), or
        every head its parameters define (a 3-D ``block_sparse`` layout).

        ``q``, ``k``: the queries ``(B, H, Lq, D)`` and keys ``(B, Hkv, Lk, D)`` (or one
        head, ``(Lq, D)`` and ``(Lk, D)``). A content-dependent pattern (`lsh`, `routing`,
        `topk`, `nsa_select`, `moba`) chooses its keys from them and returns a
        ``(B, H, Lq, Lk)`` mask (2-D for one-head inputs); every other pattern checks
        their lengths and ignores their values (spec/patterns.md, "Content-dependent
        patterns"); with 4-D ``q`` and no ``heads``, ``heads`` is q's ``H``.
        """
        lq, lk = check_lengths(lq, lk)
        if heads is not None:
            heads = check_int(heads, "heads", 1)
        inputs = None
        if q is not None or k is not None:
            inputs = Inputs.check(q, k, lq, lk, heads, read_values=self.content_dependent)
            if heads is None and q is not None and not inputs.single:
                heads = q.shape[1]                  # per-head patterns build q's heads
        elif self.content_dependent:
            raise RefattnError(f"pattern {self.name!r} chooses keys from the inputs: "
                               "pass q= and k= to mask()")
        return self._mask(lq, lk, heads, inputs)

    @property
    def content_dependent(self) -> bool:
        """Whether the mask depends on the values of q and k (spec/patterns.md)."""
        return False

    def _mask(self, lq: int, lk: int, heads: int | None, inputs) -> Mask:
        """`mask` after validation; ``inputs`` is an `_inputs.Inputs` or None. Content-
        dependent patterns and composites override this; the rest ignore ``inputs``."""
        return self._build_heads(lq, lk, heads)

    def _build_heads(self, lq: int, lk: int, heads: int | None) -> Mask:
        """Per-head patterns override this; the rest build one 2-D mask."""
        return self._build(lq, lk)

    def _build(self, lq: int, lk: int) -> Mask:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict:
        """``{"name": ..., **parameters}`` with JSON-compatible values."""
        out = {"name": self.name}
        for f in dataclasses.fields(self):
            val = getattr(self, f.name)
            if isinstance(val, np.ndarray):
                val = val.tolist()
            elif isinstance(val, Pattern):
                val = val.to_dict()
            elif isinstance(val, tuple):
                val = [v.to_dict() if isinstance(v, Pattern) else v for v in val]
            out[f.name] = val
        return out

    @classmethod
    def _from_params(cls, params: dict) -> Pattern:
        return cls(**params)

    # Algebra: the result is a pattern again (and serializes as one).
    def __or__(self, other: Pattern) -> Pattern:
        return _composite("union", self, other)

    def __and__(self, other: Pattern) -> Pattern:
        return _composite("intersection", self, other)

    def __sub__(self, other: Pattern) -> Pattern:
        return _composite("difference", self, other)


def _composite(name: str, a, b) -> Pattern:
    if not isinstance(b, Pattern):
        return NotImplemented
    return _REGISTRY[name](terms=(a, b))


def register(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: add a pattern class to the registry under ``cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"pattern name {cls.name!r} is empty or already registered")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """Every registered pattern name, sorted."""
    return sorted(_REGISTRY)


def get(name: str, /, **params) -> Pattern:
    """The pattern ``name`` built with ``params``; `RefattnError` for an unknown name
    or parameter."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise RefattnError(f"pattern: unknown pattern {_short(name)}; known: {names()}")
    cls = _REGISTRY[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise RefattnError(f"pattern {name!r}: unknown parameter(s) {unknown}; it takes {allowed}")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [f for f in required if f not in params]
    if missing:
        raise RefattnError(f"pattern {name!r}: missing parameter(s) {missing}; it takes {allowed}")
    return cls._from_params(params)


#: How deeply composites may nest in `from_dict` (a dict that contains itself nests forever).
MAX_NESTING = 64
_nesting = threading.local()


def from_dict(d: dict) -> Pattern:
    """Inverse of `Pattern.to_dict`."""
    if not isinstance(d, dict) or "name" not in d:
        raise RefattnError(f"pattern: expected a dict with a 'name' key, got {_short(d)}")
    depth = getattr(_nesting, "depth", 0)
    if depth >= MAX_NESTING:
        raise RefattnError(f"pattern: composites nested more than {MAX_NESTING} deep (or a dict that contains "
                           "itself)")
    _nesting.depth = depth + 1
    try:
        params = dict(d)
        return get(params.pop("name"), **params)
    finally:
        _nesting.depth = depth


def _short(x, limit: int = 200) -> str:
    """``repr(x)`` cut to ``limit`` characters (a repr of a deep or self-containing object is
    no message)."""
    try:
        text = reprlib.repr(x)
    except RecursionError:
        text = f"<{type(x).__name__}>"
    return text if len(text) <= limit else text[:limit] + "..."


#: The largest value of an integer pattern parameter (a width, an offset, a block, a count):
#: far beyond any length a mask can have, and small enough that a position plus or times
#: one of them stays inside int64, where the builders compute (spec/patterns.md).
MAX_PARAM = 2**40


def check_int(value, name: str, lowest: int = 0, highest: int = MAX_PARAM) -> int:
    """A pattern parameter that must be an integer in ``[lowest, highest]``, as a Python int
    (a NumPy integer is converted, so no later arithmetic happens in its width)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or not lowest <= value <= highest:
        top = {MAX_PARAM: "2**40", 2**64 - 1: "2**64 - 1"}.get(highest, str(highest))
        raise RefattnError(f"{name} must be an int in [{lowest}, {top}], got {value!r}")
    return int(value)


def keep(pattern, field: str, check, *args):
    """Validate a frozen pattern's parameter with ``check(value, *args)`` and store what the
    check returns (a NumPy integer becomes a Python int, a list a tuple, ...)."""
    object.__setattr__(pattern, field, check(getattr(pattern, field), *args))


def check_bool(value, name: str) -> bool:
    """A pattern parameter that must be a bool (not merely truthy)."""
    if not isinstance(value, bool):
        raise RefattnError(f"{name} must be a bool, got {value!r}")
    return value


#: int64 arrays of one entry per query row that a builder holds at once (positions, row
#: counts, ranges, the CSR's row pointers): what a mask costs before its entries.
_ROW_ARRAYS = 6


def check_lengths(lq, lk) -> tuple[int, int]:
    lq, lk = check_dim(lq, "lq"), check_dim(lk, "lk")
    check_allocation(8 * _ROW_ARRAYS * (lq + 1) + 8 * lk, f"a {lq} x {lk} mask's row arrays")
    return lq, lk


def _allocate(counts: np.ndarray, lq: int, lk: int) -> tuple[np.ndarray, np.ndarray]:
    """``indptr`` (int64) from row counts and an uninitialised ``indices`` of the final dtype."""
    indptr = np.zeros(lq + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    nnz = int(indptr[-1])
    dtype = _index_dtype(nnz, lk)
    check_allocation(nnz * np.dtype(dtype).itemsize, f"a mask of {nnz} entries ({lq} x {lk})")
    return indptr, np.empty(nnz, dtype=dtype)


def _finish(indptr: np.ndarray, indices: np.ndarray, lq: int, lk: int) -> Mask:
    return Mask._from_canonical(indptr.astype(indices.dtype), indices, (lq, lk))


def rows_from_progressions(first: np.ndarray, step: int, count: np.ndarray, lq: int, lk: int) -> Mask:
    """Row i allows ``first[i] + step * t`` for ``t = 0 .. count[i] - 1``; the caller
    guarantees they lie in ``[0, Lk)`` and increase. Written straight into the final index
    dtype by one compiled loop: O(Lq + nnz) time, peak memory the CSR plus O(Lq)."""
    indptr, indices = _allocate(np.maximum(count, 0).astype(np.int64), lq, lk)
    fill(indptr, first, step, indices)
    return _finish(indptr, indices, lq, lk)


def rows_from_ranges(lo: np.ndarray, hi: np.ndarray, lq: int, lk: int) -> Mask:
    """The mask whose row i allows the contiguous keys ``lo[i] <= j < hi[i]`` (clipped to
    ``[0, Lk)``; an empty range gives an empty row). O(Lq + nnz)."""
    lo = np.clip(lo, 0, lk).astype(np.int64)
    hi = np.clip(hi, 0, lk).astype(np.int64)
    return rows_from_progressions(lo, 1, hi - lo, lq, lk)


def rows_from_prefix_and_range(a_hi: np.ndarray, b_lo: np.ndarray, b_hi: np.ndarray,
                               lq: int, lk: int) -> Mask:
    """Row i allows ``0 <= j < a_hi[i]`` and ``b_lo[i] <= j < b_hi[i]`` (clipped to
    ``[0, Lk)``; overlapping ranges merge). O(Lq + nnz), no temporaries of size nnz."""
    a = np.clip(a_hi, 0, lk).astype(np.int64)
    b_lo = np.clip(b_lo, 0, lk).astype(np.int64)
    b_hi = np.clip(b_hi, 0, lk).astype(np.int64)
    empty_b = b_hi <= b_lo
    b_lo = np.where(empty_b, a, b_lo)          # no second range: the prefix alone
    b_hi = np.where(empty_b, a, b_hi)
    merge = a >= b_lo                          # touching or overlapping: one range [0, max)
    b_hi = np.where(merge, np.maximum(a, b_hi), b_hi)
    a_hi = np.where(merge, b_lo, a)
    indptr, indices = _allocate(a_hi + (b_hi - b_lo), lq, lk)
    fill_two_ranges(indptr, a_hi, b_lo, indices)
    return _finish(indptr, indices, lq, lk)


def rows_from_block_csr(bindptr: np.ndarray, bindices: np.ndarray, block: int, lq: int, lk: int) -> Mask:
    """Row i allows every key of the key blocks ``bindices[bindptr[I]:bindptr[I + 1]]``
    (sorted, unique) of its query block ``I = i // block``; the last key block stops at Lk.
    O(nbq + nnz): the layout is never expanded to a dense ``[nbq, nbk]`` array."""
    bindptr = np.asarray(bindptr, np.int64)
    bindices = np.asarray(bindices, np.int64)
    width = np.minimum(block, lk - bindices * block)             # keys in each listed block
    per_block_row = np.add.reduceat(np.append(width, 0), bindptr[:-1]) * (np.diff(bindptr) > 0)
    indptr, indices = _allocate(per_block_row[np.arange(lq) // block], lq, lk)
    fill_blocks(indptr, bindptr, bindices, np.int64(block), np.int64(lk), indices)
    return _finish(indptr, indices, lq, lk)


def query_positions(lq: int, lk: int, align: str) -> np.ndarray:
    """``i' = i + offset`` for every query row (spec/semantics.md, section 6)."""
    return np.arange(lq, dtype=np.int64) + align_offset(align, lq, lk)


@dataclasses.dataclass(frozen=True)
class _Composite(Pattern):
    """A set operation over two or more patterns (left to right)."""

    terms: tuple

    def __post_init__(self):
        terms = tuple(self.terms)
        if len(terms) < 2 or not all(isinstance(t, Pattern) for t in terms):
            raise RefattnError(f"{self.name}: terms must be two or more patterns, got {self.terms!r}")
        object.__setattr__(self, "terms", terms)

    @classmethod
    def _from_params(cls, params: dict) -> Pattern:
        terms = params.get("terms")
        if not isinstance(terms, (list, tuple)):
            raise RefattnError(f"pattern {cls.name!r}: 'terms' must be a list of pattern dicts")
        return cls(terms=tuple(t if isinstance(t, Pattern) else from_dict(t) for t in terms))

    @property
    def content_dependent(self) -> bool:
        return any(t.content_dependent for t in self.terms)

    def _mask(self, lq: int, lk: int, heads: int | None, inputs) -> Mask:
        # Per-head terms give (1, H) stacks, content terms (B, H) ones; the set
        # operations broadcast 2-D terms over them.
        return functools.reduce(self._op, (t._mask(lq, lk, heads, inputs) for t in self.terms))


@register
@dataclasses.dataclass(frozen=True)
class Union(_Composite):
    """Entries allowed by any term (``p | q``)."""

    name = "union"
    _op = staticmethod(operator.or_)


@register
@dataclasses.dataclass(frozen=True)
class Intersection(_Composite):
    """Entries allowed by every term (``p & q``)."""

    name = "intersection"
    _op = staticmethod(operator.and_)


@register
@dataclasses.dataclass(frozen=True)
class Difference(_Composite):
    """Entries allowed by the first term and by none of the others (``p - q``)."""

    name = "difference"
    _op = staticmethod(operator.sub)
