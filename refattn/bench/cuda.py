"""GPU benchmark: refattn's ``cuda`` backend against torch SDPA and compiled FlexAttention
on the same GPU, in one table.

Run by hand on a machine with an NVIDIA GPU, a CUDA build of PyTorch and numba-cuda:
``refattn bench cuda [options]`` or ``python benchmarks/bench_cuda.py [options]``. Without
a real GPU (no GPU, Numba's CUDA simulator, or a CPU-only torch) it says why on one line
and exits with status 2.

Cases (B = 1, Hkv = H = 8, D = Dv = 64 by default; float32; forward and forward+backward):
sliding window left = right = 256 (the CPU benchmark's window case) and dense causal, each
at n = 4096, 16384, 65536. SDPA runs with ``is_causal=True`` (causal case only);
FlexAttention with a ``BlockMask`` built from refattn's block structure
(`refattn.bench.BenchMask.flex_block_mask`) and the pattern's rule as ``mask_mod``, so that
all three compute the same mask.

Inputs are standard normal, drawn on the GPU by ``torch.randn`` from a CUDA generator
seeded 0 (q, k, v, dout in this order), once per (n, H, dtype), and shared by every route:
refattn takes the torch tensors through ``__cuda_array_interface__`` (no copy) and returns
Numba device arrays. Each route is called ``--warmup`` times (the first call, with its
compile or mask upload, is reported apart) and then ``--repeat`` times; the table shows the
median. Each call is timed by the wall clock between two device synchronizations: what a
caller waits for, including refattn's per-call input validation (finiteness checks as small
device kernels) and host-side setup. Peers' results are checked against refattn's
(max|diff| / max|refattn| within 1e-3 in float32, on out and, forward+backward, dq, dk,
dv); "!" marks a disagreement. torch's float32 matmul precision is set to "highest" (no
TF32), so flex computes in IEEE float32 like refattn.

GFLOP/s counts useful FLOPs on the mask's nonzeros (`refattn.bench.useful_flops`): forward
4*nnz*D per head, forward+backward 12*nnz*D. "% peak" is refattn's GFLOP/s over the GPU's
float32 peak (`fp32_peak`: SMs x FP32 lanes per SM x 2 x clock).
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import math
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import backends
from .._version import __version__
from ..attention import backward, forward
from ..errors import RefattnError
from . import (FLOP_CONVENTION, MODES, TOLERANCE, BenchMask, Outputs, Timing, compare, compiled_flex, cpu_model,
               finish_report, format_table, free_memory, gflops, row_done, setup_torch, torch_missing,
               useful_flops)
from .cpu import WINDOW, Case, _choices, _fmt_ms, _ints, _positive_float, _short_error, causal_rule, window_rule

#: The sequence lengths of the issue: n in {4k, 16k, 64k}.
SIZES = (4096, 16384, 65536)
DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
#: Share of the GPU memory free at the start of a row that the row may need.
MEMORY_SHARE = 0.8
#: FlexAttention's block size (``BLOCK_SIZE`` of the ``BlockMask``): torch's default.
FLEX_BLOCK = 128
#: The issue's target: refattn's float32 throughput on the window case, as a fraction of flex's.
FLEX_TARGET = 0.3

CASES = {
    "window": Case("window", {"name": "sliding_window", "left": WINDOW, "right": WINDOW}, SIZES, window_rule),
    "causal": Case("causal", {"name": "causal"}, SIZES, causal_rule, causal=True),
}

#: FP32 lanes ("CUDA cores") per SM by compute capability: the 32-bit floating-point
#: add / multiply / multiply-add results per clock per multiprocessor in the CUDA C++
#: Programming Guide's arithmetic-instruction throughput table. Tensor cores are not
#: counted: refattn's kernels are plain FP32 FMAs.
FP32_LANES_PER_SM = {
    (5, 0): 128, (5, 2): 128, (5, 3): 128,  # Maxwell
    (6, 0): 64, (6, 1): 128, (6, 2): 128,  # Pascal: P100 / consumer, Jetson
    (7, 0): 64, (7, 2): 64, (7, 5): 64,  # Volta, Xavier, Turing
    (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128,  # A100 / GA10x, Orin / Ada
    (9, 0): 128,  # Hopper
    (10, 0): 128, (10, 3): 128, (11, 0): 128, (12, 0): 128, (12, 1): 128,  # Blackwell
}


# ---- the float32 peak --------------------------------------------------------------------
def fp32_peak(sms: int | None, clock_khz: float | None, cc: tuple[int, int] | None,
              override_tflops: float | None = None) -> dict:
    """The GPU's float32 peak as a dict: ``tflops`` (None when unknown), the figures it
    comes from and ``source`` (how it was obtained, for the output).

    ``sms x FP32_LANES_PER_SM[cc] x 2 (an FMA is two FLOPs) x clock``; ``clock_khz`` is
    the driver's ``CLOCK_RATE``, the maximum (boost) clock, so the fraction of the peak
    is a lower bound where the GPU runs slower under load. ``override_tflops``
    (``--peak-tflops``) replaces the computation."""
    lanes = None if cc is None else FP32_LANES_PER_SM.get(tuple(cc))
    peak = {"tflops": None, "sms": sms, "lanes_per_sm": lanes, "clock_ghz": None if clock_khz is None
            else clock_khz / 1e6, "cc": None if cc is None else f"{cc[0]}.{cc[1]}"}
    if override_tflops is not None:
        return {**peak, "tflops": float(override_tflops), "source": "--peak-tflops"}
    if lanes is None:
        peak["source"] = (f"unknown: no FP32 lanes per SM for compute capability {peak['cc']} in "
                          "FP32_LANES_PER_SM; pass --peak-tflops")
        return peak
    if not sms or not clock_khz:
        peak["source"] = "unknown: the driver did not report the SM count and clock; pass --peak-tflops"
        return peak
    peak["tflops"] = sms * lanes * 2 * clock_khz * 1e3 / 1e12
    peak["source"] = f"FP32_LANES_PER_SM[cc {peak['cc']}]"
    return peak


def peak_line(peak: dict) -> str:
    """One line saying which float32 peak the "% peak" column uses and where it comes from."""
    if peak["tflops"] is None:
        return f"float32 peak: {peak['source']}"
    if peak["source"] == "--peak-tflops":
        return f"float32 peak: {peak['tflops']:.1f} TFLOP/s (given by --peak-tflops)"
    return (f"float32 peak: {peak['sms']} SMs x {peak['lanes_per_sm']} FP32 lanes/SM ({peak['source']}) "
            f"x 2 FLOP per FMA x {peak['clock_ghz']:.3f} GHz (maximum clock) = {peak['tflops']:.1f} TFLOP/s")


# ---- the machine -------------------------------------------------------------------------
def environment_problem() -> str | None:
    """Why the benchmark cannot run here (one line), or None: it needs the ``cuda``
    backend on a real GPU (not Numba's simulator) and a CUDA build of torch that sees it."""
    if importlib.util.find_spec("numba_cuda") is None:
        return "needs numba-cuda (pip install 'refattn[cuda]') and an NVIDIA GPU"
    from numba import cuda

    from ..backends import cuda as cuda_backend

    if cuda_backend.simulated():
        return ("needs a real GPU: numba.cuda is Numba's CUDA simulator here (NUMBA_ENABLE_CUDASIM=1), "
                "which runs kernels as Python threads; run it without NUMBA_ENABLE_CUDASIM on a machine "
                "with an NVIDIA GPU")
    if not cuda.is_available():
        return "needs a real GPU: Numba finds no usable CUDA GPU or driver (numba.cuda.is_available() is False)"
    try:
        backends.get("cuda")
    except RefattnError as e:  # anything else the registry knows of
        return f"needs the cuda backend: {e}"
    why = torch_missing()
    if why is not None:
        return f"needs a CUDA build of PyTorch (inputs and peers run on the GPU with torch): {why}"
    import torch

    if torch.version.cuda is None:
        return (f"needs a CUDA build of PyTorch (inputs and peers run on the GPU with torch): torch "
                f"{torch.__version__} is CPU-only (torch.version.cuda is None)")
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU "
                "(torch.cuda.is_available() is False)")
    return None


