"""Causal alignment of queries to keys when ``Lq != Lk`` (spec/semantics.md, "Alignment").

Query ``i`` is placed at key position ``i + offset``:

* ``top_left``:     ``offset = 0``; the first query lines up with the first key.
* ``bottom_right``: ``offset = Lk - Lq``; the last query lines up with the last key
  (decoding with a KV cache). This is refattn's default.
"""

from __future__ import annotations

from .errors import RefattnError

ALIGNMENTS = ("top_left", "bottom_right")
DEFAULT_ALIGN = "bottom_right"


def check_align(align, name: str = "align") -> str:
    """Return ``align`` if it is a known alignment, else raise `RefattnError`."""
    if not isinstance(align, str) or align not in ALIGNMENTS:
        raise RefattnError(f"{name} must be one of {ALIGNMENTS}, got {align!r}")
    return align


def align_offset(align: str, lq: int, lk: int) -> int:
    """The key position of query 0: ``0`` for top_left, ``Lk - Lq`` for bottom_right."""
    return 0 if check_align(align) == "top_left" else lk - lq
