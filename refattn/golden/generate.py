"""``refattn golden generate``: compute cases by both routes and write them with a manifest."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import RefattnError
from .casefile import case_arrays, write_case
from .cases import select, suite
from .manifest import manifest_entry, manifest_header
from .routes import compute_case


def generate(out_dir, expr: str | None = None, progress=None) -> dict:
    """Write the selected cases and ``manifest.json`` under ``out_dir``; return the manifest.
    ``progress(i, n, case_id)`` is called before each case."""
    out = Path(out_dir)
    (out / "cases").mkdir(parents=True, exist_ok=True)
    cases = select(suite(), expr)
    if not cases:
        raise RefattnError(f"--filter {expr!r} selects no case (`refattn golden list` lists them)")
    entries = []
    for i, case in enumerate(cases):
        if progress is not None:
            progress(i, len(cases), case.id)
        inputs, gold, agree = compute_case(case)
        data = write_case(out / "cases" / f"{case.id}.npz", case_arrays(case, inputs, gold))
        entries.append(manifest_entry(case, inputs, gold, agree, data))
    if progress is not None:
        progress(len(cases), len(cases), "")
    manifest = {**manifest_header(), "cases": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest
