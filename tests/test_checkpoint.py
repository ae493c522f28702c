"""Checkpoint schedules on the transformer stack of refattn.model: gradients bitwise equal
to `none` with dropout on, ledger peaks equal to spec/checkpointing.md's formulas with the
block's saved bytes, and the `refattn checkpoint` command."""

import json

import numpy as np
import pytest

from refattn import patterns
from refattn.train import checkpoint, model
from refattn.cli import main

SPECS = ["none", "selective", "uniform:2", "uniform:3", "sqrt", "binomial:1", "binomial:2", "binomial:4"]


def _stack(n=6, L=16, backend="dense"):
    stack = model.Stack(n, 8, 2, 1, 16, pattern=patterns.get("sliding_window", left=3, right=0), backend=backend,
                        dropout=0.2, seed=3)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, L, 8))
    target = rng.standard_normal(x.shape)
    return stack, x, model.Context(seed=5, call=2), lambda y: target


def test_every_schedule_gives_the_gradients_of_none_bit_for_bit():
    stack, x, ctx, dloss = _stack()
    _, ref = checkpoint.measure(stack, x, ctx, "none", dloss)
    assert any(np.abs(g).max() > 0 for g in ref)
    for spec in SPECS[1:]:
        row, grads = checkpoint.measure(stack, x, ctx, spec, dloss)
        assert all(a.tobytes() == b.tobytes() for a, b in zip(grads, ref)), spec


def test_dropout_masks_differ_between_calls():
    """The test above would hold trivially if dropout did nothing: another call's masks
    change the gradients."""
    stack, x, ctx, dloss = _stack()
    _, a = checkpoint.measure(stack, x, ctx, "none", dloss)
    _, b = checkpoint.measure(stack, x, model.Context(seed=5, call=3), "none", dloss)
    assert any(u.tobytes() != v.tobytes() for u, v in zip(a, b))


def test_ledger_peaks_follow_the_formulas_on_the_model():
    n = 6
    stack, x, ctx, dloss = _stack(n)
    _, saved = stack.blocks[0].forward(x, ctx, save="all")
    _, saved_sel = stack.blocks[0].forward(x, ctx, save="selective")
    S, S_sel, X = model.saved_bytes(saved), model.saved_bytes(saved_sel), x.nbytes
    assert S_sel < S
    rows = {spec: checkpoint.measure(stack, x, ctx, spec, dloss)[0] for spec in SPECS}
    assert rows["none"].ledger_peak_bytes == n * S
    assert rows["selective"].ledger_peak_bytes == n * S_sel
    assert rows["uniform:2"].ledger_peak_bytes == 2 * X + 2 * S          # m = 3 segments
    assert rows["uniform:3"].ledger_peak_bytes == 1 * X + 3 * S          # m = 2
    for s in (1, 2, 4):
        held = checkpoint.validate(checkpoint.schedule_binomial(n, s), n)["max_snapshots"]
        assert rows[f"binomial:{s}"].ledger_peak_bytes == held * X + S
        assert rows[f"binomial:{s}"].extra_forwards == checkpoint.revolve_cost(n, s)
    assert rows["none"].forward_calls == n and rows["uniform:2"].forward_calls == n + 4


def test_recompute_has_no_side_effect():
    """Parameters are untouched by any number of forwards; only backward adds to grads."""
    stack, x, ctx, dloss = _stack(3)
    before = [p.copy() for _, p in stack.params()]
    checkpoint.measure(stack, x, ctx, "binomial:1", dloss)              # 3 extra forwards
    assert all(a.tobytes() == b.tobytes() for a, (_, b) in zip(before, stack.params()))


def test_cpu_backend_schedules_agree():
    stack, x, ctx, dloss = _stack(4, backend="cpu")
    _, ref = checkpoint.measure(stack, x, ctx, "none", dloss)
    _, got = checkpoint.measure(stack, x, ctx, "binomial:2", dloss)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, ref))


def test_refattn_checkpoint_command(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("REFATTN_QUIET", "1")        # a cold cache's compile notices are not its rows
    path = tmp_path / "rows.json"
    rc = main(["checkpoint", "--layers", "4", "--seq", "32", "--dim", "16", "--heads", "2", "--backend", "dense",
               "--schedule", "all", "--json", str(path)])
    out, err = capsys.readouterr()
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("refattn checkpoint: 4 layers, n = 32")     # the header comes first
    assert lines[1].split()[:3] == ["schedule", "ledger", "peak"]
    assert [line.split()[0] for line in lines[2:]] == ["none", "selective", "uniform:1", "sqrt", "binomial:4"]
    assert err == ""                                 # each time printed once, in its row (was also on stderr)
    rows = json.loads(path.read_text())["rows"]
    assert [r["schedule"] for r in rows] == ["none", "selective", "uniform:1", "sqrt", "binomial:4"]
    assert all(r["grads_equal_none"] for r in rows)
    assert rows[0]["extra_forwards"] == 0 and rows[3]["extra_forwards"] == 2    # sqrt: k = 2, last segment 2
    assert rows[0]["ledger_peak_bytes"] > rows[3]["ledger_peak_bytes"]


@pytest.mark.parametrize("argv, message", [
    (["--schedule", "revolve"], "expected none, uniform:K"),
    (["--dropout", "1.5"], "--dropout must be in [0, 1)"),
    (["--dim", "10", "--heads", "4"], "must be a multiple of --heads"),
])
def test_refattn_checkpoint_errors(capsys, argv, message):
    rc = main(["checkpoint", "--layers", "2", "--seq", "8", "--dim", "8", "--heads", "2", *argv])
    assert rc == 1 and message in capsys.readouterr().err
