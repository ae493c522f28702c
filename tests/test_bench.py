"""The benchmark harness runs end to end and its bookkeeping is consistent (no timing is
asserted: benchmarks are run by hand)."""

import json

import numpy as np
import pytest

from refattn import backends, bench, patterns
from refattn.bench import cpu
from refattn.bench import cuda as gpu
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


# ---- the GPU harness (refattn bench cuda) -----------------------------------------------------
# No GPU here: the tests cover its pure parts (arguments, the float32 peak, the table), the
# exit without a real GPU, and the timed refattn route on tiny shapes under Numba's CUDA
# simulator with Numba device arrays standing in for torch's.

def cuda_backend_simulated() -> bool:
    """Whether the cuda backend runs on Numba's CUDA simulator here."""
    from refattn.backends import cuda as cuda_backend

    return cuda_backend.simulated()


def test_cuda_fp32_peak_from_device_attributes():
    h100 = gpu.fp32_peak(132, 1_980_000, (9, 0))  # H100 SXM: 132 SMs at 1980 MHz
    assert h100["tflops"] == pytest.approx(132 * 128 * 2 * 1.98e9 / 1e12)  # 66.9, NVIDIA's figure
    line = gpu.peak_line(h100)
    assert "132 SMs x 128 FP32 lanes/SM (FP32_LANES_PER_SM[cc 9.0])" in line and "= 66.9 TFLOP/s" in line
    assert gpu.fp32_peak(108, 1_410_000, (8, 0))["tflops"] == pytest.approx(19.49, abs=0.01)  # A100: 64 lanes
    assert gpu.fp32_peak(128, 2_520_000, (8, 9))["tflops"] == pytest.approx(82.6, abs=0.1)  # RTX 4090
    unknown = gpu.fp32_peak(100, 2_000_000, (42, 0))
    assert unknown["tflops"] is None and "pass --peak-tflops" in gpu.peak_line(unknown)
    assert gpu.fp32_peak(None, None, (9, 0))["tflops"] is None  # the driver reported no SMs or clock
    given = gpu.fp32_peak(132, 1_980_000, (9, 0), override_tflops=60.0)
    assert given["tflops"] == 60.0 and "given by --peak-tflops" in gpu.peak_line(given)


def test_cuda_device_line():
    info = {"gpu": "NVIDIA H100 80GB HBM3", "cc": [9, 0], "sms": 132, "clock_khz": 1_980_000,
            "memory_gib": 79.1, "memory_free_gib": 78.5, "memory_gb_s": 3352, "driver": "12.8",
            "runtime": "12.8", "torch": "2.13.0+cu128", "torch_cuda": "12.8", "float32_matmul_precision": "highest",
            "numba": "0.68.1", "numba_cuda": "0.30.4", "refattn": "0.1.0", "numpy": "2.4.6", "python": "3.11.7",
            "cpu": "AMD EPYC"}
    line = gpu.device_line(info)
    assert line.startswith("device: NVIDIA H100 80GB HBM3 (compute capability 9.0), 132 SMs at 1980 MHz")
    for part in ("~3352 GB/s", "driver CUDA 12.8", "torch 2.13.0+cu128 (CUDA 12.8, float32 matmul precision highest)",
                 "numba-cuda 0.30.4"):
        assert part in line


def _gpu_row(case, n, mode, ms, peers, dtype="float32", fraction=0.05):
    flops = bench.useful_flops(1000, 8, 64, mode=mode)
    ref = ({"status": "ok", "ms": ms, "gflops": gflops_of(flops, ms), "peak_fraction": fraction, "first_ms": 900.0}
           if ms is not None else {"status": "skipped", "reason": "needs ~90.0 GiB of GPU memory"})
    return {"case": case, "n": n, "heads": 8, "dtype": dtype, "mode": mode, "nnz": 1000, "flops": flops,
            "refattn": ref, "peers": peers}


def gflops_of(flops, ms):
    return flops / (ms * 1e-3) / 1e9


def _ok(ms, ref_ms, agrees=True):
    return {"status": "ok", "ms": ms, "ratio": ms / ref_ms, "agrees": agrees, "first_ms": 5000.0}


