"""A small pre-LN transformer with hand-written backward passes, built for checkpointing.

Every module has

* ``forward(x, ctx) -> (y, saved)``: ``x`` is a float array of shape ``(B, L, d_model)``
  (``(B, L, d_in)`` for `Linear`, any shape for the elementwise ops), ``saved`` a plain dict
  of NumPy arrays (or nested dicts of them) holding **exactly** what the backward needs,
  nothing more;
* ``backward(dy, saved, ctx) -> dx``: the gradient with respect to the input. Parameter
  gradients are **accumulated** (``+=``) into the module's ``grads`` dict (same keys as
  ``params``, zeroed by ``zero_grad()``), so they appear whether or not the caller uses
  ``dx``;
* ``params`` / ``grads``: dicts name -> array. A composite module (`Block`) exposes flat
  dicts (``"attn.wq"``, ``"fc1.w"``, ...) whose arrays *are* its children's arrays, and
  `Stack.params()` / `Stack.grads()` yield ``(name, array)`` pairs named ``"blocks.{i}.attn.wq"``.

**No side effects.** A forward changes no state at all: no counters, no running
statistics, no parameter, no cache, and it never writes into its input. Randomness
(`Dropout`) is a pure function of the `Context` and of the module's fixed
``(layer, index)``, so running a forward again with the same ``ctx`` (a recompute, as
activation checkpointing does) reproduces its output and its saved dict bit for bit.
Saved arrays may be the caller's arrays themselves (no defensive copies): do not modify
an activation in place while its saved dict is alive.

**Precision.** float64 by default (``dtype=``); float32 works too. The attention core is
``refattn.forward`` / ``refattn.backward`` with the layer's ``backend`` and
``compute_dtype``; its results are cast to the activations' dtype where they leave it.

**What is saved** (N = B * L tokens, ``s`` = bytes per element, 8 in float64; ``D`` the
head dim, ``H``/``Hkv`` query/kv heads):

==================  =============================================  =========================
module              saved                                          bytes
==================  =============================================  =========================
`Linear`            ``x``                                          ``s N d_in``
`LayerNorm`         ``x``, ``mean``, ``rstd``                      ``s N (d + 2)``
`GELU`              ``x``                                          ``s N d``
`Dropout`           ``keep`` (bool); nothing when inactive         ``N d`` (or 0)
`Attention` "all"   ``x``, ``q``, ``k``, ``v``, ``out``, ``lse``   ``s N (d + (2H + 2Hkv) D + H)``
`Attention` "sel."  ``x``, ``q``, ``k``, ``v``                     ``s N (d + (H + 2Hkv) D)``
==================  =============================================  =========================

A `Block` saves the sum of its parts (the residual adds need nothing):

* ``save="all"``: ``s N (4 d + 4 + (2H + 2Hkv) D + H + 2 d_ff)`` bytes,
* ``save="selective"``: ``s N (4 d + 4 + (H + 2Hkv) D + 2 d_ff)`` bytes, i.e. less by the
  attention core's ``out`` and ``lse``, ``s N H (D + 1)``,
* plus ``2 N d`` bytes of keep-masks when dropout is active (``p > 0`` and ``ctx.train``).

Never an ``L x L`` array: the attention backward recomputes the probabilities from the
saved log-sum-exp (spec/backward.md).
"""

from __future__ import annotations

import functools

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.special import erf

from ..attention import backward as _attention_backward
from ..attention import forward as _attention_forward
from ..errors import RefattnError
from ..mask import Mask

__all__ = [
    "GELU", "Attention", "Block", "Context", "Dropout", "LayerNorm", "Linear", "Module", "Stack",
    "init_rng", "keep_mask", "saved_bytes",
]

SAVE_MODES = ("all", "selective")


