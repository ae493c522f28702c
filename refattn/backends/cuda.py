"""The cuda route: numba.cuda kernels with the one contract, deterministic without atomics.

Forward: a thread block per (query block, head, batch) walks the non-empty key blocks of
its query block, staging ``K_J`` and ``V_J`` in shared memory, one thread per query row
with an online softmax (spec/backends.md, "cuda"). Backward in two kernels: ``dQ`` over
the same blocks, ``dK``/``dV`` per (key block, kv head, batch) over the transposed block
layout. The kernels are in `_cuda_kernels`; this module moves arrays, checks sizes and
launches them.

Arrays: NumPy arrays go to the device and the results come back as NumPy arrays. When
``q``, ``k`` or ``v`` is a device array (anything with ``__cuda_array_interface__``:
CuPy, torch CUDA tensors, Numba device arrays), the call stays on the device: device
inputs are used in place (any strides; converted on the device when their dtype is not
the compute dtype), host inputs of the same call are copied over, and ``out``, ``lse``,
``dq``, ``dk``, ``dv`` come back as Numba device arrays (which expose
``__cuda_array_interface__``: ``torch.as_tensor(x, device="cuda")`` and
``cupy.asarray(x)`` take them without a copy). The bias, dropout keep-mask and
``dbias`` stay host objects. A mask's arrays are copied to the device once per block
size and kept with the mask.

Available when Numba finds a CUDA GPU, or under Numba's CUDA simulator
(``NUMBA_ENABLE_CUDASIM=1``, for tests: about 60 us per (query, key) pair).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from .. import _runtime
from . import _cuda_kernels as K
from ._host import bias_args, dbias_buffers, dbias_reduce, drop_args, group_ids, plan
from ..contract import HOST, Grads, HostArrays, Problem, Result, on_cuda_device
from ..errors import RefattnError

COMPUTE_DTYPES = (np.float64, np.float32)

# numba-cuda announces its compiles through its own copy of Numba's event API.
_runtime.install_compile_notice("numba.cuda.core.event")

#: Largest block size: a block's threads, and entries of a tile row held as int16.
MAX_BLOCK = 256
#: Block sizes tried by default, largest first: the first whose kernels fit in shared memory.
_DEFAULT_BLOCKS = (64, 32, 16, 8, 4, 2, 1)
#: The device dtypes taken as inputs (bfloat16 has no Numba type: convert it first).
DEVICE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
#: The grid's y and z dimensions (heads, batch) are limited to this.
MAX_GRID_YZ = 65535


def _block_size(value, name: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_BLOCK:
        raise RefattnError(f"{name} must be None (chosen to fit shared memory) or an int in "
                           f"[1, {MAX_BLOCK}], got {value!r}")
    return int(value)


OPTIONS = {"block_q": (_block_size, None), "block_k": (_block_size, None)}


def simulated() -> bool:
    """Whether numba.cuda is Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, read when
    numba.cuda is first imported)."""
    from numba.cuda import config
    return bool(config.ENABLE_CUDASIM)


# ---- where arrays live ------------------------------------------------------------------

class DeviceArrays(HostArrays):
    """Arrays of a call that runs on the device (see the module docstring): device arrays
    are taken in place, host arrays of the same call are checked on the host and copied."""

    name = "cuda"

    def owns(self, x) -> bool:
        """Whether ``x`` is a device array."""
        if isinstance(x, np.ndarray):
            return False
        if simulated():
            from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
            return isinstance(x, FakeCUDAArray)
        return on_cuda_device(x)

    def adopt(self, x, name: str, ndim: int | None = None):
        if not self.owns(x):
            a = HOST.adopt(x, name, ndim)
            return cuda.to_device(np.ascontiguousarray(a if a.dtype in DEVICE_DTYPES else a.astype(np.float64)))
        try:
            a = x if simulated() else cuda.as_cuda_array(x)
        except Exception as e:  # a malformed or unsupported interface (e.g. torch's bfloat16)
            raise RefattnError(f"{name}: cannot read its __cuda_array_interface__ ({e})") from None
        if a.dtype not in DEVICE_DTYPES:
            raise RefattnError(f"{name}: device arrays must be float16, float32 or float64; got {a.dtype}")
        if ndim is not None and a.ndim != ndim:
            raise RefattnError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
        return a

    def first_nonfinite(self, a, allow_neginf: bool = False):
        if isinstance(a, np.ndarray):
            return HOST.first_nonfinite(a, allow_neginf)
        first = cuda.to_device(np.array([a.size], np.int64))
        kernel = {4: K.first_bad4, 3: K.first_bad3}[a.ndim]
        kernel[_elementwise_grid(a.size)](a, allow_neginf, first)
        x = int(first.copy_to_host()[0])
        return None if x == a.size else tuple(int(i) for i in np.unravel_index(x, a.shape))

    def first_bad_lse(self, p: Problem, lse):
        if isinstance(lse, np.ndarray):
            return HOST.first_bad_lse(p, lse)
        empty = np.stack([np.diff(csr.indptr) == 0 for _, _, csr in p.mask.iter_groups()])
        first = cuda.to_device(np.array([lse.size], np.int64))
        K.first_bad_lse[_elementwise_grid(lse.size)](lse, cuda.to_device(empty), cuda.to_device(group_ids(p)),
                                                    first)
        x = int(first.copy_to_host()[0])
        return None if x == lse.size else tuple(int(i) for i in np.unravel_index(x, lse.shape))

    def to_backend(self, a):
        return a  # converted to the compute dtype on the device, by the backend


#: Taken by ``refattn.forward`` / ``backward`` when q, k or v is a device array.
DEVICE_ARRAYS = DeviceArrays()


def _elementwise_grid(n: int) -> tuple[int, int]:
    """(blocks, threads) for the grid-stride kernels; few threads under the simulator,
    where each is a Python thread."""
    if simulated():
        return 2, 4
    threads = 256
    return max(1, min(4096, -(-n // threads))), threads


# ---- sizes ------------------------------------------------------------------------------

def block_sizes(dtype, dim: int, dim_v: int, block_q=None, block_k=None) -> tuple[int, int]:
    """The ``(block_q, block_k)`` a call uses: the given ones, else the largest of
    64, 32, ... whose kernels fit in `_cuda_kernels.SHARED_BYTES` of shared memory
    (``block_k`` first, for the forward's staged K and V, and for dK/dV with a given
    ``block_q``; then ``block_q`` for dK/dV)."""
    isz = np.dtype(dtype).itemsize
    fits_fwd = lambda bk: K.forward_shared_bytes(isz, 1, bk, dim, dim_v) <= K.SHARED_BYTES  # noqa: E731
    fits_bwd = lambda bq, bk: K.dkdv_shared_bytes(isz, bq, bk, dim, dim_v) <= K.SHARED_BYTES  # noqa: E731
    if block_k is not None:
        bk = block_k
    elif block_q is not None:  # the largest that fits both kernels with the given block_q
        bk = next((b for b in _DEFAULT_BLOCKS if fits_fwd(b) and fits_bwd(block_q, b)), 1)
    else:
        bk = next((b for b in _DEFAULT_BLOCKS if fits_fwd(b)), 1)
    bq = block_q if block_q is not None else next((b for b in _DEFAULT_BLOCKS if fits_bwd(b, bk)), 1)
    need = max(K.forward_shared_bytes(isz, bq, bk, dim, dim_v), K.dkdv_shared_bytes(isz, bq, bk, dim, dim_v))
    if need > K.SHARED_BYTES:
        raise RefattnError(
            f"cuda: block_q = {bq}, block_k = {bk} with head dims D = {dim}, Dv = {dim_v} in "
            f"{np.dtype(dtype)} need {need} bytes of shared memory per thread block, more than the "
            f"{K.SHARED_BYTES} it may use; choose smaller blocks"
            + ("" if bq > 1 or bk > 1 else " (these head dims are too large for this backend)"))
    return bq, bk


def _check_grid(p: Problem) -> None:
    if p.heads > MAX_GRID_YZ or p.batch > MAX_GRID_YZ:
        raise RefattnError(f"cuda: B = {p.batch} and H = {p.heads} must each be <= {MAX_GRID_YZ} "
                           "(the grid's y and z dimensions)")


# ---- moving arrays ----------------------------------------------------------------------

def _up(a: np.ndarray):
    """A host array on the device (a 1-element one for an empty array: kernels never read it)."""
    a = np.ascontiguousarray(a)
    return cuda.to_device(a if a.size else np.zeros((1,) * max(a.ndim, 1), a.dtype))


def _in_compute_dtype(a, dt: np.dtype):
    """``a`` on the device in ``dt``: in place when it is already, else converted there."""
    if isinstance(a, np.ndarray):
        return cuda.to_device(np.ascontiguousarray(a, dt))
    if a.dtype == dt:
        return a
    converted = cuda.device_array(a.shape, dt)
    (K.cast4 if a.ndim == 4 else K.cast3)[_elementwise_grid(a.size)](a, converted)
    return converted


def _device_plan(p: Problem, bq: int, bk: int):
    """The mask's arrays and block layout on the device (kept with the mask) and its
    entries per group."""
    key = ("cuda", bq, bk, 0 if simulated() else cuda.get_current_device().id)
    cached = p.mask._layouts.get(key)
    if cached is None:
        pl = plan(p, bq, bk)
        indptr, indices, base, _ = pl.mask
        tile_ptr, tile_key, tile_full, _, tile_query, ttile_ptr, ttile = pl.tiles
        arrays = {name: _up(a) for name, a in (
            ("indptr", indptr), ("indices", indices), ("base", base), ("tile_ptr", tile_ptr),
            ("tile_key", tile_key), ("tile_full", tile_full), ("tile_query", tile_query),
            ("ttile_ptr", ttile_ptr), ("ttile", ttile))}
        cached = (arrays, pl.nnz)
        p.mask._layouts[key] = cached
    return cached


def _bias_and_dropout(p: Problem, dt: np.dtype, has_dlse: bool):
    kind, dense, values, vbase, slopes, offset = bias_args(p, dt)
    keep, kbase, zscale, has_drop, _ = drop_args(p, dt, has_dlse)
    bias = (kind, _up(dense), _up(values), _up(vbase), _up(slopes), offset)
    drop = (_up(keep), _up(kbase), zscale, has_drop)
    return bias, drop


def _result(x, device_call: bool):
    return x if device_call else x.copy_to_host()


def _setup(p: Problem, config):
    _check_grid(p)
    dt = np.dtype(config.compute_dtype)
    bq, bk = block_sizes(dt, p.dim, p.dim_v, config.options["block_q"], config.options["block_k"])
    kernels = K.kernels(dt.name, bq, bk, p.dim, p.dim_v)
    arrays, nnz = _device_plan(p, bq, bk)
    gid = group_ids(p)
    q, k, v = (_in_compute_dtype(x, dt) for x in (p.q, p.k, p.v))
    scalars = (dt.type(p.scale), dt.type(0 if p.softcap is None else p.softcap))
    return dt, bq, bk, kernels, arrays, nnz, gid, (q, k, v), scalars


# ---- the contract -----------------------------------------------------------------------

def forward(p: Problem, config) -> Result:
    """Algorithm 1 with a thread block per (query block, head, batch)."""
    dt, bq, bk, kernels, m, _, gid, (q, k, v), (scale, cap) = _setup(p, config)
    (kind, bdense, bvalues, vbase, slopes, off), (keep, kbase, zscale, has_drop) = _bias_and_dropout(p, dt, False)
    out = cuda.device_array((p.batch, p.heads, p.lq, p.dim_v), dt)
    lse = cuda.device_array((p.batch, p.heads, p.lq), dt)
    kernels.forward[(-(-p.lq // bq), p.heads, p.batch), bq](
        q, k, v, scale, cap, m["indptr"], m["indices"], m["base"], _up(gid), m["tile_ptr"], m["tile_key"],
        m["tile_full"], kind, bdense, bvalues, vbase, slopes, off, keep, kbase, zscale, has_drop, out, lse)
    device_call = not isinstance(p.q, np.ndarray)
    return Result(_result(out, device_call), _result(lse, device_call))


def backward(p: Problem, out, lse, dout, dlse, config) -> Grads:
    """``D = rowsum(dO * O)``; dQ per (query block, head, batch); then dK, dV per
    (key block, kv head, batch) over the transposed layout."""
    dt, bq, bk, kernels, m, nnz, gid, (q, k, v), (scale, cap) = _setup(p, config)
    out, lse, dout = (_in_compute_dtype(x, dt) for x in (out, lse, dout))
    has_dlse = dlse is not None
    dlse = _in_compute_dtype(dlse, dt) if has_dlse else _up(np.zeros((1, 1, 1), dt))
    (kind, bdense, bvalues, vbase, slopes, off), (keep, kbase, zscale, has_drop) = \
        _bias_and_dropout(p, dt, has_dlse)
    nnz_bh = nnz[gid]
    mode, host_bufs = dbias_buffers(p, nnz_bh, dt)
    bufs = {name: _up(a) for name, a in host_bufs.items()}
    gid_d = _up(gid)
    Drow = cuda.device_array((p.batch, p.heads, p.lq), dt)
    kernels.rowdot[_elementwise_grid(p.batch * p.heads * p.lq)](dout, out, Drow)
    dq = cuda.device_array(q.shape, dt)
    dk, dv = cuda.device_array(k.shape, dt), cuda.device_array(v.shape, dt)
    # dbias terms go to the kernel that owns them: columns to dK/dV's, the rest to dQ's
    kernels.dq[(-(-p.lq // bq), p.heads, p.batch), bq](
        q, k, v, dout, lse, Drow, dlse, has_dlse, scale, cap, m["indptr"], m["indices"], m["base"], gid_d,
        m["tile_ptr"], m["tile_key"], m["tile_full"], kind, bdense, bvalues, vbase, slopes, off,
        keep, kbase, zscale, has_drop, dq, mode, bufs["rows"], bufs["full"], bufs["entries"],
        bufs["entries_base"])
    kernels.dkdv[(-(-p.lk // bk), p.kv_heads, p.batch), bk](
        q, k, v, dout, lse, Drow, dlse, has_dlse, scale, cap, m["indptr"], m["indices"], m["base"], gid_d,
        m["tile_query"], m["tile_full"], m["ttile_ptr"], m["ttile"], kind, bdense, bvalues, vbase, slopes, off,
        keep, kbase, zscale, has_drop, dk, dv, mode, bufs["cols"])
    dbias = dbias_reduce(p, nnz_bh, mode, {name: b.copy_to_host() for name, b in bufs.items()}, dt)
    device_call = not isinstance(p.q, np.ndarray)
    return Grads(_result(dq, device_call), _result(dk, device_call), _result(dv, device_call), dbias)
