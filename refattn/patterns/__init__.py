"""Attention patterns: each a frozen dataclass that builds a `refattn.Mask` in O(nnz).

``patterns.get(name, **params).mask(lq, lk)`` or ``patterns.SlidingWindow(...).mask(lq, lk)``;
``patterns.names()`` lists the registry; ``p | q``, ``p & q``, ``p - q`` combine patterns,
and ``to_dict()`` / ``from_dict()`` serialize any of them. Content-dependent patterns (`Lsh`,
`Routing`, `TopK`, `NsaSelect`, `Moba`) take the inputs: ``.mask(lq, lk, q=q, k=k)``.
Rules: spec/patterns.md.
"""

from .base import Difference, Intersection, Pattern, Union, from_dict, get, names, register
from .basic import Causal, Dense
from .block_sparse import BlockSparse
from .content import Lsh, Moba, NsaSelect, Routing, TopK, nsa_compress, nsa_compressed_mask
from .deepspeed import DeepSpeedBigBird, DeepSpeedBSLongformer, DeepSpeedFixed, DeepSpeedVariable
from .global_tokens import GlobalTokens
from .longformer import Longformer
from .neighborhood import Neighborhood2D
from .sparse_transformer import Fixed, Strided, StridedDilated, StridedLocal
from .stochastic import BigBird, Random
from .windows import ChunkedCausal, DilatedSlidingWindow, Document, PrefixLM, SinkWindow, SlidingWindow

__all__ = [
    "BigBird", "BlockSparse", "Causal", "ChunkedCausal", "DeepSpeedBigBird", "DeepSpeedBSLongformer",
    "DeepSpeedFixed", "DeepSpeedVariable", "Dense", "Difference", "DilatedSlidingWindow", "Document",
    "Fixed", "GlobalTokens", "Intersection", "Longformer", "Lsh", "Moba", "Neighborhood2D", "NsaSelect",
    "Pattern", "PrefixLM", "Random", "Routing", "SinkWindow", "SlidingWindow", "Strided", "StridedDilated",
    "StridedLocal", "TopK", "Union", "from_dict", "get", "names", "nsa_compress", "nsa_compressed_mask",
    "register",
]