# ---- context, randomness, bookkeeping ---------------------------------------------------
def _check_count(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise RefattnError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Context:
    """What a forward pass may depend on besides its input and parameters.

    ``seed``: the run's dropout seed. ``call``: the index of the forward pass in the
    *model's* sense (the training step, or the micro-batch), not the number of times a
    forward was executed: a recompute of the same pass uses the same ``ctx`` and so
    draws the same dropout masks. ``train``: dropout is active only when True.
    """

    seed: int = 0
    call: int = 0
    train: bool = True

    def __post_init__(self):
        _check_count(self.seed, "Context.seed")
        _check_count(self.call, "Context.call")
        if not isinstance(self.train, bool):
            raise RefattnError(f"Context.train must be a bool, got {self.train!r}")


def keep_mask(seed: int, layer: int, call: int, index: int, shape, p: float) -> np.ndarray:
    """The dropout keep-mask (bool, ``shape``) of dropout ``index`` of layer ``layer`` in
    forward pass ``call`` of run ``seed``.

    The draw, counter-based (a pure function of its arguments, no generator state is
    carried between calls)::

        g = numpy.random.Generator(numpy.random.PCG64(numpy.random.SeedSequence([seed, layer, call, index])))
        keep = g.random(shape) >= p

    ``SeedSequence`` hashes the four counters into PCG64's state, so neighbouring
    counters give independent streams.
    """
    key = [_check_count(seed, "seed"), _check_count(layer, "layer"), _check_count(call, "call"),
           _check_count(index, "index")]
    g = np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))
    return g.random(shape) >= p


def init_rng(seed: int, layer: int) -> np.random.Generator:
    """The parameter-initialisation generator of layer ``layer``:
    ``Generator(PCG64(SeedSequence([seed, layer])))``."""
    key = [_check_count(seed, "seed"), _check_count(layer, "layer")]
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(key)))


def saved_bytes(saved) -> int:
    """Total ``nbytes`` of the arrays in a saved dict, recursively (dicts, lists and tuples
    of them, e.g. `Stack.forward`'s list). Each leaf counts in full, as it is held."""
    if isinstance(saved, np.ndarray):
        return int(saved.nbytes)
    if isinstance(saved, dict):
        return sum(saved_bytes(v) for v in saved.values())
    if isinstance(saved, (list, tuple)):
        return sum(saved_bytes(v) for v in saved)
    raise TypeError(f"saved_bytes: a saved dict holds NumPy arrays and dicts of them, got {type(saved).__name__}")


def _flat(x: np.ndarray) -> np.ndarray:
    """``(..., d) -> (N, d)``: the token axes merged (a view when possible)."""
    return x.reshape(-1, x.shape[-1])


def _sum_tokens(x: np.ndarray) -> np.ndarray:
    """Sum over every axis but the last."""
    return _flat(x).sum(axis=0)


class Module:
    """Base: ``params`` and ``grads`` dicts (same keys) and ``zero_grad()``."""

    params: dict
    grads: dict

    def zero_grad(self) -> None:
        """Set every gradient to 0, in place (composites share their children's arrays)."""
        for g in self.grads.values():
            g[...] = 0

    def _new_params(self, **arrays) -> None:
        self.params = dict(arrays)
        self.grads = {k: np.zeros_like(v) for k, v in arrays.items()}


def _normal(rng: np.random.Generator, shape, fan_in: int, dtype) -> np.ndarray:
    """Scaled normal init, standard deviation ``1 / sqrt(fan_in)``."""
    return (rng.standard_normal(shape) / math.sqrt(fan_in)).astype(dtype)


# ---- elementwise and affine ops -------------------------------------------------------
class Linear(Module):
    """``y = x W + b``, ``W`` of shape ``(d_in, d_out)``; params ``"w"``, ``"b"`` (no ``"b"``
    with ``bias=False``).

    Saves ``x``. Backward, with tokens flattened to rows (``X`` is ``(N, d_in)``)::

        dW += X^T dY        db += sum_rows dY        dx = dY W^T

    Init: ``W ~ N(0, 1/d_in)`` from ``rng`` (default ``init_rng(seed, layer)``), ``b = 0``.
    """

    def __init__(self, d_in: int, d_out: int, *, bias: bool = True, seed: int = 0, layer: int = 0,
                 rng: np.random.Generator | None = None, dtype=np.float64):
        rng = init_rng(seed, layer) if rng is None else rng
        arrays = {"w": _normal(rng, (d_in, d_out), d_in, dtype)}
        if bias:
            arrays["b"] = np.zeros(d_out, dtype)
        self._new_params(**arrays)

    def forward(self, x, ctx):
        y = x @ self.params["w"]
        if "b" in self.params:
            y = y + self.params["b"]
        return y, {"x": x}

    def backward(self, dy, saved, ctx):
        x = saved["x"]
        self.grads["w"] += _flat(x).T @ _flat(dy)
        if "b" in self.grads:
            self.grads["b"] += _sum_tokens(dy)
        return dy @ self.params["w"].T


