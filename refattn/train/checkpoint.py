"""Recompute-based checkpointing over a stack of layers: schedules, their execution, a ledger.

A stack of ``n`` layers is a chain ``x_{i+1} = F_i(x_i)``. Its backward needs, for each
layer, what the layer's forward saves ("taping" the layer); a schedule decides which
layer inputs to keep (snapshots) and which forwards to run again instead of keeping
their saved activations (spec/checkpointing.md). A schedule is a list of `Action`s over
six verbs:

* ``advance i``: run ``F_i`` on the current state without keeping what it saves;
* ``snapshot i``: keep the current state ``x_i``;
* ``restore i``: make the kept ``x_i`` the current state;
* ``tape i``: run ``F_i`` keeping what it saves (its output becomes the current state);
* ``backward i``: run the layer's backward with what ``tape i`` kept, then drop it;
* ``free i``: drop the kept ``x_i``.

`run` executes a schedule on layers with ``forward(x, ctx, save=...) -> (y, saved)`` and
``backward(dy, saved, ctx) -> dx`` and records in a `Ledger` the bytes of saved
activations alive after each action and the forward calls per layer. The arithmetic of
every schedule is the same ops in the same order on the same values, so gradients are
bitwise identical to ``none``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from ..errors import RefattnError
from .model import saved_bytes

VERBS = ("advance", "snapshot", "restore", "tape", "backward", "free")


@dataclass(frozen=True)
class Action:
    verb: str
    layer: int

    def __str__(self) -> str:
        return f"{self.verb} {self.layer}"


# ---- Revolve -------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def _revolve(n: int, s: int) -> tuple[int, int]:
    """``(p(n, s), i)``: the fewest forward steps that reversing ``n`` steps with ``s``
    snapshots (the one of the first state included) needs beyond taping each step once,
    and the first split ``i`` that attains it (0 where no split is made)."""
    if n == 1:
        return 0, 0
    if s == 1:
        return n * (n - 1) // 2, 0
    best, arg = None, 0
    for i in range(1, n):
        cost = i + _revolve(i, s)[0] + _revolve(n - i, s - 1)[0]
        if best is None or cost < best:
            best, arg = cost, i
    return best, arg


def revolve_cost(n: int, s: int) -> int:
    """Griewank and Walther's ``p(n, s)``: ``p(1, s) = 0``, ``p(n, 1) = n (n - 1) / 2``,
    ``p(n, s) = min_{1 <= i < n} [i + p(i, s) + p(n - i, s - 1)]``."""
    _check_int(n, "n", 1)
    _check_int(s, "s", 1)
    import sys
    if n > 2000:
        raise RefattnError(f"revolve: n = {n} > 2000 layers is beyond this implementation's O(n^2 s) table")
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 4 * n + 100))
    return _revolve(n, min(s, n))[0]


def _check_int(x, name: str, low: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < low:
        raise RefattnError(f"{name} must be an int >= {low}, got {x!r}")
    return x


# ---- schedules --------------------------------------------------------------------------------

def schedule_none(n: int) -> list[Action]:
    """Tape every layer in the forward sweep, then backward in reverse."""
    return [Action("tape", i) for i in range(n)] + [Action("backward", i) for i in reversed(range(n))]


def schedule_uniform(n: int, k: int) -> list[Action]:
    """Segments of ``k`` layers (the last may be shorter). As torch's
    ``checkpoint_sequential``: every segment but the last keeps only its input in the
    forward sweep and is run again, taped, just before its backward; the last segment is
    taped in the forward sweep."""
    _check_int(k, "k", 1)
    starts = list(range(0, n, k))
    acts = []
    for j, a in enumerate(starts):
        b = min(n, a + k)
        if j < len(starts) - 1:
            acts.append(Action("snapshot", a))
            acts += [Action("advance", i) for i in range(a, b)]
        else:
            acts += [Action("tape", i) for i in range(a, b)]
    for j in reversed(range(len(starts))):
        a, b = starts[j], min(n, starts[j] + k)
        if j < len(starts) - 1:
            acts.append(Action("restore", a))
            acts += [Action("tape", i) for i in range(a, b)]
        acts += [Action("backward", i) for i in reversed(range(a, b))]
        if j < len(starts) - 1:
            acts.append(Action("free", a))
    return acts


def sqrt_segment(n: int) -> int:
    """Chen et al. (2016)'s segment length: ``ceil(sqrt(n))``."""
    return max(1, math.ceil(math.sqrt(n)))


