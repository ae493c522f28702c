"""The case file: a case's arrays in an uncompressed ``.npz`` (spec/golden-format.md).

`case_arrays` lays out the arrays by name, `write_case` writes them with fixed entry dates
(a file's bytes depend on its content only), and `read_case` loads them back.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import stat
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


def case_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of an uncompressed ``.npz`` with fixed entry dates."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            entry = io.BytesIO()
            np.lib.format.write_array(entry, arrays[name], allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            info.external_attr = 0o644 << 16
            zf.writestr(info, entry.getvalue())
    return buf.getvalue()


def write_case(path, arrays: dict[str, np.ndarray]) -> bytes:
    """Write ``arrays`` as a case file at ``path`` (`case_bytes`, `write_atomic`); return its bytes."""
    data = case_bytes(arrays)
    write_atomic(path, data)
    return data


def write_temporary(path, data: bytes) -> Path:
    """``data`` in a new temporary file beside ``path`` (same folder, so that `os.replace`
    moves it into place atomically); the caller moves or removes it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(tmp)


def write_atomic(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, moved into
    place: a reader never sees half a file, and a symbolic link at ``path`` is replaced,
    never written through."""
    tmp = write_temporary(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---- reading files from a folder that is not trusted (spec/golden-format.md, "Threat model") ----

#: The largest manifest and case file a suite may hold.
MAX_MANIFEST_BYTES = 256 * 2**20
MAX_CASE_BYTES = 4 * 2**30
#: The dtypes a case file's arrays may have.
ARRAY_DTYPES = frozenset(np.dtype(d) for d in ("<f8", "<i8", "|u1", "|b1"))


def check_relative(relpath, what: str) -> Path:
    """``relpath`` as a path inside a folder: relative, no ``..``, no empty or odd parts."""
    if not isinstance(relpath, str) or not relpath or "\0" in relpath or "\\" in relpath:
        raise RefattnError(f"{what}: expected a relative path inside the suite, got {relpath!r}")
    parts = relpath.split("/")
    if relpath.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise RefattnError(f"{what}: {relpath!r} is not a plain relative path inside the suite "
                           "(no leading /, no . or .. parts)")
    return Path(*parts)


def read_confined(folder, relpath: str, limit: int, what: str) -> bytes:
    """The bytes of the regular file ``folder/relpath``, read without following a symbolic
    link below ``folder``, without blocking on a FIFO or device, and only if it holds at
    most ``limit`` bytes; `RefattnError` naming the file otherwise.

    Each component below ``folder`` is opened relative to the one before it with
    ``O_NOFOLLOW`` (and the folders with ``O_DIRECTORY``), so no link, even one swapped in
    while the path is walked, leads out of the folder; the file's type and size are those
    of the file opened (``fstat``), not of a name looked at before."""
    folder = Path(folder)
    rel = check_relative(relpath, what)
    path = folder / rel
    nofollow, nonblock = getattr(os, "O_NOFOLLOW", 0), getattr(os, "O_NONBLOCK", 0)
    directory = getattr(os, "O_DIRECTORY", 0)

    def refuse(err: OSError, where: Path):
        if err.errno == errno.ELOOP or (err.errno == errno.ENOTDIR and where.is_symlink()):
            return RefattnError(f"{what}: {where} is a symbolic link; a suite's files are read only as regular "
                                "files inside its folder")
        if err.errno == errno.ENOTDIR:
            return RefattnError(f"{what}: {where} is not a folder")
        return RefattnError(f"{what}: cannot read {where}: {err.strerror or err}")

    try:
        fd = os.open(folder, os.O_RDONLY | directory)
    except OSError as e:
        raise refuse(e, folder) from None
    try:
        at = folder
        for part in rel.parts[:-1]:
            at = at / part
            try:
                nxt = os.open(part, os.O_RDONLY | directory | nofollow, dir_fd=fd)
            except OSError as e:
                raise refuse(e, at) from None
            os.close(fd)
            fd = nxt
        try:
            ffd = os.open(rel.parts[-1], os.O_RDONLY | nofollow | nonblock, dir_fd=fd)
        except OSError as e:
            raise refuse(e, path) from None
    finally:
        os.close(fd)
    try:
        st = os.fstat(ffd)
        if not stat.S_ISREG(st.st_mode):
            raise RefattnError(f"{what}: {path} is not a regular file")
        if st.st_size > limit:
            raise RefattnError(f"{what}: {path} holds {st.st_size} bytes; at most {limit} expected")
        with os.fdopen(ffd, "rb") as f:
            ffd = None                          # the file object closes it now
            data = f.read(limit + 1)
    finally:
        if ffd is not None:
            os.close(ffd)
    if len(data) > limit:
        raise RefattnError(f"{what}: {path} grew past {limit} bytes while it was read")
    return data


def parse_case(data: bytes, where: str) -> dict[str, np.ndarray]:
    """The arrays of a case file's bytes. Every member's ``.npy`` header is read first: only
    the dtypes of `ARRAY_DTYPES`, no pickles, and a declared shape whose data the member
    holds exactly, so that no header makes it allocate more than the file's size."""
    def bad(why: str) -> RefattnError:
        return RefattnError(f"golden: case file {where} is not a valid case file: {why}")

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise bad(f"{type(e).__name__}: {e}") from None
    arrays: dict[str, np.ndarray] = {}
    with zf:
        for info in infos:
            name = info.filename
            if not name.endswith(".npy") or "/" in name or name[:-4] in arrays:
                raise bad(f"unexpected member {name!r}")
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > len(data):
                raise bad(f"member {name!r} is compressed or larger than the file (case files are stored "
                          "uncompressed)")
            try:
                with zf.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)(member)
                    shape, fortran, dtype = header
                    if dtype not in ARRAY_DTYPES or dtype.hasobject or fortran:
                        raise bad(f"member {name!r} has dtype {dtype}{' (Fortran order)' if fortran else ''}; "
                                  f"case files hold only {sorted(d.str for d in ARRAY_DTYPES)}")
                    count = 1
                    for n in shape:
                        count *= int(n)
                    if count * dtype.itemsize != info.file_size - member.tell():
                        raise bad(f"member {name!r} declares shape {shape} of {dtype}, which its "
                                  f"{info.file_size - member.tell()} data bytes do not hold")
                    values = np.frombuffer(member.read(count * dtype.itemsize), dtype=dtype).reshape(shape)
            except RefattnError:
                raise
            except Exception as e:  # noqa: BLE001  a damaged header fails in tokenize, ast, zlib...: all "bad"
                raise bad(f"member {name!r}: {type(e).__name__}: {e}") from None
            arrays[name[:-4]] = values.copy()       # writable, owned
    return arrays


def read_case(path) -> dict[str, np.ndarray]:
    """The arrays of the case file at ``path``, read as `read_confined` and `parse_case` do
    (in its own folder); `RefattnError` (not a traceback) if it cannot be."""
    path = Path(path)
    return parse_case(read_confined(path.parent, path.name, MAX_CASE_BYTES, "golden"), str(path))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
