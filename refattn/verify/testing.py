"""pytest helpers: drop the golden suite into another project's tests.

.. code-block:: python

    import pytest
    from refattn.testing import assert_matches_golden, golden_cases

    from mypkg.attn import forward as my_attention      # your kernel, in the calling convention

    @pytest.mark.parametrize("case", golden_cases(filter="pattern-*"), ids=str)
    def test_my_kernel(case):
        assert_matches_golden(my_attention, case, dtype="float16")

``my_attention`` follows the verifier's calling convention (spec/verify.md; examples in
`refattn.adapters`), with an optional ``backward`` attribute. A case it cannot express is
skipped (``pytest.skip``), never passed. Without ``golden_dir`` the suite is found by the
rule of `refattn.golden.locate`, the same as the command line's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import golden
from ..errors import RefattnError
from ..golden import default_golden_dir
from ..golden.trust import load_case
from .impl import Impl
from .runner import verify_case


@dataclass(frozen=True)
class GoldenCase:
    """A case of a golden suite: its folder and manifest entry. ``str(case)`` is its id."""

    golden_dir: Path
    entry: dict

    @property
    def id(self) -> str:
        return golden.entry_id(self.entry)

    def __str__(self) -> str:
        return self.id

    def arrays(self) -> dict:
        """The case file's arrays, checked as `refattn.golden.trust` checks an untrusted suite."""
        return load_case(self.golden_dir, self.entry)


def golden_cases(filter: str | None = None, golden_dir=None) -> list[GoldenCase]:  # noqa: A002
    """The suite's cases whose id matches ``filter`` (comma-separated shell patterns), for
    ``pytest.mark.parametrize``; ``golden_dir`` defaults to `refattn.golden.default_golden_dir`."""
    gdir = golden.resolve_golden_dir(golden_dir)
    entries = golden.load_manifest(gdir)["cases"]
    if filter is not None:
        entries = [e for e in entries if isinstance(e, dict) and golden.id_matches(e.get("id"), filter)]
    return [GoldenCase(gdir, e) for e in entries]


def assert_matches_golden(fn, case: GoldenCase, dtype: str = "float32", *, backward=None,
                          layout: str = "bhsd", framework: str = "numpy") -> None:
    """Run ``fn`` (and its backward) on ``case`` and fail the test with the verifier's
    diagnosis unless every tensor is within the allowed error (spec/tolerance.md).
    Skips the test for a case ``fn`` cannot express."""
    import pytest

    impl = Impl(fn, backward if backward is not None else getattr(fn, "backward", None),
                getattr(fn, "__name__", "impl"))
    v = verify_case(impl, case.golden_dir, case.entry, dtype, layout, framework)
    if v.status == "unsupported":
        pytest.skip(f"{case.id}: unsupported: {v.message}")
    if v.status == "error":
        raise AssertionError(f"{case.id}: {v.message}")
    if v.status != "pass":
        t = v.first_failure
        raise AssertionError(f"{case.id} ({dtype}): {t.name} is off by {t.error:.3g}, allowed {t.allowed:.3g} "
                             f"({t.ratio:.1f}x){': ' + t.note if t.note else ''}")


__all__ = ["GoldenCase", "golden_cases", "assert_matches_golden", "default_golden_dir", "RefattnError"]
