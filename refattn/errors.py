"""The one exception type refattn raises for bad input, and the check every size goes through."""

import numpy as np


class RefattnError(ValueError):
    """Invalid input to refattn.

    A subclass of :class:`ValueError` so that callers that already catch
    ``ValueError`` keep working. Every message names the offending argument
    and states what was expected.
    """


def check_dim(value, name: str) -> int:
    """``value`` as a Python int if it is an integer >= 1 (bools are not); else `RefattnError`
    naming ``name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise RefattnError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise RefattnError(f"{name} must be >= 1, got {value}")
    return int(value)
