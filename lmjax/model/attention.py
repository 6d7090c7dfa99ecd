"""Grouped-query self-attention with RoPE and a packed-sequence causal (or bidirectional) mask.

Every backend computes the same function: token i attends to tokens j <= i of the
same packed document (equal ``segment_ids``; padding, id 0, attends within itself), and
with a sliding window of w (``config.model.sliding_window``) only to j > i - w. A
bidirectional model (``config.model.causal=False``, the masked-LM objective) drops the
j <= i condition: each token attends to its whole document both ways (a window becomes
symmetric: |i - j| < w), and still never to another document or to padding.
``config.model.attention`` picks the backend:

* ``"xla"``: plain einsums with the softmax in float32; runs everywhere (the reference).
  It materialises the (b, n, t, t) scores.
* ``"blockwise"``: the same math 128 queries at a time with a flash-style backward that
  recomputes the scores, in plain XLA ops: any platform, and the memory profile of the
  two kernels below (q, k, v, the output and a (b, n, t) log-sum-exp are all it keeps).
* ``"cudnn"``: cuDNN flash attention through ``jax.nn.dot_product_attention`` on NVIDIA
  GPUs (bf16/fp16). Causal tiles are skipped; documents are masked with a boolean mask.
* ``"splash"``: the Pallas TPU splash-attention kernel with a causal mask and segment ids.

The backends other than ``"xla"`` live in :mod:`lmjax.model.kernels`; the cuDNN and
splash kernels run per device under ``jax.shard_map``, over the mesh axes that the rules
give ``act_batch`` and ``act_heads``.

Generation (:meth:`Attention.decode`) keeps a :class:`KVCache` and always uses the XLA
einsums, whatever the backend: a prompt chunk or one new token attends over the cache
(causal models only).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax.config import ATTENTION_BACKENDS
from lmjax.mesh import constrain
from lmjax.model import context, lora
from lmjax.model.kernels import (blockwise_attention, causal_mask, cudnn_attention,
                                 masked_softmax, per_shard, splash_attention)
from lmjax.model.layers import Rope, param, project, rope

# backend -> (platforms it runs on, as jax.default_backend() names them; what it needs)
_PLATFORMS = {
    "xla": (None, "any platform"),
    "blockwise": (None, "any platform"),
    "cudnn": (("gpu", "cuda"), "an NVIDIA GPU"),
    "splash": (("tpu",), "a TPU"),
}


def _unknown(name: str) -> ValueError:
  return ValueError(f"config.model.attention={name!r} is unknown; use one of {ATTENTION_BACKENDS}.")


def check_backend(name: str, platform: str) -> None:
  """Raises ValueError if attention backend ``name`` cannot run on ``platform``.

  >>> check_backend("xla", jax.default_backend())  # passes everywhere
  """
  if name not in _PLATFORMS:
    raise _unknown(name)
  platforms, needs = _PLATFORMS[name]
  if platforms is not None and platform not in platforms:
    raise ValueError(f"config.model.attention={name!r} needs {needs} (platform is {platform}); "
                     f"use 'xla'.")


def attention_mask(segment_ids: jax.Array, window: int = 0, causal: bool = True) -> jax.Array:
  """(b, 1, 1, t, s) boolean: causal (``causal=False``: both ways), within the same packed
  document and, with ``window`` > 0, within the ``window`` latest (bidirectional: nearest)
  tokens."""
  t = segment_ids.shape[1]
  seen = causal_mask(t, t, window, causal=causal)
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # (b, t, s)
  return (seen[None] & same_doc)[:, None, None]


class KVCache(NamedTuple):
  """Keys and values of the tokens seen so far, for every layer (stacked, so the cache
  scans with the blocks), in the compute dtype.

  Prompts are left-padded: all rows write slot ``index`` at once, and row b's real tokens
  start at slot ``start[b]`` (its position 0); slots before ``start`` are padding, never
  attended to. Positions are ``slot - start``.
  """
  k: jax.Array  # (l, b, s, k, h)
  v: jax.Array  # (l, b, s, k, h)
  index: jax.Array  # () int32: the next slot to write (tokens written so far, padding included)
  start: jax.Array  # (b,) int32: each row's first real slot


# Logical axes of one layer's cache keys/values (b, s, k, h), and of the stacked (l, ...) ones.
CACHE_AXES = ("act_batch", None, "act_kv_heads", None)
STACKED_CACHE_AXES = (None, *CACHE_AXES)


def cache_mask(start: jax.Array, index: jax.Array, t: int, s: int, window: int = 0) -> jax.Array:
  """(b, 1, 1, t, s) boolean for t queries at slots index..index+t-1 over s cache slots:
  causal (within ``window`` if > 0) and past each row's left padding (a padding query sees
  only itself)."""
  q_slot = index + jnp.arange(t, dtype=jnp.int32)[:, None]  # (t, 1)
  k_slot = jnp.arange(s, dtype=jnp.int32)[None, :]  # (1, s)
  real = k_slot[None] >= start[:, None, None]  # (b, 1, s)
  mask = causal_mask(t, s, window, index)[None] & (real | (k_slot == q_slot)[None])  # (b, t, s)
  return mask[:, None, None]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Reference attention in plain XLA ops; softmax in float32.

  q (b, t, n, h), k/v (b, s, k, h), mask broadcastable to (b, k, g, t, s) -> (b, t, n, h).
  """
  b, t, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, n // kv, h)  # (b, t, k, g, h)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  probs = masked_softmax(scores * (h ** -0.5), mask, v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                          backend: str = "xla", window: int = 0, causal: bool = True) -> jax.Array:
  """Causal (``causal=False``: bidirectional) attention within packed documents (and a
  sliding ``window`` if > 0) with the chosen backend.

  q (b, t, n, h), k/v (b, t, k, h), segment_ids (b, t) -> (b, t, n, h).

  >>> out = dot_product_attention(q, k, v, segment_ids, backend="xla")
  """
  if backend == "xla":
    return xla_attention(q, k, v, attention_mask(segment_ids, window, causal))
  if backend == "blockwise":
    return blockwise_attention(q, k, v, segment_ids, window=window, causal=causal)
  if backend == "cudnn":
    return per_shard(functools.partial(cudnn_attention, window=window, causal=causal), q, k, v,
                     segment_ids)
  if backend == "splash":
    return per_shard(functools.partial(splash_attention, window=window, causal=causal), q, k, v,
                     segment_ids)
  raise _unknown(backend)


