"""The golden suite (spec/golden-format.md, spec/tolerance.md): deterministic generation, the
committed files against the format, `refattn golden check` on intact and tampered copies,
`refattn golden list`, and the two-route agreement check of `compute_case`."""

import hashlib
import json
import math
import re
import shutil
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from refattn import golden, patterns
from refattn.cli import main
from refattn.errors import RefattnError
from refattn.patterns.examples import example

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "golden"
SPEC = (ROOT / "spec" / "golden-format.md").read_text()
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
ENTRIES = MANIFEST["cases"]
BY_ID = {e["id"]: e for e in ENTRIES}
SUITE = {c.id: c for c in golden.suite()}

#: A few cases covering every kind of array: a plain pattern, a per-head random pattern, a
#: sparse bias, dropout, an explicit mask with empty rows, every option at once, edge shapes.
FEW = ["pattern-causal", "pattern-random", "feature-sparse-bias", "feature-dropout", "feature-empty-rows-random",
       "feature-everything", "feature-alibi-top-left-rect", "shape-l1", "shape-d256"]


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _arrays(entry) -> dict:
    return _arrays_at(GOLDEN / entry["file"])


def _arrays_at(path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


@pytest.fixture(scope="module")
def arrays():
    """Every committed case file's arrays, by case id (read once)."""
    return {e["id"]: _arrays(e) for e in ENTRIES}


@pytest.fixture
def suite_copy(tmp_path):
    """A writable copy of the committed suite."""
    dst = tmp_path / "golden"
    shutil.copytree(GOLDEN, dst)
    return dst


# ---- generation is deterministic ----------------------------------------------------------------------

def test_generate_twice_is_byte_identical(tmp_path):
    expr = ",".join(FEW)
    m1 = golden.generate(tmp_path / "a", expr)
    m2 = golden.generate(tmp_path / "b", expr)
    assert [e["id"] for e in m1["cases"]] == [c for c in SUITE if c in FEW]    # the suite's order
    assert m1 == m2
    assert (tmp_path / "a" / "manifest.json").read_bytes() == (tmp_path / "b" / "manifest.json").read_bytes()
    for cid in FEW:
        a = (tmp_path / "a" / "cases" / f"{cid}.npz").read_bytes()
        b = (tmp_path / "b" / "cases" / f"{cid}.npz").read_bytes()
        assert a == b, cid
        assert hashlib.sha256(a).hexdigest() == next(e["sha256"] for e in m1["cases"] if e["id"] == cid)


OUTPUTS = {"out", "lse", "dq", "dk", "dv", "dbias", "dbias_values"}


def test_committed_suite_equals_a_fresh_generation(tmp_path):
    """Inputs, masks and parameters are integer or exact arithmetic: equal to the bit on any
    machine. The outputs come from BLAS and libm, whose last bits differ between machines
    (spec/golden-format.md): they must agree within the agreement bound, and the measured
    manifest keys are what `golden check` compares (its own tests below)."""
    fresh = golden.generate(tmp_path, ",".join(FEW))
    measured = {"sha256", "agreement", "baselines", "allowed"}
    for entry in fresh["cases"]:
        committed = BY_ID[entry["id"]]
        assert {k: v for k, v in entry.items() if k not in measured} == \
            {k: v for k, v in committed.items() if k not in measured}, entry["id"]
        new, old = _arrays_at(tmp_path / entry["file"]), _arrays(committed)
        assert sorted(new) == sorted(old)
        for name in sorted(set(new) - OUTPUTS):
            assert new[name].dtype == old[name].dtype and np.array_equal(new[name], old[name]), (entry["id"], name)
        for name in sorted(set(new) & OUTPUTS):
            a, b = new[name], old[name]
            assert np.array_equal(np.isfinite(a), np.isfinite(b)) and np.array_equal(a[~np.isfinite(a)],
                                                                                   b[~np.isfinite(b)])
            fin = np.isfinite(a)
            scale = max(float(np.max(np.abs(b[fin]), initial=0.0)), 1.0)
            assert float(np.max(np.abs(a[fin] - b[fin]), initial=0.0)) <= golden.AGREEMENT_BOUND * scale, \
                (entry["id"], name)
    header = {k: v for k, v in fresh.items() if k != "cases"}
    assert header == {k: v for k, v in MANIFEST.items() if k != "cases"}


def test_check_tolerates_outputs_moved_within_the_bound(suite_copy, capsys):
    """Another machine's BLAS moves the outputs in their last bits, and with them every
    float64 baseline (a distance from the outputs at rounding-noise level): `golden check`
    accepts that (spec/golden-format.md) and still refuses a moved float32 baseline."""
    manifest = json.loads((suite_copy / "manifest.json").read_text())
    entry = next(e for e in manifest["cases"] if e["id"] == "pattern-causal")
    path = suite_copy / entry["file"]
    arrays = _arrays_at(path)
    arrays["out"] = arrays["out"] * (1 + 2.0 ** -50)             # a few ulps: another machine's BLAS
    data = golden.write_case(path, arrays)
    entry["sha256"], entry["bytes"] = golden.sha256(data), len(data)
    entry["baselines"]["float64"]["out"] *= 1.5                  # float64 baselines are rounding noise
    (suite_copy / "manifest.json").write_text(json.dumps(manifest))
    rc, out, err = run_cli(capsys, "golden", "check", suite_copy, "--filter", "pattern-causal")
    assert rc == 0, out + err
    entry["baselines"]["float32"]["out"] *= 1.01                 # beyond 1e-3: not rounding noise
    (suite_copy / "manifest.json").write_text(json.dumps(manifest))
    rc, out, err = run_cli(capsys, "golden", "check", suite_copy, "--filter", "pattern-causal")
    assert rc == 1 and "baselines float32 out" in out + err, out + err


def test_manifest_lists_the_whole_suite():
    assert [e["id"] for e in ENTRIES] == list(SUITE)
    assert len(ENTRIES) == 54
    assert sorted(p.name for p in (GOLDEN / "cases").iterdir()) == sorted(f"{e['id']}.npz" for e in ENTRIES)


# ---- check: the committed suite, and tampered copies ----------------------------------------------------

def test_check_passes_on_the_committed_suite(capsys):
    rc, out, err = run_cli(capsys, "golden", "check", GOLDEN)
    assert rc == 0, out + err
    assert "54 of 54 case(s) pass; the suite is intact" in out
    assert "FAIL" not in out


def _data_offset(path: Path, name: str) -> int:
    """Where the raw data of array ``name`` starts in the (stored) .npz at ``path``."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{name}.npy")
    raw = path.read_bytes()
    h = info.header_offset
    assert raw[h:h + 4] == b"PK\x03\x04"
    n, m = struct.unpack("<HH", raw[h + 26:h + 30])
    start = h + 30 + n + m
    assert raw[start:start + 8] == b"\x93NUMPY\x01\x00"
    (hlen,) = struct.unpack("<H", raw[start + 8:start + 10])
    return start + 10 + hlen


def _flip_byte(path: Path, name: str, element: int = 5) -> None:
    raw = bytearray(path.read_bytes())
    raw[_data_offset(path, name) + 8 * element + 3] ^= 0x10
    path.write_bytes(bytes(raw))


def _edit_manifest(gdir: Path, edit) -> None:
    m = json.loads((gdir / "manifest.json").read_text())
    edit(m)
    (gdir / "manifest.json").write_text(json.dumps(m, indent=1))


def _entry(m: dict, cid: str) -> dict:
    return next(e for e in m["cases"] if e["id"] == cid)


def _resync(gdir: Path, cid: str) -> None:
    """Make the manifest's size and checksum those of the (tampered) file again."""
    data = (gdir / "cases" / f"{cid}.npz").read_bytes()

    def edit(m):
        _entry(m, cid).update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    _edit_manifest(gdir, edit)


def _check_fails(capsys, gdir: Path, cid: str | None = None) -> tuple[str, str]:
    """`refattn golden check` must exit 1 with a message, never raise (a traceback)."""
    argv = ["golden", "check", gdir] + (["--filter", cid] if cid else [])
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 1, out + err
    assert "Traceback" not in out + err
    if cid:
        assert re.search(rf"^FAIL +{re.escape(cid)} +[0-9.]+ +\S", out, re.M), out
        assert "0 of 1 case(s) pass" in out and "intact" not in out
    return out, err


def test_check_flipped_byte(capsys, suite_copy):
    _flip_byte(suite_copy / "cases" / "pattern-causal.npz", "q")
    out, _ = _check_fails(capsys, suite_copy, "pattern-causal")
    assert "pattern-causal.npz: size or SHA-256 differs from the manifest" in out


def test_check_flipped_byte_with_resynced_checksum(capsys, suite_copy):
    """The checksum updated too: the archive's own CRC still catches the flipped byte."""
    _flip_byte(suite_copy / "cases" / "feature-gqa.npz", "out")
    _resync(suite_copy, "feature-gqa")
    out, _ = _check_fails(capsys, suite_copy, "feature-gqa")
    assert "is not a valid case file" in out and "CRC" in out


@pytest.mark.parametrize("name, delta, message", [
    ("q", 1 / 64, "input 'q' differs from its regeneration from seed"),
    ("mask_indices", 1, "input 'mask_indices' differs from its regeneration"),
    ("out", 1e-9, "out differs from its regeneration by"),
    ("dv", 1e-9, "dv differs from its regeneration by"),
])
def test_check_rewritten_array_with_resynced_checksum(capsys, suite_copy, name, delta, message):
    """A well-formed file whose checksum matches the manifest, with one value changed: only
    the regeneration from the seed can catch it."""
    cid = "feature-dense-bias"
    path = suite_copy / "cases" / f"{cid}.npz"
    arrs = golden.read_case(path)
    x = arrs[name].copy()
    x.flat[x.size // 2] += delta
    arrs[name] = x
    golden.write_case(path, arrs)
    _resync(suite_copy, cid)
    out, _ = _check_fails(capsys, suite_copy, cid)
    assert message in out


def test_check_truncated_file(capsys, suite_copy):
    path = suite_copy / "cases" / "shape-l77.npz"
    path.write_bytes(path.read_bytes()[:1000])
    out, _ = _check_fails(capsys, suite_copy, "shape-l77")
    assert "size or SHA-256 differs" in out and "truncated" in out


def test_check_missing_file(capsys, suite_copy):
    (suite_copy / "cases" / "feature-softcap.npz").unlink()
    out, _ = _check_fails(capsys, suite_copy, "feature-softcap")
    assert "cannot read" in out and "feature-softcap.npz" in out


def test_check_missing_file_in_a_full_check(capsys, suite_copy):
    (suite_copy / "cases" / "feature-softcap.npz").unlink()
    out, _ = _check_fails(capsys, suite_copy)
    assert re.search(r"^FAIL +feature-softcap +[0-9.]+ +case feature-softcap: cannot read", out, re.M), out
    assert "53 of 54 case(s) pass" in out and "intact" not in out


@pytest.mark.parametrize("version", [1, 3, 0, "2", None])
def test_check_wrong_schema_version(capsys, suite_copy, version):
    _edit_manifest(suite_copy, lambda m: m.__setitem__("schema_version", version))
    out, err = _check_fails(capsys, suite_copy)
    assert f"has schema version {version!r}; this refattn reads version 2" in err
    assert err.startswith("refattn golden: error: ")


@pytest.mark.parametrize("text", ["{not json", "", "[1, 2]", '{"format": "something-else"}'])
def test_check_unreadable_manifest(capsys, suite_copy, text):
    (suite_copy / "manifest.json").write_text(text)
    out, err = _check_fails(capsys, suite_copy)
    assert err.startswith("refattn golden: error: ")
    assert "manifest.json" in err
    assert ("cannot read" in err) if text in ("{not json", "") else ("not a refattn golden manifest" in err)


def test_check_no_manifest(capsys, tmp_path):
    out, err = _check_fails(capsys, tmp_path)
    assert f"{tmp_path} is not a golden suite (no manifest.json in it)" in err and "--golden DIR" in err


@pytest.mark.parametrize("key, dtype, tensor", [("baselines", "float16", "out"), ("baselines", "bfloat16", "dk"),
                                                ("allowed", "float32", "dq")])
def test_check_edited_baseline(capsys, suite_copy, key, dtype, tensor):
    cid = "pattern-sliding_window"
    stored = BY_ID[cid][key][dtype][tensor]
    _edit_manifest(suite_copy, lambda m: _entry(m, cid)[key][dtype].__setitem__(tensor, stored * 1.5))
    out, _ = _check_fails(capsys, suite_copy, cid)
    assert f"{key} {dtype} {tensor} = {stored * 1.5!r} in the manifest" in out and "recomputed" in out


def test_check_removed_baseline(capsys, suite_copy):
    cid = "pattern-sliding_window"
    _edit_manifest(suite_copy, lambda m: _entry(m, cid)["baselines"]["float32"].pop("lse"))
    out, _ = _check_fails(capsys, suite_copy, cid)
    assert "baselines float32 lse = None in the manifest" in out


@pytest.mark.parametrize("key, value", [("baselines", []), ("file", None)])
def test_check_malformed_entry(capsys, suite_copy, key, value):
    cid = "pattern-causal"
    _edit_manifest(suite_copy, lambda m: _entry(m, cid).__setitem__(key, value))
    _check_fails(capsys, suite_copy, cid)


@pytest.mark.parametrize("key, value", [("scale", 0.5), ("softcap", 2.0), ("seed", 7)])
def test_check_edited_case_parameters(capsys, suite_copy, key, value):
    cid = "pattern-causal"
    _edit_manifest(suite_copy, lambda m: _entry(m, cid).__setitem__(key, value))
    _check_fails(capsys, suite_copy, cid)


def test_check_filter_selecting_nothing(capsys):
    rc, out, err = run_cli(capsys, "golden", "check", GOLDEN, "--filter", "no-such-case-*")
    assert rc == 1
    assert "intact" not in out
    assert "selects no case" in err


# ---- the committed files against the format --------------------------------------------------------------

def _spec_features() -> list[str]:
    row = next(line for line in SPEC.splitlines() if line.startswith("| `features` |"))
    return re.findall(r"`([a-z_]+)`", row.split("|")[2])


def test_every_pattern_has_a_case():
    supported = [n for n in patterns.names() if example(n, 48, 48) is not None]
    assert len(supported) >= 20
    for name in supported:
        entry = BY_ID.get(f"pattern-{name}")
        assert entry is not None, f"no golden case for pattern {name}"
        assert entry["group"] == "pattern" and entry["pattern"]["name"] == name
        assert entry["pattern"] == example(name, 48, 48, seed=0).to_dict()


def test_every_spec_feature_has_a_case():
    features = _spec_features()
    assert len(features) == 14 and "gqa" in features and "content" in features
    used = {f for e in ENTRIES for f in e["features"]}
    assert set(features) <= used, set(features) - used
    assert used <= set(features), used - set(features)


def test_features_describe_the_cases():
    """Each case's `features` says what its other keys show, no more, no less."""
    for e in ENTRIES:
        s, f, bias = e["shape"], set(e["features"]), e["bias"]
        pat = e["pattern"] or {}
        assert (s["H"] != s["Hkv"]) == bool(f & {"gqa", "mqa"}), e["id"]
        assert ("mqa" not in f) or s["Hkv"] == 1, e["id"]
        assert (s["Lq"] != s["Lk"]) == ("rect" in f), e["id"]
        assert ("decode" in f) == (s["Lq"] == 1 and s["Lk"] > 1), e["id"]
        assert ("causal_top_left" in f) == (pat.get("name") == "causal" and pat.get("align") == "top_left"), e["id"]
        assert ("scale" in f) == (not math.isclose(e["scale"], 1 / math.sqrt(s["D"]), rel_tol=1e-15)), e["id"]
        assert ("softcap" in f) == (e["softcap"] is not None), e["id"]
        assert ("alibi" in f) == (bias is not None and bias["kind"] == "alibi"), e["id"]
        assert ("dense_bias" in f) == (bias is not None and bias["kind"] == "dense"), e["id"]
        assert ("sparse_bias" in f) == (bias is not None and bias["kind"] == "sparse"), e["id"]
        assert ("dropout" in f) == (e["dropout_p"] is not None), e["id"]
        assert ("dlse" in f) == bool(e["dlse"]), e["id"]
        assert ("empty_rows" not in f) or e["mask"]["empty_rows"] > 0, e["id"]
        assert ("content" in f) == (bool(pat) and patterns.from_dict(pat).content_dependent), e["id"]


def test_empty_rows_feature_marks_every_case_with_empty_rows():
    untagged = [e["id"] for e in ENTRIES if e["mask"]["empty_rows"] > 0 and "empty_rows" not in e["features"]]
    assert untagged == []


def test_manifest_header_and_keys():
    assert MANIFEST["format"] == "refattn-golden" and MANIFEST["schema_version"] == 2
    assert MANIFEST["routes"] == ["dense", "sparse"] and MANIFEST["agreement_bound"] == 1e-13
    assert MANIFEST["input_grid"] == {"step": 1 / 64, "max_abs": 4}
    rows = SPEC.split("Each case:")[1].split("## The arrays")[0].splitlines()
    keys = {k for row in rows if row.startswith("| `") for k in re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])}
    assert len(keys) >= 15
    for e in ENTRIES:
        assert set(e) == keys, (e["id"], set(e) ^ keys)
        assert e["file"] == f"cases/{e['id']}.npz"
        assert e["group"] in ("pattern", "feature", "shape") and e["id"].startswith(e["group"] + "-")
        assert e["input_dtypes"] == ["float64", "float32", "float16", "bfloat16"]
        assert max(e["agreement"].values()) <= MANIFEST["agreement_bound"]