def test_cuda_table_and_notes():
    skip = {"status": "skipped", "reason": "is_causal covers the dense causal case only"}
    rows = [
        _gpu_row("window", 4096, "fwd", 2.0, {"sdpa": skip, "flex": _ok(1.0, 2.0)}),
        _gpu_row("window", 4096, "fwdbwd", 10.0, {"sdpa": skip, "flex": _ok(2.0, 10.0)}),
        _gpu_row("causal", 4096, "fwd", 4.0, {"sdpa": _ok(1.0, 4.0), "flex": _ok(2.0, 4.0, agrees=False)}),
        _gpu_row("causal", 65536, "fwdbwd", None, {"sdpa": {"status": "skipped", "reason": "refattn did not run"},
                                                     "flex": {"status": "skipped", "reason": "refattn did not run"}}),
    ]
    md = gpu.table(rows, ["sdpa", "flex"], markdown=True)
    assert ("| case | n | H | dtype | mode | nnz | refattn ms | GFLOP/s | % peak | sdpa ms | sdpa x | flex ms "
            "| flex x |") in md
    assert "| window | 4096 | 8 | float32 | fwd | 1000 | 2.00 | 1.0 | 5.0 | - | - | 1.00 | 0.50 |" in md
    assert "| causal | 4096 | 8 | float32 | fwd | 1000 | 4.00 | 0.5 | 5.0 | 1.00 | 0.25 | 2.00! | 0.50 |" in md
    assert "| causal | 65536 | 8 | float32 | fwdbwd | 1000 | - | - | - | - | - | - | - |" in md
    text = gpu.table(rows, ["sdpa", "flex"])
    assert text.splitlines()[0].split() == ["case", "n", "H", "dtype", "mode", "nnz", "refattn", "ms", "GFLOP/s",
                                           "%", "peak", "sdpa", "ms", "sdpa", "x", "flex", "ms", "flex", "x"]
    notes = "\n".join(gpu.footnotes(rows, ["sdpa", "flex"], gpu.fp32_peak(132, 1_980_000, (9, 0))))
    assert "refattn -: needs ~90.0 GiB of GPU memory" in notes
    assert "sdpa -: is_causal covers the dense causal case only" in notes
    assert "refattn did not run" not in notes  # said once, by refattn's own reason
    assert "% peak = refattn GFLOP/s / 66.9 TFLOP/s" in notes
    assert "met in 1 of 2 rows; lowest x = 0.20 (n=4096 fwdbwd)" in notes
    assert "flex first calls 5.00-5.00 s (torch.compile" in notes
    unknown = "\n".join(gpu.footnotes(rows, ["flex"], gpu.fp32_peak(1, 1, (42, 0))))
    assert "% peak: not shown" in unknown
    assert gpu.target_note([r for r in rows if r["case"] == "causal"]) is None


def test_cuda_row_memory_estimate():
    bm = gpu.CASES["causal"].mask(256)
    mask_bytes = gpu.mask_device_bytes(bm, 64, 64)
    assert mask_bytes >= bm.mask.csr.indices.nbytes + 8 * 257
    fwd = gpu.row_bytes(1, 8, 256, 64, 4, "fwd", mask_bytes)
    assert fwd == 7 * 8 * 256 * 64 * 4 + mask_bytes
    assert gpu.row_bytes(1, 8, 256, 64, 4, "fwdbwd", mask_bytes) > fwd


def test_cuda_harness_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, refattn.bench.cuda; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_cuda_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "cuda", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: refattn bench cuda" in out and "--peak-tflops" in out and "4096,16384,65536" in out
    with pytest.raises(SystemExit):
        cli_main(["bench", "--help"])
    assert "cuda (the cuda backend against torch SDPA and FlexAttention on the GPU)" in \
        " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("argv, message", [
    (["--peers", "sdpa,bogus"], "argument --peers"),
    (["--cases", "dense"], "argument --cases"),
    (["--n", "0"], "argument --n"),
    (["--repeat", "0"], "argument --repeat"),
    (["--dtypes", "float16"], "argument --dtypes"),
])
def test_cuda_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        cli_main(["bench", "cuda"] + argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_parser_defaults():
    args = gpu.build_parser().parse_args([])
    assert args.cases == ["window", "causal"] and args.sizes == [4096, 16384, 65536]
    assert args.dtypes == ["float32"] and args.modes == ["fwd", "fwdbwd"] and args.peers == ["sdpa", "flex"]
    assert (args.batch, args.heads, args.dim) == (1, [8], 64)
    assert gpu.backend_options(args) is None
    args = gpu.build_parser().parse_args(["--peers", "none", "--block-q", "32", "--sizes", "16,32"])
    assert args.peers == [] and args.sizes == [16, 32] and gpu.backend_options(args) == {"block_q": 32}


@pytest.mark.skipif("cuda" not in backends.names() or not cuda_backend_simulated(),
                    reason="runs under Numba's CUDA simulator")
def test_cuda_bench_needs_a_real_gpu(capsys):
    assert gpu.main(["--n", "16"], prog="refattn bench cuda") == 2
    err = capsys.readouterr().err
    assert err.startswith("refattn bench cuda: error: needs a real GPU: numba.cuda is Numba's CUDA simulator")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert cli_main(["bench", "cuda"]) == 2
    assert "needs a real GPU" in capsys.readouterr().err


@pytest.mark.skipif("cuda" not in backends.names(), reason="cuda backend unavailable here")
def test_cuda_bench_needs_torch_with_cuda(capsys, monkeypatch):
    from refattn.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "simulated", lambda: False)  # as if on a real GPU
    monkeypatch.setattr(gpu, "torch_missing", lambda: "PyTorch is not installed")
    assert gpu.main([]) == 2
    assert "needs a CUDA build of PyTorch (inputs and peers run on the GPU with torch): PyTorch is not " \
        "installed" in capsys.readouterr().err
    monkeypatch.setattr(gpu, "torch_missing", lambda: None)
    torch = pytest.importorskip("torch")
    if torch.version.cuda is None:
        assert gpu.main([]) == 2
        assert f"torch {torch.__version__} is CPU-only" in capsys.readouterr().err