def schedule_binomial(n: int, s: int) -> list[Action]:
    """Revolve (Griewank and Walther 2000) with ``s`` snapshots, the first being the
    stack's input: the fewest forward steps, ``p(n, s)`` beyond taping each layer once."""
    _check_int(s, "s", 1)
    revolve_cost(n, s)                    # fills the table (and checks n)
    acts = [Action("snapshot", 0)]

    def reverse(start: int, m: int, snaps: int) -> None:
        # steps start .. start + m - 1; x_start is kept; `snaps` snapshots usable, it included
        if m == 1:
            acts.extend([Action("restore", start), Action("tape", start), Action("backward", start)])
            return
        if snaps == 1:
            for j in reversed(range(m)):
                acts.append(Action("restore", start))
                acts.extend(Action("advance", start + t) for t in range(j))
                acts.extend([Action("tape", start + j), Action("backward", start + j)])
            return
        _, i = _revolve(m, min(snaps, m))
        acts.append(Action("restore", start))
        acts.extend(Action("advance", start + t) for t in range(i))
        acts.append(Action("snapshot", start + i))
        reverse(start + i, m - i, snaps - 1)
        acts.append(Action("free", start + i))
        reverse(start, i, snaps)

    reverse(0, n, min(s, n))
    acts.append(Action("free", 0))
    return acts


def parse_schedule(text: str, n: int) -> tuple[str, list[Action]]:
    """``none``, ``uniform:K``, ``sqrt``, ``binomial:S`` (``selective`` is ``none`` with
    layers that recompute their attention core) -> ``(name, actions)``."""
    _check_int(n, "layers", 1)
    name, _, arg = text.partition(":")
    try:
        if name in ("none", "selective") and not arg:
            return text, schedule_none(n)
        if name == "sqrt" and not arg:
            return text, schedule_uniform(n, sqrt_segment(n))
        if name == "uniform" and arg:
            return text, schedule_uniform(n, int(arg))
        if name == "binomial" and arg:
            return text, schedule_binomial(n, int(arg))
    except ValueError:
        pass
    raise RefattnError(f"schedule {text!r}: expected none, uniform:K, sqrt, binomial:S or selective")


def validate(actions: list[Action], n: int) -> dict:
    """Check that ``actions`` reverse a chain of ``n`` layers correctly (each backward in
    reverse order, after a tape of that layer from the right state); return counts
    ``{"forward": per layer, "advance": total, "tape": total, "max_snapshots": ...}``."""
    state = 0                 # index of the current state x_state (None: unknown)
    kept, taped = set(), set()
    next_backward = n - 1
    forwards, advances, tapes, max_snaps = [0] * n, 0, 0, 0
    for a in actions:
        i = a.layer
        if a.verb in ("advance", "tape"):
            if state != i:
                raise RefattnError(f"{a}: the current state is x_{state}, not x_{i}")
            forwards[i] += 1
            state = i + 1
            if a.verb == "tape":
                taped.add(i)
                tapes += 1
            else:
                advances += 1
        elif a.verb == "snapshot":
            if state != i:
                raise RefattnError(f"{a}: the current state is x_{state}")
            kept.add(i)
            max_snaps = max(max_snaps, len(kept))
        elif a.verb == "restore":
            if i not in kept:
                raise RefattnError(f"{a}: x_{i} is not kept")
            state = i
        elif a.verb == "free":
            kept.discard(i)
        elif a.verb == "backward":
            if i != next_backward or i not in taped:
                raise RefattnError(f"{a}: expected backward {next_backward} after its tape")
            taped.discard(i)
            next_backward -= 1
        else:
            raise RefattnError(f"unknown verb {a.verb!r}")
    if next_backward != -1:
        raise RefattnError(f"the schedule stops before layer {next_backward}'s backward")
    return {"forward": forwards, "advance": advances, "tape": tapes, "max_snapshots": max_snaps}


