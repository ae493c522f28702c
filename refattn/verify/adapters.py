"""Implementations in the verifier's calling convention (spec/verify.md), ready to verify.

``refattn verify refattn.adapters:cpu`` checks refattn's own ``cpu`` backend (and
``tiled``, ``sparse``, ``dense``, ``cuda`` likewise); ``sdpa`` and ``flex`` wrap PyTorch's
``scaled_dot_product_attention`` and ``torch.compile(flex_attention)`` (use them with
``--framework torch``; they need the ``oracle`` extra). Each is also a worked example of
writing an adapter for one's own kernel.
"""

from __future__ import annotations

import numpy as np

from ..attention import backward as _backward
from ..attention import forward as _forward
from .._runtime import notice
from ..bias import ALiBi

_COMPUTE = {"float64": "float64", "float32": "float32"}


def _refattn_backend(name: str):
    """Forward and backward of refattn backend ``name`` in the convention: the mask as a
    `refattn.Mask` (``mask_form = "csr"``), the compute dtype that of the inputs."""

    def call_kwargs(q, scale, softcap, bias, alibi_slopes, alibi_align, dropout_p, dropout_keep, mask):
        from ..dropout import Dropout

        dt = np.dtype(q.dtype).name
        kw = {"scale": scale, "softcap": softcap, "backend": name,
              "compute_dtype": _COMPUTE.get(dt, "float32") if name != "dense" else None}
        if bias is not None:
            kw["bias"] = np.asarray(bias, np.float64)
        if alibi_slopes is not None:
            kw["bias"] = ALiBi(alibi_slopes, alibi_align)
        if dropout_keep is not None:
            B, H = dropout_keep.shape[:2]
            kw["dropout"] = Dropout(dropout_p, [[dropout_keep[b, h][mask.group(b, h).toarray()]
                                                 for h in range(H)] for b in range(B)])
        return kw

    def forward(q, k, v, *, mask, scale, softcap=None, bias=None, alibi_slopes=None, alibi_align=None,
                dropout_p=None, dropout_keep=None):
        kw = call_kwargs(q, scale, softcap, bias, alibi_slopes, alibi_align, dropout_p, dropout_keep, mask)
        r = _forward(q, k, v, mask, **kw)
        return r.out, r.lse

    def backward(q, k, v, out, lse, dout, *, mask, scale, softcap=None, bias=None, alibi_slopes=None,
                 alibi_align=None, dropout_p=None, dropout_keep=None, dlse=None):
        kw = call_kwargs(q, scale, softcap, bias, alibi_slopes, alibi_align, dropout_p, dropout_keep, mask)
        g = _backward(q, k, v, out, lse, dout, mask, dlse=dlse, **kw)
        return g.dq, g.dk, g.dv, g.dbias                       # dbias comes back in the bias's shape

    forward.mask_form = "csr"
    forward.backward = backward
    forward.__name__ = backward.__name__ = f"refattn_{name}"
    return forward


dense = _refattn_backend("dense")
sparse = _refattn_backend("sparse")
tiled = _refattn_backend("tiled")
cpu = _refattn_backend("cpu")
cuda = _refattn_backend("cuda")


# ---- PyTorch ----------------------------------------------------------------------------------

def _empty_rows(mask_dense):
    return ~mask_dense.any(dim=-1)


def sdpa(q, k, v, *, mask, scale, bias=None):
    """``torch.nn.functional.scaled_dot_product_attention`` with the mask (and a dense
    bias) as an additive float mask. SDPA gives NaN on rows with no allowed key and no LSE:
    the adapter writes refattn's 0 on those rows; the LSE is not provided."""
    import torch

    m = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    add = torch.zeros(m.shape, dtype=q.dtype).masked_fill(~m, float("-inf"))
    if bias is not None:
        add = add + bias
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=scale,
                                                           enable_gqa=q.shape[1] != k.shape[1])
    return out.masked_fill(_empty_rows(m)[..., None], 0.0)


def _sdpa_backward(q, k, v, out, lse, dout, *, mask, scale, bias=None):
    import torch

    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    b = bias.detach().requires_grad_() if bias is not None else None
    o = sdpa(q, k, v, mask=mask, scale=scale, bias=b)
    grads = torch.autograd.grad(o, [q, k, v] + ([b] if b is not None else []), dout, allow_unused=True)
    dq, dk, dv = (torch.nan_to_num(g, nan=0.0) for g in grads[:3])   # NaN rows: no allowed key
    return (dq, dk, dv) + ((torch.nan_to_num(grads[3], nan=0.0),) if b is not None else ())


sdpa.mask_form = "dense"
sdpa.backward = _sdpa_backward

_FLEX = {}


def flex(q, k, v, *, mask, mask_dense, scale, softcap=None, bias=None):
    """``torch.compile(flex_attention)`` with a ``BlockMask`` from refattn's block arrays
    and a ``mask_mod`` that reads the dense mask; softcap and a dense bias as a
    ``score_mod``. Returns the output only: compiled flex on the CPU runs inference only
    and cannot return the LSE (torch 2.13), so the LSE is not provided and there is no
    backward."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if "fn" not in _FLEX:
        notice("compiling FlexAttention with torch.compile for each new shape (about 20 s the first time in a "
               "process, seconds after; torch's inductor cache keeps them)")
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    fm = mask
    dense = mask_dense.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2]).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):
        return dense[b, h, q_idx, kv_idx]

    t = lambda x: torch.from_numpy(np.array(x))  # noqa: E731  (a writable copy)
    block_mask = BlockMask.from_kv_blocks(
        t(fm.kv_num_blocks), t(fm.kv_indices), t(fm.full_kv_num_blocks), t(fm.full_kv_indices),
        BLOCK_SIZE=fm.block_size, mask_mod=mask_mod, seq_lengths=(q.shape[2], k.shape[2]))
    cap = softcap

    def score_mod(score, b, h, q_idx, kv_idx):
        if cap is not None:
            score = cap * torch.tanh(score / cap)
        if bias is not None:
            bb = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
            score = score + bb[b, h, q_idx, kv_idx]
        return score

    with torch.no_grad():
        return _FLEX["fn"](q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                           enable_gqa=q.shape[1] != k.shape[1])


flex.mask_form = "flex"
flex.flex_block = 128
