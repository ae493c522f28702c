"""The implementation under test: how it is named, loaded and called (spec/verify.md).

An implementation is a forward function, optionally with a backward, in the calling
convention of spec/verify.md; it declares the mask form it takes with an attribute
``mask_form`` and may raise `Unsupported` for a case it cannot express.
"""

from __future__ import annotations

import importlib
import inspect
import os
import traceback
from dataclasses import dataclass

from ..errors import RefattnError

MASK_FORMS = ("csr", "dense", "flex", "causal")


class Unsupported(Exception):
    """Raised by an implementation for a case it cannot express (reported, never passed)."""


@dataclass
class Impl:
    """An implementation under test."""

    forward: object
    backward: object | None = None
    name: str = "impl"

    @property
    def mask_form(self) -> str:
        form = getattr(self.forward, "mask_form", "dense")
        if form not in MASK_FORMS:
            raise RefattnError(f"{self.name}: mask_form must be one of {MASK_FORMS}, got {form!r}")
        return form


def load_function(spec: str):
    """``module:function`` (``module:obj.attr`` too) -> the callable."""
    if not isinstance(spec, str) or ":" not in spec:
        raise RefattnError(f"implementation {spec!r}: expected module:function")
    mod_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise RefattnError(f"implementation {spec!r}: cannot import {mod_name!r} ({e})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RefattnError(f"implementation {spec!r}: {mod_name!r} has no {attr!r}") from None
    if not callable(obj):
        raise RefattnError(f"implementation {spec!r} is not callable")
    return obj


def load_impl(forward_spec: str, backward_spec: str | None = None) -> Impl:
    fwd = load_function(forward_spec)
    bwd = load_function(backward_spec) if backward_spec else getattr(fwd, "backward", None)
    return Impl(fwd, bwd, forward_spec)


def accepts(fn, names: set[str]) -> set[str]:
    """The names among ``names`` that ``fn`` takes as keyword arguments."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return set(names)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return set(names)
    return {n for n in names if n in params}


def outputs(result, names: tuple[str, ...]) -> dict:
    if isinstance(result, dict):
        return {n: result.get(n) for n in names}
    if isinstance(result, (tuple, list)):
        return {n: (result[i] if i < len(result) else None) for i, n in enumerate(names)}
    return {names[0]: result, **{n: None for n in names[1:]}}


#: refattn's own folder: frames in it are the harness (or a refattn adapter), not the kernel.
_REFATTN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _source_file(fn) -> str | None:
    """The file that defines ``fn`` (a function, a wrapped one, or a callable object)."""
    for candidate in (fn, type(fn)):
        try:
            return os.path.abspath(inspect.getfile(inspect.unwrap(candidate)))
        except (TypeError, OSError, ValueError):
            continue
    return None


def _shown_path(path: str) -> str:
    """A path relative to the current folder when it lies under it, else as it is."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return path
    return path if rel.startswith(os.pardir) else rel


def failure(exc: BaseException, fn, what: str) -> tuple[str, str]:
    """An implementation's exception as ``(message, traceback)``: the message names its
    type, its whole text on one line, and where in the implementation it was raised,
    ``file:line`` (the innermost frame in the file that defines ``fn``; else the innermost
    outside refattn's verifier); the traceback is the whole of it, for ``--json``."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = _source_file(fn)
    verifier = os.path.dirname(os.path.abspath(__file__))
    here = [f for f in frames if own is not None and os.path.abspath(f.filename) == own]
    outside = [f for f in frames if not os.path.abspath(f.filename).startswith(verifier + os.sep)]
    frame = (here or outside or frames or [None])[-1]
    text = " ".join(str(exc).split())
    message = f"{what} raised {type(exc).__name__}" + (f": {text}" if text else "")
    if frame is not None:
        message += f" (at {_shown_path(frame.filename)}:{frame.lineno} in {frame.name})"
    return message, "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
