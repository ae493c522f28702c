"""`refattn verify` and `refattn.testing` (spec/verify.md, spec/tolerance.md): refattn's own
backends pass, deliberately wrong implementations (tests/broken_impls.py) fail with a
diagnosis naming the wrong tensor, unsupported and crashing implementations are reported as
such, and the exit code, the JSON report and the pytest helpers say so too."""

import json
import math
import re
from pathlib import Path

import pytest

import refattn.adapters
from refattn import verify
from refattn.cli import main
from refattn.testing import assert_matches_golden, golden_cases

from . import broken_impls as bi

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
ENTRIES = json.loads((GOLDEN / "manifest.json").read_text())["cases"]
BY_ID = {e["id"]: e for e in ENTRIES}
ALL = [e["id"] for e in ENTRIES]
BROKEN = bi.__name__            # "tests.broken_impls", importable by the verifier under pytest
#: the cases torch SDPA cannot express (spec/tolerance.md): softcap, ALiBi, dropout, dlse
SDPA_UNSUPPORTED = {"feature-softcap", "feature-alibi", "feature-alibi-top-left-rect", "feature-dropout",
                    "feature-dlse", "feature-everything"}


def run_verify(capsys, impl, *argv):
    rc = main(["verify", impl, "--golden", str(GOLDEN), *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return rc, out, err


def table(out: str) -> dict[str, list[str]]:
    """The printed table: case id -> [status, tensor, error, allowed, ratio, note...]."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in BY_ID:
            rows[cells[0]] = cells[1:]
    return rows


def summary(out: str) -> tuple[int, int, int, int, int]:
    m = re.search(r"(\d+) passed, (\d+) failed, (\d+) errors, (\d+) unsupported, of (\d+) case\(s\)", out)
    assert m, out
    return tuple(int(x) for x in m.groups())


def verdicts(fn, expr=None, dtype="float32", layout="bhsd") -> dict[str, verify.CaseVerdict]:
    impl = verify.Impl(fn, getattr(fn, "backward", None), getattr(fn, "__name__", "impl"))
    return {v.case_id: v for v in verify.verify(impl, GOLDEN, dtype, expr, layout)}


# ---- refattn's own backends pass ------------------------------------------------------------------------

@pytest.mark.parametrize("backend, dtype, expr, n", [
    ("cpu", "float32", None, 54),
    ("tiled", "float32", "pattern-*", 30),
    ("dense", "float64", None, 54),
])
def test_refattn_backends_pass(capsys, backend, dtype, expr, n):
    argv = ["--dtype", dtype] + (["--filter", expr] if expr else [])
    rc, out, err = run_verify(capsys, f"refattn.adapters:{backend}", *argv)
    assert rc == 0, out + err
    assert summary(out) == (n, 0, 0, 0, n)
    rows = table(out)
    assert len(rows) == n and all(r[0] == "pass" for r in rows.values())
    assert all(float(r[4]) < 1 for r in rows.values())
    assert f"refattn.adapters:{backend} ({dtype}, bhsd, numpy)" in out


def test_every_tensor_is_judged():
    """A full implementation is judged on every tensor of every case, dbias included."""
    res = verdicts(refattn.adapters.cpu, "feature-*")
    for cid, v in res.items():
        names = [t.name for t in v.tensors]
        want = ["out", "lse", "dq", "dk", "dv"] + (["dbias"] if BY_ID[cid]["bias"] is not None else [])
        assert names == want, cid
        assert v.status == "pass" and all(t.ok and t.note == "" for t in v.tensors), cid


# ---- layouts ---------------------------------------------------------------------------------------------

BSHD_CASES = "pattern-causal,feature-gqa,feature-rect-bottom-right,feature-dense-bias,feature-dlse,shape-decode"


def test_bshd_adapter_passes_with_layout_bshd(capsys):
    rc, out, err = run_verify(capsys, f"{BROKEN}:bshd", "--layout", "bshd", "--filter", BSHD_CASES)
    assert rc == 0, out
    assert summary(out) == (6, 0, 0, 0, 6)
    assert "(float32, bshd, numpy)" in out


def test_bshd_adapter_fails_with_the_default_layout(capsys):
    rc, out, err = run_verify(capsys, f"{BROKEN}:bshd", "--filter", BSHD_CASES)
    assert rc == 1
    rows = table(out)
    assert len(rows) == 6
    for cid, row in rows.items():
        assert row[0] in ("FAIL", "ERROR"), (cid, row)
    # the transposed arrays do not fit the mask: the row says so, no crash
    assert "does not match q and k" in out or "must be 0" in out
    assert rows["feature-gqa"][0] == "ERROR" and "forward raised RefattnError" in " ".join(rows["feature-gqa"])


# ---- deliberately wrong implementations fail, naming the wrong tensor ------------------------------------

def test_wrong_scale_fails_on_out(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:wrong_scale", "--filter", "pattern-causal,feature-gqa,feature-scale,"
                            "shape-d1")
    assert rc == 1
    rows = table(out)
    for cid in ("pattern-causal", "feature-gqa", "feature-scale"):
        assert rows[cid][:2] == ["FAIL", "out"], rows[cid]
        assert float(rows[cid][4]) > 1000
    assert rows["shape-d1"][0] == "pass"        # D = 1: 1/D is the right scale there
    res = verdicts(bi.wrong_scale, "pattern-causal,feature-scale")
    for v in res.values():
        assert v.status == "fail" and v.first_failure.name == "out" and v.first_failure.ratio > 1000


def test_window_off_by_one_fails_on_out(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:window_off_by_one", "--filter", "pattern-sliding_window,pattern-dense")
    assert rc == 1
    rows = table(out)
    assert rows["pattern-sliding_window"][:2] == ["FAIL", "out"]
    assert rows["pattern-dense"][0] == "pass"   # no key left of a full row: nothing to get wrong
    assert summary(out) == (1, 1, 0, 0, 2)
    v = verdicts(bi.window_off_by_one, "pattern-sliding_window")["pattern-sliding_window"]
    assert v.status == "fail" and v.first_failure.name == "out"
    assert v.first_failure.error > 100 * v.first_failure.allowed


def test_nan_on_empty_rows_fails_exactly_on_cases_with_empty_rows(capsys):
    res = verdicts(bi.nan_empty_rows)
    with_empty = {e["id"] for e in ENTRIES if e["mask"]["empty_rows"] > 0}
    assert {"feature-empty-rows-causal", "feature-empty-rows-random"} <= with_empty
    assert {c for c, v in res.items() if v.status != "pass"} == with_empty
    for cid in with_empty:
        t = res[cid].first_failure
        assert res[cid].status == "fail" and t.name == "out" and math.isinf(t.error), cid
        assert "nan at" in t.note and "expected 0.0" in t.note
        lse = next(x for x in res[cid].tensors if x.name == "lse")
        assert not lse.ok and "expected -inf" in lse.note
    rc, out, _ = run_verify(capsys, f"{BROKEN}:nan_empty_rows", "--filter", "feature-empty-rows-*,pattern-causal")
    assert rc == 1
    rows = table(out)
    assert rows["feature-empty-rows-causal"][:3] == ["FAIL", "out", "inf"]
    assert "nan at" in " ".join(rows["feature-empty-rows-random"])
    assert rows["pattern-causal"][0] == "pass"


def test_missing_gqa_reduction_fails_on_dk(capsys):
    res = verdicts(bi.gqa_no_reduction)
    grouped = {e["id"] for e in ENTRIES if e["shape"]["H"] != e["shape"]["Hkv"]}
    assert {"feature-gqa", "feature-mqa"} <= grouped
    assert {c for c, v in res.items() if v.status != "pass"} == grouped
    for cid in grouped:
        v = res[cid]
        t = {x.name: x for x in v.tensors}
        assert t["out"].ok and t["lse"].ok and t["dq"].ok, cid      # the forward (and dq) pass
        assert v.first_failure.name in ("dk", "dv") and not t["dk"].ok and not t["dv"].ok, cid
    rc, out, _ = run_verify(capsys, f"{BROKEN}:gqa_no_reduction", "--filter", "feature-gqa,feature-mqa")
    assert rc == 1
    assert {r[1] for r in table(out).values()} == {"dk"}
    assert all(r[0] == "FAIL" for r in table(out).values())


def test_backward_option_overrides_the_attribute(capsys):
    """--backward names the backward: a correct forward with the broken GQA backward fails on dk."""
    rc, out, _ = run_verify(capsys, "refattn.adapters:dense", "--backward",
                            f"{BROKEN}:_gqa_no_reduction_backward", "--filter", "feature-gqa,pattern-causal")
    assert rc == 1
    rows = table(out)
    assert rows["feature-gqa"][:2] == ["FAIL", "dk"] and rows["pattern-causal"][0] == "pass"


# ---- unsupported, errors and the exit code ----------------------------------------------------------------

def test_no_softcap_keyword_is_unsupported(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:no_softcap", "--filter", "feature-softcap,feature-everything,"
                            "pattern-causal,feature-dropout")
    assert rc == 0                       # unsupported is reported, never a failure (nor a pass)
    rows = table(out)
    assert rows["feature-softcap"][0] == "UNSUPPORTED" and "forward takes no softcap" in " ".join(
        rows["feature-softcap"])
    assert rows["feature-everything"][0] == "UNSUPPORTED"
    assert rows["pattern-causal"][0] == "pass" and rows["feature-dropout"][0] == "pass"
    assert summary(out) == (2, 0, 0, 2, 4)
    v = verdicts(bi.no_softcap, "feature-softcap")["feature-softcap"]
    assert v.status == "unsupported" and v.tensors == [] and "softcap" in v.message


def test_raising_unsupported_is_unsupported(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:raises_unsupported_on_softcap", "--filter",
                            "feature-softcap,pattern-causal")
    assert rc == 0
    rows = table(out)
    assert rows["feature-softcap"][0] == "UNSUPPORTED" and "this kernel has no softcap" in " ".join(
        rows["feature-softcap"])
    assert rows["pattern-causal"][0] == "pass"


def test_nothing_passed_is_exit_1(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:always_unsupported", "--filter", "pattern-*")
    assert rc == 1
    assert summary(out) == (0, 0, 0, 30, 30)


def test_other_exceptions_are_errors(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:crashes", "--filter", "pattern-causal,feature-gqa")
    assert rc == 1
    rows = table(out)
    assert rows["pattern-causal"][0] == "ERROR"
    assert "forward raised KernelCrash: kernel exploded" in " ".join(rows["pattern-causal"])
    assert summary(out) == (0, 0, 2, 0, 2)
    v = verdicts(bi.crashes, "pattern-causal")["pattern-causal"]
    assert v.status == "error" and v.first_failure is None


def test_an_error_among_passes_is_exit_1(capsys):
    """One crashing case is enough: a forward that raises only on the gqa case."""
    rc, out, _ = run_verify(capsys, f"{BROKEN}:crashes_on_gqa", "--filter", "pattern-causal,feature-gqa")
    assert rc == 1
    assert summary(out) == (1, 0, 1, 0, 2)
    rows = table(out)
    assert rows["pattern-causal"][0] == "pass" and rows["feature-gqa"][0] == "ERROR"
    assert "forward raised KernelCrash: no GQA in this kernel" in " ".join(rows["feature-gqa"])


def test_any_failure_is_exit_1(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:wrong_scale", "--filter", "pattern-causal,shape-d1")
    assert summary(out) == (1, 1, 0, 0, 2)
    assert rc == 1


def test_bad_implementation_spec_is_a_clean_error(capsys):
    for spec in ("no_colon", "no.such.module:f", "refattn.adapters:nothing"):
        rc, out, err = run_verify(capsys, spec)
        assert rc == 1 and err.startswith("refattn verify: error: implementation"), (spec, err)


def test_empty_filter_is_a_clean_error(capsys):
    rc, out, err = run_verify(capsys, "refattn.adapters:cpu", "--filter", "no-such-case")
    assert rc == 1 and "selects no case" in err


# ---- the JSON report ---------------------------------------------------------------------------------------

def test_json_report(capsys, tmp_path):
    path = tmp_path / "v.json"
    rc, out, _ = run_verify(capsys, f"{BROKEN}:no_softcap", "--filter", "pattern-causal,feature-softcap,"
                            "feature-sparse-bias", "--json", path)
    assert rc == 0
    rep = json.loads(path.read_text())
    assert rep["impl"] == f"{BROKEN}:no_softcap" and rep["dtype"] == "float32"
    cases = {c["id"]: c for c in rep["cases"]}
    assert set(cases) == {"pattern-causal", "feature-softcap", "feature-sparse-bias"}
    assert cases["feature-softcap"]["status"] == "unsupported" and cases["feature-softcap"]["tensors"] == []
    assert "softcap" in cases["feature-softcap"]["message"]
    for cid in ("pattern-causal", "feature-sparse-bias"):
        c = cases[cid]
        assert c["status"] == "pass"
        names = [t["name"] for t in c["tensors"]]
        assert names == ["out", "lse", "dq", "dk", "dv"] + (["dbias"] if cid == "feature-sparse-bias" else [])
        for t in c["tensors"]:
            assert set(t) == {"name", "error", "allowed", "ok", "note", "ratio"}
            assert t["ok"] is True and t["error"] <= t["allowed"] and t["allowed"] > 0
            assert t["allowed"] == BY_ID[cid]["allowed"]["float32"][t["name"]]


def test_json_report_of_a_failure(capsys, tmp_path):
    path = tmp_path / "v.json"
    rc, _, _ = run_verify(capsys, f"{BROKEN}:gqa_no_reduction", "--filter", "feature-gqa", "--json", path)
    assert rc == 1
    (case,) = json.loads(path.read_text())["cases"]
    assert case["status"] == "fail"
    bad = [t["name"] for t in case["tensors"] if not t["ok"]]
    assert bad == ["dk", "dv"] and all(t["ratio"] > 1 for t in case["tensors"] if not t["ok"])


def test_json_report_is_strict_json(capsys, tmp_path):
    path = tmp_path / "v.json"
    rc, _, _ = run_verify(capsys, f"{BROKEN}:nan_empty_rows", "--filter", "feature-empty-rows-causal",
                          "--json", path)
    assert rc == 1

    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    json.loads(path.read_text(), parse_constant=refuse)


# ---- torch: SDPA and compiled flex_attention ------------------------------------------------------------

@pytest.mark.oracle
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sdpa_passes_every_supported_case(capsys, tmp_path, dtype):
    pytest.importorskip("torch")
    path = tmp_path / "v.json"
    rc, out, err = run_verify(capsys, "refattn.adapters:sdpa", "--framework", "torch", "--dtype", dtype,
                              "--json", path)
    assert rc == 0, out + err
    cases = {c["id"]: c for c in json.loads(path.read_text())["cases"]}
    assert set(cases) == set(ALL)
    assert {c for c, v in cases.items() if v["status"] == "unsupported"} == SDPA_UNSUPPORTED
    assert {c for c, v in cases.items() if v["status"] == "pass"} == set(ALL) - SDPA_UNSUPPORTED
    lse = [t for c in cases.values() for t in c["tensors"] if t["name"] == "lse"]
    assert lse and all(t["note"] == "not provided (not judged)" for t in lse)     # SDPA gives no LSE
    assert summary(out) == (48, 0, 0, 6, 54)


@pytest.mark.oracle
def test_flex_passes_mask_cases(capsys, tmp_path):
    pytest.importorskip("torch")
    path = tmp_path / "v.json"
    rc, out, err = run_verify(capsys, "refattn.adapters:flex", "--framework", "torch", "--filter",
                              "pattern-causal,pattern-sliding_window,pattern-bigbird", "--json", path)
    assert rc == 0, out + err
    cases = json.loads(path.read_text())["cases"]
    assert len(cases) == 3 and all(c["status"] == "pass" for c in cases)
    for c in cases:   # forward only, no LSE
        assert [(t["name"], t["note"]) for t in c["tensors"]] == [("out", ""), ("lse", "not provided (not judged)")]


# ---- refattn.testing ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", golden_cases(filter="pattern-*"), ids=str)
def test_my_kernel(case):
    assert_matches_golden(refattn.adapters.cpu, case, dtype="float32")


def test_golden_cases_selection():
    cases = golden_cases(filter="pattern-*")
    assert [str(c) for c in cases] == [c for c in ALL if c.startswith("pattern-")] and len(cases) == 30
    assert [c.id for c in golden_cases()] == ALL
    assert [c.id for c in golden_cases(filter="feature-gqa,shape-l1", golden_dir=GOLDEN)] == ["feature-gqa", "shape-l1"]
    assert cases[0].arrays()["q"].shape == tuple(cases[0].entry["shape"][k] for k in ("B", "H", "Lq", "D"))


def _case(cid):
    (case,) = golden_cases(filter=cid)
    return case


@pytest.mark.parametrize("fn, cid, tensor", [
    (bi.wrong_scale, "pattern-causal", "out"),
    (bi.window_off_by_one, "pattern-sliding_window", "out"),
    (bi.nan_empty_rows, "feature-empty-rows-random", "out"),
    (bi.gqa_no_reduction, "feature-mqa", "dk"),
])
def test_assert_matches_golden_names_case_tensor_and_ratio(fn, cid, tensor):
    with pytest.raises(AssertionError) as exc:
        assert_matches_golden(fn, _case(cid), dtype="float32")
    msg = str(exc.value)
    assert msg.startswith(f"{cid} (float32): {tensor} is off by ")
    assert "allowed" in msg
    assert re.search(r"\((inf|[0-9.e+]+)x\)", msg), msg


def test_assert_matches_golden_error_is_an_assertion():
    with pytest.raises(AssertionError, match="pattern-causal: forward raised KernelCrash: kernel exploded"):
        assert_matches_golden(bi.crashes, _case("pattern-causal"))


def test_assert_matches_golden_skips_unsupported():
    with pytest.raises(pytest.skip.Exception, match="feature-softcap: unsupported: forward takes no softcap"):
        assert_matches_golden(bi.no_softcap, _case("feature-softcap"))
    with pytest.raises(pytest.skip.Exception, match="this kernel has no softcap"):
        assert_matches_golden(bi.raises_unsupported_on_softcap, _case("feature-softcap"))
    assert_matches_golden(bi.no_softcap, _case("pattern-causal"))       # supported: passes


def test_assert_matches_golden_layout_and_backward():
    case = _case("feature-gqa")
    assert_matches_golden(bi.bshd, case, layout="bshd")
    with pytest.raises(AssertionError):
        assert_matches_golden(bi.bshd, case)
    with pytest.raises(AssertionError, match=r"feature-gqa \(float64\): dk is off by"):
        assert_matches_golden(refattn.adapters.dense, case, dtype="float64", backward=bi.gqa_no_reduction.backward)


# ---- as a kernel author meets it: errors with their place, what went unchecked, imports ----------------

def _line_of(fn, text: str) -> int:
    """The line number, in its file, of the first line of ``fn`` that contains ``text``."""
    import inspect

    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_an_error_row_keeps_the_type_the_whole_message_and_the_place(capsys, tmp_path):
    report = tmp_path / "v.json"
    rc, out, _ = run_verify(capsys, f"{BROKEN}:crashes_in_a_helper", "--filter", "pattern-causal", "--json", report)
    assert rc == 1
    line = next(x for x in out.splitlines() if x.startswith("pattern-causal "))
    where = f"(at tests/broken_impls.py:{_line_of(bi._deep_helper, 'raise KernelCrash')} in _deep_helper)"
    assert ("forward raised KernelCrash: a message longer than a table cell, over two lines: the tile loop ran "
            "past key block 7 of a sequence that has only 6 of them " + where) in line
    case = json.loads(report.read_text())["cases"][0]
    assert case["status"] == "error" and case["message"].endswith(where)
    assert case["traceback"].startswith("Traceback (most recent call last):")
    assert "in crashes_in_a_helper" in case["traceback"] and "KernelCrash" in case["traceback"]


def test_an_error_inside_a_library_names_the_implementations_line(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:shape_error", "--filter", "pattern-causal")
    assert rc == 1
    line = next(x for x in out.splitlines() if x.startswith("pattern-causal "))
    assert "forward raised ValueError: " in line
    assert line.endswith(f"(at tests/broken_impls.py:{_line_of(bi.shape_error, 'np.matmul')} in shape_error)")


def test_a_run_without_a_backward_says_so(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:forward_only", "--filter", "pattern-causal,feature-gqa")
    assert rc == 0
    header, *_, last = out.strip().splitlines()
    assert "forward only; backward not checked: no backward given" in header
    assert last == "2 passed, 0 failed, 0 errors, 0 unsupported, of 2 case(s); backward not checked: no backward given"
    rc, out, _ = run_verify(capsys, "refattn.adapters:dense", "--filter", "pattern-causal")
    assert "forward and backward" in out.splitlines()[0] and "not checked" not in out


def test_rows_come_as_cases_finish(capsys):
    """The header first, then one row per case in the suite's order, then the summary."""
    rc, out, _ = run_verify(capsys, "refattn.adapters:dense", "--filter", "pattern-causal,shape-*")
    lines = out.strip().splitlines()
    assert lines[0].startswith("refattn.adapters:dense (float32, bhsd, numpy) against 7 case(s) of ")
    assert lines[1].split() == ["case", "status", "tensor", "error", "allowed", "ratio", "time", "s", "note"]
    ids = [e for e in ALL if e == "pattern-causal" or e.startswith("shape-")]
    assert [x.split()[0] for x in lines[2:-1]] == ids
    assert all(float(x.split()[6]) >= 0 for x in lines[2:-1])


def _cli(args, cwd, env_update=None):
    """``refattn`` as its console script runs it: the current folder is not on the import
    path by itself (``python -I``: no script folder, no current folder)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "REFATTN_GOLDEN"}
    env.update(env_update or {})
    code = "import sys; from refattn.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-I", "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_the_current_folder_is_importable(tmp_path):
    (tmp_path / "myattn.py").write_text(
        "from refattn import adapters\n\n"
        "def forward(q, k, v, *, mask, scale, **kw):\n"
        "    return adapters.dense(q, k, v, mask=mask, scale=scale, **kw)\n\n"
        "forward.mask_form = 'csr'\n")
    proc = _cli(["verify", "myattn:forward", "--golden", str(GOLDEN), "--filter", "pattern-causal"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 0 failed" in proc.stdout


def test_outside_the_repository_the_default_suite_is_found(tmp_path):
    proc = _cli(["verify", "refattn.adapters:dense", "--filter", "pattern-causal"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"against 1 case(s) of {GOLDEN}" in proc.stdout.splitlines()[0]
    proc = _cli(["golden", "check", "--filter", "pattern-causal"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"1 case(s) of {GOLDEN}" in proc.stdout.splitlines()[0]


def test_a_missing_suite_names_golden(tmp_path):
    for argv in (["verify", "refattn.adapters:dense", "--golden", str(tmp_path / "nope")],
                 ["golden", "check", str(tmp_path)]):
        proc = _cli(argv, tmp_path)
        assert proc.returncode == 1 and proc.stdout == ""
        assert proc.stderr.count("\n") == 1 and "is not a golden suite" in proc.stderr
        assert "--golden DIR" in proc.stderr and "REFATTN_GOLDEN" in proc.stderr


# ---- a kernel must provide what it is judged on ------------------------------------------------------

@pytest.mark.parametrize("name", ["returns_none", "returns_empty_tuple", "returns_empty_dict", "returns_wrong_keys"])
def test_a_forward_that_returns_no_out_fails(capsys, name):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:{name}", "--filter", "pattern-causal,feature-gqa")
    assert rc == 1
    assert summary(out) == (0, 2, 0, 0, 2)
    assert table(out)["pattern-causal"][:3] == ["FAIL", "out", "inf"]
    with pytest.raises(AssertionError, match="out is off by inf"):
        assert_matches_golden(getattr(bi, name), _case("pattern-causal"))
    with pytest.raises(AssertionError, match="out is off by inf"):
        assert_matches_golden(lambda q, k, v, **kw: None, _case("pattern-causal"))


def test_a_backward_that_returns_nothing_fails(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:backward_returns_none", "--filter", "pattern-causal")
    assert rc == 1 and summary(out) == (0, 1, 0, 0, 1)
    v = verdicts(bi.backward_returns_none, "pattern-causal")["pattern-causal"]
    assert [(t.name, t.ok) for t in v.tensors] == [("out", True), ("lse", True), ("dq", False), ("dk", False),
                                                   ("dv", False)]
    assert all(t.note == "not provided: the implementation must return it" for t in v.tensors[2:])


# ---- a kernel cannot end the run ---------------------------------------------------------------------

@pytest.mark.parametrize("name, code", [("exits_0", 0), ("exits_1", 1)])
def test_sys_exit_is_an_error_and_the_run_goes_on(capsys, name, code):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:{name}", "--filter", "pattern-causal,feature-gqa")
    assert rc == 1
    assert summary(out) == (0, 0, 2, 0, 2)
    assert f"forward raised SystemExit: {code}" in " ".join(table(out)["feature-gqa"])


def test_ctrl_c_stops_the_run_and_keeps_the_table(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:interrupted_on_gqa", "--filter", "pattern-causal,feature-gqa,shape-l1")
    assert rc == 130
    ids = [e for e in ALL if e in ("pattern-causal", "feature-gqa", "shape-l1")]
    assert ids.index("feature-gqa") == 1          # the suite's order: one case before it
    rows = table(out)
    assert list(rows) == [ids[0]] and rows[ids[0]][0] == "pass"
    assert out.strip().splitlines()[-1] == ("1 passed, 0 failed, 0 errors, 0 unsupported, of 1 case(s); "
                                            "backward not checked: no backward given; interrupted: 2 case(s) not run")
    with pytest.raises(KeyboardInterrupt):
        verdicts(bi.interrupted_on_gqa, "feature-gqa")


def test_dense_forms_past_the_bound_are_unsupported_not_allocated(capsys, monkeypatch):
    """The verifier builds no dense (B, H, Lq, Lk) array past MAX_DENSE_ENTRIES (2**28 here;
    a small bound stands in for a case of 16k tokens): such a case is unsupported for an
    implementation that takes dense masks, and judged for one that takes CSR."""
    from refattn.verify import frame

    monkeypatch.setattr(frame, "MAX_DENSE_ENTRIES", 48 * 48 - 1)
    dense_form = verdicts(bi.dense_mask_form, "pattern-causal,feature-dropout")
    assert dense_form["pattern-causal"].status == "unsupported"
    assert "the mask would be a dense array of 2304 entries (1, 1, 48, 48)" in dense_form["pattern-causal"].message
    csr_form = verdicts(refattn.adapters.dense, "pattern-causal,feature-dropout")
    assert csr_form["pattern-causal"].status == "pass"
    assert csr_form["feature-dropout"].status == "unsupported"
    assert "the dropout keep-mask would be a dense array" in csr_form["feature-dropout"].message


@pytest.mark.parametrize("name, note", [
    ("returns_a_generator", "out: expected an array of real numbers, got dtype object (tuple)"),
    ("returns_complex", "out: expected an array of real numbers, got dtype complex128 (ndarray)"),
    ("returns_a_string", "out: expected an array of real numbers, got dtype <U3 (str)"),
])
def test_outputs_that_are_no_real_arrays_fail_with_the_reason(name, note):
    v = verdicts(getattr(bi, name), "pattern-causal")["pattern-causal"]
    assert v.status == "fail" and v.tensors[0].name == "out" and v.tensors[0].note.startswith(note.split(" (")[0])


def test_a_tensor_that_requires_grad_is_read():
    pytest.importorskip("torch")
    v = verdicts(bi.returns_a_grad_tensor, "pattern-causal")["pattern-causal"]
    assert v.status == "pass", v


def test_an_implementation_that_writes_into_its_inputs_fails(capsys):
    v = verdicts(bi.scales_q_in_place, "pattern-causal")["pattern-causal"]
    assert v.status == "fail"
    assert [(t.name, t.ok) for t in v.tensors] == [("out", True), ("lse", True), ("q", False)]
    assert v.tensors[2].note.startswith("modified in place by the forward")
    v = verdicts(bi.backward_zeroes_dout, "pattern-causal")["pattern-causal"]
    assert [t.name for t in v.tensors if not t.ok] == ["dout"]
    assert "modified in place by the backward" in v.first_failure.note
    v = verdicts(bi.backward_scales_k, "pattern-causal")["pattern-causal"]      # a forward input, in the backward
    assert [t.name for t in v.tensors if not t.ok] == ["k"]
    rc, out, _ = run_verify(capsys, f"{BROKEN}:scales_q_in_place", "--filter", "pattern-causal")
    assert rc == 1 and table(out)["pattern-causal"][:2] == ["FAIL", "q"]


# ---- isolation: a crash or a hang costs one case ----------------------------------------------------

@pytest.mark.parametrize("name, message", [
    ("segfaults_on_gqa", "the implementation crashed the process: SIGSEGV"),
    ("aborts_on_gqa", "the implementation crashed the process: SIGABRT"),
    ("exits_hard_on_gqa", "the implementation ended the process with exit status 3"),
])
def test_isolate_turns_a_crash_into_one_error(capsys, tmp_path, name, message):
    report = tmp_path / "v.json"
    rc, out, _ = run_verify(capsys, f"{BROKEN}:{name}", "--filter", "pattern-causal,feature-gqa,shape-l1",
                            "--isolate", "--json", report)
    assert rc == 1
    rows = table(out)
    assert rows["feature-gqa"][0] == "ERROR" and message in " ".join(rows["feature-gqa"])
    assert rows["pattern-causal"][0] == "pass" and rows["shape-l1"][0] == "pass"
    assert "each case in a child process" in out.splitlines()[0]
    cases = json.loads(report.read_text())["cases"]
    assert [c["status"] for c in cases] == ["pass", "error", "pass"]
    assert all(c["seconds"] > 0 for c in cases)                 # each case's time, the child's start included


def test_timeout_kills_a_hanging_case(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:hangs_on_gqa", "--filter", "pattern-causal,feature-gqa",
                            "--timeout", "8")
    assert rc == 1
    rows = table(out)
    assert rows["feature-gqa"][0] == "ERROR" and "timed out: no verdict after 8 s" in " ".join(rows["feature-gqa"])
    assert rows["pattern-causal"][0] == "pass"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_timeout_must_be_positive_seconds(capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["verify", "refattn.adapters:dense", "--timeout", value])
    assert e.value.code == 2 and "expected a number of seconds > 0" in capsys.readouterr().err


def test_isolated_and_in_process_verdicts_agree():
    from refattn.verify.isolate import verify_case_isolated

    for cid in ("pattern-causal", "feature-dense-bias"):
        here = verdicts(refattn.adapters.dense, cid)[cid]
        there = verify_case_isolated("refattn.adapters:dense", None, GOLDEN, BY_ID[cid])
        assert there == here


def test_an_assertion_without_a_message_names_its_line(capsys):
    rc, out, _ = run_verify(capsys, f"{BROKEN}:asserts_on_gqa", "--filter", "feature-gqa")
    line = next(x for x in out.splitlines() if x.startswith("feature-gqa "))
    where = f"(at tests/broken_impls.py:{_line_of(bi.asserts_on_gqa, 'assert q.shape')} in asserts_on_gqa)"
    assert rc == 1 and line.rstrip().endswith("forward raised AssertionError " + where)


def test_the_json_report_has_the_fields_of_the_spec(capsys, tmp_path):
    report = tmp_path / "v.json"
    run_verify(capsys, f"{BROKEN}:crashes_on_gqa", "--filter", "pattern-causal,feature-gqa", "--json", report)
    data = json.loads(report.read_text())
    assert set(data) == {"impl", "dtype", "layout", "framework", "golden", "backward_checked", "cases"}
    ok, err = data["cases"]
    assert set(ok) == {"id", "status", "seconds", "message", "tensors"}
    assert set(err) == {"id", "status", "seconds", "message", "traceback", "tensors"}
    assert set(ok["tensors"][0]) == {"name", "error", "allowed", "ok", "note", "ratio"}
