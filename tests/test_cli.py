"""The `refattn` command line: `--version`, `run`, exit codes and error messages."""

import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import refattn
from refattn import patterns
from refattn.cli import checksum, main


def run_cli(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"refattn {refattn.__version__}"


@pytest.mark.parametrize("launcher", ["console-script", "python -m"])
def test_entry_points(launcher):
    if launcher == "console-script":
        exe = shutil.which("refattn")
        assert exe is not None, "the `refattn` console script is not on PATH: is the package installed?"
        cmd = [exe]
    else:
        cmd = [sys.executable, "-m", "refattn"]
    proc = subprocess.run(cmd + ["--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"refattn {refattn.__version__}"


def test_run_text_output(capsys):
    rc, out, _ = run_cli(capsys, "run", "--heads", "4", "--kv-heads", "2", "--lq", "16", "--lk", "24",
                         "--dim", "8", "--pattern", "causal", "--backward")
    assert rc == 0
    assert "q (1, 4, 16, 8)  k (1, 2, 24, 8)  v (1, 2, 24, 8)" in out
    nnz = patterns.Causal().mask(16, 24).nnz
    assert f"mask nnz={nnz}" in out
    for name in ("forward", "backward", "out ", "lse ", "dq ", "dk ", "dv "):
        assert name in out


def test_run_json_matches_the_library(capsys):
    rc, out, _ = run_cli(capsys, "run", "--lq", "8", "--lk", "12", "--dim", "4", "--heads", "2",
                         "--pattern", "causal", "--align", "top_left", "--dtype", "float64",
                         "--seed", "3", "--backward", "--json")
    assert rc == 0
    rep = json.loads(out)
    assert rep["pattern"] == {"name": "causal", "align": "top_left"}
    rng = np.random.default_rng(3)  # the draw documented in `refattn run --help`
    q = rng.standard_normal((1, 2, 8, 4))
    k = rng.standard_normal((1, 2, 12, 4))
    v = rng.standard_normal((1, 2, 12, 4))
    dout = rng.standard_normal((1, 2, 8, 4))
    m = patterns.Causal(align="top_left").mask(8, 12)
    r = refattn.forward(q, k, v, m)
    g = refattn.backward(q, k, v, r.out, r.lse, dout, m)
    assert rep["nnz"] == m.nnz
    assert rep["out"] == checksum(r.out) and rep["lse"] == checksum(r.lse)
    assert rep["dq"] == checksum(g.dq) and rep["dv"] == checksum(g.dv)


def test_run_is_reproducible(capsys):
    args = ("run", "--lq", "8", "--dim", "4", "--json", "--dtype", "bfloat16")
    a = json.loads(run_cli(capsys, *args)[1])
    b = json.loads(run_cli(capsys, *args)[1])
    assert a["out"] == b["out"] and a["lse"] == b["lse"]


def test_checksum_counts_empty_rows():
    c = checksum(np.array([1.0, -np.inf, 2.0]))
    assert c["sum"] == 3.0 and c["neg_inf"] == 1 and len(c["sha256"]) == 16


def test_refattn_error_exits_1_with_message(capsys):
    rc, out, err = run_cli(capsys, "run", "--heads", "3", "--kv-heads", "2", "--lq", "4")
    assert rc == 1 and out == ""
    assert err.strip() == "refattn run: error: heads: q has H = 3 heads, k/v have Hkv = 2; H % Hkv must be 0"


def test_unknown_backend_exits_1(capsys):
    rc, _, err = run_cli(capsys, "run", "--lq", "4", "--backend", "nope")
    assert rc == 1 and "unknown backend 'nope'" in err


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: COMMAND"),
    (["run", "--lq", "0"], "argument --lq: expected an integer >= 1, got '0'"),
    (["run", "--seed", "-1"], "argument --seed: expected an integer >= 0, got '-1'"),
    (["run", "--pattern", "nope"], "argument --pattern: invalid choice"),
    (["run", "--dtype", "int8"], "argument --dtype: invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_every_subcommand_has_help(capsys):
    from refattn.cli import COMMANDS
    for name, _, _ in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: refattn " + name in capsys.readouterr().out


def test_align_without_causal_is_an_error(capsys):
    rc, _, err = run_cli(capsys, "run", "--lq", "4", "--align", "top_left")
    assert rc == 1 and "--align applies only to --pattern causal" in err


def test_patterns_lists_every_pattern(capsys):
    rc, out, _ = run_cli(capsys, "patterns")
    assert rc == 0
    listed = [line.split()[0] for line in out.splitlines()]
    assert listed == patterns.names()
    assert "sliding_window           (left, right, align)" in out
    # the first sentence ends at a sentence's end, not at the ellipsis of a range
    assert ("per_row keys per query row, drawn without replacement from 0 .. n_i - 1 (n_i = Lk, or "
            "min(i' + 1, Lk) when causal) by refattn's seeded draw; a row with fewer candidates takes them all\n") in out


@pytest.mark.parametrize("doc, first", [
    ("One. Two.", "One"),
    ("Keys ``0 .. n - 1``. Then more.", "Keys 0 .. n - 1"),
    ("As in e.g. the paper. More.", "As in e.g. the paper"),
    ("No period", "No period"),
    ("Ends here.\n\nSecond paragraph.", "Ends here"),
])
def test_first_sentence(doc, first):
    from refattn.cli.show import first_sentence

    assert first_sentence(doc) == first


def test_show_draws_the_mask_and_its_stats(capsys):
    rc, out, _ = run_cli(capsys, "show", "sliding_window", "--lq", "6", "--lk", "8",
                         "--param", "left=1", "--param", "right=0", "--param", "align=top_left")
    assert rc == 0
    lines = out.splitlines()
    from refattn.study.draw import draw
    m = patterns.SlidingWindow(1, 0, "top_left").mask(6, 8)
    assert lines[1:7] == draw(m).splitlines()
    assert f"nnz={m.nnz}" in lines[7] and "empty rows=0" in lines[7]


def test_show_json_parameters_and_blocks(capsys):
    rc, out, _ = run_cli(capsys, "show", "global_tokens", "--lq", "100", "--param", "indices=[0, 50]",
                         "--max-size", "10")
    assert rc == 0 and out.splitlines()[1] == "+" * 10


@pytest.mark.parametrize("argv, rc, message", [
    (["show", "nope"], 1, "unknown pattern 'nope'"),
    (["show", "causal", "--param", "align=middle"], 1, "align must be one of"),
    (["show", "causal", "--param", "window=3"], 1, "unknown parameter(s) ['window']"),
])
def test_show_errors(capsys, argv, rc, message):
    got, _, err = run_cli(capsys, *argv)
    assert got == rc and message in err


def test_show_param_needs_key_value(capsys):
    with pytest.raises(SystemExit) as e:
        main(["show", "causal", "--param", "x"])
    assert e.value.code == 2 and "expected key=value" in capsys.readouterr().err


def test_closed_pipe_is_not_an_error():
    exe = shutil.which("refattn") or "refattn"
    proc = subprocess.run(f"{exe} show dense --lq 2000 --max-size 2000 | head -2 | tail -1", shell=True,
                          capture_output=True, text=True)
    assert proc.stdout.strip() == "#" * 2000
    assert proc.stderr == ""                    # quietly: no error line either (a broken pipe is no error)


@pytest.mark.parametrize("name", patterns.names())
def test_show_works_for_every_pattern(capsys, name):
    from refattn.patterns.examples import example
    p = example(name, 16, 16)
    params = [f"{k}={json.dumps(v)}" for k, v in p.to_dict().items() if k != "name"]
    rc, out, err = run_cli(capsys, "show", name, "--lq", "16", *sum((["--param", x] for x in params), []))
    assert rc == 0, err
    from refattn.study.draw import draw
    from refattn.patterns.content import sample_inputs
    q, k = sample_inputs(16, 16)            # the CLI's inputs for content-dependent patterns
    assert out.splitlines()[1:17] == draw(p.mask(16, 16, q=q, k=k)).splitlines()
    assert ("q, k ~ N(0, 1) D=16 seed=0" in out.splitlines()[0]) == p.content_dependent


def test_show_content_dependent_pattern_draws_its_inputs_from_seed(capsys):
    from refattn.study.draw import draw
    from refattn.patterns.content import sample_inputs
    p = patterns.TopK(2, base=patterns.Causal())
    args = ["show", "topk", "--lq", "12", "--lk", "20", "--param", "k=2", "--param", 'base={"name": "causal"}']
    pics = []
    for seed, dim in ((0, 16), (5, 16), (5, 3)):
        rc, out, err = run_cli(capsys, *args, "--seed", str(seed), "--dim", str(dim), "--heads", "2", "--head", "1")
        assert rc == 0, err
        q, k = sample_inputs(12, 20, heads=2, dim=dim, seed=seed)
        assert out.splitlines()[1:13] == draw(p.mask(12, 20, q=q, k=k), h=1).splitlines()
        assert f"head=1 of 2  q, k ~ N(0, 1) D={dim} seed={seed}" in out.splitlines()[0]
        pics.append(out.splitlines()[1:13])
    assert pics[0] != pics[1] != pics[2]


def test_paths_content_dependent_pattern(capsys):
    from refattn.study import analysis
    from refattn.patterns.content import sample_inputs
    rc, out, err = run_cli(capsys, "paths", "--pattern", "moba", "--param", "block=2", "--param", "top_k=2",
                           "--n", "16", "--from", "0", "--to", "15", "--seed", "4")
    assert rc == 0, err
    q, k = sample_inputs(16, 16, seed=4)
    chain = analysis.path(patterns.Moba(2, 2).mask(16, 16, q=q, k=k), 0, 15)
    assert f"fewest layers from key 0 to query 15: {len(chain) - 1}" in out


def test_missing_pattern_parameters_are_a_clean_error(capsys):
    rc, _, err = run_cli(capsys, "show", "sliding_window")
    assert rc == 1 and "missing parameter(s) ['left', 'right']" in err and "Traceback" not in err


def test_show_heads_and_png(capsys, tmp_path):
    from refattn.study.draw import draw
    path = tmp_path / "m.png"
    rc, out, _ = run_cli(capsys, "show", "random", "--lq", "12", "--param", "per_row=2", "--heads", "3",
                         "--head", "2", "--png", str(path))
    assert rc == 0
    m = patterns.Random(2).mask(12, 12, heads=3)
    assert "head=2 of 3" in out.splitlines()[0]
    assert out.splitlines()[1:13] == draw(m, h=2).splitlines()
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (504, 504)          # 12 cells x 42 pixels
    assert f"wrote {path} (504 x 504 pixels)" in out
    rc, _, err = run_cli(capsys, "show", "random", "--param", "per_row=2", "--head", "1")
    assert rc == 1 and "--head 1 is out of range: this mask has 1 head(s)" in err
    rc, _, err = run_cli(capsys, "show", "causal", "--png", str(tmp_path / "no" / "x.png"))
    assert rc == 1 and "cannot write" in err


@pytest.mark.parametrize("backend", ["sparse", "tiled"])
def test_run_other_backends_and_compute_dtype(capsys, backend):
    argv = ["run", "--lq", "40", "--heads", "2", "--pattern", "causal", "--backward", "--json"]
    _, out, _ = run_cli(capsys, *argv)
    ref = json.loads(out)
    rc, out, _ = run_cli(capsys, *argv, "--backend", backend)
    got = json.loads(out)
    assert rc == 0 and got["backend"] == backend and got["compute_dtype"] == "float64"
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert got[name]["sum"] == pytest.approx(ref[name]["sum"], rel=1e-12, abs=1e-12)
    rc, out, _ = run_cli(capsys, *argv, "--backend", backend, "--compute-dtype", "float32")
    got32 = json.loads(out)
    assert rc == 0 and got32["compute_dtype"] == "float32"
    assert got32["out"]["sum"] == pytest.approx(ref["out"]["sum"], rel=1e-4)
    rc, _, err = run_cli(capsys, "run", "--lq", "4", "--compute-dtype", "float32")
    assert rc == 1 and "backend 'dense' computes in ['float64']" in err


# ---- hostile command lines: one line and exit 1 or 2, never a traceback ---------------------------

@pytest.mark.parametrize("argv, rc, message", [
    (["checkpoint", "--heads", "2", "--kv-heads", "3", "--layers", "1", "--seq", "8", "--dim", "8"], 1,
     "refattn checkpoint: error: --heads 2 must be a multiple of --kv-heads 3"),
    (["show", "causal", "--param", "x=" + "[" * 5000 + "]" * 5000], 2, "the value of 'x' is nested too deeply"),
    (["show", "document", "--param", "lengths=5"], 1, "document.lengths must be a sequence of ints, got 5"),
    (["show", "sliding_window", "--param", "left=1000000000000000000000000000000", "--param", "right=0"], 1,
     "sliding_window.left must be an int in [0, 2**40]"),
    (["verify", "refattn.adapters:dense", "--json", "/nonexistent-folder/v.json"], 1,
     "--json /nonexistent-folder/v.json: no such folder /nonexistent-folder"),
    (["checkpoint", "--layers", "1", "--seq", "8", "--dim", "8", "--heads", "2", "--json", "/"], 1,
     "--json /: is a folder, not a file"),
])
def test_hostile_arguments_are_one_line(capsys, argv, rc, message):
    if rc == 2:
        with pytest.raises(SystemExit) as e:
            main(argv)
        got = e.value.code
    else:
        got = main(argv)
    err = capsys.readouterr().err
    assert got == rc and message in err and "Traceback" not in err


def test_a_full_disk_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "refattn", "patterns"], stdout=open("/dev/full", "w"),
                          stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "refattn patterns: error: cannot write: No space left on device\n"


def test_nested_and_self_containing_pattern_dicts():
    d = {"name": "causal"}
    for _ in range(400):
        d = {"name": "union", "terms": [d]}
    with pytest.raises(refattn.RefattnError, match="nested more than 64 deep"):
        patterns.from_dict(d)
    loop = {"name": "union", "terms": []}
    loop["terms"].append(loop)
    with pytest.raises(refattn.RefattnError, match="nested more than 64 deep"):
        patterns.from_dict(loop)
    ok = {"name": "causal"}
    for _ in range(60):
        ok = {"name": "union", "terms": [ok, {"name": "causal"}]}
    assert patterns.from_dict(ok).mask(4, 4) == patterns.Causal().mask(4, 4)