def _attribute(device, name: str):
    """A device attribute from the driver (``MULTIPROCESSOR_COUNT``, ...), or None where
    this driver does not report it."""
    try:
        return int(getattr(device, name))
    except Exception:  # an attribute a newer driver dropped: reported as unknown
        return None


def _version(fn) -> str | None:
    try:
        return ".".join(map(str, fn()))
    except Exception:  # a version query the installed Numba lacks: reported as unknown
        return None


def device_info() -> dict:
    """The GPU (through Numba's driver API: the device refattn's kernels run on) and the
    versions, as a JSON-able dict. Call after `environment_problem` returned None."""
    import numba
    import torch
    from numba import cuda
    from numba.cuda.cudadrv.driver import driver

    dev = cuda.get_current_device()
    free, total = cuda.current_context().get_memory_info()
    name = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
    cc = tuple(int(x) for x in dev.compute_capability)
    mem_khz, bus_bits = _attribute(dev, "MEMORY_CLOCK_RATE"), _attribute(dev, "GLOBAL_MEMORY_BUS_WIDTH")
    return {
        "gpu": name,
        "cc": list(cc),
        "sms": _attribute(dev, "MULTIPROCESSOR_COUNT"),
        "clock_khz": _attribute(dev, "CLOCK_RATE"),
        "memory_gib": round(total / 2**30, 1),
        "memory_free_gib": round(free / 2**30, 1),
        # double data rate: two transfers per memory clock
        "memory_gb_s": None if not (mem_khz and bus_bits) else round(2 * mem_khz * 1e3 * bus_bits / 8 / 1e9),
        "driver": _version(driver.get_version),
        "runtime": _version(cuda.runtime.get_version),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "numba": numba.__version__,
        "numba_cuda": importlib.metadata.version("numba-cuda"),
        "refattn": __version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
    }


