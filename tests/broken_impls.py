"""Implementations in the verifier's calling convention (spec/verify.md) for tests/test_verify.py.

Most are deliberately wrong in one known way (each built on refattn's own dense backend, so
that everything but the planted mistake is right); the verifier must catch each one on the
cases that exercise it, name the tensor that is wrong, and pass the cases that do not.
The others are correct implementations with an unusual contract (the BSHD layout) or with
missing features (no ``softcap`` keyword, raising `Unsupported`), and one that crashes.
"""

from __future__ import annotations

import numpy as np

from refattn import Mask, adapters
from refattn.verify import Unsupported

_fwd = adapters.dense                 # forward(q, k, v, *, mask, scale, ...) -> (out, lse); mask_form "csr"
_bwd = adapters.dense.backward        # backward(q, k, v, out, lse, dout, *, mask, scale, ..., dlse) -> tuple


def _csr(fn):
    fn.mask_form = "csr"
    return fn


def _empty_rows(mask: Mask, B: int, H: int) -> np.ndarray:
    """(B, H, Lq) bool: the rows with no allowed key."""
    return np.stack([np.stack([mask.row_counts(b, h) == 0 for h in range(H)]) for b in range(B)])


# ---- 1. wrong scale: 1/D instead of the given scale ------------------------------------------------

@_csr
def wrong_scale(q, k, v, *, mask, scale, **kw):
    return _fwd(q, k, v, mask=mask, scale=1.0 / q.shape[-1], **kw)


def _wrong_scale_backward(q, k, v, out, lse, dout, *, mask, scale, **kw):
    return _bwd(q, k, v, out, lse, dout, mask=mask, scale=1.0 / q.shape[-1], **kw)


wrong_scale.backward = _wrong_scale_backward


# ---- 2. a sliding window one key too wide on the left ----------------------------------------------

def _widen_left(mask: Mask) -> Mask:
    """Each non-empty row also allows the key just left of its first allowed one: for a
    sliding window (i - left .. i + right) the entry j = i - left - 1, where it exists."""
    dense = mask.to_dense()
    flat = dense.reshape(-1, dense.shape[-1])
    for row in flat:
        cols = np.flatnonzero(row)
        if cols.size and cols[0] > 0:
            row[cols[0] - 1] = True
    return Mask.from_dense(flat.reshape(dense.shape))


@_csr
def window_off_by_one(q, k, v, *, mask, scale, **kw):
    return _fwd(q, k, v, mask=_widen_left(mask), scale=scale, **kw)


def _window_off_by_one_backward(q, k, v, out, lse, dout, *, mask, scale, **kw):
    return _bwd(q, k, v, out, lse, dout, mask=_widen_left(mask), scale=scale, **kw)


window_off_by_one.backward = _window_off_by_one_backward


# ---- 3. NaN on rows with no allowed key -------------------------------------------------------------

@_csr
def nan_empty_rows(q, k, v, *, mask, scale, **kw):
    out, lse = _fwd(q, k, v, mask=mask, scale=scale, **kw)
    empty = _empty_rows(mask, q.shape[0], q.shape[1])
    out, lse = np.array(out), np.array(lse)
    out[empty] = np.nan          # e.g. 0/0 from a softmax over no key
    lse[empty] = np.nan
    return out, lse


def _nan_empty_rows_backward(q, k, v, out, lse, dout, *, mask, scale, **kw):
    """Correct (it repairs its forward's NaN rows before differentiating)."""
    empty = _empty_rows(mask, q.shape[0], q.shape[1])
    out, lse = np.array(out), np.array(lse)
    out[empty] = 0
    lse[empty] = -np.inf
    return _bwd(q, k, v, out, lse, dout, mask=mask, scale=scale, **kw)


nan_empty_rows.backward = _nan_empty_rows_backward


# ---- 4. GQA without the reduction over each kv head's query heads in the backward ------------------

@_csr
def gqa_no_reduction(q, k, v, *, mask, scale, **kw):
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


