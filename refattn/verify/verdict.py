"""Verdicts: the tolerance rule of spec/tolerance.md applied to one tensor, and a case's result."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TensorVerdict:
    name: str
    error: float
    allowed: float
    ok: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.error / self.allowed if self.allowed > 0 else (0.0 if self.error == 0 else math.inf)


@dataclass
class CaseVerdict:
    case_id: str
    status: str                      # "pass", "fail", "unsupported", "error"
    message: str = ""
    tensors: list[TensorVerdict] = field(default_factory=list)
    traceback: str = ""              # an "error": the implementation's whole traceback

    @property
    def first_failure(self) -> TensorVerdict | None:
        return next((t for t in self.tensors if not t.ok), None)

    @property
    def worst(self) -> TensorVerdict | None:
        return max(self.tensors, key=lambda t: t.ratio, default=None)


#: The tensors an implementation must return: ``out`` always, the gradients of q, k, v when
#: it has a backward. ``lse`` and ``dbias`` may be left out (then they are not judged).
REQUIRED = ("out", "dq", "dk", "dv")


def compare(name: str, got, gold: np.ndarray, allowed: float, empty: np.ndarray | None) -> TensorVerdict:
    """The rule of spec/tolerance.md for one tensor."""
    if got is None:
        if name in REQUIRED:        # a kernel that computes nothing never passes
            return TensorVerdict(name, math.inf, allowed, False, "not provided: the implementation must return it")
        return TensorVerdict(name, 0.0, allowed, True, "not provided (not judged)")
    if got.shape != gold.shape:
        return TensorVerdict(name, math.inf, allowed, False, f"shape {got.shape}, expected {gold.shape}")
    fin = np.isfinite(gold)
    if not np.array_equal(np.isfinite(got), fin) or (got[~fin] != gold[~fin]).any():
        idx = np.argwhere((np.isfinite(got) != fin) | (~fin & (got != gold)))[0].tolist()
        return TensorVerdict(name, math.inf, allowed, False, f"{got[tuple(idx)]} at {idx}, expected "
                                                               f"{gold[tuple(idx)]}")
    if empty is not None and empty.any():               # rows with no key: exactly 0
        rows = got[empty]
        if (rows != 0).any():
            idx = np.argwhere(empty)[int(np.argwhere((rows != 0).any(axis=-1))[0, 0])].tolist()
            return TensorVerdict(name, math.inf, allowed, False, f"row {idx} has no allowed key: must be 0")
    err = float(np.max(np.abs(got[fin] - gold[fin]), initial=0.0))
    return TensorVerdict(name, err, allowed, err <= allowed)