def device_line(info: dict) -> str:
    """Two lines describing the GPU and the versions, from :func:`device_info`."""
    cc = info["cc"]
    clock = "?" if info["clock_khz"] is None else f"{info['clock_khz'] / 1e3:.0f}"
    bandwidth = "" if info["memory_gb_s"] is None else f", ~{info['memory_gb_s']} GB/s peak"
    return (f"device: {info['gpu']} (compute capability {cc[0]}.{cc[1]}), {info['sms']} SMs at {clock} MHz "
            f"(maximum), {info['memory_gib']} GiB ({info['memory_free_gib']} GiB free{bandwidth}); "
            f"host {info['cpu']}\n"
            f"versions: driver CUDA {info['driver']}, runtime CUDA {info['runtime']} (Numba's), torch "
            f"{info['torch']} (CUDA {info['torch_cuda']}, float32 matmul precision "
            f"{info['float32_matmul_precision']}), numba {info['numba']}, numba-cuda {info['numba_cuda']}, "
            f"refattn {info['refattn']}, numpy {info['numpy']}, python {info['python']}")


# ---- how the harness reaches the GPU ------------------------------------------------------
@dataclass(frozen=True)
class DeviceOps:
    """How the harness makes device arrays and waits for the device.

    ``make_inputs(shape, dtype)`` returns ``[q, k, v, dout]`` on the device, seeded;
    ``synchronize()`` waits for all work on the device; ``free_bytes()`` releases memory
    held but unused and returns the device memory free then (None: unknown, no guard).
    :func:`torch_ops` is the real one; the tests pass Numba device arrays under the
    simulator."""

    make_inputs: Callable[[tuple[int, ...], np.dtype], list]
    synchronize: Callable[[], None]
    free_bytes: Callable[[], int | None]


def torch_ops() -> DeviceOps:
    """`DeviceOps` with torch CUDA tensors. Numba runs refattn's kernels in the device's
    primary context, the one torch uses, so ``torch.cuda.synchronize()`` (a device
    synchronize) also waits for them."""
    torch = setup_torch()
    from numba import cuda

    def make_inputs(shape, dtype):
        g = torch.Generator(device="cuda").manual_seed(0)
        tdt = getattr(torch, np.dtype(dtype).name)
        return [torch.randn(shape, generator=g, device="cuda", dtype=tdt) for _ in range(4)]

    def free_bytes():
        # Numba frees lazily and torch caches: neither gives memory back to the other
        # on its own, so release both before the next route or row.
        gc.collect()
        cuda.current_context().deallocations.clear()
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info()[0]

    return DeviceOps(make_inputs, torch.cuda.synchronize, free_bytes)


def to_host(x) -> np.ndarray:
    """A device array (Numba's or a torch tensor) as a NumPy array."""
    if hasattr(x, "copy_to_host"):  # Numba device arrays, refattn's results
        return x.copy_to_host()
    if hasattr(x, "detach"):  # torch tensors
        return x.detach().cpu().numpy()
    return np.asarray(x)


def time_device(fn: Callable[[], Any], repeat: int, warmup: int, synchronize: Callable[[], None]) -> Timing:
    """Call ``fn()`` ``warmup`` times (the first is timed apart: compiles, uploads), then
    ``repeat`` times timed; each timed call runs between two ``synchronize()`` calls (the
    second one inside the time: the call is done when the device is). Returns the last
    call's result with the times; each result is dropped before the next call starts."""
    synchronize()
    t0 = time.perf_counter()
    result = fn()
    synchronize()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        result = None
        result = fn()
    times = []
    for _ in range(repeat):
        result = None
        synchronize()
        t0 = time.perf_counter()
        result = fn()
        synchronize()
        times.append(time.perf_counter() - t0)
    return Timing(first, times, result)


def host_outputs(result) -> Outputs:
    """A route's device results ``(out,)`` or ``(out, dq, dk, dv)`` as `Outputs` on the host."""
    return Outputs(*(to_host(x) for x in result))


# ---- the routes --------------------------------------------------------------------------
def refattn_call(q, k, v, dout, mask, dtype, mode: str, options: dict | None = None) -> tuple:
    """``refattn.forward`` (and, for ``fwdbwd``, ``refattn.backward``) with backend
    ``cuda`` on device arrays: ``(out,)`` or ``(out, dq, dk, dv)``, Numba device arrays."""
    scale = 1.0 / math.sqrt(q.shape[3])
    r = forward(q, k, v, mask, scale=scale, backend="cuda", compute_dtype=dtype, options=options)
    if mode == "fwd":
        return (r.out,)
    g = backward(q, k, v, r.out, r.lse, dout, mask, scale=scale, backend="cuda", compute_dtype=dtype,
                 options=options)
    return (r.out, g.dq, g.dk, g.dv)


