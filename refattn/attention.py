"""The public entry points ``refattn.forward`` and ``refattn.backward``."""

from __future__ import annotations

import numpy as np

from . import backends
from .contract import HOST, Grads, Result, check_backward_inputs, check_magnitudes, make_problem, on_cuda_device
from .errors import RefattnError


def _array_space(impl, backend: str, **arrays):
    """Where the call's arrays live: on the device when any of them is a device array of a
    backend that takes them (its ``DEVICE_ARRAYS``), else in host memory (where
    validation refuses device arrays)."""
    device = getattr(impl, "DEVICE_ARRAYS", None)
    if device is None:
        return HOST
    if any(device.owns(x) for x in arrays.values()):
        return device
    for name, x in arrays.items():
        if on_cuda_device(x):  # a device array the backend cannot take: Numba's simulator is on
            raise RefattnError(f"{name}: a CUDA device array, but backend {backend!r} runs on Numba's CUDA "
                               "simulator here, which takes only its own arrays (numba.cuda.to_device)")
    return HOST


def _overflow(name: str, idx, dtype, what: str = "the result is not finite") -> RefattnError:
    return RefattnError(
        f"{name}: {what} at index {list(idx)} although every input is finite; the computation "
        f"overflows {np.dtype(dtype).name} (inputs of extreme magnitude?)"
    )


def _check_result(r: Result, problem, arrays, dtype) -> Result:
    """Finite inputs must give a finite ``out`` and an ``lse`` that is -inf exactly on the
    mask's empty rows and finite on every other: a row whose sums overflowed is an error,
    never passed off as an empty row (spec/semantics.md, section 7)."""
    idx = arrays.first_nonfinite(r.lse, allow_neginf=True)
    if idx is not None:
        raise _overflow("lse", idx, dtype)
    idx = arrays.first_bad_lse(problem, r.lse)
    if idx is not None:
        raise _overflow("lse", idx, dtype, "-inf on a row with allowed keys")
    idx = arrays.first_nonfinite(r.out)
    if idx is not None:
        raise _overflow("out", idx, dtype)
    return r


def _check_grads(g: Grads, arrays, dtype) -> Grads:
    for name in ("dq", "dk", "dv"):
        idx = arrays.first_nonfinite(getattr(g, name))
        if idx is not None:
            raise _overflow(name, idx, dtype)
    if g.dbias is not None:  # in the bias's layout, in host memory
        leaves = [g.dbias] if isinstance(g.dbias, np.ndarray) else [x for row in g.dbias for x in row]
        for leaf in leaves:
            idx = HOST.first_nonfinite(leaf)
            if idx is not None:
                raise _overflow("dbias", idx, dtype)
    return g


def forward(q, k, v, mask=None, *, scale=None, softcap=None, bias=None, dropout=None,
            backend: str = "dense", compute_dtype=None, options: dict | None = None) -> Result:
    """Attention forward: ``Result(out, lse)`` (spec/semantics.md).

    Parameters
    ----------
    q, k, v : arrays of shape (B, H, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, Dv)
        One dtype among float16, bfloat16 (ml_dtypes), float32, float64; finite.
        ``H % Hkv == 0``; query head ``h`` reads kv head ``h // (H // Hkv)``.
    mask : refattn.Mask or None
        Allowed (query, key) entries, ``(Lq, Lk)`` or per group ``(Bm, Hm, Lq, Lk)``;
        None means every key is allowed.
    scale : float, default ``1 / sqrt(D)``
    softcap : float > 0 or None
        ``S <- softcap * tanh(S / softcap)`` after scaling.
    bias : array broadcastable to (B, H, Lq, Lk), refattn.SparseBias, refattn.ALiBi or None
        Added after the softcap.
    dropout : refattn.Dropout or None
        Explicit keep-mask on the mask's nonzeros; ``O = (P * Z / (1 - p)) V``.
    backend : str
        One of ``refattn.backends.names()``.
    compute_dtype : dtype or None
        The precision the backend computes in: float64 (every backend's default; the
        only one of ``dense``) or float32 (``sparse``, ``tiled``: the kernel rounds as a
        float32 kernel would). Results come back in this dtype.
    options : dict or None
        The backend's own tuning options, e.g. ``{"block_q": 64, "block_k": 64}`` for
        ``tiled``; unknown options are errors.

    Returns
    -------
    Result(out, lse)
        ``out`` (B, H, Lq, Dv) and ``lse`` (B, H, Lq), natural log; a row with no
        allowed key has ``out = 0`` and ``lse = -inf``.
    """
    impl = backends.get(backend)
    config = backends.configure(impl, backend, compute_dtype, options)
    arrays = _array_space(impl, backend, q=q, k=k, v=v)
    problem = make_problem(q, k, v, mask, scale=scale, softcap=softcap, bias=bias, dropout=dropout,
                           arrays=arrays)
    if arrays is HOST:
        check_magnitudes(problem, config.compute_dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, as an error
        return _check_result(impl.forward(problem, config), problem, arrays, config.compute_dtype)


def backward(q, k, v, out, lse, dout, mask=None, *, scale=None, softcap=None, bias=None,
             dropout=None, dlse=None, backend: str = "dense", compute_dtype=None,
             options: dict | None = None) -> Grads:
    """Attention backward: ``Grads(dq, dk, dv, dbias)`` (spec/backward.md).

    Takes the forward's inputs and its ``out`` and ``lse``, the upstream gradient
    ``dout`` (shape of ``out``) and optionally ``dlse`` (shape of ``lse``).
    Probabilities are recomputed from ``lse``, never stored. ``lse`` must be -inf
    exactly on the rows with no allowed key. ``dk``/``dv`` sum over the query heads
    of each GQA group; ``dbias`` has the layout of ``bias`` (for `ALiBi`, the
    gradient with respect to its slopes), or is None without a bias. ``backend``,
    ``compute_dtype`` and ``options`` as in `forward`.
    """
    impl = backends.get(backend)
    config = backends.configure(impl, backend, compute_dtype, options)
    arrays = _array_space(impl, backend, q=q, k=k, v=v, out=out, lse=lse, dout=dout, dlse=dlse)
    problem = make_problem(q, k, v, mask, scale=scale, softcap=softcap, bias=bias, dropout=dropout,
                           arrays=arrays)
    out, lse, dout, dlse = check_backward_inputs(problem, out, lse, dout, dlse, arrays)
    if arrays is HOST:
        check_magnitudes(problem, config.compute_dtype, dout)
    with np.errstate(over="ignore", invalid="ignore"):
        return _check_grads(impl.backward(problem, out, lse, dout, dlse, config), arrays, config.compute_dtype)
