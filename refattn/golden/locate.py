"""Where a golden suite is found: one rule for the command line and the library alike.

A suite is a folder holding ``manifest.json`` (spec/golden-format.md). When a caller names
one (``--golden DIR``, ``golden_dir=``), that folder is the suite. Otherwise the first of:

1. ``$REFATTN_GOLDEN``, when set;
2. ``./golden`` in the current folder, when it holds a manifest (where ``refattn golden
   generate`` writes by default, and the committed suite when run in the repository);
3. the ``golden/`` folder of the source checkout beside the package (an editable install);
4. the built-in suite, generated once into the user's cache
   (``$XDG_CACHE_HOME/refattn/golden-<version>``, else ``~/.cache/...``). Generation is
   deterministic: on one machine it is the committed suite, byte for byte.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from .._runtime import notice, user_cache_dir
from .._version import __version__
from ..errors import RefattnError
from .generate import generate

#: The repository's suite, beside the package in a source checkout.
CHECKOUT_GOLDEN = Path(__file__).resolve().parent.parent.parent / "golden"
_HOW = ("name the suite's folder (--golden DIR on the command line, golden_dir= in Python) or set "
        "REFATTN_GOLDEN; write one with `refattn golden generate --out DIR`")


def _has_manifest(folder: Path) -> bool:
    return (folder / "manifest.json").is_file()


def cache_golden_dir() -> Path:
    """The folder of the built-in suite in the user's cache, for this version."""
    return Path(user_cache_dir()) / f"golden-{__version__}"


def resolve_golden_dir(golden_dir=None) -> Path:
    """The suite's folder: ``golden_dir`` when given (it must hold a manifest), else
    `default_golden_dir`. `RefattnError` says how to name one when there is none."""
    if golden_dir is None:
        return default_golden_dir()
    folder = Path(golden_dir)
    if not _has_manifest(folder):
        what = "no such folder" if not folder.exists() else "no manifest.json in it"
        raise RefattnError(f"golden: {folder} is not a golden suite ({what}); {_HOW}")
    return folder


def default_golden_dir() -> Path:
    """The suite used when none is named (the module's rule). Generating the cached suite
    takes seconds and is said on stderr; it is written to a temporary folder and moved into
    place, so concurrent first runs never see half a suite."""
    env = os.environ.get("REFATTN_GOLDEN")
    if env:
        folder = Path(env)
        if not _has_manifest(folder):
            raise RefattnError(f"golden: REFATTN_GOLDEN={env} is not a golden suite (no manifest.json); {_HOW}")
        return folder
    for folder in (Path("golden"), CHECKOUT_GOLDEN):
        if _has_manifest(folder):
            return folder
    cache = cache_golden_dir()
    if not _has_manifest(cache):
        _generate_into(cache)
    return cache


def _generate_into(cache: Path) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    notice(f"generating the built-in golden suite once into {cache} (seconds; later runs read it there)")
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        manifest = generate(tmp)
        if cache.exists() and not _has_manifest(cache):
            shutil.rmtree(cache, ignore_errors=True)     # an unfinished copy of an older refattn
        try:
            tmp.rename(cache)
        except OSError:         # another process moved its copy into place first: keep that one
            if not _has_manifest(cache):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    notice(f"generated {len(manifest['cases'])} cases in {time.perf_counter() - t0:.1f} s")
