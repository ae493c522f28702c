"""refattn: the reference engine and specification for attention.

    import refattn
    m = refattn.patterns.get("causal").mask(lq, lk)
    r = refattn.forward(q, k, v, m)                          # r.out, r.lse
    g = refattn.backward(q, k, v, r.out, r.lse, dout, m)     # g.dq, g.dk, g.dv, g.dbias

The semantics are written in spec/semantics.md and spec/backward.md.
"""

from . import backends, patterns
from ._version import __version__
from .alignment import ALIGNMENTS, DEFAULT_ALIGN
from .attention import backward, forward
from .bias import ALiBi, SparseBias
from .contract import Grads, Result
from .dropout import Dropout
from .errors import RefattnError
from .mask import Mask

__all__ = [
    "ALIGNMENTS", "DEFAULT_ALIGN", "ALiBi", "Dropout", "Grads", "Mask", "RefattnError",
    "Result", "SparseBias", "__version__", "backends", "backward", "forward", "patterns",
]
