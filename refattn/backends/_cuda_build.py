"""Compile the cuda backend's kernels for a GPU architecture on a machine without a GPU.

Numba's CUDA simulator runs kernels as Python and checks no types, so this is how a
machine without a GPU (CI) checks that the kernels build for a real one: each kernel is
compiled to PTX with NVVM for the argument types the backend launches it with, and the
PTX is assembled with nvJitLink, whose ptxas log gives registers per thread, spills,
stack and shared memory per thread block. Needs NVVM and nvJitLink (``pip install
"numba-cuda[cu13]"``, in the test extra); no GPU. Used by the tests and by
``benchmarks/cuda_resources.py``.
"""

from __future__ import annotations

import re

import numba
import numpy as np

from . import _cuda_kernels as K


def signatures(ks, dt: str) -> dict:
    """Argument types of the three attention kernels, as the backend launches them (with
    C-contiguous arrays and int32 mask indices)."""
    ty = lambda *xs: tuple(numba.typeof(x) for x in xs)  # noqa: E731
    i2, i1, i32, b1 = np.zeros((1, 1), np.int64), np.zeros(1, np.int64), np.zeros(1, np.int32), np.zeros(1, bool)
    f4, f3, f1, s = np.zeros((1, 1, 1, 1), dt), np.zeros((1, 1, 1), dt), np.zeros(1, dt), np.dtype(dt).type(1)
    bias, drop = (1, f4, f1, i2, f1, 0), (b1, i2, s, True)
    return {
        "forward": (ks.forward, ty(f4, f4, f4, s, s, i2, i32, i1, i2, i2, i1, b1, *bias, *drop, f4, f3)),
        "dq": (ks.dq, ty(f4, f4, f4, f4, f3, f3, f3, True, s, s, i2, i32, i1, i2, i2, i1, b1, *bias, *drop,
                         f4, 1, f3, f4, f1, i2)),
        "dkdv": (ks.dkdv, ty(f4, f4, f4, f4, f3, f3, f3, True, s, s, i2, i32, i1, i2, i1, b1, i2, i1, *bias, *drop,
                             f4, f4, 1, f3)),
    }


def assemble(ptx: str, arch: str, name: str) -> str:
    """nvJitLink's verbose log of assembling ``ptx`` for ``arch`` (raises with the log on failure)."""
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(2, [f"-arch={arch}", "-verbose"])
    data = ptx.encode()
    nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), name)
    try:
        nvjitlink.complete(handle)
        failed = None
    except nvjitlink.nvJitLinkError as e:
        failed = e
    logs = []
    for size_fn, get_fn in ((nvjitlink.get_info_log_size, nvjitlink.get_info_log),
                            (nvjitlink.get_error_log_size, nvjitlink.get_error_log)):
        buf = bytearray(size_fn(handle))
        get_fn(handle, buf)
        logs.append(buf.decode(errors="replace"))
    nvjitlink.destroy(handle)
    if failed is not None:
        raise RuntimeError(f"{name}: nvJitLink failed ({failed}):\n{logs[1] or logs[0]}")
    return logs[0]


def resources(log: str) -> dict:
    """Registers, spill bytes, stack and shared memory from ptxas's lines in ``log``."""
    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0
    return {"registers": grab(r"Used (\d+) registers"), "spill_stores": grab(r"(\d+) bytes spill stores"),
            "spill_loads": grab(r"(\d+) bytes spill loads"), "stack": grab(r"(\d+) bytes stack frame"),
            "shared": grab(r"(\d+) bytes smem")}


def elementwise_signatures(dt: str) -> dict:
    """Argument types of the elementwise kernels (a float16 input where one can come in)."""
    ty = lambda *xs: tuple(numba.typeof(x) for x in xs)  # noqa: E731
    f4, f3, h4 = np.zeros((1, 1, 1, 1), dt), np.zeros((1, 1, 1), dt), np.zeros((1, 1, 1, 1), np.float16)
    i1, i2 = np.zeros(1, np.int64), np.zeros((1, 1), np.int64)
    return {"cast4": (K.cast4, ty(h4, f4)), "cast3": (K.cast3, ty(f3, f3)),
            "first_bad4": (K.first_bad4, ty(h4, True, i1)), "first_bad3": (K.first_bad3, ty(f3, True, i1)),
            "first_bad_lse": (K.first_bad_lse, ty(f3, np.zeros((1, 1), bool), i2, i1))}


def report(cc: tuple[int, int], dim: int, dim_v: int, elementwise: bool = False) -> list[dict]:
    """One row per kernel and compute dtype, at the backend's default block sizes for
    ``dim``, ``dim_v``: what ptxas allocated for it on ``sm_<cc>``."""
    from numba import cuda

    from .cuda import block_sizes

    rows = []
    for dt in ("float32", "float64"):
        bq, bk = block_sizes(dt, dim, dim_v)
        kernels = signatures(K.kernels(dt, bq, bk, dim, dim_v), dt)
        if elementwise:
            kernels.update(elementwise_signatures(dt))
        for name, (kernel, sig) in kernels.items():
            ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=cc)
            res = resources(assemble(ptx, f"sm_{cc[0]}{cc[1]}", name))
            # float64 arithmetic in PTX (an instruction with a .f64 type), which a float32
            # kernel must not have: a float32 value promoted by a stray int or constant
            res["f64_instructions"] = len(re.findall(r"^\s*[a-z]+[.a-z0-9]*\.f64\b", ptx, re.M))
            threads = {"forward": bq, "dq": bq, "dkdv": bk}.get(name)
            rows.append({"dtype": dt, "kernel": name, "block_q": bq, "block_k": bk, "threads": threads, **res})
    return rows
