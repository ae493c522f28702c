"""Reusable parts of refattn's benchmark harnesses (``refattn bench cpu``; later ``cuda``).

Run by hand, never asserted in tests: these measure, they do not check a contract.

What lives here
---------------
- the FLOP convention (:func:`useful_flops`) and the timing helper (:func:`time_calls`);
- the machine description (:func:`machine_info`, :func:`machine_line`) and the BLAS
  roofline (:func:`roofline`);
- :class:`BenchMask`, a refattn `Mask` with the derived forms the peers need (the dense
  boolean matrix, a FlexAttention ``BlockMask``), each built once and cached;
- the routes: :func:`refattn_route` (the backend under test) and the peers in `PEERS`,
  each a small function ``run(q, k, v, mask, dout, dtype, mode) -> Outputs`` plus a
  ``skip(mask, heads, dtype, mode)`` that says why it does not apply (or None);
- :func:`compare` (do two routes agree?) and :func:`format_table`.

FLOP convention
---------------
Useful FLOPs only, counted on the mask's nonzeros (``nnz`` of one head's mask, times the
number of heads): the forward is ``2 nnz D`` for ``S = Q K^T`` plus ``2 nnz Dv`` for
``P V``, i.e. ``4 nnz D`` when ``Dv = D``; the backward is ``dP = dO V^T``, ``dV = P^T dO``,
``dQ = dS K``, ``dK = dS^T Q``, ``4 nnz (D + Dv)`` = ``8 nnz D``. forward+backward is
therefore ``12 nnz D`` per head. Recomputing ``S`` in the backward (as FlashAttention
does), the softmax's exponentials and the work on masked-out entries are not counted, so
a dense kernel that computes the whole ``n x n`` matrix scores the same FLOPs as a sparse
one for the same mask.
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .._version import __version__
from ..attention import backward as _refattn_backward
from ..attention import forward as _refattn_forward
from ..mask import Mask

MODES = ("fwd", "fwdbwd")

FLOP_CONVENTION = (
    "useful FLOPs on the mask's nonzeros: forward 4*nnz*D per head (Q K^T and P V), "
    "backward 8*nnz*D (dP, dV, dQ, dK), forward+backward 12*nnz*D; nnz is one head's mask"
)

#: Agreement bound with refattn's result, relative to max|refattn's array|.
TOLERANCE = {np.dtype(np.float32): 1e-3, np.dtype(np.float64): 1e-9}


# ---- FLOPs and timing ---------------------------------------------------------------------
def useful_flops(nnz: int, heads: int, d: int, dv: int | None = None, mode: str = "fwd") -> int:
    """Useful FLOPs of one attention call (see the module docstring).

    ``nnz`` is the number of allowed (query, key) entries of one head's mask and
    ``heads`` the number of query heads that use it; ``mode`` is ``"fwd"`` or
    ``"fwdbwd"``. With ``Dv = D``: ``4 nnz D heads`` forward, ``12 nnz D heads`` both.
    """
    dv = d if dv is None else dv
    fwd = 2 * nnz * (d + dv)
    if mode == "fwd":
        return heads * fwd
    if mode == "fwdbwd":
        return heads * (fwd + 4 * nnz * (d + dv))
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def gflops(flops: float, seconds: float) -> float:
    """GFLOP/s of ``flops`` done in ``seconds``."""
    return flops / seconds / 1e9


@dataclasses.dataclass
class Timing:
    """The first (warm-up) call's seconds, the timed calls' seconds, and the last call's
    result (kept for the agreement check)."""

    first_s: float
    times_s: list[float]
    result: Any = None

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


#: Seconds of idleness before each route is timed. A BLAS or OpenMP library keeps its
#: worker threads spinning for a while after a call (OpenBLAS for ~0.1 s): the next
#: route, timed at once, would share the cores with them. Measured here: the first row
#: after the 2048^3 roofline ran 3x slow without the pause.
SETTLE_S = 0.3


def time_calls(fn: Callable[[], Any], repeat: int) -> Timing:
    """After `SETTLE_S` of idleness, call ``fn()`` once to warm up (compile, caches, page
    faults), then ``repeat`` times timed with ``time.perf_counter``; returns the last
    call's result with the times. Each result is dropped before the next call starts, so
    only one is alive at a time."""
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    result = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        result = None
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return Timing(first, times, result)


# ---- the machine --------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or `platform.processor()` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def available_memory() -> int | None:
    """Bytes of memory available now (``MemAvailable``), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def torch_missing() -> str | None:
    """Why PyTorch cannot be used here, or None if it is installed."""
    if importlib.util.find_spec("torch") is None:
        return "PyTorch is not installed (pip install 'refattn[oracle]')"
    return None


