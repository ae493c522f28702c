"""A case run in a child process, so that an implementation that crashes (a segfault, an
abort, ``os._exit``) or hangs costs that case, not the run (spec/verify.md, "Isolation").

The child is started fresh (``spawn``: no state, threads or locks shared with this
process), puts this process's import path first, loads the implementation by its name
(``module:function``), runs `runner.verify_case` and sends the verdict back through a pipe.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import time
from pathlib import Path

from ..golden import entry_id
from .impl import load_impl
from .runner import verify_case
from .verdict import CaseVerdict

#: How long a child is given to exit after it has sent its verdict, or after a kill.
_GRACE = 5.0


def _child(conn, forward_spec: str, backward_spec: str | None, golden_dir: str, entry, dtype: str,
           layout: str, framework: str, path: list[str]) -> None:  # pragma: no cover - runs in the child
    sys.path[:0] = [p for p in path if p not in sys.path]
    try:
        verdict = verify_case(load_impl(forward_spec, backward_spec), golden_dir, entry, dtype, layout, framework)
    except BaseException as e:  # noqa: B036  a failure of the harness itself, told to the parent
        verdict = CaseVerdict(entry_id(entry), "error", f"the child process failed: {type(e).__name__}: {e}")
    conn.send(verdict)
    conn.close()


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return f"signal {code}"


def verify_case_isolated(forward_spec: str, backward_spec: str | None, golden_dir, entry, dtype: str = "float32",
                         layout: str = "bhsd", framework: str = "numpy",
                         timeout: float | None = None) -> CaseVerdict:
    """`runner.verify_case` in a child process. A child that dies before it answers (a
    signal, an exit) or runs past ``timeout`` seconds (then it is killed) is the case's
    ERROR, saying which."""
    cid = entry_id(entry)
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, forward_spec, backward_spec, str(Path(golden_dir)), entry, dtype,
                                             layout, framework, list(sys.path)), daemon=True)
    start = time.perf_counter()
    child.start()
    send.close()
    try:
        answered = receive.poll(timeout)
        verdict = receive.recv() if answered else None
    except (EOFError, OSError):             # the child died before it answered
        verdict, answered = None, True
    except BaseException:                   # Ctrl-C here: take the child down too
        child.kill()
        child.join(_GRACE)
        raise
    finally:
        receive.close()
    if verdict is not None:
        child.join(_GRACE)
        if child.is_alive():
            child.kill()
            child.join(_GRACE)
        return verdict
    if not answered:
        child.kill()
        child.join(_GRACE)
        return CaseVerdict(cid, "error", f"timed out: no verdict after {timeout:g} s (the child process was killed)")
    child.join(_GRACE)
    code = child.exitcode
    seconds = time.perf_counter() - start
    if code is not None and code < 0:
        return CaseVerdict(cid, "error", f"the implementation crashed the process: {_signal_name(-code)} "
                                         f"after {seconds:.1f} s")
    return CaseVerdict(cid, "error", f"the implementation ended the process with exit status {code} "
                                     f"after {seconds:.1f} s, before a verdict")
