"""The benchmark harness runs end to end and its bookkeeping is consistent (no timing is
asserted: benchmarks are run by hand)."""

import json

import numpy as np
import pytest

from refattn import bench, patterns
from refattn.bench import cpu
from refattn.cli import main as cli_main

TINY = ["--cases", "window", "--sizes", "256", "--heads", "1", "--dtypes", "float64",
        "--repeat", "1", "--peers", "numpy,sparse", "--backend", "tiled", "--roofline-size", "128"]


def test_useful_flops_on_a_small_mask():
    m = patterns.get("causal").mask(4, 4)  # 10 allowed entries
    assert m.nnz == 10
    assert bench.useful_flops(m.nnz, 1, 8) == 4 * 10 * 8
    assert bench.useful_flops(m.nnz, 3, 8, mode="fwdbwd") == 12 * 10 * 8 * 3
    # Dv != D: 2 nnz (D + Dv) forward, 4 nnz (D + Dv) backward
    assert bench.useful_flops(m.nnz, 1, 8, 4) == 2 * 10 * 12
    assert bench.useful_flops(m.nnz, 1, 8, 4, "fwdbwd") == 6 * 10 * 12
    with pytest.raises(ValueError):
        bench.useful_flops(10, 1, 8, mode="bwd")


def test_end_to_end_tiny(tmp_path, capsys):
    path = tmp_path / "out.json"
    assert cpu.main(TINY + ["--modes", "fwd,fwdbwd", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "roofline" in out and "12*nnz*D" in out and "numpy ms" in out
    doc = json.loads(path.read_text())
    assert doc["convention"] == bench.FLOP_CONVENTION
    assert set(doc["roofline_gflops"]) == {"float32", "float64"}
    rows = doc["rows"]
    assert [(r["case"], r["n"], r["heads"], r["dtype"], r["mode"]) for r in rows] == [
        ("window", 256, 1, "float64", "fwd"), ("window", 256, 1, "float64", "fwdbwd")]
    nnz = patterns.get("sliding_window", left=256, right=256).mask(256, 256).nnz
    for r in rows:
        assert {"case", "pattern", "n", "heads", "dtype", "mode", "nnz", "flops", "refattn",
                "peers"} <= set(r)
        assert r["nnz"] == nnz == 256 * 256  # the window covers every pair at n = 256
        assert r["flops"] == bench.useful_flops(nnz, 1, 64, mode=r["mode"])
        ref = r["refattn"]
        assert ref["status"] == "ok" and len(ref["times_ms"]) == 1
        assert ref["gflops"] == pytest.approx(r["flops"] / (ref["ms"] * 1e-3) / 1e9)
        assert set(r["peers"]) == {"numpy", "sparse"}
        for res in r["peers"].values():
            assert res["status"] == "ok" and res["agrees"], res
            assert res["max_rel_err"] < 1e-9
            assert res["ratio"] == pytest.approx(res["ms"] / ref["ms"])


def test_markdown_table(capsys):
    assert cpu.main(TINY + ["--modes", "fwd", "--peers", "numpy", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| case | n | H | dtype | mode | nnz | refattn ms | GFLOP/s | numpy ms | numpy x |" in out
    assert "| window | 256 | 1 | float64 | fwd | 65536 |" in out


def test_numpy_peer_agrees_with_the_dense_oracle():
    import refattn

    rng = np.random.default_rng(1)
    q, k, v, dout = (rng.standard_normal((1, 2, 40, 8)) for _ in range(4))
    m = patterns.get("strided", stride=8).mask(40, 40)
    got = bench.numpy_attention(q, k, v, bench.BenchMask(m), dout, np.float64, "fwdbwd")
    r = refattn.forward(q, k, v, m)
    g = refattn.backward(q, k, v, r.out, r.lse, dout, m)
    err, ok = bench.compare(bench.Outputs(r.out, g.dq, g.dk, g.dv), got, np.float64)
    assert ok and err < 1e-12


@pytest.mark.parametrize("name", ["causal", "window", "strided"])
def test_flex_rules_match_the_patterns(name):
    case = cpu.CASES[name]
    for n in (300, 700):
        bm = case.mask(n)
        assert bench.rule_matches(bm.mask, case.rule)


def test_compare_flags_a_disagreement():
    a = bench.Outputs(np.ones((1, 1, 4, 2)))
    b = bench.Outputs(np.ones((1, 1, 4, 2)) * (1 + 1e-6))
    assert bench.compare(a, b, np.float32)[1]
    assert not bench.compare(a, b, np.float64)[1]


def test_cli_help(capsys):
    for argv in (["bench", "--help"], ["bench", "cpu", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli_main(argv)
        assert e.value.code == 0
    assert "usage: refattn bench cpu" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--peers", "numpy,bogus"], "argument --peers"),
    (["--cases", "nope"], "argument --cases"),
    (["--backend", "nope"], "unknown refattn backend 'nope'"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "cpu"] + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_torch_peer_without_torch_exits_2(capsys, monkeypatch):
    monkeypatch.setattr(bench, "torch_missing", lambda: "PyTorch is not installed")
    with pytest.raises(SystemExit) as e:
        cpu.main(["--peers", "flex"])
    assert e.value.code == 2
    assert "--peers flex: PyTorch is not installed" in capsys.readouterr().err


@pytest.mark.oracle
def test_sdpa_and_flex_peers_tiny():
    pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    q, k, v, dout = (rng.standard_normal((1, 2, 64, 64), dtype=np.float32) for _ in range(4))
    bm = cpu.CASES["causal"].mask(64)
    ref = bench.numpy_attention(q, k, v, bm, dout, np.float32, "fwdbwd")
    got = bench.sdpa_attention(q, k, v, bm, dout, np.float32, "fwdbwd")
    assert bench.compare(ref, got, np.float32)[1]
    assert bench.PEERS["flex"].skip(bm, 2, np.dtype(np.float32), "fwdbwd") is not None
    assert bench.PEERS["sdpa"].skip(cpu.CASES["window"].mask(64), 2, np.float32, "fwd") is not None
