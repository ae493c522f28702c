"""What refattn does to the process it runs in: where its caches go, and what it says
on stderr while a user waits.

* **Caches go to a per-user folder**, `user_cache_dir` (``$XDG_CACHE_HOME/refattn``, else
  ``~/.cache/refattn``), never into the installed package. Numba caches a ``cache=True``
  function beside its source (``__pycache__``) whenever that folder is writable, which for
  an installed package is ``site-packages/refattn/``: files pip does not own, left behind
  by ``pip uninstall`` as a folder without ``__init__.py`` that then imports as a namespace
  package and hides a later editable install. `install_numba_cache_locator` sends refattn's
  own functions to ``user_cache_dir()/numba`` instead; when ``NUMBA_CACHE_DIR`` is set,
  Numba's own rule applies and they go there. Other libraries' functions are not touched.
* **A first run talks.** Compiling refattn's kernels takes seconds to minutes the first
  time on a machine; `install_compile_notice` says so once per kernel on stderr, with what
  it is and that it happens once. `notice` is the one way refattn writes such a line;
  ``REFATTN_QUIET=1`` silences them all.

`refattn/__init__.py` calls both installers before any module defines a Numba function.
"""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
import threading

#: The package's own folder: functions defined under it are refattn's.
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def user_cache_dir() -> str:
    """refattn's per-user cache folder: ``$XDG_CACHE_HOME/refattn``, else ``~/.cache/refattn``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "refattn")


def _numba_roots() -> tuple[str, str]:
    """Where refattn's compiled functions may go, in order: the user cache, else a folder of
    this user's in the temporary folder (never the installed package)."""
    return (os.path.join(user_cache_dir(), "numba"), os.path.join(tempfile.gettempdir(), f"refattn-numba-{_user()}"))


def numba_cache_dir() -> str:
    """Where Numba keeps refattn's compiled functions: ``NUMBA_CACHE_DIR`` when set (Numba's
    rule), else the first of `_numba_roots` that can be written."""
    from numba.core import config

    if config.CACHE_DIR:
        return config.CACHE_DIR
    for root in _numba_roots():
        try:
            os.makedirs(root, exist_ok=True)
            tempfile.TemporaryFile(dir=root).close()
        except OSError:
            continue
        return root
    return _numba_roots()[0]


def quiet() -> bool:
    """Whether ``REFATTN_QUIET`` asks refattn to print no notices."""
    return os.environ.get("REFATTN_QUIET", "") not in ("", "0")


