"""Attention patterns: each a frozen dataclass that builds a `refattn.Mask` in O(nnz).

``patterns.get(name, **params).mask(lq, lk)`` or ``patterns.SlidingWindow(...).mask(lq, lk)``;
``patterns.names()`` lists the registry; ``p | q``, ``p & q``, ``p - q`` combine patterns,
and ``to_dict()`` / ``from_dict()`` serialize any of them. Rules: spec/patterns.md.
"""

from .base import Difference, Intersection, Pattern, Union, from_dict, get, names, register
from .basic import Causal, Dense
from .global_tokens import GlobalTokens
from .sparse_transformer import Fixed, Strided, StridedDilated, StridedLocal
from .windows import ChunkedCausal, DilatedSlidingWindow, Document, PrefixLM, SinkWindow, SlidingWindow

__all__ = [
    "Causal", "ChunkedCausal", "Dense", "Difference", "DilatedSlidingWindow", "Document",
    "Fixed", "GlobalTokens", "Intersection", "Pattern", "PrefixLM", "SinkWindow", "SlidingWindow", "Strided",
    "StridedDilated", "StridedLocal", "Union",
    "from_dict", "get", "names", "register",
]
