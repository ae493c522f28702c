"""refattn: the reference engine and specification for attention.

    import refattn
    m = refattn.patterns.get("causal").mask(lq, lk)
    r = refattn.forward(q, k, v, m)                          # r.out, r.lse
    g = refattn.backward(q, k, v, r.out, r.lse, dout, m)     # g.dq, g.dk, g.dv, g.dbias

The semantics are written in spec/semantics.md and spec/backward.md; the layers of the
package are drawn in README.md, "Architecture".
"""

from . import _runtime

# Before any module below defines a Numba function: its cache goes to the user's cache
# folder, not into the installed package, and a first compile says what it is doing.
_runtime.install_numba_cache_locator()
_runtime.install_compile_notice()

from . import backends, patterns  # noqa: E402
from ._version import __version__  # noqa: E402
from .alignment import ALIGNMENTS, DEFAULT_ALIGN  # noqa: E402
from .attention import backward, forward  # noqa: E402
from .bias import ALiBi, SparseBias  # noqa: E402
from .contract import Grads, Result  # noqa: E402
from .dropout import Dropout  # noqa: E402
from .errors import RefattnError  # noqa: E402
from .mask import Mask  # noqa: E402

__all__ = [
    "ALIGNMENTS", "DEFAULT_ALIGN", "ALiBi", "Dropout", "Grads", "Mask", "RefattnError",
    "Result", "SparseBias", "__version__", "backends", "backward", "forward", "patterns",
]
