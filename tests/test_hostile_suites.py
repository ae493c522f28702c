"""Suites from an untrusted source (spec/golden-format.md, "Threat model"): every hostile
folder here is made by the test, never committed. Whatever a folder holds, `verify`,
`golden check` and `refattn.testing` end in a verdict per case, never a traceback, a hang,
a huge allocation or a read outside the folder; a case whose file or entry is not what
the manifest promises is that case's ERROR (verify) or FAIL (check), and the others are
still judged."""

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from refattn import golden
from refattn.cli import main
from refattn.testing import assert_matches_golden, golden_cases

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
IDS = ["pattern-causal", "feature-gqa", "feature-dense-bias"]
VICTIM = "feature-gqa"


@pytest.fixture
def suite(tmp_path) -> Path:
    """A three-case copy of the committed suite."""
    folder = tmp_path / "suite"
    (folder / "cases").mkdir(parents=True)
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    manifest["cases"] = [e for e in manifest["cases"] if e["id"] in IDS]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for cid in IDS:
        shutil.copy(GOLDEN / "cases" / f"{cid}.npz", folder / "cases")
    return folder


def edit(folder: Path, change) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest, next(e for e in manifest["cases"] if e.get("id") == VICTIM))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def resync(folder: Path, cid: str = VICTIM) -> None:
    """Make the manifest's size and checksum those of the (edited) file."""
    data = (folder / "cases" / f"{cid}.npz").read_bytes()
    edit(folder, lambda m, e: e.update(bytes=len(data), sha256=golden.sha256(data)))


def write_npz(path: Path, arrays: dict, *, compress=False, headers: dict | None = None) -> None:
    """An .npz with the given arrays; ``headers`` replaces a member's raw bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, a in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, a, allow_pickle=False)
            zf.writestr(f"{name}.npy", (headers or {}).get(name, buf.getvalue()))


def verify_rows(capsys, folder: Path):
    rc = main(["verify", "refattn.adapters:dense", "--golden", str(folder)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    rows = {line.split()[0]: line for line in out.splitlines()[2:-1]}
    return rc, rows, out, err


def check_rows(capsys, folder: Path):
    rc = main(["golden", "check", str(folder)])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    rows = {line.split()[1]: line for line in out.splitlines()[2:-1]}
    return rc, rows, out, err


def assert_only_the_victim_fails(capsys, folder: Path, message: str, *, check_message: str | None = None):
    rc, rows, out, _ = verify_rows(capsys, folder)
    assert rc == 1
    assert rows[VICTIM].split()[1] == "ERROR" and message in rows[VICTIM], rows[VICTIM]
    assert all(rows[c].split()[1] == "pass" for c in IDS if c != VICTIM), out
    rc, rows, out, _ = check_rows(capsys, folder)
    assert rc == 1
    assert rows[VICTIM].startswith("FAIL") and (check_message or message) in rows[VICTIM], rows[VICTIM]
    assert all(rows[c].startswith("pass") for c in IDS if c != VICTIM), out
    case = next(c for c in golden_cases(golden_dir=folder) if c.id == VICTIM)
    with pytest.raises(AssertionError, match=f"^{VICTIM}: "):
        assert_matches_golden(__import__("refattn").adapters.dense, case)


def test_an_intact_copy_passes(capsys, suite):
    rc, rows, _, _ = verify_rows(capsys, suite)
    assert rc == 0 and len(rows) == 3


def test_gold_scaled_in_the_file(capsys, suite):
    """out * 1.001 in the case file: the checksum catches it, and names the file."""
    path = suite / "cases" / f"{VICTIM}.npz"
    arrays = golden.read_case(path)
    arrays["out"] = arrays["out"] * 1.001
    golden.write_case(path, arrays)
    assert_only_the_victim_fails(capsys, suite, f"cases/{VICTIM}.npz is not the file the manifest lists",
                                 check_message="size or SHA-256 differs")


def test_an_allowance_edited_by_hand(capsys, suite):
    edit(suite, lambda m, e: e["allowed"]["float32"].__setitem__("out", 1e300))
    rc, rows, _, _ = verify_rows(capsys, suite)
    assert rc == 1 and "allowed float32 out = 1e+300 does not follow from its baseline" in rows[VICTIM]


def test_a_flipped_byte(capsys, suite):
    path = suite / "cases" / f"{VICTIM}.npz"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert_only_the_victim_fails(capsys, suite, "is not the file the manifest lists",
                                 check_message="size or SHA-256 differs")


def test_a_truncated_file(capsys, suite):
    path = suite / "cases" / f"{VICTIM}.npz"
    path.write_bytes(path.read_bytes()[:1000])
    assert_only_the_victim_fails(capsys, suite, "is not the file the manifest lists",
                                 check_message="size or SHA-256 differs")


def test_a_missing_file(capsys, suite):
    (suite / "cases" / f"{VICTIM}.npz").unlink()
    assert_only_the_victim_fails(capsys, suite, "No such file")


@pytest.mark.parametrize("file", ["../../x.npz", "/etc/passwd", "cases/../../x.npz", "cases//a.npz", "./a.npz"])
def test_paths_outside_the_folder_are_refused(capsys, suite, file):
    outside = suite.parent / "x.npz"
    shutil.copy(suite / "cases" / f"{VICTIM}.npz", outside)
    edit(suite, lambda m, e: e.__setitem__("file", file))
    assert_only_the_victim_fails(capsys, suite, "is not a plain relative path inside the suite")


def test_a_symlinked_case_file_is_refused(capsys, suite):
    outside = suite.parent / "outside.npz"
    target = suite / "cases" / f"{VICTIM}.npz"
    shutil.move(target, outside)
    target.symlink_to(outside)
    assert_only_the_victim_fails(capsys, suite, "is a symbolic link")


def test_a_symlinked_cases_folder_is_refused(capsys, suite):
    moved = suite.parent / "elsewhere"
    shutil.move(suite / "cases", moved)
    (suite / "cases").symlink_to(moved)
    rc, rows, _, _ = verify_rows(capsys, suite)
    assert rc == 1 and all("is a symbolic link" in rows[c] for c in IDS)


@pytest.mark.parametrize("special", ["fifo", "dev-zero", "folder"])
def test_special_files_are_refused_without_reading(capsys, suite, special):
    target = suite / "cases" / f"{VICTIM}.npz"
    target.unlink()
    if special == "fifo":
        os.mkfifo(target)               # reading it would hang
    elif special == "dev-zero":
        target.symlink_to("/dev/zero")  # reading it would never end
    else:
        target.mkdir()
    assert_only_the_victim_fails(capsys, suite, "is a symbolic link" if special == "dev-zero"
                                 else "is not a regular file")


@pytest.mark.parametrize("special", ["dev-zero", "folder", "fifo"])
def test_a_special_manifest_is_a_one_line_error(capsys, suite, special):
    manifest = suite / "manifest.json"
    manifest.unlink()
    if special == "dev-zero":
        manifest.symlink_to("/dev/zero")
    elif special == "folder":
        manifest.mkdir()
    else:
        os.mkfifo(manifest)
    for argv in (["verify", "refattn.adapters:dense", "--golden", str(suite)], ["golden", "check", str(suite)]):
        rc = main(argv)
        out, err = capsys.readouterr()
        assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err


def test_an_array_declaring_a_huge_shape(capsys, suite):
    """A header that declares (10**12,) float64 over a few bytes: refused before allocating."""
    path = suite / "cases" / f"{VICTIM}.npz"
    arrays = golden.read_case(path)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    write_npz(path, arrays, headers={"out": header.getvalue() + b"\0" * 64})
    resync(suite)
    assert_only_the_victim_fails(capsys, suite, "declares shape (1000000000000,)",
                                 check_message="declares shape (1000000000000,)")


def test_a_compressed_member_is_refused(capsys, suite):
    """Case files are stored uncompressed: a deflated member (a bomb, at worst) is refused."""
    path = suite / "cases" / f"{VICTIM}.npz"
    write_npz(path, golden.read_case(path), compress=True)
    resync(suite)
    assert_only_the_victim_fails(capsys, suite, "is compressed")


def test_an_object_array_is_refused(capsys, suite):
    path = suite / "cases" / f"{VICTIM}.npz"
    arrays = golden.read_case(path)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([1, "x"], dtype=object), allow_pickle=True)
    write_npz(path, arrays, headers={"out": buf.getvalue()})
    resync(suite)
    assert_only_the_victim_fails(capsys, suite, "has dtype object")


@pytest.mark.parametrize("change, message", [
    (lambda e: e["shape"].update(Lq=60000, Lk=60000), "needs"),
    (lambda e: e["shape"].update(B=10**7), "needs"),
    (lambda e: e["shape"].update(B=2**40), "shape must give"),
    (lambda e: e.__setitem__("bytes", 10**15), "bytes must be an int in"),
    (lambda e: e.pop("shape"), "missing key(s) ['shape']"),
    (lambda e: e.pop("file"), "missing key(s) ['file']"),
    (lambda e: e.pop("allowed"), "missing key(s) ['allowed']"),
    (lambda e: e.pop("bias"), "missing key(s) ['bias']"),
    (lambda e: e.__setitem__("allowed", []), "allowed must be an object"),
    (lambda e: e["mask"].__setitem__("groups", [5, 5]), "mask.groups"),
    (lambda e: e.__setitem__("scale", "0.5"), "scale must be a finite number"),
    (lambda e: e.__setitem__("sha256", "x" * 64), "sha256 must be 64"),
])
def test_malformed_entries(capsys, suite, change, message):
    edit(suite, lambda m, e: change(e))
    assert_only_the_victim_fails(capsys, suite, message)


@pytest.mark.parametrize("entry", [3, "a string", None, [], {"id": 7}])
def test_an_entry_that_is_no_object_costs_one_case(capsys, suite, entry):
    manifest = json.loads((suite / "manifest.json").read_text())
    manifest["cases"].insert(1, entry)
    (suite / "manifest.json").write_text(json.dumps(manifest))
    rc = main(["verify", "refattn.adapters:dense", "--golden", str(suite)])
    out, err = capsys.readouterr()
    assert rc == 1 and "Traceback" not in out + err
    assert "3 passed, 0 failed, 1 errors, 0 unsupported, of 4 case(s)" in out
    assert [c.id for c in golden_cases(golden_dir=suite)] == [IDS[0], "?", *IDS[1:]]


def test_shapes_that_do_not_match_the_arrays(capsys, suite):
    """The manifest's shape must be the arrays' (inside the file size, so the form check passes)."""
    edit(suite, lambda m, e: e["shape"].update(D=e["shape"]["D"] // 2))
    rc, rows, _, _ = verify_rows(capsys, suite)
    assert rc == 1 and "array 'q' has shape" in rows[VICTIM]


def test_a_deeply_nested_manifest_is_a_one_line_error(capsys, suite):
    (suite / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    rc = main(["golden", "check", str(suite)])
    _, err = capsys.readouterr()
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err


def test_generate_refuses_a_symlinked_cases_folder(capsys, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "cases").symlink_to(elsewhere)
    assert main(["golden", "generate", "--out", str(out), "--filter", "shape-l1"]) == 1
    assert "is a symbolic link" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []


def test_forged_entries_that_pass_the_form_check_cost_one_case(capsys, suite):
    """Entries whose form is right but whose arrays are not what the entry needs: the verifier
    checks them before building anything (found by review: each crashed a run)."""
    def drop_allowed(m, e):
        del e["allowed"]["float32"]["out"]
    edit(suite, drop_allowed)
    rc, rows, _, _ = verify_rows(capsys, suite)
    assert rc == 1 and "allowed float32 must give exactly" in rows[VICTIM]


def test_a_non_string_id_is_one_row_in_check(capsys, suite):
    manifest = json.loads((suite / "manifest.json").read_text())
    manifest["cases"].append({"id": 5})
    (suite / "manifest.json").write_text(json.dumps(manifest))
    rc, _, out, err = check_rows(capsys, suite)
    assert rc == 1 and "3 of 4 case(s) pass" in out
