"""``refattn golden check``: a suite's files against its manifest, and each case regenerated.

Each case file's size and SHA-256 are checked first; then the case is regenerated from its
seed by both routes: inputs and mask must be equal, outputs within the agreement bound,
and the measured baselines and allowances within `BASELINE_RTOL` plus the outputs' own
cross-machine drift (spec/golden-format.md, "Checking a suite").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import RefattnError, check_allocation
from .casefile import case_arrays, parse_case, read_confined, sha256
from .cases import Case
from .manifest import check_entry, entry_id, load_manifest, manifest_entry, select_entries
from .routes import AGREEMENT_BOUND, agreement, compute_case, output_drift, term_floors
from .tolerance import ATOL_ULPS, BASELINE_RTOL, EPS, FACTOR
from .trust import check_arrays


@dataclass
class CheckResult:
    case_id: str
    ok: bool
    message: str


def check_case(golden_dir, entry: dict) -> CheckResult:
    """One case: its file's size and checksum, then a regeneration compared with it (a
    malformed manifest entry is a failed check, not a crash)."""
    cid = entry_id(entry)
    try:
        check_entry(entry)
        return _check_case(golden_dir, entry)
    except RefattnError as e:
        return CheckResult(cid, False, str(e))
    except Exception as e:  # noqa: BLE001  whatever a forged entry makes fail is that case's FAIL, not the run's end
        return CheckResult(cid, False, f"the case cannot be checked: {type(e).__name__}: {e}")


#: Manifest keys that are measurements of this machine's routes, compared within bounds
#: (agreement: not at all, it is rounding noise of the two routes) rather than exactly.
_MEASURED = {"agreement", "baselines", "allowed"}


def _check_case(golden_dir, entry: dict) -> CheckResult:
    cid = entry["id"]
    path = Path(golden_dir) / entry["file"]
    # a regular file inside the suite, no larger than the manifest says (MAX_CASE_BYTES at most)
    data = read_confined(golden_dir, entry["file"], entry["bytes"], f"case {cid}")
    if len(data) != entry.get("bytes") or sha256(data) != entry.get("sha256"):
        return CheckResult(cid, False, f"{path.name}: size or SHA-256 differs from the manifest "
                           f"({len(data)} bytes; the file was changed or truncated)")
    case = Case.from_dict(entry.get("case"))      # regenerated from what the manifest records
    if case.id != cid or case.shape != entry["shape"]:
        return CheckResult(cid, False, f"the recorded case is {case.id!r} of shape {case.shape}, not the entry's")
    try:
        stored = parse_case(data, str(path))
        check_arrays(stored, entry)                # the file is the case it says, before any regeneration
        B, H, lq, lk = case.B, case.H, case.Lq, case.Lk
        check_allocation(8 * B * H * lq * lk if case.mask is not None else 0, f"case {cid}'s explicit mask")
        inputs, gold, _ = compute_case(case)
        fresh = case_arrays(case, inputs, gold)
    except RefattnError as e:
        return CheckResult(cid, False, str(e))
    if set(stored) != set(fresh):
        return CheckResult(cid, False, f"arrays {sorted(set(stored) ^ set(fresh))} missing or unexpected")
    outputs = {"out", "lse", "dq", "dk", "dv", "dbias", "dbias_values"}
    for name in sorted(set(fresh) - outputs):                     # inputs and the mask: exactly
        if stored[name].dtype != fresh[name].dtype or not np.array_equal(stored[name], fresh[name]):
            return CheckResult(cid, False, f"input {name!r} differs from its regeneration from seed {case.seed}")
    floors = term_floors(inputs)
    floors["dbias_values"] = floors["dbias"]
    for name in sorted(set(fresh) & outputs):
        got = agreement({name: stored[name]}, {name: fresh[name]}, floors)[name]
        if not got <= AGREEMENT_BOUND:
            return CheckResult(cid, False, f"{name} differs from its regeneration by {got:.3g} (relative) "
                               f"> {AGREEMENT_BOUND}")
    expected = manifest_entry(case, inputs, gold, {}, data)
    for key in sorted(set(expected) | set(entry)):
        if key not in _MEASURED and entry.get(key) != expected.get(key):
            return CheckResult(cid, False, f"manifest key {key!r} is {entry.get(key)!r}, the case gives "
                               f"{expected.get(key)!r}")
    drift = output_drift(gold, floors)
    for key, fresh_values in (("baselines", expected["baselines"]), ("allowed", expected["allowed"])):
        for dt, per in fresh_values.items():
            for name, b in per.items():
                s = entry.get(key, {}).get(dt, {}).get(name)
                # allowed = factor * baseline + atol_ulps * eps * max|gold| moves with both terms
                slack = drift[name] * ((FACTOR[dt][name] + ATOL_ULPS * EPS[dt]) if key == "allowed" else 1.0)
                if not isinstance(s, (int, float)) or not abs(s - b) <= BASELINE_RTOL * b + slack:
                    return CheckResult(cid, False, f"{key} {dt} {name} = {s!r} in the manifest, {b:.6g} recomputed")
    return CheckResult(cid, True, "ok")


def check(golden_dir, expr: str | None = None, progress=None) -> list[CheckResult]:
    """Check every (selected) case of the suite in ``golden_dir``."""
    manifest = load_manifest(golden_dir)
    entries = select_entries(manifest["cases"], expr, str(golden_dir))
    results = []
    for i, entry in enumerate(entries):
        if progress is not None:
            progress(i, len(entries), entry.get("id", "?"))
        results.append(check_case(golden_dir, entry))
    if progress is not None:
        progress(len(entries), len(entries), "")
    return results
