"""pytest helpers for other projects' test suites: the public name of `refattn.verify.testing`.

    import pytest
    from refattn.testing import golden_cases, assert_matches_golden
"""

from .errors import RefattnError
from .verify.testing import GoldenCase, assert_matches_golden, default_golden_dir, golden_cases

__all__ = ["GoldenCase", "RefattnError", "assert_matches_golden", "default_golden_dir", "golden_cases"]