def sdpa_call(q, k, v, dout, bm: BenchMask, mode: str) -> tuple:
    """``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)`` (torch
    picks its kernel); the backward through autograd (``out.backward(dout)``)."""
    torch = setup_torch()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    scale = 1.0 / math.sqrt(q.shape[3])
    if mode == "fwd":
        with torch.no_grad():
            return (sdpa(q, k, v, is_causal=True, scale=scale),)
    qt, kt, vt = (x.detach().requires_grad_() for x in (q, k, v))  # fresh leaves: no grad accumulation
    out = sdpa(qt, kt, vt, is_causal=True, scale=scale)
    out.backward(dout)
    return (out.detach(), qt.grad, kt.grad, vt.grad)


def device_block_mask(bm: BenchMask):
    """:meth:`BenchMask.flex_block_mask` moved to the GPU, kept with the mask (dropped
    by ``bm.free()``)."""
    key = f"flex{FLEX_BLOCK}_cuda"
    if key not in bm._cache:
        bm._cache[key] = bm.flex_block_mask(FLEX_BLOCK).to("cuda")
    return bm._cache[key]


def flex_call(q, k, v, dout, bm: BenchMask, mode: str) -> tuple:
    """``torch.compile(flex_attention, dynamic=False)`` with :func:`device_block_mask`;
    the backward through autograd."""
    torch = setup_torch()
    fn = compiled_flex()
    block_mask = device_block_mask(bm)
    scale = 1.0 / math.sqrt(q.shape[3])
    if mode == "fwd":
        with torch.no_grad():
            return (fn(q, k, v, block_mask=block_mask, scale=scale),)
    qt, kt, vt = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(qt, kt, vt, block_mask=block_mask, scale=scale)
    out.backward(dout)
    return (out.detach(), qt.grad, kt.grad, vt.grad)


def _sdpa_skip(bm: BenchMask, mode: str) -> str | None:
    return None if bm.causal else "is_causal covers the dense causal case only"


def _flex_skip(bm: BenchMask, mode: str) -> str | None:
    try:
        found = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    except ModuleNotFoundError:  # torch.nn.attention itself is missing (torch < 2.2)
        found = False
    if not found:
        return "this torch has no torch.nn.attention.flex_attention"
    if bm.rule is None:
        return "no rule for this pattern (a mask_mod)"
    return None


@dataclass(frozen=True)
class GpuPeer:
    """One implementation to compare with on the GPU: ``run(q, k, v, dout, mask, mode)``
    returns device results like `refattn_call`; ``skip(mask, mode)`` says why it does not
    apply (None: it runs); ``setup(mask)``, untimed, builds what it keeps per mask."""

    name: str
    run: Callable
    skip: Callable
    help: str
    setup: Callable | None = None


PEERS: dict[str, GpuPeer] = {
    "sdpa": GpuPeer("sdpa", sdpa_call, _sdpa_skip,
                    "torch scaled_dot_product_attention(is_causal=True), autograd backward"),
    "flex": GpuPeer("flex", flex_call, _flex_skip,
                    "torch.compile(flex_attention) with a BlockMask on the GPU, autograd backward",
                    setup=device_block_mask),
}


# ---- memory --------------------------------------------------------------------------------
#: Arrays of one ``(B, H, n, D)`` size alive at a row's peak: forward q, k, v, dout,
#: refattn's out and lse, and a peer's out and working memory; forward+backward also the
#: gradients, refattn's ``D = rowsum(dO * O)`` and a peer's saved tensors and grads.
ROW_ARRAYS = {"fwd": 7, "fwdbwd": 13}


