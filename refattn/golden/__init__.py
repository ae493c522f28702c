"""The golden suite: cases, their generation by two routes, the file format, the check and
the tolerance policy (spec/golden-format.md, spec/tolerance.md).

    from refattn import golden
    golden.suite()                       # the built-in cases (`golden.cases`)
    golden.generate("out/")              # compute and write them (`golden.generate`)
    golden.check("golden/")              # checksums, then every case regenerated (`golden.check`)
    golden.default_golden_dir()          # the suite used when none is named (`golden.locate`)

Modules, bottom to top: `cases` (what a case is, its inputs, the suite), `routes` (the two
routes and their agreement), `lowp` and `tolerance` (the low-precision baselines and the
allowed error), `casefile` (the ``.npz`` format), `manifest` (``manifest.json``),
`generate`, `check` and `locate` (where a suite is found).
"""

from .casefile import case_arrays, read_case, sha256, write_case
from .cases import (CASE_LIST_FORMAT, CASE_LIST_SCHEMA, GRID_MAX, GRID_STEP, TIERS, Case, case_list, case_mask,
                    cases_from_list, grid_values, id_matches, make_inputs, read_case_list, select, suite, tier)
from .check import CheckResult, check, check_case
from .generate import generate
from .locate import default_golden_dir, resolve_golden_dir
from .manifest import (FORMAT, SCHEMA_VERSION, check_entry, entry_id, load_manifest, manifest_entry, manifest_header,
                       select_entries)
from .routes import AGREEMENT_BOUND, ROUTES, agreement, compute_case, run_route
from .tolerance import ATOL_ULPS, BASELINE_RTOL, EPS, FACTOR, INPUT_DTYPES, TENSORS, allowed, baselines

__all__ = [
    "CASE_LIST_FORMAT", "CASE_LIST_SCHEMA", "TIERS", "case_list", "cases_from_list", "read_case_list", "tier",
    "AGREEMENT_BOUND", "ATOL_ULPS", "BASELINE_RTOL", "EPS", "FACTOR", "FORMAT", "GRID_MAX", "GRID_STEP",
    "INPUT_DTYPES", "ROUTES", "SCHEMA_VERSION", "TENSORS", "Case", "CheckResult", "agreement", "allowed",
    "baselines", "case_arrays", "case_mask", "check", "check_case", "check_entry", "entry_id", "compute_case", "default_golden_dir",
    "generate", "grid_values", "id_matches", "load_manifest", "make_inputs", "manifest_entry", "manifest_header",
    "read_case", "resolve_golden_dir", "run_route", "select", "select_entries", "sha256", "suite", "write_case",
]