def notice(message: str) -> None:
    """One line on stderr, ``refattn: MESSAGE``, unless `quiet`."""
    if quiet():
        return
    try:
        sys.stderr.write(f"refattn: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):   # a closed or broken stderr: a notice is never worth a failure
        pass


def _user() -> str:
    try:
        return str(os.getuid())
    except AttributeError:      # pragma: no cover - Windows
        return os.environ.get("USERNAME", "user")


def _is_refattn_file(path: str) -> bool:
    try:
        return os.path.commonpath([os.path.abspath(path), _PACKAGE_DIR]) == _PACKAGE_DIR
    except ValueError:              # another drive (Windows)
        return False


def install_numba_cache_locator() -> bool:
    """Put refattn's Numba cache in `numba_cache_dir` (see the module docstring). Returns
    False when this Numba has no locator list to extend (its default rule then applies)."""
    from numba.core import caching, config

    impl = getattr(caching, "CacheImpl", None)
    base = getattr(caching, "_CacheLocator", None)
    mixin = getattr(caching, "_SourceFileBackedLocatorMixin", None)
    if impl is None or base is None or mixin is None or not isinstance(getattr(impl, "_locator_classes", None), list):
        return False
    if any(getattr(c, "_refattn", False) for c in impl._locator_classes):
        return True

    class RefattnCacheLocator(mixin, base):
        """refattn's functions, cached under ``user_cache_dir()/numba``."""

        _refattn = True

        def __init__(self, py_func, py_file, root):
            self._py_file = py_file
            self._lineno = py_func.__code__.co_firstlineno
            # one folder per installed copy (Numba's rule: the source folder, hashed)
            self._cache_path = os.path.join(root, self.get_suitable_cache_subpath(py_file))

        def get_cache_path(self):
            return self._cache_path

        @classmethod
        def from_function(cls, py_func, py_file):
            if config.CACHE_DIR or not _is_refattn_file(py_file) or not os.path.exists(py_file):
                return None         # NUMBA_CACHE_DIR, or not ours: Numba's own locators decide
            for root in _numba_roots():           # never the package
                locator = cls(py_func, py_file, root)
                try:
                    locator.ensure_cache_path()
                except OSError:
                    continue
                return locator
            return None

    impl._locator_classes.insert(0, RefattnCacheLocator)
    return True


#: The slow first compiles, by the compiled function's module and name: what is compiled
#: and how long it took with a cold cache on the project's 2-core CI machine (README,
#: "Set up"). A kernel's backward is three functions compiled in a row: one notice.
_SLOW = {
    ("refattn.backends.cpu", "_forward_kernel"): ("the cpu backend's {dtype} forward kernel", "about 6 s"),
    ("refattn.backends.cpu", "_rowdot_kernel"): ("the cpu backend's {dtype} backward kernels", "about 25 s"),
    ("refattn.backends.cpu", "_dq_kernel"): ("the cpu backend's {dtype} backward kernels", "about 25 s"),
    ("refattn.backends.cpu", "_dkdv_kernel"): ("the cpu backend's {dtype} backward kernels", "about 25 s"),
}
#: Whole modules whose first compiles are one wait; no time: numba.cuda caches no GPU kernel,
#: so they are compiled in every process (seconds).
_MODULES = {
    "refattn.backends._cuda_kernels": ("the cuda backend's {dtype} kernels", None),
}
#: Every other refattn function: one notice for all of them, at the first one compiled.
_OTHERS = ("refattn's mask and pattern kernels", "up to 2 s each, as each is first used")


def _float_dtype(args) -> str:
    """The first floating dtype among a compile's argument types ("float64" if none)."""
    for t in args or ():
        name = str(getattr(t, "dtype", ""))
        if name in ("float32", "float64"):
            return name
    return "float64"


def _describe(dispatcher, args) -> tuple[str, str | None] | None:
    """``(what, how long)`` for a compile of one of refattn's functions (how long None: not
    cached, so in every process), else None."""
    py_func = getattr(dispatcher, "py_func", None)
    module = getattr(py_func, "__module__", "") or ""
    if module != "refattn" and not module.startswith("refattn."):
        return None
    slow = _SLOW.get((module, getattr(py_func, "__name__", ""))) or _MODULES.get(module)
    if slow is None:
        return _OTHERS
    what, how_long = slow
    return what.format(dtype=_float_dtype(args)), how_long


class _CompileNotice:
    """Says, once per process and kind of kernel, that refattn is compiling it.

    Only the outermost compile of a refattn function speaks: the functions it calls are
    compiled inside it, and their time is part of its wait."""

    def __init__(self):
        self._depth = threading.local()
        self._said: set[str] = set()

    def on_start(self, event):
        depth = getattr(self._depth, "n", 0)
        self._depth.n = depth + 1
        if depth:
            return
        data = event.data or {}
        described = _describe(data.get("dispatcher"), data.get("args"))
        if described is None:
            return
        what, how_long = described
        if what in self._said:
            return
        self._said.add(what)
        if how_long is None:
            notice(f"compiling {what} with Numba: seconds, in every process (GPU kernels are not cached)")
        else:
            notice(f"compiling {what} with Numba: once per machine ({how_long}), then cached in {numba_cache_dir()}")

    def on_end(self, event):
        self._depth.n = max(getattr(self._depth, "n", 1) - 1, 0)


def install_compile_notice(event_module: str = "numba.core.event") -> bool:
    """Register the compile notice for the compile events of an event API: Numba's own
    (``numba:compile``) by default; numba-cuda has its own copy (``numba.cuda.core.event``,
    ``numba-cuda:compile``), which the cuda backend registers with on import. False if there
    is no such API."""
    try:
        event = importlib.import_module(event_module)
    except ImportError:
        return False
    if not hasattr(event, "register") or not hasattr(event, "Listener"):
        return False
    if event_module in _LISTENERS:
        return True

    class Listener(event.Listener):
        def on_start(self, ev):
            _NOTICE.on_start(ev)

        def on_end(self, ev):
            _NOTICE.on_end(ev)

    listener = Listener()
    registered = False
    for kind in ("numba:compile", "numba-cuda:compile"):   # numba-cuda renamed its kinds
        try:
            event.register(kind, listener)
            registered = True
        except ValueError:                                 # a kind this event API does not have
            continue
    if registered:
        _LISTENERS[event_module] = listener
    return registered


#: One notice state for every event API: a kind of kernel is announced once per process.
_NOTICE = _CompileNotice()
_LISTENERS: dict = {}