def test_case_ids_follow_the_spec():
    assert [e["id"] for e in ENTRIES if not re.fullmatch(r"[a-z0-9_.-]+", e["id"])] == []


def test_manifest_is_strict_json():
    """Readers in any language: no NaN or Infinity tokens."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    json.loads((GOLDEN / "manifest.json").read_text(), parse_constant=refuse)


def test_case_files_are_plain_stored_npz():
    for e in ENTRIES:
        path = GOLDEN / e["file"]
        data = path.read_bytes()
        assert len(data) == e["bytes"] and hashlib.sha256(data).hexdigest() == e["sha256"], e["id"]
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                assert info.compress_type == zipfile.ZIP_STORED, (e["id"], info.filename)
                assert info.date_time == (1980, 1, 1, 0, 0, 0), (e["id"], info.filename)
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    assert version == (1, 0)
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                assert not fortran and dtype.str[0] in "<|", (e["id"], info.filename)
        with np.load(path, allow_pickle=False) as z:
            assert all(z[name].dtype != object for name in z.files)


def _spec_dtypes() -> dict[str, str]:
    table = SPEC.split("## The arrays of a case file")[1].split("## How outputs")[0]
    dtypes = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([a-z_]+)`", cells[0])
        types = [t.strip() for t in cells[1].split(",")]
        for i, n in enumerate(names):
            dtypes[n] = types[i] if len(types) > 1 else types[0]
    return dtypes


def _expected_shapes(e: dict, a: dict) -> dict[str, tuple]:
    s = e["shape"]
    B, H, Hkv, Lq, Lk, D, Dv = (s[k] for k in ("B", "H", "Hkv", "Lq", "Lk", "D", "Dv"))
    G = e["mask"]["groups"][0] * e["mask"]["groups"][1]
    shapes = {"q": (B, H, Lq, D), "k": (B, Hkv, Lk, D), "v": (B, Hkv, Lk, Dv), "dout": (B, H, Lq, Dv),
              "mask_indptr": (G, Lq + 1), "mask_indices": (e["mask"]["nnz"],), "mask_offsets": (G + 1,),
              "out": (B, H, Lq, Dv), "lse": (B, H, Lq), "dq": (B, H, Lq, D), "dk": (B, Hkv, Lk, D),
              "dv": (B, Hkv, Lk, Dv)}
    if e["dlse"]:
        shapes["dlse"] = (B, H, Lq)
    bias = e["bias"]
    if bias is not None and bias["kind"] == "dense":
        shapes["bias"] = shapes["dbias"] = tuple(bias["shape"])
    elif bias is not None and bias["kind"] == "sparse":
        total = int(a["bias_offsets"][-1])
        shapes.update(bias_values=(total,), bias_offsets=(B * H + 1,), dbias_values=(total,))
    elif bias is not None:
        shapes["alibi_slopes"] = shapes["dbias"] = (H,)
    if e["dropout_p"] is not None:
        shapes.update(dropout_keep=(int(a["dropout_offsets"][-1]),), dropout_offsets=(B * H + 1,))
    return shapes


def test_arrays_have_the_spec_dtypes_and_shapes(arrays):
    dtypes = _spec_dtypes()
    assert len(dtypes) == 21 and dtypes["dropout_keep"] == "uint8" and dtypes["bias_offsets"] == "int64"
    for e in ENTRIES:
        a = arrays[e["id"]]
        shapes = _expected_shapes(e, a)
        assert set(a) == set(shapes), (e["id"], set(a) ^ set(shapes))
        for name, x in a.items():
            assert x.dtype == np.dtype(dtypes[name]), (e["id"], name, x.dtype)
            assert x.shape == shapes[name], (e["id"], name, x.shape, shapes[name])
            assert x.flags.c_contiguous


def _per_bh_nnz(e: dict, a: dict) -> np.ndarray:
    """nnz of each (b, h)'s mask group, in (b, h) row-major order."""
    bm, hm = e["mask"]["groups"]
    nnz = np.diff(a["mask_offsets"])
    B, H = e["shape"]["B"], e["shape"]["H"]
    return np.array([nnz[(b if bm > 1 else 0) * hm + (h if hm > 1 else 0)] for b in range(B) for h in range(H)])