class LayerNorm(Module):
    """``y = xhat * gamma + beta`` over the last axis, ``xhat = (x - mu) / sigma``,
    ``sigma = sqrt(var + eps)`` (biased variance, as ``torch.nn.LayerNorm``); params
    ``"gamma"`` (ones) and ``"beta"`` (zeros).

    Saves ``x``, ``mean = mu`` and ``rstd = 1 / sigma`` (the last two of shape ``x.shape[:-1]``);
    ``xhat`` is rebuilt from them in backward with the forward's own arithmetic. Backward,
    with ``g = dy * gamma`` and means over the normalised axis::

        dx      = (1 / sigma) (g - mean(g) - xhat * mean(g * xhat))
        dgamma += sum_tokens(dy * xhat)        dbeta += sum_tokens(dy)
    """

    def __init__(self, d: int, *, eps: float = 1e-5, dtype=np.float64):
        self.eps = float(eps)
        self._new_params(gamma=np.ones(d, dtype), beta=np.zeros(d, dtype))

    def _stats(self, x):
        mean = x.mean(axis=-1)
        xc = x - mean[..., None]
        var = (xc * xc).mean(axis=-1)
        return mean, 1.0 / np.sqrt(var + self.eps)

    @staticmethod
    def _xhat(x, mean, rstd):
        return (x - mean[..., None]) * rstd[..., None]

    def forward(self, x, ctx):
        mean, rstd = self._stats(x)
        y = self._xhat(x, mean, rstd) * self.params["gamma"] + self.params["beta"]
        return y, {"x": x, "mean": mean, "rstd": rstd}

    def backward(self, dy, saved, ctx):
        rstd = saved["rstd"][..., None]
        xhat = self._xhat(saved["x"], saved["mean"], saved["rstd"])
        self.grads["gamma"] += _sum_tokens(dy * xhat)
        self.grads["beta"] += _sum_tokens(dy)
        g = dy * self.params["gamma"]
        return rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))


_SQRT1_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class GELU(Module):
    """The exact GELU, ``y = x Phi(x)``, ``Phi(x) = (1 + erf(x / sqrt 2)) / 2`` (as
    ``torch.nn.functional.gelu`` with ``approximate="none"``); no params.

    Saves ``x``. Backward::

        dx = dy (Phi(x) + x phi(x)),    phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    """

    def __init__(self):
        self._new_params()

    @staticmethod
    def _cdf(x):
        return 0.5 * (1.0 + erf(x * _SQRT1_2))

    def forward(self, x, ctx):
        return x * self._cdf(x), {"x": x}

    def backward(self, dy, saved, ctx):
        x = saved["x"]
        return dy * (self._cdf(x) + x * (_INV_SQRT_2PI * np.exp(-0.5 * x * x)))


class Dropout(Module):
    """Inverted dropout with a counter-based keep-mask; no params.

    In training (``ctx.train`` and ``p > 0``): ``y = x * Z / (1 - p)`` with
    ``Z = keep_mask(ctx.seed, layer, ctx.call, index, x.shape, p)``, a pure function of
    ``(seed, layer, call, index)`` (see `keep_mask` for the generator), so a recompute with
    the same ``ctx`` draws the same ``Z``. ``index`` tells apart the dropouts of one layer
    (in a `Block`: 0 after the attention, 1 after the MLP). Otherwise the identity
    (``y`` is ``x``, nothing saved).

    Saves ``keep`` (``Z``, bool: one byte per element). Backward: ``dx = dy * Z / (1 - p)``.
    """

    def __init__(self, p: float = 0.0, *, layer: int = 0, index: int = 0):
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise RefattnError(f"dropout p must be in [0, 1), got {p}")
        self.p = p
        self.layer = _check_count(layer, "layer")
        self.index = _check_count(index, "index")
        self._new_params()

    def active(self, ctx: Context) -> bool:
        return ctx.train and self.p > 0.0

    def forward(self, x, ctx):
        if not self.active(ctx):
            return x, {}
        keep = keep_mask(ctx.seed, self.layer, ctx.call, self.index, x.shape, self.p)
        return self._apply(x, keep), {"keep": keep}

    def _apply(self, a, keep):
        return np.where(keep, a * (1.0 / (1.0 - self.p)), 0).astype(a.dtype, copy=False)

    def backward(self, dy, saved, ctx):
        if "keep" not in saved:
            return dy
        return self._apply(dy, saved["keep"])


