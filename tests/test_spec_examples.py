"""Every `>>>` example in spec/*.md is executed: the spec cannot drift from the code."""

import doctest
from pathlib import Path

import numpy as np
import pytest

SPEC = Path(__file__).resolve().parent.parent / "spec"
FILES = sorted(SPEC.glob("*.md"))


def test_spec_folder_has_examples():
    assert any("```pycon" in f.read_text() for f in FILES)


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_spec_examples(path):
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    with np.printoptions(precision=6, suppress=True):
        result = doctest.testfile(str(path), module_relative=False, optionflags=flags,
                                  raise_on_error=False, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {path.name}"


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_code_fences_are_balanced(path):
    """doctest ignores fences, so an unclosed one would pass the examples yet swallow
    the sections after it when rendered."""
    fences = [line.strip() for line in path.read_text().splitlines() if line.strip().startswith("```")]
    assert len(fences) % 2 == 0, f"{path.name}: odd number of ``` fences"
    assert all(f != "```" for f in fences[0::2]), f"{path.name}: a fence opens without a language"
    assert all(f == "```" for f in fences[1::2]), f"{path.name}: a block is opened inside another"