def test_per_bh_layouts_follow_the_mask(arrays):
    for e in ENTRIES:
        a = arrays[e["id"]]
        for prefix in ("bias", "dropout"):
            if f"{prefix}_offsets" in a:
                offsets = a[f"{prefix}_offsets"]
                assert offsets[0] == 0 and np.array_equal(np.diff(offsets), _per_bh_nnz(e, a)), e["id"]
        if "dropout_keep" in a:
            assert set(np.unique(a["dropout_keep"]).tolist()) <= {0, 1}
            assert 0 < a["dropout_keep"].mean() < 1


def _on_grid(x: np.ndarray) -> bool:
    scaled = x * 64
    return bool(np.all(scaled == np.round(scaled)) and np.all(np.abs(x) <= 4))


def test_inputs_are_on_the_grid_and_exact_in_every_dtype(arrays):
    for e in ENTRIES:
        a = arrays[e["id"]]
        for name in ("q", "k", "v", "dout", "dlse", "bias", "bias_values"):
            if name not in a:
                continue
            x = a[name]
            assert np.all(np.isfinite(x)) and _on_grid(x), (e["id"], name)
            for dt in (np.float32, np.float16, ml_dtypes.bfloat16):
                assert np.array_equal(x.astype(dt).astype(np.float64), x), (e["id"], name, dt)
        assert np.abs(a["q"]).max() > 0.5      # not degenerate (all zeros would be "on the grid" too)