class Attention(nnx.Module):
  """GQA self-attention: n query heads share k key/value heads.

  ``backend`` is one of ``config.ATTENTION_BACKENDS``; it changes no parameter. ``rope_theta``
  is RoPE's base frequency or a :class:`Rope` (scaled frequencies); ``use_rope=False``
  leaves positions to the caller (learned position embeddings). ``bias`` adds biases to
  the four projections; ``sliding_window`` > 0 limits each token to that many latest tokens.
  ``quantization`` is the four projections' (see :func:`lmjax.model.layers.project`).
  ``causal=False`` attends both ways within each document (a masked LM); such a module has
  no :meth:`decode` and no context parallelism.
  ``adapters`` adds LoRA adapters to those of its targets among q, k, v and o
  (:mod:`lmjax.model.lora`).

  >>> attn = Attention(64, 4, 2, 16, rope_theta=1e4, rngs=nnx.Rngs(0), std=0.02,
  ...                  param_dtype=jnp.float32, backend="xla")
  >>> y = attn(x, positions, segment_ids)  # x (b, t, 64)
  """

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope_theta: float | Rope, rngs: nnx.Rngs, std: float, param_dtype,
               backend: str = "xla", use_rope: bool = True, bias: bool = False,
               sliding_window: int = 0, quantization: str = "none",
               context_attention: str = "ring", context_load_balance: bool = True,
               causal: bool = True, adapters: lora.Adapters | None = None):
    if backend not in ATTENTION_BACKENDS:
      raise _unknown(backend)
    self.q = param(rngs, (dim, num_heads, head_dim), ("embed", "heads", "head_dim"), param_dtype, std)
    self.k = param(rngs, (dim, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                   param_dtype, std)
    self.v = param(rngs, (dim, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                   param_dtype, std)
    self.o = param(rngs, (num_heads, head_dim, dim), ("heads", "head_dim", "embed"), param_dtype, std)
    self.bias = bias
    if bias:
      self.q_bias = param(None, (num_heads, head_dim), ("heads", "head_dim"), param_dtype, fill=0.0)
      self.k_bias = param(None, (num_kv_heads, head_dim), ("kv_heads", "head_dim"), param_dtype, fill=0.0)
      self.v_bias = param(None, (num_kv_heads, head_dim), ("kv_heads", "head_dim"), param_dtype, fill=0.0)
      self.o_bias = param(None, (dim,), ("norm",), param_dtype, fill=0.0)
    lora.attach(self, rngs, adapters, {"q": 1, "k": 1, "v": 1, "o": 2})
    self.rope = (rope_theta if isinstance(rope_theta, Rope) else Rope(theta=rope_theta)) if use_rope else None
    self.backend = backend
    self.sliding_window = sliding_window
    self.quantization = quantization
    self.context = (context_attention, context_load_balance)
    self.causal = causal

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    q, k, v = self._qkv(x, positions)
    if context.shards(x.shape[1]) > 1:  # the sequence is split over devices
      if not self.causal:
        raise ValueError("bidirectional attention (model.causal=False) does not split the "
                         "sequence; use mesh.context=1.")
      kind, balanced = self.context
      out = context.context_attention(q, k, v, segment_ids, kind=kind, balanced=balanced,
                                      window=self.sliding_window)
    else:
      out = dot_product_attention(q, k, v, segment_ids, backend=self.backend,
                                  window=self.sliding_window, causal=self.causal)  # (b, t, n, h)
    return self._out(out, x.dtype)

  def decode(self, x: jax.Array, positions: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
             index: jax.Array, start: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of t new tokens over one layer's cache, with XLA einsums for every backend.

    x (b, t, d) at ``positions`` (b, t) fills cache slots index..index+t-1 of k_cache/v_cache
    (b, s, k, h); ``start`` (b,) is each row's first real slot (see :class:`KVCache`).
    Returns the output (b, t, d) and the updated k_cache, v_cache.
    """
    if not self.causal:
      raise ValueError("a bidirectional model (model.causal=False) has no KV-cache decoding: "
                       "it sees each document whole, so it cannot generate left to right.")
    q, k, v = self._qkv(x, positions)
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
    k_cache, v_cache = constrain(k_cache, CACHE_AXES), constrain(v_cache, CACHE_AXES)
    mask = cache_mask(start, index, x.shape[1], k_cache.shape[1], self.sliding_window)  # (b, 1, 1, t, s)
    out = xla_attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype), mask)  # (b, t, n, h)
    return self._out(out, x.dtype), k_cache, v_cache

  def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Projections with RoPE: x (b, t, d) -> q (b, t, n, h), k and v (b, t, k, h)."""
    dt = x.dtype
    proj = lambda name, eq: lora.add(self, name, eq, x, project(eq, x, getattr(self, name), dt,
                                                                self.quantization))
    q = proj("q", "btd,dnh->btnh")  # (b, t, n, h)
    k = proj("k", "btd,dkh->btkh")  # (b, t, k, h)
    v = proj("v", "btd,dkh->btkh")
    if self.bias:
      q, k, v = (y + b[...].astype(dt) for y, b in ((q, self.q_bias), (k, self.k_bias), (v, self.v_bias)))
    if self.rope is not None:
      q, k = rope(q, positions, self.rope), rope(k, positions, self.rope)
    q = constrain(q, ("act_batch", "act_seq", "act_heads", None))
    k = constrain(k, ("act_batch", "act_seq", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_seq", "act_kv_heads", None))
    return q, k, v

  def _out(self, out: jax.Array, dt) -> jax.Array:
    """The output projection: out (b, t, n, h) -> (b, t, d)."""
    y = lora.add(self, "o", "btnh,nhd->btd", out, project("btnh,nhd->btd", out, self.o, dt,
                                                          self.quantization))
    return y + self.o_bias[...].astype(dt) if self.bias else y
