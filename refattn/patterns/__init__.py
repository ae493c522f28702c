"""Attention patterns: each a frozen dataclass that builds a `refattn.Mask`.

``patterns.get(name, **params).mask(lq, lk)`` or ``patterns.Causal(...).mask(lq, lk)``;
``patterns.names()`` lists the registry.
"""

from .base import Pattern, from_dict, get, names, register
from .basic import Causal, Dense

__all__ = ["Pattern", "Causal", "Dense", "from_dict", "get", "names", "register"]