def _mask_from_arrays(e: dict, a: dict) -> np.ndarray:
    """The mask as a dense (Bm, Hm, Lq, Lk) array, read as the spec's text says."""
    bm, hm = e["mask"]["groups"]
    lq, lk = e["shape"]["Lq"], e["shape"]["Lk"]
    indptr, indices, offsets = a["mask_indptr"], a["mask_indices"], a["mask_offsets"]
    dense = np.zeros((bm, hm, lq, lk), bool)
    for b in range(bm):
        for h in range(hm):
            g = b * hm + h
            assert indptr[g, 0] == 0 and indptr[g, -1] == offsets[g + 1] - offsets[g]
            assert np.all(np.diff(indptr[g]) >= 0)
            for i in range(lq):
                cols = indices[offsets[g] + indptr[g, i]:offsets[g] + indptr[g, i + 1]]
                assert np.all(np.diff(cols) > 0) and np.all((cols >= 0) & (cols < lk)), (e["id"], g, i)
                dense[b, h, i, cols] = True
    assert offsets[0] == 0 and offsets[-1] == indices.shape[0] == e["mask"]["nnz"]
    return dense


def test_mask_arrays_rebuild_the_cases_mask(arrays):
    for e in ENTRIES:
        a = arrays[e["id"]]
        got = _mask_from_arrays(e, a)
        s = e["shape"]
        if e["pattern"] is not None:       # content-dependent patterns choose from the stored q, k
            m = patterns.from_dict(e["pattern"]).mask(s["Lq"], s["Lk"], heads=s["H"], q=a["q"], k=a["k"])
        else:
            m = golden.case_mask(SUITE[e["id"]], a["q"], a["k"])
        assert m.group_shape == tuple(e["mask"]["groups"]), e["id"]
        assert np.array_equal(got, m.to_dense().reshape(got.shape)), e["id"]
        empty = sum(int((m.row_counts(b, h) == 0).sum()) for b in range(s["B"]) for h in range(s["H"]))
        assert empty == e["mask"]["empty_rows"], e["id"]


