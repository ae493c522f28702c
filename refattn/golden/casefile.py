"""The case file: a case's arrays in an uncompressed ``.npz`` (spec/golden-format.md).

`case_arrays` lays out the arrays by name, `write_case` writes them with fixed entry dates
(a file's bytes depend on its content only), and `read_case` loads them back.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..bias import ALiBi, SparseBias
from ..errors import RefattnError
from ..mask import Mask
from .cases import Case

#: A fixed date for the archive's entries, so that a case's bytes depend on its content only.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _per_bh(grid_leaves: list[list[np.ndarray]], B: int, H: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Leaves of a (possibly broadcast) per-(b, h) grid of nonzero values, expanded to every
    (b, h) in row-major order: ``(values, offsets)``."""
    bv, hv = len(grid_leaves), len(grid_leaves[0])
    leaves = [np.asarray(grid_leaves[b if bv > 1 else 0][h if hv > 1 else 0]) for b in range(B) for h in range(H)]
    offsets = np.concatenate([[0], np.cumsum([x.shape[0] for x in leaves])]).astype(np.int64)
    values = np.concatenate(leaves).astype(dtype) if leaves else np.zeros(0, dtype)
    return values, offsets


def case_arrays(case: Case, inputs: dict, outputs: dict) -> dict[str, np.ndarray]:
    """The arrays of the case file (spec/golden-format.md), by name."""
    mask: Mask = inputs["mask"]
    csrs = [csr for _, _, csr in mask.iter_groups()]
    arrays = {"q": inputs["q"], "k": inputs["k"], "v": inputs["v"], "dout": inputs["dout"]}
    if inputs["dlse"] is not None:
        arrays["dlse"] = inputs["dlse"]
    arrays["mask_indptr"] = np.stack([np.asarray(c.indptr, np.int64) for c in csrs])
    arrays["mask_indices"] = np.concatenate([np.asarray(c.indices, np.int64) for c in csrs])
    arrays["mask_offsets"] = np.concatenate([[0], np.cumsum([c.nnz for c in csrs])]).astype(np.int64)
    bias = inputs["bias"]
    if isinstance(bias, SparseBias):
        arrays["bias_values"], arrays["bias_offsets"] = _per_bh(bias.grid.grid, case.B, case.H, np.float64)
    elif isinstance(bias, ALiBi):
        arrays["alibi_slopes"] = np.asarray(bias.slopes, np.float64)
    elif bias is not None:
        arrays["bias"] = np.asarray(bias, np.float64)
    if inputs["dropout"] is not None:
        arrays["dropout_keep"], arrays["dropout_offsets"] = _per_bh(inputs["dropout"].grid.grid, case.B, case.H,
                                                                    np.uint8)
    for name in ("out", "lse", "dq", "dk", "dv"):
        arrays[name] = np.asarray(outputs[name], np.float64)
    if "dbias" in outputs:
        if isinstance(bias, SparseBias):
            dbias = outputs["dbias"]
            leaves = [[np.asarray(x) for x in row] for row in dbias] if not isinstance(dbias, np.ndarray) else \
                [[dbias[b, h] for h in range(dbias.shape[1])] for b in range(dbias.shape[0])]
            arrays["dbias_values"], _ = _per_bh(leaves, case.B, case.H, np.float64)
        else:
            arrays["dbias"] = np.asarray(outputs["dbias"], np.float64)
    return {name: np.ascontiguousarray(a) for name, a in arrays.items()}


def write_case(path, arrays: dict[str, np.ndarray]) -> bytes:
    """Write ``arrays`` as an uncompressed ``.npz`` with fixed entry dates; return its bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            entry = io.BytesIO()
            np.lib.format.write_array(entry, arrays[name], allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, entry.getvalue())
    data = buf.getvalue()
    write_atomic(path, data)
    return data


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, moved into
    place: a reader never sees half a file, and a symbolic link at ``path`` is replaced,
    never written through."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_case(path) -> dict[str, np.ndarray]:
    """The arrays of a case file; `RefattnError` (not a traceback) if it is unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {name: z[name] for name in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise RefattnError(f"golden: cannot read case file {path}: {type(e).__name__}: {e}") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