def _gqa_no_reduction_backward(q, k, v, out, lse, dout, *, mask, scale, **kw):
    """dk, dv of the first query head of each group only (the others' contributions dropped)."""
    group = q.shape[1] // k.shape[1]
    k_rep, v_rep = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    dq, dk, dv, *rest = _bwd(q, k_rep, v_rep, out, lse, dout, mask=mask, scale=scale, **kw)
    return (dq, dk[:, ::group], dv[:, ::group], *rest)


gqa_no_reduction.backward = _gqa_no_reduction_backward


# ---- correct, in the BSHD layout (sequence before heads) ----------------------------------------------

def _t(x):
    return None if x is None else np.ascontiguousarray(np.swapaxes(x, 1, 2))


@_csr
def bshd(q, k, v, *, mask, scale, **kw):
    """q (B, Lq, H, D), k (B, Lk, Hkv, D), v (B, Lk, Hkv, Dv) -> out (B, Lq, H, Dv), lse (B, H, Lq)."""
    out, lse = _fwd(_t(q), _t(k), _t(v), mask=mask, scale=scale, **kw)
    return _t(out), lse


def _bshd_backward(q, k, v, out, lse, dout, *, mask, scale, **kw):
    dq, dk, dv, *rest = _bwd(_t(q), _t(k), _t(v), _t(out), lse, _t(dout), mask=mask, scale=scale, **kw)
    return (_t(dq), _t(dk), _t(dv), *rest)


bshd.backward = _bshd_backward


# ---- correct but without features; one that crashes ----------------------------------------------------

@_csr
def no_softcap(q, k, v, *, mask, scale, bias=None, alibi_slopes=None, alibi_align=None, dropout_p=None,
               dropout_keep=None):
    """Every keyword of the convention but ``softcap``: the softcap cases are unsupported."""
    return _fwd(q, k, v, mask=mask, scale=scale, bias=bias, alibi_slopes=alibi_slopes, alibi_align=alibi_align,
                dropout_p=dropout_p, dropout_keep=dropout_keep)


no_softcap.backward = _bwd


@_csr
def raises_unsupported_on_softcap(q, k, v, *, mask, scale, softcap=None, **kw):
    if softcap is not None:
        raise Unsupported("this kernel has no softcap")
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


@_csr
def always_unsupported(q, k, v, *, mask, scale, **kw):
    raise Unsupported("supports nothing")


class KernelCrash(RuntimeError):
    pass


@_csr
def crashes(q, k, v, *, mask, scale, **kw):
    raise KernelCrash("kernel exploded")


@_csr
def crashes_on_gqa(q, k, v, *, mask, scale, **kw):
    """Correct, but raises on the cases with grouped kv heads."""
    if q.shape[1] != k.shape[1]:
        raise KernelCrash("no GQA in this kernel")
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


def _deep_helper(n: int):
    raise KernelCrash("a message longer than a table cell, over two lines:\n"
                      f"the tile loop ran past key block {n} of a sequence that has only {n - 1} of them")


@_csr
def crashes_in_a_helper(q, k, v, *, mask, scale, **kw):
    """Raises from a helper function, with a long message over two lines."""
    return _deep_helper(7)


@_csr
def shape_error(q, k, v, *, mask, scale, **kw):
    """Raises inside NumPy, called from this line."""
    return np.matmul(q, v[..., :1, :1, None])


@_csr
def forward_only(q, k, v, *, mask, scale, **kw):
    """Correct, with no backward."""
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


# ---- kernels that compute nothing ------------------------------------------------------------------

@_csr
def returns_none(q, k, v, *, mask, scale, **kw):
    return None


@_csr
def returns_empty_tuple(q, k, v, *, mask, scale, **kw):
    return ()


@_csr
def returns_empty_dict(q, k, v, *, mask, scale, **kw):
    return {}


@_csr
def returns_wrong_keys(q, k, v, *, mask, scale, **kw):
    out, lse = _fwd(q, k, v, mask=mask, scale=scale, **kw)
    return {"output": out, "logsumexp": lse}


