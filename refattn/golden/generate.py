"""``refattn golden generate``: compute cases by both routes and write them with a manifest.

Generating into a folder that already holds a suite adds to it: the cases regenerated
replace their old entries, every other entry is kept (a ``--filter`` never drops cases it
did not regenerate), in the order of the case list generated. The case files are written
under temporary names and moved into place, and the manifest read, merged and written, all
under one lock on the folder: concurrent runs into one folder keep each other's cases, and
every listed file is the one its entry describes (spec/golden-format.md, "Generating into
a folder").
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from ..errors import RefattnError
from .casefile import case_arrays, case_bytes, write_atomic, write_temporary
from .cases import Case, select, suite
from .manifest import FORMAT, SCHEMA_VERSION, manifest_entry, manifest_header
from .routes import compute_case

try:                                    # POSIX: advisory locks; elsewhere runs are not serialised
    import fcntl
except ImportError:                     # pragma: no cover - Windows
    fcntl = None


def _folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise RefattnError(f"golden generate: --out {out} is a file, not a folder")
    try:
        (out / "cases").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RefattnError(f"golden generate: cannot create {out / 'cases'}: {e.strerror or e}") from None
    if (out / "cases").is_symlink():      # files are written only inside --out, never through a link
        raise RefattnError(f"golden generate: {out / 'cases'} is a symbolic link; a suite's cases are written "
                           "into a folder of its own")
    if not os.access(out / "cases", os.W_OK) or not os.access(out, os.W_OK):
        raise RefattnError(f"golden generate: cannot write to {out}: permission denied")


def existing_entries(out: Path) -> list[dict]:
    """The entries of the manifest already in ``out`` (none if there is none); `RefattnError`
    if there is one this refattn cannot add to, so that nothing in it is lost."""
    path = out / "manifest.json"
    if not path.exists() and not path.is_symlink():
        return []
    manifest, why = None, None
    if path.is_symlink() or not path.is_file():
        why = "not a regular file"
    else:
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            why = f"unreadable: {e}"
    if why is None and (not isinstance(manifest, dict) or manifest.get("format") != FORMAT):
        why = "not a refattn golden manifest"
    elif why is None and manifest.get("schema_version") != SCHEMA_VERSION:
        why = f"schema version {manifest.get('schema_version')!r}, this refattn writes {SCHEMA_VERSION}"
    elif why is None and (not isinstance(manifest.get("cases"), list)
                          or not all(isinstance(e, dict) and isinstance(e.get("id"), str) for e in manifest["cases"])):
        why = "its list of cases is malformed"
    if why is not None:
        raise RefattnError(f"golden generate: {path} is there but cannot be added to ({why}); write to another "
                           f"--out, or move it away")
    return manifest["cases"]


def merge(kept: list[dict], fresh: dict[str, dict], order: list[str]) -> list[dict]:
    """``kept`` with the ``fresh`` entries (by id) in their place, the new ones added; in the
    order of the ids in ``order`` (the case list generated), then the others in their old order."""
    order = {cid: i for i, cid in enumerate(order)}
    by_id = {e["id"]: e for e in kept}
    by_id.update(fresh)
    old_position = {e["id"]: i for i, e in enumerate(kept)}
    return sorted(by_id.values(), key=lambda e: (order.get(e["id"], len(order)), old_position.get(e["id"], 0)))


@contextlib.contextmanager
def _locked(out: Path):
    """An exclusive lock on the folder itself (no lock file is left in the suite)."""
    if fcntl is None:                   # pragma: no cover
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                    # closing releases the lock


def generate(out_dir, expr: str | None = None, progress=None, cases: list[Case] | None = None) -> dict:
    """Write the ``cases`` (default: the built-in suite, tier ``core``) that ``expr`` selects
    under ``out_dir`` and merge them into its ``manifest.json`` (see the module); return the
    manifest. ``progress(i, n, case_id)`` is called before each case."""
    out = Path(out_dir)
    _folder(out)
    existing_entries(out)               # refuse before the work, not after it
    listed = suite() if cases is None else list(cases)
    cases = select(listed, expr)
    if not cases:
        raise RefattnError(f"--filter {expr!r} selects no case (`refattn golden list` lists them)")
    fresh, pending = {}, []                 # case files wait under temporary names until the lock
    try:
        for i, case in enumerate(cases):
            if progress is not None:
                progress(i, len(cases), case.id)
            inputs, gold, agree = compute_case(case)
            data = case_bytes(case_arrays(case, inputs, gold))
            final = out / "cases" / f"{case.id}.npz"
            pending.append((write_temporary(final, data), final))
            fresh[case.id] = manifest_entry(case, inputs, gold, agree, data)
        if progress is not None:
            progress(len(cases), len(cases), "")
        with _locked(out):                  # the files and the manifest that lists them, together
            manifest = {**manifest_header(), "cases": merge(existing_entries(out), fresh, [c.id for c in listed])}
            while pending:
                tmp, final = pending.pop()
                os.replace(tmp, final)
            write_atomic(out / "manifest.json", (json.dumps(manifest, indent=1) + "\n").encode())
    finally:
        for tmp, _ in pending:              # an error or Ctrl-C: no temporary file is left behind
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return manifest
