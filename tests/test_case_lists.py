"""Cases as data (spec/golden-format.md, "Case lists"): a case is its dict, a tier is a list
of them, the manifest records each case as the list does, and a user-written list
generates, checks and verifies like the built-in suite."""

import json
from pathlib import Path

import pytest

from refattn import RefattnError, golden
from refattn.cli import main
from refattn.golden import Case

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())


def test_every_case_is_its_dict():
    for case in golden.suite():
        d = case.to_dict()
        assert json.loads(json.dumps(d)) == d
        assert Case.from_dict(d) == case


def test_the_manifest_records_each_case_as_the_list_does():
    listed = {c["id"]: c for c in golden.case_list(golden.tier("core"), "core")["cases"]}
    assert [e["id"] for e in MANIFEST["cases"]] == list(listed)
    for e in MANIFEST["cases"]:
        assert e["case"] == listed[e["id"]]
        assert e["shape"] == e["case"]["shape"] and e["seed"] == e["case"]["seed"]


def test_golden_cases_prints_a_list_that_reads_back(capsys):
    assert main(["golden", "cases", "--tier", "core", "--filter", "feature-*"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["format"] == "refattn-golden-cases" and data["schema_version"] == 2 and data["tier"] == "core"
    cases = golden.cases_from_list(data, "printed")
    assert [c.id for c in cases] == [c.id for c in golden.suite() if c.id.startswith("feature-")]


def test_a_user_written_list_generates_checks_and_verifies(capsys, tmp_path):
    """Start from a tier's list, edit it (a longer sequence, another seed, a new id), build it."""
    base = Case.from_dict(next(c for c in golden.case_list(golden.suite())["cases"] if c["id"] == "feature-gqa"))
    mine = base.to_dict() | {"id": "mine-gqa-long", "seed": 7, "shape": {**base.shape, "Lq": 70, "Lk": 70}}
    explicit = next(c for c in golden.suite() if c.mask is not None).to_dict() | {"id": "mine-empty", "seed": 8}
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"format": "refattn-golden-cases", "schema_version": 2, "tier": None,
                                "cases": [mine, explicit]}))
    out = tmp_path / "suite"
    assert main(["golden", "generate", "--cases", str(path), "--out", str(out)]) == 0
    assert "wrote 2 case(s)" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["case"] for e in manifest["cases"]] == [mine, explicit]
    assert main(["golden", "check", str(out)]) == 0                     # regenerated from the recorded cases
    assert "2 of 2 case(s) pass; the suite is intact" in capsys.readouterr().out
    assert main(["verify", "refattn.adapters:dense", "--golden", str(out)]) == 0
    assert main(["golden", "list", "--cases", str(path)]) == 0
    assert "mine-gqa-long" in capsys.readouterr().out


def test_check_regenerates_what_the_manifest_records(capsys, tmp_path):
    """An entry whose recorded case was edited is found: its inputs are no longer its seed's."""
    out = tmp_path / "suite"
    golden.generate(out, "shape-l1")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["cases"][0]["case"]["seed"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(["golden", "check", str(out)]) == 1
    assert "differs from its regeneration" in capsys.readouterr().out


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("seed"), "expected an object with the keys"),
    (lambda d: d.update(extra=1), "expected an object with the keys"),
    (lambda d: d.update(id="has space"), "id must be"),
    (lambda d: d.update(group="Feature!"), "group must be"),
    (lambda d: d.update(mask="random_empty_rows"), "give exactly one of pattern"),
    (lambda d: d.update(pattern=None), "give exactly one of pattern"),
    (lambda d: d.update(pattern={"name": "nope"}), "unknown pattern 'nope'"),
    (lambda d: d["shape"].update(H=3), "not a multiple of shape.Hkv"),
    (lambda d: d["shape"].update(Lq=0), r"shape.Lq must be an int in \[1, 2147483647\]"),
    (lambda d: d.update(seed=-1), r"seed must be an int in \[0"),
    (lambda d: d.update(features="gqa"), "features must be a list"),
    (lambda d: d["options"].update(bias="other"), "options.bias must be one of"),
    (lambda d: d["options"].update(dropout_p=1.0), r"options.dropout_p must be in \[0, 1\)"),
    (lambda d: d["options"].update(softcap=-1), "options.softcap must be null or a finite number > 0"),
    (lambda d: d["options"].update(dlse=1), "options.dlse must be true or false"),
    (lambda d: d["options"].pop("scale"), "options must give exactly"),
])
def test_malformed_cases_are_named(change, message):
    d = json.loads(json.dumps(next(c for c in golden.suite() if c.id == "feature-gqa").to_dict()))
    change(d)
    with pytest.raises(RefattnError, match=message):
        Case.from_dict(d)


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON"),
    ('{"format": "x"}', "not a refattn case list"),
    ('{"format": "refattn-golden-cases", "schema_version": 1, "cases": []}', "schema version 1"),
    ('{"format": "refattn-golden-cases", "schema_version": 2, "cases": []}', "has no cases"),
])
def test_malformed_lists_are_one_line(capsys, tmp_path, text, message):
    path = tmp_path / "l.json"
    path.write_text(text)
    assert main(["golden", "generate", "--cases", str(path), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_id_twice_is_refused(tmp_path):
    d = golden.suite()[0].to_dict()
    with pytest.raises(RefattnError, match="appears twice"):
        golden.cases_from_list({"format": "refattn-golden-cases", "schema_version": 2, "cases": [d, d]}, "list")


def test_unknown_tier():
    with pytest.raises(RefattnError, match=r"unknown tier 'huge'; the tiers are \['core'\]"):
        golden.tier("huge")