@_csr
def backward_returns_none(q, k, v, *, mask, scale, **kw):
    """A correct forward whose backward computes nothing."""
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


backward_returns_none.backward = lambda *a, **kw: None


# ---- kernels that try to end the process -----------------------------------------------------------

@_csr
def exits_0(q, k, v, *, mask, scale, **kw):
    import sys
    sys.exit(0)


@_csr
def exits_1(q, k, v, *, mask, scale, **kw):
    raise SystemExit(1)


@_csr
def interrupted_on_gqa(q, k, v, *, mask, scale, **kw):
    """Correct, until the user presses Ctrl-C on the gqa case."""
    if q.shape[1] != k.shape[1]:
        raise KeyboardInterrupt
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


def dense_mask_form(q, k, v, *, mask, scale, **kw):
    """Correct, taking the mask as a dense (Bm, Hm, Lq, Lk) bool array (the default form)."""
    m = np.asarray(mask)
    return _fwd(q, k, v, mask=Mask.from_dense(m[0, 0] if m.shape[:2] == (1, 1) else m), scale=scale, **kw)


# ---- outputs that are no arrays of real numbers --------------------------------------------------

@_csr
def returns_a_generator(q, k, v, *, mask, scale, **kw):
    out, lse = _fwd(q, k, v, mask=mask, scale=scale, **kw)
    return (x for x in out), lse


@_csr
def returns_complex(q, k, v, *, mask, scale, **kw):
    out, lse = _fwd(q, k, v, mask=mask, scale=scale, **kw)
    return out.astype(np.complex128) + 1e-3j, lse


@_csr
def returns_a_grad_tensor(q, k, v, *, mask, scale, **kw):
    import torch

    out, lse = _fwd(q, k, v, mask=mask, scale=scale, **kw)
    return torch.tensor(np.asarray(out, np.float64), requires_grad=True), lse


@_csr
def returns_a_string(q, k, v, *, mask, scale, **kw):
    return "out", None


# ---- kernels that write into their inputs ------------------------------------------------------------

@_csr
def scales_q_in_place(q, k, v, *, mask, scale, **kw):
    """Correct outputs, but q is left scaled (a kernel that pre-scales its input in place)."""
    out, lse = _fwd(q, k, v, mask=mask, scale=scale, **kw)
    q *= 2
    return out, lse


@_csr
def backward_zeroes_dout(q, k, v, *, mask, scale, **kw):
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


def _zeroing_backward(q, k, v, out, lse, dout, **kw):
    grads = _bwd(q, k, v, out, lse, dout, **kw)
    dout[...] = 0
    return grads


backward_zeroes_dout.backward = _zeroing_backward


# ---- kernels that take the process down ---------------------------------------------------------

def _on_gqa(q, k):
    return q.shape[1] != k.shape[1]


@_csr
def segfaults_on_gqa(q, k, v, *, mask, scale, **kw):
    """Correct, but dereferences NULL on the grouped-heads case (as a native kernel might)."""
    if _on_gqa(q, k):
        import ctypes
        ctypes.string_at(0)
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


@_csr
def aborts_on_gqa(q, k, v, *, mask, scale, **kw):
    if _on_gqa(q, k):
        import os
        os.abort()
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


@_csr
def exits_hard_on_gqa(q, k, v, *, mask, scale, **kw):
    if _on_gqa(q, k):
        import os
        os._exit(3)
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


@_csr
def hangs_on_gqa(q, k, v, *, mask, scale, **kw):
    if _on_gqa(q, k):
        import time
        time.sleep(600)
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


@_csr
def asserts_on_gqa(q, k, v, *, mask, scale, **kw):
    assert q.shape[1] == k.shape[1]
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


@_csr
def backward_scales_k(q, k, v, *, mask, scale, **kw):
    return _fwd(q, k, v, mask=mask, scale=scale, **kw)


def _k_scaling_backward(q, k, v, out, lse, dout, **kw):
    grads = _bwd(q, k, v, out, lse, dout, **kw)
    k *= 0.5
    return grads


backward_scales_k.backward = _k_scaling_backward