def test_empty_rows_follow_the_convention(arrays):
    """lse is -inf exactly on the rows with no key; out and dq are 0 there."""
    for e in ENTRIES:
        a = arrays[e["id"]]
        s = e["shape"]
        dense = _mask_from_arrays(e, a)
        dense = np.broadcast_to(dense, (s["B"], s["H"], s["Lq"], s["Lk"]))
        empty = ~dense.any(axis=-1)
        assert int(empty.sum()) == e["mask"]["empty_rows"]
        assert np.array_equal(np.isneginf(a["lse"]), empty), e["id"]
        assert np.all(np.isfinite(a["lse"][~empty])) and not np.isnan(a["lse"]).any()
        assert np.all(a["out"][empty] == 0) and np.all(a["dq"][empty] == 0), e["id"]
        for name in ("out", "dq", "dk", "dv"):
            assert np.all(np.isfinite(a[name])), (e["id"], name)


def test_suite_size():
    total = sum(p.stat().st_size for p in GOLDEN.rglob("*") if p.is_file())
    assert total <= 25 * 2**20
    assert sum(e["bytes"] for e in ENTRIES) <= 25 * 2**20


# ---- the tolerance policy: allowed = factor * baseline + atol -------------------------------------------

def test_tolerance_constants_are_the_specs():
    tol = MANIFEST["tolerance"]
    assert tol["eps"] == {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
    assert tol["atol_ulps"] == 2
    for dt in ("float64", "float32"):
        assert tol["factor"][dt] == {t: 10 for t in golden.TENSORS}
    for dt in ("float16", "bfloat16"):
        assert tol["factor"][dt] == {"out": 2, "lse": 2, "dq": 3, "dk": 3, "dv": 3, "dbias": 3}


def test_allowed_is_factor_times_baseline_plus_atol(arrays):
    tol = MANIFEST["tolerance"]
    for e in ENTRIES:
        a = arrays[e["id"]]
        expected_tensors = {"out", "lse", "dq", "dk", "dv"} | ({"dbias"} if e["bias"] is not None else set())
        assert set(e["allowed"]) == set(e["baselines"]) == set(golden.INPUT_DTYPES)
        for dt, per in e["allowed"].items():
            assert set(per) == set(e["baselines"][dt]) == expected_tensors, (e["id"], dt)
            for name, allowed in per.items():
                gold = a["dbias_values"] if name == "dbias" and "dbias_values" in a else a[name]
                gold = gold[np.isfinite(gold)]
                big = float(np.max(np.abs(gold), initial=0.0))
                base = e["baselines"][dt][name]
                assert base >= 0
                want = tol["factor"][dt][name] * base + tol["atol_ulps"] * tol["eps"][dt] * big
                assert allowed == pytest.approx(want, rel=1e-12, abs=0), (e["id"], dt, name)
                assert allowed > 0 or big == 0, (e["id"], dt, name)


# ---- compute_case: the two routes must agree --------------------------------------------------------------

def test_compute_case_fails_when_the_routes_disagree(monkeypatch):
    real = golden.routes.run_route
    calls = []

    def perturbed(backend, inputs):
        res = real(backend, inputs)
        calls.append(backend)
        if backend == golden.ROUTES[1]:
            res = {**res, "out": res["out"] * (1 + 1e-10)}
        return res

    case = SUITE["pattern-causal"]
    golden.compute_case(case)                  # unperturbed: agrees
    monkeypatch.setattr(golden.routes, "run_route", perturbed)
    with pytest.raises(RefattnError, match="disagree") as exc:
        golden.compute_case(case)
    assert calls == list(golden.ROUTES)
    msg = str(exc.value)
    assert "pattern-causal" in msg and "out" in msg and "dq" not in msg


def test_compute_case_agreement_is_recorded():
    _, gold, agree = golden.compute_case(SUITE["feature-sparse-bias"])
    assert set(agree) == {"out", "lse", "dq", "dk", "dv", "dbias"}
    assert all(0 <= v <= golden.AGREEMENT_BOUND for v in agree.values())


# ---- list and generate from the command line -------------------------------------------------------------

def test_golden_list(capsys):
    rc, out, _ = run_cli(capsys, "golden", "list")
    assert rc == 0
    lines = out.splitlines()
    ids = [line.split()[0] for line in lines[1:-1]]
    assert ids == list(SUITE)
    assert lines[-1] == f"{len(SUITE)} case(s)"


def test_golden_list_filter(capsys):
    rc, out, _ = run_cli(capsys, "golden", "list", "--filter", "shape-*")
    assert rc == 0
    ids = [line.split()[0] for line in out.splitlines()[1:-1]]
    assert ids == [c for c in SUITE if c.startswith("shape-")] and len(ids) == 6
    assert out.splitlines()[-1] == "6 case(s)"


def test_golden_list_json(capsys):
    rc, out, _ = run_cli(capsys, "golden", "list", "--json", "--filter", "pattern-*,feature-gqa")
    assert rc == 0
    rows = json.loads(out)
    assert [r["id"] for r in rows] == [c for c in SUITE if c.startswith("pattern-")] + ["feature-gqa"]
    gqa = rows[-1]
    assert gqa["group"] == "feature" and gqa["features"] == "gqa" and gqa["pattern"] == "sliding_window"
    rc, out, _ = run_cli(capsys, "golden", "list", "--json")
    assert [r["id"] for r in json.loads(out)] == list(SUITE)


def test_golden_generate_cli(capsys, tmp_path):
    rc, out, err = run_cli(capsys, "golden", "generate", "--out", tmp_path / "g", "--filter", "shape-l1,shape-d1")
    assert rc == 0, err
    assert "wrote 2 case(s)" in out
    assert sorted(p.name for p in (tmp_path / "g" / "cases").iterdir()) == ["shape-d1.npz", "shape-l1.npz"]
    rc, out, err = run_cli(capsys, "golden", "check", tmp_path / "g")
    assert rc == 0 and "2 of 2 case(s) pass; the suite is intact" in out


@pytest.mark.parametrize("expr", ["no-such-case", ",", "pattern-causal-*"])
def test_generate_with_an_empty_selection_is_an_error(capsys, tmp_path, expr):
    rc, out, err = run_cli(capsys, "golden", "generate", "--out", tmp_path / "g", "--filter", expr)
    assert rc == 1
    assert err.startswith("refattn golden: error: --filter") and "Traceback" not in err
    assert not (tmp_path / "g" / "manifest.json").exists()


# ---- generating into a folder that holds a suite never loses a case ---------------------------------

def _ids(gdir: Path) -> list[str]:
    return [e["id"] for e in json.loads((gdir / "manifest.json").read_text())["cases"]]


def test_a_filtered_generate_into_a_full_suite_keeps_every_case(capsys, suite_copy):
    before = json.loads((suite_copy / "manifest.json").read_text())["cases"]
    rc, out, err = run_cli(capsys, "golden", "generate", "--out", suite_copy, "--filter", "pattern-causal")
    assert rc == 0, err
    assert out.strip() == (f"wrote 1 case(s), {BY_ID['pattern-causal']['bytes'] / 2**20:.1f} MiB, to {suite_copy}/cases/; "
                           f"{suite_copy}/manifest.json lists {len(before)} case(s) "
                           f"({len(before) - 1} kept from before, not regenerated)")
    assert _ids(suite_copy) == [e["id"] for e in before]
    rc, out, _ = run_cli(capsys, "golden", "check", suite_copy)
    assert rc == 0 and f"{len(before)} of {len(before)} case(s) pass; the suite is intact" in out


def test_merging_keeps_the_suite_order_and_unknown_cases(tmp_path):
    gdir = tmp_path / "g"
    golden.generate(gdir, "shape-l1")
    manifest = json.loads((gdir / "manifest.json").read_text())
    manifest["cases"].append({**manifest["cases"][0], "id": "mine-1"})      # a case of some other list
    (gdir / "manifest.json").write_text(json.dumps(manifest))
    golden.generate(gdir, "pattern-causal,shape-d1")
    order = list(SUITE)
    assert _ids(gdir) == sorted(["pattern-causal", "shape-d1", "shape-l1"], key=order.index) + ["mine-1"]


@pytest.mark.parametrize("content, why", [
    ("{not json", "unreadable"),
    ('{"format": "something-else"}', "not a refattn golden manifest"),
    ('{"format": "refattn-golden", "schema_version": 99, "cases": []}', "schema version 99"),
    ('{"format": "refattn-golden", "schema_version": 2, "cases": [3]}', "malformed"),
])
def test_generate_refuses_a_manifest_it_cannot_add_to(capsys, tmp_path, content, why):
    gdir = tmp_path / "g"
    gdir.mkdir()
    (gdir / "manifest.json").write_text(content)
    rc, out, err = run_cli(capsys, "golden", "generate", "--out", gdir, "--filter", "shape-l1")
    assert rc == 1 and why in err and "write to another --out" in err
    assert (gdir / "manifest.json").read_text() == content                 # untouched
    assert not (gdir / "cases" / "shape-l1.npz").exists()                  # refused before the work


def test_generate_onto_a_file_or_an_unwritable_folder(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    rc, _, err = run_cli(capsys, "golden", "generate", "--out", tmp_path / "f", "--filter", "shape-l1")
    assert rc == 1 and "is a file, not a folder" in err and "Traceback" not in err
    rc, _, err = run_cli(capsys, "golden", "generate", "--out", tmp_path / "f" / "sub", "--filter", "shape-l1")
    assert rc == 1 and "cannot create" in err and "Traceback" not in err


def test_generate_replaces_a_symlinked_case_file_instead_of_writing_through_it(tmp_path):
    gdir = tmp_path / "g"
    golden.generate(gdir, "shape-l1")
    outside = tmp_path / "outside.npz"
    outside.write_bytes(b"precious")
    target = gdir / "cases" / "shape-l1.npz"
    target.unlink()
    target.symlink_to(outside)
    golden.generate(gdir, "shape-l1")
    assert outside.read_bytes() == b"precious"
    assert not target.is_symlink() and target.stat().st_size > 1000


def test_concurrent_generates_into_one_folder_keep_both(tmp_path):
    import subprocess
    import sys

    gdir = tmp_path / "g"
    code = "import sys; from refattn import golden; golden.generate(sys.argv[1], sys.argv[2])"
    runs = [subprocess.Popen([sys.executable, "-c", code, str(gdir), expr])
            for expr in ("pattern-*", "feature-*,shape-*")]
    assert [p.wait(timeout=300) for p in runs] == [0, 0]
    assert _ids(gdir) == list(SUITE)


def test_an_interrupted_generate_leaves_no_file_behind(tmp_path, monkeypatch):
    """Case files wait under temporary names until the manifest is merged: a failure on the
    second case leaves neither a temporary file nor a case file nor a manifest."""
    real = golden.generate.__globals__["compute_case"]
    calls = []

    def failing(case):
        calls.append(case.id)
        if len(calls) == 2:
            raise RefattnError("stop")
        return real(case)

    monkeypatch.setitem(golden.generate.__globals__, "compute_case", failing)
    with pytest.raises(RefattnError, match="stop"):
        golden.generate(tmp_path / "g", "shape-*")
    assert list((tmp_path / "g" / "cases").iterdir()) == [] and not (tmp_path / "g" / "manifest.json").exists()
    monkeypatch.undo()
    golden.generate(tmp_path / "g", "shape-*")
    names = sorted(p.name for p in (tmp_path / "g" / "cases").iterdir())
    assert names == sorted(f"{c}.npz" for c in SUITE if c.startswith("shape-"))
