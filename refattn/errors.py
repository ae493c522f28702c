"""The one exception type refattn raises for bad input, and the checks every size goes through."""

import os

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


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, where the OS says (None elsewhere)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_allocation(nbytes: int, what: str) -> None:
    """`RefattnError` before an allocation of ``nbytes`` that this machine's physical memory
    cannot hold: one line that names it, not a MemoryError from deep inside (or, worse, a
    machine that swaps for minutes first)."""
    ram = physical_memory()
    if ram is not None and nbytes > ram:
        raise RefattnError(f"{what} would take {nbytes / 2**30:.3g} GiB, more than this machine's "
                           f"{ram / 2**30:.3g} GiB of memory")
