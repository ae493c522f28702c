"""spec/ stands on its own: it cites code and documents by name, never a file outside the
repository (`../shared/...` is not there for a reader of the repository)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("page", sorted((ROOT / "spec").glob("*.md")), ids=lambda p: p.name)
def test_no_reference_outside_the_repository(page):
    text = page.read_text()
    outside = re.findall(r"\.\./[\w./-]+", text)
    assert outside == [], f"{page.name} cites files outside the repository: {outside}"
