"""Checkpoint schedules on a toy chain: Revolve's cost, validity, bitwise-equal gradients,
and ledger peaks equal to the formulas of spec/checkpointing.md."""

import math

import numpy as np
import pytest

from refattn import RefattnError
from refattn.train.checkpoint import (Action, parse_schedule, revolve_cost, run, schedule_binomial, schedule_none,
                                schedule_uniform, sqrt_segment, validate)


def p_brute(n, s):
    """The recurrence written out, without the implementation's table."""
    if n == 1:
        return 0
    if s == 1:
        return n * (n - 1) // 2
    return min(i + p_brute(i, s) + p_brute(n - i, s - 1) for i in range(1, n))


@pytest.mark.parametrize("n, s, p", [(10, 3, 15), (30, 5, 62), (100, 10, 222), (1, 4, 0), (5, 1, 10)])
def test_revolve_cost_known_values(n, s, p):
    assert revolve_cost(n, s) == p


def test_revolve_cost_is_the_recurrence():
    for n in range(1, 13):
        for s in range(1, 6):
            assert revolve_cost(n, s) == p_brute(n, s)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 33])
def test_binomial_schedule_costs_p_and_holds_at_most_s_snapshots(n):
    for s in range(1, 7):
        counts = validate(schedule_binomial(n, s), n)
        assert counts["advance"] == revolve_cost(n, s)
        assert counts["tape"] == n and counts["max_snapshots"] <= s
        assert sum(counts["forward"]) == n + revolve_cost(n, s)


@pytest.mark.parametrize("n, k", [(1, 1), (7, 3), (8, 4), (32, 6), (5, 9)])
def test_uniform_schedule_recomputes_all_but_the_last_segment(n, k):
    counts = validate(schedule_uniform(n, k), n)
    last = n - ((n - 1) // k) * k
    assert counts["advance"] == n - last
    assert counts["forward"] == [2] * (n - last) + [1] * last


def test_sqrt_segment():
    assert [sqrt_segment(n) for n in (1, 4, 10, 32, 100)] == [1, 2, 4, 6, 10]


def test_invalid_schedules_are_refused():
    with pytest.raises(RefattnError, match="expected backward 1"):
        validate([Action("tape", 0), Action("tape", 1), Action("backward", 0)], 2)
    with pytest.raises(RefattnError, match="not x_1"):
        validate([Action("tape", 1)], 2)
    with pytest.raises(RefattnError, match="x_0 is not kept"):
        validate([Action("restore", 0)], 1)
    for bad in ("uniform", "uniform:x", "binomial:0", "sqrt:3", "revolve"):
        with pytest.raises(RefattnError):
            parse_schedule(bad, 8)


class ToyLayer:
    """y = tanh(x W + b), saving x and y (S = 2 X bytes); counts its forward calls."""

    def __init__(self, rng, d):
        self.W = rng.standard_normal((d, d)) / math.sqrt(d)
        self.b = rng.standard_normal(d)
        self.dW, self.db = np.zeros_like(self.W), np.zeros_like(self.b)
        self.calls = 0

    def forward(self, x, ctx, save="all"):
        self.calls += 1              # a test-only side effect, outside what forward computes
        y = np.tanh(x @ self.W + self.b)
        return y, {"x": x, "y": y}

    def backward(self, dy, saved, ctx):
        g = dy * (1 - saved["y"] ** 2)
        self.dW += saved["x"].T @ g
        self.db += g.sum(axis=0)
        return g @ self.W.T


def _chain(n, d=5, seed=0):
    rng = np.random.default_rng(seed)
    return [ToyLayer(rng, d) for _ in range(n)], rng.standard_normal((3, d))


def _grads(layers, actions, x):
    dx, y, ledger = run(layers, actions, x, None, lambda y: 2 * y)
    return [layer.dW.tobytes() + layer.db.tobytes() for layer in layers] + [dx.tobytes(), y.tobytes()], ledger


@pytest.mark.parametrize("spec", ["uniform:3", "sqrt", "binomial:1", "binomial:3", "binomial:20"])
def test_every_schedule_gives_the_same_bits(spec):
    n = 11
    ref, _ = _grads(*_chain(n)[:1], schedule_none(n), _chain(n)[1])
    layers, x = _chain(n)
    got, ledger = _grads(layers, parse_schedule(spec, n)[1], x)
    assert got == ref
    assert ledger.forward_calls == [layer.calls for layer in layers]


@pytest.mark.parametrize("n", [1, 6, 11, 32])
def test_ledger_peaks_are_the_formulas(n):
    """With X bytes per layer input and S per taped layer: none n S; uniform(k) with m
    segments (m - 1) X + k S (n S when m = 1); binomial(s) s' X + S, s' = snapshots held."""
    layers, x = _chain(n)
    X = x.nbytes
    S = 2 * X
    _, _, ledger = run(layers, schedule_none(n), x, None, lambda y: y)
    assert ledger.peak == n * S
    for k in (1, 3, 4, sqrt_segment(n)):
        layers, x = _chain(n)
        m = -(-n // k)
        _, _, ledger = run(layers, schedule_uniform(n, k), x, None, lambda y: y)
        assert ledger.peak == ((m - 1) * X + k * S if m > 1 else n * S), k
        assert ledger.current == 0
    for s in (1, 2, 4):
        layers, x = _chain(n)
        acts = schedule_binomial(n, s)
        _, _, ledger = run(layers, acts, x, None, lambda y: y)
        assert ledger.peak == validate(acts, n)["max_snapshots"] * X + S
        assert ledger.current == 0