def numba_threading_layer() -> str:
    """Numba's threading layer, known only once a parallel Numba kernel has run."""
    import numba

    try:
        return numba.threading_layer()
    except ValueError:
        return "not used (the backend ran no parallel Numba code)"


def machine_info() -> dict:
    """CPU, cores, thread counts and library versions, as a JSON-able dict."""
    import numba
    import scipy

    info = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "numba_threads": int(numba.config.NUMBA_NUM_THREADS),
        "numba_threading_layer": numba_threading_layer(),
        "python": platform.python_version(),
        "refattn": __version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "numba": numba.__version__,
        "torch": None,
        "torch_threads": None,
    }
    if torch_missing() is None:
        info["torch"] = importlib.metadata.version("torch")
        if "torch" in _TORCH:  # threads only once the harness has set torch up
            info["torch_threads"] = _TORCH["torch"].get_num_threads()
    try:
        info["load_average"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not available
        info["load_average"] = None
    memory = available_memory()
    info["memory_available_gib"] = None if memory is None else round(memory / 2**30, 1)
    return info


def machine_line(info: dict) -> str:
    """One line (two, really) describing the machine, from :func:`machine_info`."""
    if info["torch"] is None:
        torch_part = "torch not installed"
    elif info["torch_threads"] is None:
        torch_part = f"torch {info['torch']} (not used)"
    else:
        torch_part = f"torch {info['torch']} ({info['torch_threads']} threads)"
    mem = info.get("memory_available_gib")
    return (f"machine: {info['cpu']}, {info['cores']} cores"
            + (f", {mem} GiB available" if mem is not None else "")
            + (f", 1-min load average {info['load_average']}" if info.get("load_average") is not None else "")
            + f"; numba {info['numba_threads']} threads, threading layer "
            f"{info['numba_threading_layer']}\n"
            f"versions: python {info['python']}, refattn {info['refattn']}, numpy {info['numpy']}, "
            f"scipy {info['scipy']}, numba {info['numba']}, {torch_part}")


def roofline(size: int = 2048, repeats: int = 3, dtypes=(np.float32, np.float64)) -> dict[str, float]:
    """This machine's BLAS matmul GFLOP/s per dtype: NumPy ``a @ b`` on ``size x size``
    matrices, ``2 size^3`` FLOPs, best of ``repeats`` after one warm-up."""
    rng = np.random.default_rng(0)
    out = {}
    for dt in dtypes:
        a = rng.standard_normal((size, size), dtype=dt)
        b = rng.standard_normal((size, size), dtype=dt)
        a @ b
        best = math.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[np.dtype(dt).name] = gflops(2 * size**3, best)
    return out


# ---- masks ---------------------------------------------------------------------------------
#: A FlexAttention ``mask_mod``: ``rule(b, h, q_idx, kv_idx) -> bool``, written with
#: operators only (``&``, ``|``, ``<=``, ``%``) so that it also evaluates on NumPy arrays.
Rule = Callable[[Any, Any, Any, Any], Any]

#: The largest ``Lq * Lk`` for which a dense boolean copy of a mask is built for a peer.
DENSE_MASK_LIMIT = 2**31


class BenchMask:
    """A refattn `Mask` (one group, ``(Lq, Lk)``) with the forms the peers need.

    ``rule`` is the pattern's rule as a FlexAttention ``mask_mod``, when the case has one;
    ``causal`` says the mask is exactly top-left causal (what SDPA's ``is_causal`` takes).
    Derived forms are built on first use and kept until the object is dropped.
    """

    def __init__(self, mask: Mask, *, rule: Rule | None = None, causal: bool = False):
        if mask.ndim != 2:
            raise ValueError("BenchMask takes a single (Lq, Lk) mask, shared by every head")
        self.mask = mask
        self.rule = rule
        self.causal = causal
        self.nnz = mask.nnz
        self.shape = mask.matrix_shape
        self._cache: dict[str, Any] = {}

    def blocked(self) -> np.ndarray:
        """Dense boolean ``(Lq, Lk)``, True where an entry is *removed*."""
        if "blocked" not in self._cache:
            lq, lk = self.shape
            if lq * lk > DENSE_MASK_LIMIT:
                raise MemoryError(f"a dense {lq} x {lk} mask is too big")
            self._cache["blocked"] = ~self.mask.to_dense()
        return self._cache["blocked"]

    def flex_block_mask(self, block_size: int = 128):
        """A FlexAttention ``BlockMask`` (on the CPU) for this mask.

        The block structure (which tiles are empty, partial, full) comes from
        refattn's :meth:`Mask.to_flex_block_mask` and goes in through
        ``BlockMask.from_kv_blocks``: O(nnz). (``create_block_mask`` evaluates the
        ``mask_mod`` on all ``Lq * Lk`` pairs: 15 s at n = 262,144 and 4.6 min at
        n = 1,048,576 on a 2-core machine, even compiled.) Inside partial tiles flex
        applies ``mask_mod``: the case's ``rule`` where it has one, else a lookup in a
        dense boolean tensor of the mask (``Lq * Lk`` bytes). refattn's own
        ``to_torch_block_mask`` (a ``searchsorted`` in the mask_mod) does not compile
        with inductor on the CPU, hence not used. A wrong block structure or rule shows
        up in the agreement check.
        """
        key = f"flex{block_size}"
        if key not in self._cache:
            import torch
            from torch.nn.attention.flex_attention import BlockMask

            arrays = self.mask.to_flex_block_mask(block_size)
            rule = self.rule
            if rule is None:
                dense = torch.from_numpy(~self.blocked())

                def rule(b, h, q_idx, kv_idx):
                    return dense[q_idx, kv_idx]

            t = {name: torch.from_numpy(np.array(getattr(arrays, name)))
                 for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")}
            self._cache[key] = BlockMask.from_kv_blocks(
                t["kv_num_blocks"], t["kv_indices"], t["full_kv_num_blocks"], t["full_kv_indices"],
                BLOCK_SIZE=arrays.block_size, mask_mod=rule, seq_lengths=arrays.seq_lengths)
        return self._cache[key]

    def free(self) -> None:
        """Drop the derived forms."""
        self._cache.clear()


def rule_matches(mask: Mask, rule: Rule) -> bool:
    """Whether ``rule`` evaluated on NumPy index grids gives exactly ``mask`` (small masks)."""
    lq, lk = mask.matrix_shape
    got = rule(0, 0, np.arange(lq)[:, None], np.arange(lk)[None, :])
    return bool(np.array_equal(np.broadcast_to(got, (lq, lk)), mask.to_dense()))


# ---- results -------------------------------------------------------------------------------
@dataclasses.dataclass
class Outputs:
    """What a route returns: ``out`` and, for forward+backward, ``dq``, ``dk``, ``dv``
    (NumPy arrays, shapes as refattn's)."""

    out: np.ndarray
    dq: np.ndarray | None = None
    dk: np.ndarray | None = None
    dv: np.ndarray | None = None

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays present, by name."""
        return {name: getattr(self, name) for name in ("out", "dq", "dk", "dv")
                if getattr(self, name) is not None}


def _max_abs(a: np.ndarray, b: np.ndarray | None = None, chunk: int = 1 << 22) -> float:
    """``max|a|`` or ``max|b - a|`` in float64, a chunk at a time (the 1M-token rows hold
    GBs per array: no full-size temporaries)."""
    a = a.reshape(-1)
    b = None if b is None else b.reshape(-1)
    worst = 0.0
    for i in range(0, a.size, chunk):
        x = a[i:i + chunk].astype(np.float64)
        if b is not None:
            x = b[i:i + chunk].astype(np.float64) - x
        here = float(np.max(np.abs(x)))
        if math.isnan(here):
            return math.nan
        worst = max(worst, here)
    return worst


def compare(ref: Outputs, got: Outputs, dtype) -> tuple[float, bool]:
    """``(error, agrees)``: the largest ``max|got - ref| / max|ref|`` over the arrays both
    have, and whether it is within `TOLERANCE` for ``dtype``."""
    worst = 0.0
    theirs = got.arrays()
    for name, a in ref.arrays().items():
        if name not in theirs:
            continue
        b = theirs[name]
        if b.shape != a.shape:
            return math.inf, False
        peak, diff = _max_abs(a), _max_abs(a, b)
        err = diff / (peak or 1.0)
        if not math.isfinite(err):
            return math.inf, False
        worst = max(worst, err)
    return worst, worst <= TOLERANCE[np.dtype(dtype)]


def _scale(q: np.ndarray) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


# ---- refattn itself ------------------------------------------------------------------------
def refattn_route(backend: str) -> Callable:
    """The route under test: ``refattn.forward`` (and ``refattn.backward``) with
    ``backend`` and ``compute_dtype = dtype``, as a ``run(q, k, v, mask, dout, dtype, mode)``."""

    def run(q, k, v, mask: BenchMask, dout, dtype, mode) -> Outputs:
        r = _refattn_forward(q, k, v, mask.mask, scale=_scale(q), backend=backend, compute_dtype=dtype)
        if mode == "fwd":
            return Outputs(r.out)
        g = _refattn_backward(q, k, v, r.out, r.lse, dout, mask.mask, scale=_scale(q),
                              backend=backend, compute_dtype=dtype)
        return Outputs(r.out, g.dq, g.dk, g.dv)

    run.__name__ = f"refattn_{backend}"
    return run


# ---- peers ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Peer:
    """One implementation to compare with.

    ``run(q, k, v, mask, dout, dtype, mode) -> Outputs``; ``skip(mask, heads, dtype, mode)``
    returns why the peer does not apply or does not fit (None: it runs); ``work(mask,
    heads)`` is what its time grows with (to extrapolate for ``--max-peer-seconds``);
    ``setup(mask)``, untimed, builds what the peer keeps per mask; ``needs`` names
    the optional dependency it needs (``"torch"``), see :func:`dependency_missing`."""

    name: str
    run: Callable
    skip: Callable
    work: Callable
    help: str
    setup: Callable | None = None
    needs: str | None = None


# numpy: dense attention, the textbook formulas --------------------------------------------
NUMPY_LIMIT_BYTES = 6 * 2**30


def numpy_attention(q, k, v, mask: BenchMask, dout, dtype, mode) -> Outputs:
    """Dense attention in NumPy in ``dtype``: ``S = scale Q K^T``, masked, softmax, ``P V``;
    backward ``dP = dO V^T``, ``dS = P (dP - rowsum(dO O))``, ``dQ = scale dS K``,
    ``dK = scale dS^T Q``, ``dV = P^T dO``. A row with no allowed key gives 0."""
    dtype = np.dtype(dtype)
    q, k, v = (np.asarray(a, dtype=dtype) for a in (q, k, v))
    group = q.shape[1] // k.shape[1]
    kr, vr = (np.repeat(a, group, axis=1) if group > 1 else a for a in (k, v))
    scale = dtype.type(_scale(q))
    s = np.matmul(q, kr.swapaxes(-1, -2))
    s *= scale
    np.copyto(s, -np.inf, where=mask.blocked())
    top = s.max(axis=-1, keepdims=True)
    np.copyto(top, 0, where=~np.isfinite(top))  # empty rows: exp(-inf - 0) = 0
    s -= top
    np.exp(s, out=s)
    total = s.sum(axis=-1, keepdims=True)
    np.copyto(total, 1, where=total == 0)
    s /= total  # s is P now
    out = np.matmul(s, vr)
    if mode == "fwd":
        return Outputs(out)
    dout = np.asarray(dout, dtype=dtype)
    dp = np.matmul(dout, vr.swapaxes(-1, -2))
    dp -= np.sum(dout * out, axis=-1, keepdims=True)
    dp *= s  # dS
    dv = np.matmul(s.swapaxes(-1, -2), dout)
    del s
    dq = np.matmul(dp, kr)
    dq *= scale
    dk = np.matmul(dp.swapaxes(-1, -2), q)
    dk *= scale
    del dp
    if group > 1:
        b, h, lk, _ = k.shape
        dk = dk.reshape(b, h, group, lk, -1).sum(axis=2)
        dv = dv.reshape(b, h, group, lk, -1).sum(axis=2)
    return Outputs(out, dq, dk, dv)


def _numpy_skip(mask: BenchMask, heads, dtype, mode):
    lq, lk = mask.shape
    if 3 * heads * lq * lk * 8 > NUMPY_LIMIT_BYTES:
        return "its dense H x n x n arrays (3 * H*n*n*8 bytes) exceed 6 GiB"
    return None


# sparse: refattn's SciPy backend --------------------------------------------------------------
SPARSE_LIMIT = 2e8


def _sparse_skip(mask: BenchMask, heads, dtype, mode):
    if mask.nnz * heads > SPARSE_LIMIT:
        return f"nnz*H > {SPARSE_LIMIT:.0e} (too slow and too big)"
    return None


# torch: SDPA and compiled FlexAttention ----------------------------------------------------
_TORCH: dict[str, Any] = {}


def setup_torch(threads: int | None = None, cache_dir: str | None = None):
    """Import torch once: ``TORCHINDUCTOR_CACHE_DIR`` (if not set already) to ``cache_dir``,
    ``threads`` intra-op threads (default: this process's cores), and a high recompile
    limit (compiled flex recompiles per shape, dtype and mask; past dynamo's default of
    8 it would silently fall back to eager flex, ~50x slower). Returns the module."""
    if "torch" not in _TORCH:
        if cache_dir is not None:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.abspath(cache_dir))
        import torch
        import torch._dynamo

        torch.set_num_threads(threads or usable_cores())
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 4096)
        _TORCH["torch"] = torch
    return _TORCH["torch"]


def _torch_inputs(q, k, v, grad: bool):
    torch = setup_torch()
    return [torch.from_numpy(a).requires_grad_(grad) for a in (q, k, v)]


def sdpa_attention(q, k, v, mask: BenchMask, dout, dtype, mode) -> Outputs:
    """``torch.nn.functional.scaled_dot_product_attention(..., is_causal=True)``; the
    backward through autograd (``out.backward(dout)``). Causal masks only."""
    torch = setup_torch()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    gqa = q.shape[1] != k.shape[1]
    if mode == "fwd":
        with torch.no_grad():
            qt, kt, vt = _torch_inputs(q, k, v, False)
            return Outputs(sdpa(qt, kt, vt, is_causal=True, scale=_scale(q), enable_gqa=gqa).numpy())
    qt, kt, vt = _torch_inputs(q, k, v, True)
    out = sdpa(qt, kt, vt, is_causal=True, scale=_scale(q), enable_gqa=gqa)
    out.backward(torch.from_numpy(np.ascontiguousarray(dout, dtype=dtype)))
    return Outputs(out.detach().numpy(), qt.grad.numpy(), kt.grad.numpy(), vt.grad.numpy())


def _sdpa_skip(mask: BenchMask, heads, dtype, mode):
    if not mask.causal:
        return "is_causal covers the dense causal case only"
    return None


def compiled_flex():
    """``torch.compile(flex_attention, dynamic=False)``, made once: static shapes give
    the fastest kernels; each new shape compiles once (cached on disk afterwards)."""
    if "flex" not in _TORCH:
        torch = setup_torch()
        from torch.nn.attention.flex_attention import flex_attention

        _TORCH["flex"] = torch.compile(flex_attention, dynamic=False)
    return _TORCH["flex"]


def flex_attention(q, k, v, mask: BenchMask, dout, dtype, mode) -> Outputs:
    """Compiled FlexAttention on the CPU with :meth:`BenchMask.flex_block_mask`; forward
    only (on the CPU compiled flex has no backward and no LSE)."""
    if mode != "fwd":
        raise NotImplementedError("compiled flex_attention has no backward on the CPU")
    torch = setup_torch()
    fn = compiled_flex()
    with torch.no_grad():
        qt, kt, vt = _torch_inputs(q, k, v, False)
        out = fn(qt, kt, vt, block_mask=mask.flex_block_mask(), scale=float(_scale(q)),
                 enable_gqa=q.shape[1] != k.shape[1])
    return Outputs(out.numpy())


def _flex_skip(mask: BenchMask, heads, dtype, mode):
    if mode != "fwd":
        return "compiled flex on the CPU is forward-only (no backward)"
    if mask.rule is None and mask.shape[0] * mask.shape[1] > DENSE_MASK_LIMIT:
        return "no rule for this pattern and its dense mask is too big for a mask_mod"
    return None


PEERS: dict[str, Peer] = {
    "numpy": Peer(
        "numpy", numpy_attention, _numpy_skip, lambda m, h: h * m.shape[0] * m.shape[1],
        "plain NumPy dense attention with the boolean mask, in the benchmarked dtype",
        setup=lambda m: m.blocked()),
    "sparse": Peer(
        "sparse", refattn_route("sparse"), _sparse_skip, lambda m, h: h * m.nnz,
        "refattn's 'sparse' backend (SciPy SDDMM, segmented softmax, SpMM)"),
    "sdpa": Peer(
        "sdpa", sdpa_attention, _sdpa_skip, lambda m, h: h * m.shape[0] * m.shape[1],
        "torch scaled_dot_product_attention(is_causal=True), autograd backward",
        needs="torch"),
    "flex": Peer(
        "flex", flex_attention, _flex_skip, lambda m, h: h * m.nnz,
        "torch.compile(flex_attention) with a BlockMask, forward only on the CPU",
        setup=lambda m: m.flex_block_mask(), needs="torch"),
}


def dependency_missing(needs: str | None) -> str | None:
    """Why an optional dependency (``"torch"``) cannot be used here, or None."""
    if needs is None:
        return None
    if needs == "torch":
        return torch_missing()
    raise ValueError(f"unknown dependency {needs!r}")


def installed_peers() -> list[str]:
    """The peers whose dependencies are installed, in `PEERS` order."""
    return [name for name, p in PEERS.items() if dependency_missing(p.needs) is None]


# ---- tables --------------------------------------------------------------------------------
def format_table(headers: list[str], rows: list[list[str]], markdown: bool = False,
                 left: int = 1) -> str:
    """A plain-text table (columns right-aligned but the first ``left``) or a Markdown one."""
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join(":---" if i < left else "---:" for i in range(len(headers))) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def free_memory() -> None:
    """Collect garbage (after dropping the big arrays of a case)."""
    gc.collect()


def progress_line(row: dict) -> str:
    """One measured row as a line for stderr while a benchmark runs: each route's time,
    and DISAGREES where a peer's result is off refattn's."""
    ref = row["refattn"]
    parts = [f"refattn {ref['ms']:.2f} ms" if ref.get("status") == "ok" else "refattn -"]
    parts += [f"{p} {res['ms']:.2f} ms" + ("" if res["agrees"] else " DISAGREES")
              if res.get("status") == "ok" else f"{p} -" for p, res in row["peers"].items()]
    return f"  {row['case']} n={row['n']} H={row['heads']} {row['dtype']} {row['mode']}: " + ", ".join(parts)


def row_done(row: dict, doc: dict, json_path: str | None) -> None:
    """After each measured row: its line on stderr, and the JSON document so far (a long
    run that is stopped keeps what it measured)."""
    print(progress_line(row), file=sys.stderr, flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)


def finish_report(out, table_text: str, notes: list[str], doc: dict, json_path: str | None) -> None:
    """The table, its footnotes, and the final JSON document."""
    print(table_text, file=out)
    print(file=out)
    for note in notes:
        print(note, file=out)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=1)