# ---- running a schedule ----------------------------------------------------------------------

@dataclass
class Ledger:
    """Bytes of saved activations alive after each action (snapshots of layer inputs and
    what taped layers keep), their peak, and forward calls per layer."""

    alive: list[int] = field(default_factory=list)
    forward_calls: list[int] = field(default_factory=list)
    peak: int = 0
    current: int = 0

    def add(self, nbytes: int) -> None:
        self.current += nbytes
        self.peak = max(self.peak, self.current)

    def remove(self, nbytes: int) -> None:
        self.current -= nbytes

    def mark(self) -> None:
        self.alive.append(self.current)


def run(layers, actions: list[Action], x, ctx, dloss, *, save: str = "all", nbytes=None):
    """Execute ``actions`` on ``layers``: returns ``(dx, y, ledger)``, the gradient at the
    stack's input, the stack's output and the ledger.

    ``dloss(y) -> dy`` gives the gradient of the loss at the stack's output. ``save`` is
    passed to each layer's forward ("all", or "selective"). ``nbytes(obj)`` counts the
    bytes of a saved dict or an array (default `refattn.train.model.saved_bytes`)."""
    n = len(layers)
    validate(actions, n)
    size = nbytes or saved_bytes
    ledger = Ledger(forward_calls=[0] * n)
    kept, taped = {}, {}
    state, y, dy = x, None, None
    for a in actions:
        i = a.layer
        if a.verb == "snapshot":
            kept[i] = state
            ledger.add(size(state))
        elif a.verb == "restore":
            state = kept[i]
        elif a.verb == "free":
            ledger.remove(size(kept.pop(i)))
        elif a.verb == "advance":
            state, _ = layers[i].forward(state, ctx, save=save)
            ledger.forward_calls[i] += 1
        elif a.verb == "tape":
            out, saved = layers[i].forward(state, ctx, save=save)
            ledger.forward_calls[i] += 1
            taped[i] = saved
            ledger.add(size(saved))
            state = out
            if i == n - 1:
                y = out
        elif a.verb == "backward":
            if i == n - 1:
                dy = dloss(y)
            saved = taped.pop(i)
            dy = layers[i].backward(dy, saved, ctx)
            ledger.remove(size(saved))
        ledger.mark()
    return dy, y, ledger


# ---- comparing schedules on a model (refattn checkpoint) ----------------------------------------




def expand_schedules(text: str, n: int) -> list[str]:
    """``all`` or a comma-separated list of schedule specs, each checked."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if specs == ["all"]:
        specs = ["none", "selective", f"uniform:{max(1, n // 4)}", "sqrt", f"binomial:{min(4, n)}"]
    for s in specs:
        parse_schedule(s, n)
    if not specs:
        raise RefattnError("--schedule: no schedule given")
    return specs


@dataclass
class ScheduleRow:
    schedule: str
    ledger_peak_bytes: int
    traced_peak_bytes: int
    forward_calls: int
    extra_forwards: int
    seconds: float
    grads_equal_none: bool | None
    digest: str = field(repr=False, default="")


def measure(stack, x, ctx, spec: str, dloss) -> tuple[ScheduleRow, list]:
    """Forward and backward of ``stack`` under schedule ``spec``: the row of the table and
    the gradients (parameters, then the input's)."""
    import hashlib
    import time
    import tracemalloc

    n = len(stack.blocks)
    name, actions = parse_schedule(spec, n)
    save = "selective" if name == "selective" else "all"
    stack.zero_grad()
    tracemalloc.start()
    tracemalloc.reset_peak()
    t0 = time.perf_counter()
    dx, _, ledger = run(stack.blocks, actions, x, ctx, dloss, save=save)
    seconds = time.perf_counter() - t0
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    grads = [g.copy() for _, g in stack.grads()] + [dx]
    h = hashlib.sha256()
    for g in grads:
        h.update(g.tobytes())
    calls = sum(ledger.forward_calls)                 # each layer is taped once; the rest are advances
    row = ScheduleRow(spec, ledger.peak, traced, calls, calls - n, seconds, None, h.hexdigest())
    return row, grads