# ---- attention --------------------------------------------------------------------------
def _split_heads(a: np.ndarray, heads: int) -> np.ndarray:
    """``(B, L, heads * D) -> (B, heads, L, D)``, contiguous."""
    B, L, HD = a.shape
    return np.ascontiguousarray(a.reshape(B, L, heads, HD // heads).transpose(0, 2, 1, 3))


def _merge_heads(a: np.ndarray, dtype) -> np.ndarray:
    """``(B, heads, L, D) -> (B, L, heads * D)`` in ``dtype``."""
    B, H, L, D = a.shape
    return a.transpose(0, 2, 1, 3).reshape(B, L, H * D).astype(dtype, copy=False)


@functools.lru_cache(maxsize=16)
def _pattern_mask(pattern, L: int, heads: int) -> Mask:
    """``pattern.mask(L, L, heads=heads)``, kept: patterns are immutable values, and so are masks."""
    return pattern.mask(L, L, heads=heads)


class Attention(Module):
    """Multi-head attention with GQA: ``y = Attn(x Wq + bq, x Wk + bk, x Wv + bv) Wo + bo``.

    ``n_heads`` query heads and ``n_kv_heads`` kv heads of ``head_dim`` each (default
    ``d_model // n_heads``); query head ``h`` reads kv head ``h // (H // Hkv)``. The core
    ``Attn`` is ``refattn.forward`` with the mask of ``pattern`` (a refattn pattern, built as
    ``pattern.mask(L, L, heads=H)``; a fixed `refattn.Mask`; or None: dense), ``scale``
    (default ``1 / sqrt(head_dim)``), ``backend``, ``compute_dtype`` and ``options``.
    Params ``wq (d, H D)``, ``wk``, ``wv (d, Hkv D)``, ``wo (H D, d)`` and biases ``bq``,
    ``bk``, ``bv``, ``bo`` (zeros); weights ``N(0, 1/fan_in)``.

    Saves ``x`` (for dWq, dWk, dWv and dx), ``q``, ``k``, ``v`` (B, H|Hkv, L, D) and, with
    ``save="all"``, the core's ``out`` (B, H, L, D) and ``lse`` (B, H, L); ``out`` is also
    the input of the output projection, held once. With ``save="selective"`` the backward
    first recomputes ``out, lse = refattn.forward(q, k, v, mask)`` (deterministic: the same
    bits). Backward, ``O`` = ``out`` with heads merged to ``(N, H D)``, ``X`` = ``x`` as
    ``(N, d)``::

        dWo += O^T dY        dbo += sum_rows dY        dO = dY Wo^T   (split into heads)
        dq, dk, dv = refattn.backward(q, k, v, out, lse, dO, mask)   (dk, dv summed over each GQA group)
        dWq += X^T dq        dbq += sum_rows dq        (likewise k, v; heads merged)
        dx = dq Wq^T + dk Wk^T + dv Wv^T

    The core's backward recomputes ``P = exp(S - lse)`` from the saved ``lse``: nothing of
    size ``L x L`` is ever held.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, *, head_dim: int | None = None,
                 pattern=None, backend: str = "dense", compute_dtype=None, scale: float | None = None,
                 options: dict | None = None, seed: int = 0, layer: int = 0,
                 rng: np.random.Generator | None = None, dtype=np.float64):
        if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
            raise RefattnError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if d_model % n_heads:
                raise RefattnError(f"d_model ({d_model}) is not a multiple of n_heads ({n_heads}); give head_dim")
            head_dim = d_model // n_heads
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.pattern, self.backend, self.compute_dtype, self.options = pattern, backend, compute_dtype, options
        self.scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
        rng = init_rng(seed, layer) if rng is None else rng
        hq, hkv = n_heads * head_dim, n_kv_heads * head_dim
        self._new_params(
            wq=_normal(rng, (d_model, hq), d_model, dtype), bq=np.zeros(hq, dtype),
            wk=_normal(rng, (d_model, hkv), d_model, dtype), bk=np.zeros(hkv, dtype),
            wv=_normal(rng, (d_model, hkv), d_model, dtype), bv=np.zeros(hkv, dtype),
            wo=_normal(rng, (hq, d_model), hq, dtype), bo=np.zeros(d_model, dtype),
        )

    def mask(self, L: int, q=None, k=None) -> Mask | None:
        """The ``(L, L)`` mask of the layer's pattern (None: every key allowed). A mask is
        a value of (pattern, L, heads), built once and shared by every layer and call
        (at L = 16k a sliding window takes 0.4 s to build, more than a layer's forward);
        a content-dependent pattern's mask is chosen from this call's ``q`` and ``k``
        (the backward rebuilds it from the saved ones: the same mask, bit for bit)."""
        if self.pattern is None or isinstance(self.pattern, Mask):
            return self.pattern
        if self.pattern.content_dependent:
            return self.pattern.mask(L, L, heads=self.n_heads, q=q, k=k)
        try:
            return _pattern_mask(self.pattern, L, self.n_heads)
        except TypeError:  # a pattern holding an unhashable parameter: built each time
            return self.pattern.mask(L, L, heads=self.n_heads)

    def _core_kwargs(self):
        return dict(scale=self.scale, backend=self.backend, compute_dtype=self.compute_dtype,
                    options=self.options)

    def core(self, q, k, v, mask):
        """``refattn.forward(q, k, v, mask, ...)`` with the layer's options: ``Result(out, lse)``."""
        return _attention_forward(q, k, v, mask, **self._core_kwargs())

    def forward(self, x, ctx, *, save: str = "all"):
        if save not in SAVE_MODES:
            raise RefattnError(f"save must be one of {SAVE_MODES}, got {save!r}")
        p = self.params
        q = _split_heads(x @ p["wq"] + p["bq"], self.n_heads)
        k = _split_heads(x @ p["wk"] + p["bk"], self.n_kv_heads)
        v = _split_heads(x @ p["wv"] + p["bv"], self.n_kv_heads)
        r = self.core(q, k, v, self.mask(x.shape[1], q, k))
        y = _merge_heads(r.out, x.dtype) @ p["wo"] + p["bo"]
        saved = {"x": x, "q": q, "k": k, "v": v}
        if save == "all":
            saved["out"], saved["lse"] = r.out, r.lse
        return y, saved

    def backward(self, dy, saved, ctx):
        p, g = self.params, self.grads
        x, q, k, v = saved["x"], saved["q"], saved["k"], saved["v"]
        mask = self.mask(x.shape[1], q, k)
        if "out" in saved:
            out, lse = saved["out"], saved["lse"]
        else:  # selective recomputation: the core again, from the saved q, k, v
            out, lse = self.core(q, k, v, mask)
        g["wo"] += _flat(_merge_heads(out, dy.dtype)).T @ _flat(dy)
        g["bo"] += _sum_tokens(dy)
        dout = _split_heads(dy @ p["wo"].T, self.n_heads)
        cg = _attention_backward(q, k, v, out, lse, dout, mask, **self._core_kwargs())
        X = _flat(x)
        dx = None
        for name, d in (("q", cg.dq), ("k", cg.dk), ("v", cg.dv)):
            d = _merge_heads(d, dy.dtype)
            g["w" + name] += X.T @ _flat(d)
            g["b" + name] += _sum_tokens(d)
            term = d @ p["w" + name].T
            dx = term if dx is None else dx + term
        return dx


# ---- transformer block and stack --------------------------------------------------------
class Block(Module):
    """Pre-LN transformer block, layer index ``layer``::

        h = x + Drop_0(Attn(LN1(x)))
        y = h + Drop_1(W2 GELU(W1 LN2(h) + b1) + b2)

    Children (``children``, in forward order): ``ln1``, ``attn``, ``drop1``, ``ln2``,
    ``fc1``, ``act``, ``fc2``, ``drop2``. ``params`` / ``grads`` are flat dicts named
    ``"ln1.gamma"``, ``"attn.wq"``, ``"fc1.w"``, ... sharing the children's arrays.
    Parameters are drawn from ``init_rng(seed, layer)`` in that order. The dropouts are
    ``Dropout(dropout, layer=layer, index=0 | 1)``.

    ``forward(x, ctx, save="all" | "selective")`` returns ``saved = {child: its saved dict}``;
    "selective" leaves out the attention core's ``out`` and ``lse``, which the backward
    recomputes (Megatron-LM's selective recomputation). Backward, in reverse::

        dh = dy + LN2^T(fc1^T(GELU^T(fc2^T(Drop_1^T dy))))
        dx = dh + LN1^T(Attn^T(Drop_0^T dh))
    """

    CHILDREN = ("ln1", "attn", "drop1", "ln2", "fc1", "act", "fc2", "drop2")

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, d_ff: int, *, pattern=None,
                 backend: str = "dense", compute_dtype=None, dropout: float = 0.0, layer: int = 0,
                 seed: int = 0, head_dim: int | None = None, scale: float | None = None,
                 options: dict | None = None, eps: float = 1e-5, dtype=np.float64):
        self.layer = _check_count(layer, "layer")
        rng = init_rng(seed, layer)
        self.ln1 = LayerNorm(d_model, eps=eps, dtype=dtype)
        self.attn = Attention(d_model, n_heads, n_kv_heads, head_dim=head_dim, pattern=pattern,
                              backend=backend, compute_dtype=compute_dtype, scale=scale, options=options,
                              rng=rng, dtype=dtype)
        self.drop1 = Dropout(dropout, layer=layer, index=0)
        self.ln2 = LayerNorm(d_model, eps=eps, dtype=dtype)
        self.fc1 = Linear(d_model, d_ff, rng=rng, dtype=dtype)
        self.act = GELU()
        self.fc2 = Linear(d_ff, d_model, rng=rng, dtype=dtype)
        self.drop2 = Dropout(dropout, layer=layer, index=1)
        self.children = {name: getattr(self, name) for name in self.CHILDREN}
        self.params = {f"{c}.{k}": a for c, m in self.children.items() for k, a in m.params.items()}
        self.grads = {f"{c}.{k}": a for c, m in self.children.items() for k, a in m.grads.items()}

    def forward(self, x, ctx, *, save: str = "all"):
        if save not in SAVE_MODES:
            raise RefattnError(f"save must be one of {SAVE_MODES}, got {save!r}")
        s = {}
        a, s["ln1"] = self.ln1.forward(x, ctx)
        a, s["attn"] = self.attn.forward(a, ctx, save=save)
        a, s["drop1"] = self.drop1.forward(a, ctx)
        h = x + a
        m, s["ln2"] = self.ln2.forward(h, ctx)
        m, s["fc1"] = self.fc1.forward(m, ctx)
        m, s["act"] = self.act.forward(m, ctx)
        m, s["fc2"] = self.fc2.forward(m, ctx)
        m, s["drop2"] = self.drop2.forward(m, ctx)
        return h + m, s

    def backward(self, dy, saved, ctx):
        d = self.drop2.backward(dy, saved["drop2"], ctx)
        d = self.fc2.backward(d, saved["fc2"], ctx)
        d = self.act.backward(d, saved["act"], ctx)
        d = self.fc1.backward(d, saved["fc1"], ctx)
        dh = dy + self.ln2.backward(d, saved["ln2"], ctx)
        d = self.drop1.backward(dh, saved["drop1"], ctx)
        d = self.attn.backward(d, saved["attn"], ctx)
        return dh + self.ln1.backward(d, saved["ln1"], ctx)


class Stack:
    """``n_layers`` `Block` s in sequence, ``blocks[i]`` with layer index ``i``; every other
    keyword goes to each `Block` (``seed`` included: block ``i``'s parameters come from
    ``init_rng(seed, i)``).

    ``forward`` / ``backward`` are the plain no-checkpoint loop: every block's saved dict is
    kept in ``saved_list``.
    """

    def __init__(self, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, d_ff: int,
                 **block_kwargs):
        if "layer" in block_kwargs:
            raise TypeError("Stack sets each block's layer index itself (block i has layer=i)")
        self.blocks = [Block(d_model, n_heads, n_kv_heads, d_ff, layer=i, **block_kwargs)
                       for i in range(n_layers)]

    def params(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, parameter array)`` pairs, block by block in forward order, named e.g.
        ``"blocks.3.attn.wq"``; the arrays themselves (``dict(stack.params())`` for a mapping)."""
        for i, b in enumerate(self.blocks):
            for k, a in b.params.items():
                yield f"blocks.{i}.{k}", a

    def grads(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, gradient array)`` pairs, the same names in the same order as `params`;
        the accumulators themselves."""
        for i, b in enumerate(self.blocks):
            for k, a in b.grads.items():
                yield f"blocks.{i}.{k}", a

    def zero_grad(self) -> None:
        for b in self.blocks:
            b.zero_grad()

    def forward(self, x, ctx, *, save: str = "all"):
        saved_list = []
        for b in self.blocks:
            x, s = b.forward(x, ctx, save=save)
            saved_list.append(s)
        return x, saved_list

    def backward(self, dy, saved_list, ctx):
        if len(saved_list) != len(self.blocks):
            raise RefattnError(f"saved_list has {len(saved_list)} entries for {len(self.blocks)} blocks")
        for b, s in zip(reversed(self.blocks), reversed(saved_list)):
            dy = b.backward(dy, s, ctx)
        return dy