def _numba_ops(free=None):
    """`DeviceOps` with Numba device arrays (the simulator's, in the tests)."""
    from numba import cuda

    def make_inputs(shape, dtype):
        rng = np.random.default_rng(0)
        return [cuda.to_device(rng.standard_normal(shape).astype(dtype)) for _ in range(4)]

    return gpu.DeviceOps(make_inputs, cuda.synchronize, lambda: free)


@pytest.mark.skipif("cuda" not in backends.names(), reason="cuda backend unavailable here")
def test_cuda_rows_with_numba_device_arrays(monkeypatch):
    """The timed refattn route and the peers' bookkeeping, n = 16, H = 1, D = 8, with stand-in
    peers made of refattn itself (agrees), refattn times 1.01 (disagrees) and one that fails.
    Numba device arrays: the simulator's here, a real GPU's where there is one."""

    def same(q, k, v, dout, bm, mode):
        return gpu.refattn_call(q, k, v, dout, bm.mask, np.float32, mode)

    def off(q, k, v, dout, bm, mode):
        return tuple(gpu.to_host(x) * np.float32(1.01) for x in same(q, k, v, dout, bm, mode))

    def broken(q, k, v, dout, bm, mode):
        raise RuntimeError("boom")

    for name, run in (("same", same), ("off", off), ("broken", broken)):
        monkeypatch.setitem(gpu.PEERS, name, gpu.GpuPeer(name, run, lambda bm, mode: None, "a stand-in"))
    args = gpu.build_parser().parse_args(["--cases", "window", "--n", "16", "--heads", "1", "--dim", "8",
                                          "--repeat", "2", "--warmup", "1", "--peers", "none"])
    args.peers = ["same", "off", "broken", "sdpa"]
    ops = _numba_ops()
    first = gpu.first_call_times(ops, ["float32"], 8, n=16)
    assert set(first["float32"]) == {"forward_s", "backward_s"}
    runner = gpu.Runner(args, ops, peak_tflops=10.0)
    emitted = []
    runner.run_case(gpu.CASES["window"], 16, emitted.append)
    rows = runner.rows
    assert emitted == rows and [r["mode"] for r in rows] == ["fwd", "fwdbwd"]
    json.dumps(rows)
    for r in rows:
        assert r["nnz"] == 16 * 16 and r["flops"] == bench.useful_flops(256, 1, 8, mode=r["mode"])
        ref = r["refattn"]
        assert ref["status"] == "ok" and len(ref["times_ms"]) == 2 and ref["blocks"] == [64, 64]
        assert ref["gflops"] == pytest.approx(r["flops"] / (ref["ms"] * 1e-3) / 1e9)
        assert ref["peak_fraction"] == pytest.approx(ref["gflops"] / 1e4)
        peers = r["peers"]
        assert peers["same"]["agrees"] and peers["same"]["max_rel_err"] == 0.0
        assert peers["same"]["ratio"] == pytest.approx(peers["same"]["ms"] / ref["ms"])
        assert not peers["off"]["agrees"] and peers["off"]["max_rel_err"] == pytest.approx(0.01, rel=1e-3)
        assert peers["broken"] == {"status": "error", "reason": "RuntimeError: boom"}
        assert peers["sdpa"] == {"status": "skipped", "reason": "is_causal covers the dense causal case only"}
    assert "!" in gpu.table(rows, args.peers).splitlines()[2]


@pytest.mark.skipif("cuda" not in backends.names(), reason="cuda backend unavailable here")
def test_cuda_memory_guard_skips_rows():
    def no_inputs(shape, dtype):
        raise AssertionError("no row fits: no inputs are made")

    args = gpu.build_parser().parse_args(["--cases", "causal", "--n", "16", "--heads", "1"])
    runner = gpu.Runner(args, gpu.DeviceOps(no_inputs, lambda: None, lambda: 1000))
    runner.run_case(gpu.CASES["causal"], 16, lambda row: None)
    for r in runner.rows:
        assert r["refattn"]["status"] == "skipped"
        assert "of GPU memory, more than 80% of the 0.0 GiB free" in r["refattn"]["reason"]
        assert r["peers"] == {p: {"status": "skipped", "reason": "refattn did not run"} for p in ("sdpa", "flex")}