def mask_device_bytes(bm: BenchMask, block_q: int, block_k: int) -> int:
    """Device bytes of the mask: refattn's copy (CSR indices, int64 row pointers, per
    ``block_q x block_k`` tile 25 bytes of layout) and flex's ``BlockMask`` (four int32
    ``nb x nb`` index arrays: torch pads each row to every block)."""
    lq, lk = bm.shape
    indices = sum(csr.indices.nbytes for _, _, csr in bm.mask.iter_groups())
    tiles = min(bm.nnz, -(-lq // block_q) * -(-lk // block_k))
    flex = 4 * 4 * -(-lq // FLEX_BLOCK) * -(-lk // FLEX_BLOCK)
    return indices + 8 * (lq + 1) + 25 * tiles + flex


def row_bytes(batch: int, heads: int, n: int, dim: int, itemsize: int, mode: str, mask_bytes: int) -> int:
    """Rough device memory of a row (see `ROW_ARRAYS`), the mask included."""
    return ROW_ARRAYS[mode] * batch * heads * n * dim * itemsize + mask_bytes


# ---- arguments -----------------------------------------------------------------------------
def _peers(text: str) -> list[str]:
    """``--peers``: a comma-separated subset of `PEERS`, or ``none``."""
    return [] if text.strip() == "none" else _choices(list(PEERS))(text)


def _positive_int(text: str) -> int:
    """An argparse type: one integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Benchmark refattn's cuda backend on the GPU against torch SDPA and "
        "torch.compile(flex_attention) on the same GPU; print one table. Needs an NVIDIA GPU, "
        "numba-cuda and a CUDA build of torch. GFLOP/s: " + FLOP_CONVENTION + ".",
        epilog=f"Cases: window (sliding_window left=right={WINDOW}) and causal, n="
        + ",".join(map(str, SIZES)) + " by default. Peers: "
        + "; ".join(f"{name}: {peer.help}" for name, peer in PEERS.items())
        + ". Times: wall clock between device synchronizations, median of --repeat calls after "
        "--warmup calls.",
    )
    p.add_argument("--cases", type=_choices(list(CASES)), default=list(CASES),
                   help=f"which cases, comma-separated (default {','.join(CASES)})")
    p.add_argument("--n", "--sizes", dest="sizes", type=_ints, default=list(SIZES), metavar="N[,N...]",
                   help="sequence lengths n = Lq = Lk (default " + ",".join(map(str, SIZES)) + ")")
    p.add_argument("--dtypes", "--dtype", dest="dtypes", type=_choices(list(DTYPES)), default=["float32"],
                   help="compute dtypes (and input dtypes), among float32,float64 (default float32)")
    p.add_argument("--heads", type=_ints, default=[8], help="query heads H = Hkv, comma-separated (default 8)")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch B (default 1)")
    p.add_argument("--dim", type=_positive_int, default=64, help="head dim D = Dv (default 64)")
    p.add_argument("--modes", type=_choices(list(MODES)), default=list(MODES),
                   help="fwd (forward) and/or fwdbwd (forward then backward) (default both)")
    p.add_argument("--repeat", type=_positive_int, default=10,
                   help="timed calls per route; the table shows the median (default 10)")
    p.add_argument("--warmup", type=_positive_int, default=2,
                   help="untimed calls before them; the first is reported as the first call (default 2)")
    p.add_argument("--peers", type=_peers, default=list(PEERS),
                   help=f"peers to compare with, comma-separated among {','.join(PEERS)}, or none "
                   f"(default {','.join(PEERS)})")
    p.add_argument("--block-q", type=_positive_int, default=None,
                   help="the cuda backend's block_q option (default: chosen to fit shared memory)")
    p.add_argument("--block-k", type=_positive_int, default=None,
                   help="the cuda backend's block_k option (default: chosen to fit shared memory)")
    p.add_argument("--peak-tflops", type=_positive_float, default=None,
                   help="the GPU's float32 peak in TFLOP/s for the %% peak column, instead of "
                   "SMs x FP32 lanes per SM x 2 x maximum clock")
    p.add_argument("--json", metavar="FILE", default=None,
                   help="write every raw result (all times, errors, skip reasons) to FILE, "
                   "rewritten after each row")
    p.add_argument("--markdown", action="store_true",
                   help="print the table as Markdown (for benchmarks/RESULTS.md)")
    return p


def backend_options(args) -> dict | None:
    """The cuda backend's ``options`` from ``--block-q`` / ``--block-k`` (None: its defaults)."""
    opts = {name: getattr(args, name) for name in ("block_q", "block_k") if getattr(args, name) is not None}
    return opts or None


def block_sizes(dtype, dim: int, options: dict | None) -> tuple[int, int]:
    """The cuda backend's ``(block_q, block_k)`` for a call in ``dtype`` with head dim
    ``dim`` and ``options``, as the backend itself chooses and checks them (range, shared
    memory); `RefattnError` when they do not fit."""
    impl = backends.get("cuda")
    config = backends.configure(impl, "cuda", dtype, options)
    return impl.block_sizes(config.compute_dtype, dim, dim, config.options["block_q"], config.options["block_k"])


def _check_blocks(parser, args) -> dict[str, tuple[int, int]]:
    """`block_sizes` per dtype of the run; a usage error when ``--block-q``, ``--block-k``
    and ``--dim`` do not fit the backend."""
    blocks = {}
    for name in args.dtypes:
        try:
            blocks[name] = block_sizes(DTYPES[name], args.dim, backend_options(args))
        except RefattnError as e:
            parser.error(str(e).replace("options['block_q']", "--block-q").replace("options['block_k']",
                                                                                    "--block-k"))
    return blocks


# ---- the run -------------------------------------------------------------------------------
def first_call_times(ops: DeviceOps, dtypes, dim: int, options=None, n: int = 128) -> dict[str, dict[str, float]]:
    """Seconds of the cuda backend's very first forward and backward per dtype on a small
    causal problem (``n``, H = 1, ``dim``): the kernels' compilation (or Numba's cache
    load) and the mask's upload included."""
    mask = CASES["causal"].mask(n).mask
    scale = 1.0 / math.sqrt(dim)
    out = {}
    for name in dtypes:
        dt = DTYPES[name]
        q, k, v, dout = ops.make_inputs((1, 1, n, dim), dt)
        ops.synchronize()
        t0 = time.perf_counter()
        r = forward(q, k, v, mask, scale=scale, backend="cuda", compute_dtype=dt, options=options)
        ops.synchronize()
        t1 = time.perf_counter()
        backward(q, k, v, r.out, r.lse, dout, mask, scale=scale, backend="cuda", compute_dtype=dt, options=options)
        ops.synchronize()
        out[name] = {"forward_s": t1 - t0, "backward_s": time.perf_counter() - t1}
    return out


class Runner:
    """Runs the rows and keeps the results (``self.rows``, JSON-able).

    ``args`` as parsed by :func:`build_parser`; ``ops`` how to reach the device;
    ``peak_tflops`` the float32 peak for "% peak" (None: unknown)."""

    def __init__(self, args, ops: DeviceOps, peak_tflops: float | None = None,
                 blocks: dict[str, tuple[int, int]] | None = None):
        self.args = args
        self.ops = ops
        self.peak_tflops = peak_tflops
        self.blocks = dict(blocks or {})
        self.options = backend_options(args)
        self.rows: list[dict] = []
        self.failed: dict[tuple, str] = {}  # (peer, dtype, mode) -> why it failed

    def run_case(self, case: Case, n: int, emit) -> None:
        t0 = time.perf_counter()
        bm = case.mask(n)
        print(f"[{case.name} n={n}] mask: nnz={bm.nnz} built in {time.perf_counter() - t0:.2f} s",
              file=sys.stderr, flush=True)
        for heads in self.args.heads:
            for dname in self.args.dtypes:
                self.run_inputs(case, bm, n, heads, dname, emit)
        bm.free()
        del bm
        free_memory()

    def run_inputs(self, case: Case, bm: BenchMask, n: int, heads: int, dname: str, emit) -> None:
        dt = DTYPES[dname]
        a = self.args
        free = self.ops.free_bytes()
        budget = math.inf if free is None else MEMORY_SHARE * free
        if dname not in self.blocks:
            self.blocks[dname] = block_sizes(dt, a.dim, self.options)
        bq, bk = self.blocks[dname]
        mask_bytes = mask_device_bytes(bm, bq, bk)
        need = {m: row_bytes(a.batch, heads, n, a.dim, dt.itemsize, m, mask_bytes) for m in a.modes}
        arrays = None
        if any(need[m] <= budget for m in a.modes):
            arrays = self.ops.make_inputs((a.batch, heads, n, a.dim), dt)
        for mode in a.modes:
            row = self.new_row(case, bm, n, heads, dname, mode)
            row["memory_estimate_gib"] = need[mode] / 2**30
            if need[mode] > budget:
                row["refattn"] = {"status": "skipped",
                                  "reason": f"needs ~{need[mode] / 2**30:.1f} GiB of GPU memory, more than "
                                  f"{MEMORY_SHARE:.0%} of the {free / 2**30:.1f} GiB free"}
                row["peers"] = {p: {"status": "skipped", "reason": "refattn did not run"} for p in a.peers}
            else:
                self.run_row(row, bm, arrays, dt, mode)
            self.rows.append(row)
            emit(row)
        del arrays
        free_memory()

    def new_row(self, case: Case, bm: BenchMask, n: int, heads: int, dname: str, mode: str) -> dict:
        a = self.args
        flops = a.batch * useful_flops(bm.nnz, heads, a.dim, a.dim, mode)
        return {"case": case.name, "pattern": case.pattern, "n": n, "batch": a.batch, "heads": heads,
                "kv_heads": heads, "d": a.dim, "dv": a.dim, "dtype": dname, "mode": mode,
                "nnz": bm.nnz, "flops": flops, "refattn": {}, "peers": {}}

    def run_row(self, row: dict, bm: BenchMask, arrays, dt: np.dtype, mode: str) -> None:
        q, k, v, dout = arrays
        try:
            t = time_device(lambda: refattn_call(q, k, v, dout, bm.mask, dt, mode, self.options),
                            self.args.repeat, self.args.warmup, self.ops.synchronize)
            ref = host_outputs(t.result)
        except Exception as e:  # reported in the table (e.g. out of memory), the run goes on
            why = _short_error(e)
            print(f"  refattn failed ({dt.name}, {mode}): {why}", file=sys.stderr, flush=True)
            row["refattn"] = {"status": "error", "reason": why}
            row["peers"] = {p: {"status": "skipped", "reason": "refattn did not run"} for p in self.args.peers}
            return
        t.result = None
        self.ops.free_bytes()  # refattn's device results go before the peers allocate theirs
        rate = gflops(row["flops"], t.median_s)
        fraction = (rate / (self.peak_tflops * 1e3)
                    if self.peak_tflops and dt == np.dtype(np.float32) else None)
        row["refattn"] = {"status": "ok", "backend": "cuda", "blocks": list(self.blocks.get(dt.name, ())),
                          "ms": t.median_s * 1e3, "times_ms": [x * 1e3 for x in t.times_s],
                          "first_ms": t.first_s * 1e3, "gflops": rate, "peak_fraction": fraction}
        for name in self.args.peers:
            row["peers"][name] = self.run_peer(name, row, bm, arrays, dt, mode, ref, t.median_s)
            self.ops.free_bytes()

    def run_peer(self, name: str, row: dict, bm: BenchMask, arrays, dt: np.dtype, mode: str,
                 ref: Outputs, ref_s: float) -> dict:
        peer = PEERS[name]
        q, k, v, dout = arrays
        key = (name, dt.name, mode)
        reason = self.failed.get(key) or peer.skip(bm, mode)
        if reason is not None:
            return {"status": "skipped", "reason": reason}
        try:
            t0 = time.perf_counter()
            if peer.setup is not None:
                peer.setup(bm)
            setup_s = time.perf_counter() - t0
            t = time_device(lambda: peer.run(q, k, v, dout, bm, mode), self.args.repeat, self.args.warmup,
                            self.ops.synchronize)
            got = host_outputs(t.result)
            t.result = None
        except Exception as e:  # a peer that fails is reported, not fatal
            why = _short_error(e)
            if "out of memory" not in why.lower():  # a smaller problem may still fit
                self.failed[key] = why  # not retried for this dtype and mode
            print(f"  {name} failed ({dt.name}, {mode}): {why}", file=sys.stderr, flush=True)
            return {"status": "error", "reason": why}
        err, ok = compare(ref, got, dt)
        return {"status": "ok", "ms": t.median_s * 1e3, "times_ms": [x * 1e3 for x in t.times_s],
                "first_ms": t.first_s * 1e3, "setup_s": setup_s, "ratio": t.median_s / ref_s,
                "gflops": gflops(row["flops"], t.median_s), "max_rel_err": err, "agrees": ok}


# ---- printing ------------------------------------------------------------------------------
def table(rows: list[dict], peers: list[str], markdown: bool = False) -> str:
    """The result table: per row refattn's ms, GFLOP/s and % of the float32 peak, then
    each peer's ms ("!" when it disagrees with refattn) and x = peer ms / refattn ms."""
    headers = ["case", "n", "H", "dtype", "mode", "nnz", "refattn ms", "GFLOP/s", "% peak"]
    for p in peers:
        headers += [f"{p} ms", f"{p} x"]
    body = []
    for r in rows:
        ref = r["refattn"]
        cells = [r["case"], str(r["n"]), str(r["heads"]), r["dtype"], r["mode"], str(r["nnz"])]
        if ref.get("status") == "ok":
            frac = ref.get("peak_fraction")
            cells += [_fmt_ms(ref["ms"] / 1e3), f"{ref['gflops']:.1f}", "-" if frac is None else f"{100 * frac:.1f}"]
        else:
            cells += ["-", "-", "-"]
        for p in peers:
            res = r["peers"].get(p, {})
            if res.get("status") == "ok":
                cells += [_fmt_ms(res["ms"] / 1e3) + ("" if res["agrees"] else "!"), f"{res['ratio']:.2f}"]
            else:
                cells += ["-", "-"]
        body.append(cells)
    return format_table(headers, body, markdown=markdown, left=1)


def target_note(rows: list[dict]) -> str | None:
    """The issue's target, refattn >= `FLEX_TARGET` x flex's float32 throughput on the
    window case, against the rows that measured it (None: no such row)."""
    xs = [(r["n"], r["mode"], r["peers"]["flex"]["ratio"]) for r in rows
          if r["case"] == "window" and r["dtype"] == "float32"
          and r["peers"].get("flex", {}).get("status") == "ok"]
    if not xs:
        return None
    met = sum(x >= FLEX_TARGET for _, _, x in xs)
    worst = min(xs, key=lambda t: t[2])
    return (f"target: refattn >= {FLEX_TARGET}x flex's float32 throughput on window (flex x >= {FLEX_TARGET}): "
            f"met in {met} of {len(xs)} rows; lowest x = {worst[2]:.2f} (n={worst[0]} {worst[1]}).")


def footnotes(rows: list[dict], peers: list[str], peak: dict | None = None) -> list[str]:
    """The notes under the table: definitions, skip and error reasons, the target, the
    best fraction of the peak, the first calls."""
    notes = [
        ("x = peer ms / refattn ms = refattn's throughput / the peer's (> 1: refattn is faster); "
         "each ms is the median of the timed calls, wall clock between device synchronizations."),
        (f"! = the peer disagrees with refattn: max|diff| / max|refattn| above "
         f"{TOLERANCE[np.dtype(np.float32)]:g} (float32), {TOLERANCE[np.dtype(np.float64)]:g} (float64)."),
        ("refattn ms include what each call of refattn.forward/backward does besides the kernels: input "
         "checks (finiteness, as small device kernels, with a 4-byte copy back each), host-side setup, and "
         "Numba's allocation of its results (one cuMemAlloc per array, no pool)."),
    ]
    if peak is not None:
        if peak.get("tflops"):
            notes.append(f"% peak = refattn GFLOP/s / {peak['tflops']:.1f} TFLOP/s, the float32 peak above "
                         "(FP32 FMA lanes at the maximum clock; tensor cores not counted); float32 rows only.")
        else:
            notes.append(f"% peak: not shown, the float32 peak is {peak['source']}.")
    for reason in dict.fromkeys(r["refattn"]["reason"] for r in rows if r["refattn"].get("status") != "ok"):
        notes.append(f"refattn -: {reason}")
    for p in peers:
        for reason in dict.fromkeys(r["peers"][p]["reason"] for r in rows if r["refattn"].get("status") == "ok"
                                    and r["peers"].get(p, {}).get("status") != "ok"):
            notes.append(f"{p} -: {reason}")
    best = [r for r in rows if r["refattn"].get("peak_fraction") is not None]
    if best:
        b = max(best, key=lambda r: r["refattn"]["peak_fraction"])
        notes.append(f"refattn's best fraction of the float32 peak: {100 * b['refattn']['peak_fraction']:.1f}% "
                     f"({b['case']} n={b['n']} H={b['heads']} {b['mode']}, {b['refattn']['gflops']:.0f} GFLOP/s).")
    target = target_note(rows)
    if target is not None:
        notes.append(target)
    firsts = [r["refattn"]["first_ms"] / 1e3 for r in rows if r["refattn"].get("status") == "ok"]
    if firsts:
        notes.append(f"refattn first calls {min(firsts):.2f}-{max(firsts):.2f} s: a mask's first row includes "
                     "its block layout and upload to the GPU; the kernels are compiled by then (first-call line).")
    for p in peers:
        fs = [r["peers"][p]["first_ms"] / 1e3 for r in rows if r["peers"].get(p, {}).get("status") == "ok"]
        if fs:
            notes.append(f"{p} first calls {min(fs):.2f}-{max(fs):.2f} s"
                         + (" (torch.compile per shape and mask, or a load from its cache)." if p == "flex" else "."))
    return notes


def main(argv=None, prog: str | None = None) -> int:
    """Run the GPU benchmark; print the header, the table and its notes. Returns 0, or 2
    (with the reason on stderr) where it cannot run: no real GPU, no CUDA build of torch."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    why = environment_problem()
    if why is not None:
        print(f"{parser.prog}: error: {why}", file=sys.stderr)
        return 2
    blocks = _check_blocks(parser, args)
    out = sys.stdout
    torch = setup_torch(cache_dir=".torchinductor_cache")
    torch.set_float32_matmul_precision("highest")  # IEEE float32 in flex's matmuls, as refattn
    ops = torch_ops()

    info = device_info()
    peak = fp32_peak(info["sms"], info["clock_khz"], tuple(info["cc"]), args.peak_tflops)
    print(f"refattn bench cuda: backend 'cuda' against {', '.join(args.peers) or 'no peers'}", file=out)
    print(f"GFLOP/s convention: {FLOP_CONVENTION}.", file=out)
    print(device_line(info), file=out)
    print(peak_line(peak), file=out)
    print(f"shapes: B={args.batch}, H=Hkv in {{{','.join(map(str, args.heads))}}}, D=Dv={args.dim}; "
          f"{args.warmup} warm-up and {args.repeat} timed calls per route", file=out)
    first = first_call_times(ops, args.dtypes, args.dim, backend_options(args))
    print("refattn 'cuda' blocks (block_q x block_k): "
          + ", ".join(f"{d} {bq}x{bk}" for d, (bq, bk) in blocks.items())
          + "; first call (n=128 causal, kernel compile or cache load included): "
          + "; ".join(f"{d} forward {t['forward_s']:.2f} s, backward {t['backward_s']:.2f} s"
                      for d, t in first.items()), file=out)
    print(file=out, flush=True)

    runner = Runner(args, ops, peak["tflops"], blocks)
    doc = {"convention": FLOP_CONVENTION, "device": info, "peak": peak, "first_call_s": first,
           "args": dict(vars(args)), "rows": runner.rows}

    def emit(row):
        row_done(row, doc, args.json)

    for name in args.cases:
        for n in args.sizes:
            runner.run_case(CASES[name], n, emit)

    finish_report(out, table(runner.rows, args.peers, args.markdown), footnotes(runner.rows, args.peers, peak),
                  doc, args.json)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
