"""One rule finds the golden suite when none is named (refattn/golden/locate.py), for the
command line and the library alike: $REFATTN_GOLDEN, ./golden, the source checkout's
golden/, else the built-in suite generated once into the user cache."""

import json
import shutil
from pathlib import Path

import pytest

from refattn import golden
from refattn.errors import RefattnError
from refattn.golden import locate
from refattn.testing import golden_cases

GOLDEN = Path(__file__).resolve().parent.parent / "golden"


def small_suite(folder: Path, cid: str = "pattern-causal") -> Path:
    """A one-case copy of the committed suite."""
    (folder / "cases").mkdir(parents=True)
    manifest = json.loads((GOLDEN / "manifest.json").read_text())
    manifest["cases"] = [e for e in manifest["cases"] if e["id"] == cid]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    shutil.copy(GOLDEN / "cases" / f"{cid}.npz", folder / "cases")
    return folder


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A working folder with no suite, no REFATTN_GOLDEN, an empty user cache."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("REFATTN_GOLDEN", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path


def test_the_checkout_is_found_from_anywhere(elsewhere):
    assert locate.CHECKOUT_GOLDEN == GOLDEN
    assert golden.default_golden_dir() == GOLDEN
    assert [c.id for c in golden_cases(filter="pattern-causal")] == ["pattern-causal"]


def test_the_current_folder_comes_before_the_checkout(elsewhere):
    small_suite(Path("golden"))
    assert golden.default_golden_dir() == Path("golden")
    assert [c.id for c in golden_cases()] == ["pattern-causal"]


def test_refattn_golden_comes_first(elsewhere, monkeypatch):
    small_suite(Path("golden"))
    mine = small_suite(elsewhere / "mine", "shape-l1")
    monkeypatch.setenv("REFATTN_GOLDEN", str(mine))
    assert golden.default_golden_dir() == mine
    assert [c.id for c in golden_cases()] == ["shape-l1"]


def test_a_bad_refattn_golden_is_an_error(elsewhere, monkeypatch):
    monkeypatch.setenv("REFATTN_GOLDEN", str(elsewhere / "nothing"))
    with pytest.raises(RefattnError, match=r"REFATTN_GOLDEN=.*nothing is not a golden suite .*--golden DIR"):
        golden.default_golden_dir()


def test_a_named_folder_must_be_a_suite(elsewhere):
    with pytest.raises(RefattnError, match=r"is not a golden suite \(no such folder\).*golden_dir="):
        golden.resolve_golden_dir(elsewhere / "nope")
    with pytest.raises(RefattnError, match=r"is not a golden suite \(no manifest.json in it\)"):
        golden_cases(golden_dir=elsewhere)


def test_without_any_suite_the_built_in_one_is_generated_once(elsewhere, monkeypatch, capsys):
    monkeypatch.setattr(locate, "CHECKOUT_GOLDEN", elsewhere / "no-checkout")
    cache = locate.cache_golden_dir()
    assert str(cache).startswith(str(elsewhere / "cache" / "refattn" / "golden-"))
    assert golden.default_golden_dir() == cache
    err = capsys.readouterr().err
    assert f"refattn: generating the built-in golden suite once into {cache}" in err
    assert "refattn: generated 54 cases" in err
    ours = json.loads((cache / "manifest.json").read_text())["cases"]
    committed = json.loads((GOLDEN / "manifest.json").read_text())["cases"]
    assert [e["id"] for e in ours] == [e["id"] for e in committed]
    assert golden.default_golden_dir() == cache and capsys.readouterr().err == ""   # once
    assert list(cache.parent.glob(f".{cache.name}.*")) == []                        # no temporary left


def test_an_unfinished_cache_is_replaced(elsewhere, monkeypatch):
    """A cache folder without its manifest (an interrupted older run) is generated anew;
    generation itself is replaced by a small stand-in here."""
    monkeypatch.setattr(locate, "CHECKOUT_GOLDEN", elsewhere / "no-checkout")
    cache = locate.cache_golden_dir()
    (cache / "cases").mkdir(parents=True)
    (cache / "cases" / "half.npz").write_bytes(b"half")

    def fake_generate(out):
        small_suite(Path(out) / "x")
        for item in (Path(out) / "x").iterdir():
            item.rename(Path(out) / item.name)
        return json.loads((Path(out) / "manifest.json").read_text())

    monkeypatch.setattr(locate, "generate", fake_generate)
    assert golden.default_golden_dir() == cache
    assert sorted(p.name for p in (cache / "cases").iterdir()) == ["pattern-causal.npz"]
