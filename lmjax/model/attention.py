"""Grouped-query self-attention with RoPE and a packed-sequence causal mask.

Every backend computes the same function: token i attends to tokens j <= i of the
same packed document (equal ``segment_ids``; padding, id 0, attends within itself), and
with a sliding window of w (``config.model.sliding_window``) only to j > i - w.
``config.model.attention`` picks the backend:

* ``"xla"``: plain einsums with the softmax in float32; runs everywhere (the reference).
  It materialises the (b, n, t, t) scores.
* ``"blockwise"``: the same math 128 queries at a time with a flash-style backward that
  recomputes the scores, in plain XLA ops: any platform, and the memory profile of the
  kernels below (q, k, v, the output and a (b, n, t) log-sum-exp are all it keeps).
* ``"cudnn"``: cuDNN flash attention through ``jax.nn.dot_product_attention`` on NVIDIA
  GPUs (bf16/fp16). Causal tiles are skipped; documents are masked with a boolean mask.
* ``"splash"``: the Pallas TPU splash-attention kernel with a causal mask and segment ids.

The two kernels run per device under ``jax.shard_map``, over the mesh axes that the
rules give ``act_batch`` and ``act_heads``.

Generation (:meth:`Attention.decode`) keeps a :class:`KVCache` and always uses the XLA
einsums, whatever the backend: a prompt chunk or one new token attends over the cache.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmjax import mesh as mesh_lib
from lmjax.config import ATTENTION_BACKENDS
from lmjax.mesh import constrain
from lmjax.model.layers import Rope, param, rope

_MASKED = -1e30  # large negative instead of -inf: a row is never fully masked (diagonal)

# backend -> (platforms it runs on, as jax.default_backend() names them; what it needs)
_PLATFORMS = {
    "xla": (None, "any platform"),
    "blockwise": (None, "any platform"),
    "cudnn": (("gpu", "cuda"), "an NVIDIA GPU"),
    "splash": (("tpu",), "a TPU"),
}

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


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


def _window(t: int, s: int, window: int, offset: jax.Array | int = 0) -> jax.Array:
  """(t, s) boolean: query i (at slot offset + i) sees key slot j if j <= i and, with a
  window w > 0, j > i - w."""
  q = offset + jnp.arange(t, dtype=jnp.int32)[:, None]
  k = jnp.arange(s, dtype=jnp.int32)[None, :]
  return (k <= q) & ((q - k < window) if window > 0 else True)


def attention_mask(segment_ids: jax.Array, window: int = 0) -> jax.Array:
  """(b, 1, 1, t, s) boolean: causal, within the same packed document and, with
  ``window`` > 0, within the ``window`` latest tokens."""
  t = segment_ids.shape[1]
  causal = _window(t, t, window)
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # (b, t, s)
  return (causal[None] & same_doc)[:, None, None]


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
  mask = _window(t, s, window, index)[None] & (real | (k_slot == q_slot)[None])  # (b, t, s)
  return mask[:, None, None]


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """Reference attention in plain XLA ops; softmax in float32.

  q (b, t, n, h), k/v (b, s, k, h), mask broadcastable to (b, k, g, t, s) -> (b, t, n, h).
  """
  b, t, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, n // kv, h)  # (b, t, k, g, h)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (h ** -0.5)
  scores = jnp.where(mask, scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                    window: int = 0, implementation: str = "cudnn") -> jax.Array:
  """``jax.nn.dot_product_attention`` with causal + same-document masking.

  q (b, t, n, h), k/v (b, s, k, h) with k dividing n (GQA is native, no repeat),
  segment_ids (b, t) -> (b, t, n, h). ``is_causal`` lets cuDNN skip the tiles above the
  diagonal; the same-document mask is a (b, 1, t, s) boolean that cuDNN adds as a bias; a
  sliding ``window`` is cuDNN's local window. ``implementation="xla"`` runs the same call
  on any platform.
  """
  same_doc = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # (b, 1, t, s)
  local = (window - 1, 0) if window > 0 else None
  return jax.nn.dot_product_attention(q, k, v, mask=same_doc, is_causal=True,
                                      local_window_size=local, implementation=implementation)


BLOCK = 128  # queries per block of the blockwise backend


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """(b, t, ...) -> (t/c, b, c, ...): c-query blocks first, for lax.map / lax.scan."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, t // block, block, *x.shape[2:]), 1, 0)


def _unblock(x: jax.Array) -> jax.Array:  # (t/c, b, c, ...) -> (b, t, ...)
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _grouped(x: jax.Array, kv: int) -> jax.Array:  # (b, t, n, h) -> (b, t, k, g, h)
  b, t, n, h = x.shape
  return x.reshape(b, t, kv, n // kv, h)


@functools.partial(jax.checkpoint, static_argnums=(5,))  # never save a block's mask or scores
def _block_scores(i: jax.Array, qi: jax.Array, k: jax.Array, seg_i: jax.Array, seg: jax.Array,
                  window: int) -> jax.Array:
  """Masked float32 scores (b, k, g, c, s) of query block i: qi (b, c, k, g, h)."""
  c, h = qi.shape[1], qi.shape[-1]
  s = jnp.einsum("bckgh,bskh->bkgcs", qi, k, preferred_element_type=jnp.float32) * (h ** -0.5)
  mask = _window(c, k.shape[1], window, i * c)[None] & (seg_i[:, :, None] == seg[:, None, :])
  return jnp.where(mask[:, None, None], s, _MASKED)  # mask (b, c, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, seg, window, block):
  return _blockwise_fwd(q, k, v, seg, window, block)[0]


def _blockwise_fwd(q, k, v, seg, window, block):
  qb, sb = _blocks(_grouped(q, k.shape[2]), block), _blocks(seg, block)

  def one(args):
    i, qi, si = args
    s = _block_scores(i, qi, k, si, seg, window)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgcs,bskh->bckgh", (p / l).astype(v.dtype), v)
    return o, (m + jnp.log(l))[..., 0]  # log-sum-exp (b, k, g, c)

  o, lse = jax.lax.map(one, (jnp.arange(qb.shape[0]), qb, sb))
  out = _unblock(o).reshape(q.shape)
  return out, (q, k, v, seg, out, lse)


def _blockwise_bwd(window, block, res, dout):
  q, k, v, seg, out, lse = res
  kv = k.shape[2]
  qb, ob, db = (_blocks(_grouped(x, kv), block) for x in (q, out, dout))

  def one(carry, args):  # dk, dv accumulate over query blocks; dq is per block
    dk, dv = carry
    i, qi, oi, doi, lse_i, si = args
    p = jnp.exp(_block_scores(i, qi, k, si, seg, window) - lse_i[..., None])  # (b, k, g, c, s)
    dv = dv + jnp.einsum("bkgcs,bckgh->bskh", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bckgh,bskh->bkgcs", doi, v, preferred_element_type=jnp.float32)
    delta = jnp.einsum("bckgh,bckgh->bkgc", doi.astype(jnp.float32), oi.astype(jnp.float32))
    ds = (p * (dp - delta[..., None]) * (q.shape[-1] ** -0.5)).astype(q.dtype)
    dk = dk + jnp.einsum("bkgcs,bckgh->bskh", ds, qi, preferred_element_type=jnp.float32)
    return (dk, dv), jnp.einsum("bkgcs,bskh->bckgh", ds, k)

  zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  (dk, dv), dq = jax.lax.scan(one, zeros, (jnp.arange(qb.shape[0]), qb, ob, db, lse, _blocks(seg, block)))
  return _unblock(dq).reshape(q.shape), dk.astype(k.dtype), dv.astype(v.dtype), None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                        window: int = 0, block: int = BLOCK) -> jax.Array:
  """:func:`xla_attention`'s function, ``block`` queries at a time (the gcd of t and
  ``block``), with a backward that recomputes each block's scores from the saved
  log-sum-exp: at most one block of (c, s) scores is alive, forward or backward.

  q (b, t, n, h), k/v (b, t, k, h), segment_ids (b, t) -> (b, t, n, h).
  """
  return _blockwise(q, k, v, segment_ids, window, math.gcd(q.shape[1], block))


def _splash_block(t: int) -> int:
  """The largest splash tile (512, 256 or 128) that divides sequence length t."""
  for block in (512, 256, 128):
    if t % block == 0:
      return block
  raise ValueError(f"splash attention needs the sequence length to be a multiple of 128, got {t}; "
                   f"change data.seq_len or use config.model.attention='xla'.")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     window: int = 0, interpret: bool = False) -> jax.Array:
  """The Pallas TPU splash kernel: causal (or, with ``window``, local) mask and
  ``SegmentIds``, vmapped over the batch.

  q (b, t, n, h), k/v (b, t, k, h) with k dividing n (GQA is native: the MHA kernel maps
  query head i to key/value head i // (n/k); k == 1 uses the MQA kernel),
  segment_ids (b, t) -> (b, t, n, h). t must be a multiple of 128.
  ``interpret=True`` runs the kernel in the Pallas interpreter (CPU tests).
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as splash  # TPU-only kernel

  b, t, n, h = q.shape
  kv = k.shape[2]
  block = _splash_block(t)
  blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                             block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                             use_fused_bwd_kernel=True)
  causal = splash.LocalMask((t, t), (window - 1, 0), 0) if window > 0 else splash.CausalMask((t, t))
  mask = splash.MultiHeadMask([causal] * n)
  make = splash.make_splash_mqa if kv == 1 else splash.make_splash_mha
  kernel = make(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
  q = (q * (h ** -0.5)).astype(q.dtype).transpose(0, 2, 1, 3)  # (b, n, t, h), pre-scaled
  k = k.transpose(0, 2, 1, 3)  # (b, k, s, h)
  v = v.transpose(0, 2, 1, 3)
  if kv == 1:
    k, v = k[:, 0], v[:, 0]  # (b, s, h)
  seg = segment_ids.astype(jnp.int32)
  out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, splash.SegmentIds(q=s, kv=s)))(q, k, v, seg)
  return out.transpose(0, 2, 1, 3)  # (b, t, n, h)


def _activation_axes(shape: tuple[int, ...], logical_axes: tuple[str | None, ...]) -> list[tuple[str, ...]]:
  """Per dimension, the mesh axes that :func:`constrain` would shard it over."""
  # Axes a surrounding vmap(spmd_axis_name=...) maps over (pipeline stages) stay out.
  spec = mesh_lib.activation_spec(shape, logical_axes)
  return [() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec]


def per_shard(fn: AttentionFn, q: jax.Array, k: jax.Array, v: jax.Array,
              segment_ids: jax.Array) -> jax.Array:
  """Runs ``fn(q, k, v, segment_ids)`` on each device's rows and heads under ``shard_map``.

  Outside a mesh it calls ``fn`` directly. Rows split over the ``act_batch`` mesh axes,
  heads over the ``act_heads`` axes that divide n; when those do not divide k, each
  key/value head is repeated the fewest times that makes them (keeping every query head
  with its own key/value head). The sequence is never split.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, segment_ids)
  b, t, n, h = q.shape
  batch_axes, head_axes = _activation_axes((b, n), ("act_batch", "act_heads"))
  shards = math.prod(mesh.shape[a] for a in head_axes)
  kv = k.shape[2]
  repeat = math.lcm(kv, shards) // kv  # lcm(k, shards) divides n as both k and shards do
  if repeat > 1:
    k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)  # (b, s, k*repeat, h)
  rows = batch_axes or None
  heads = head_axes or None
  qkv_spec = P(rows, None, heads, None)
  sharded = jax.shard_map(fn, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(rows, None)),
                          out_specs=qkv_spec, check_vma=False)
  return sharded(q, k, v, segment_ids)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                          backend: str = "xla", window: int = 0) -> jax.Array:
  """Causal attention within packed documents (and a sliding ``window`` if > 0) with the
  chosen backend.

  q (b, t, n, h), k/v (b, t, k, h), segment_ids (b, t) -> (b, t, n, h).

  >>> out = dot_product_attention(q, k, v, segment_ids, backend="xla")
  """
  if backend == "xla":
    return xla_attention(q, k, v, attention_mask(segment_ids, window))
  if backend == "blockwise":
    return blockwise_attention(q, k, v, segment_ids, window=window)
  if backend == "cudnn":
    return per_shard(functools.partial(cudnn_attention, window=window), q, k, v, segment_ids)
  if backend == "splash":
    return per_shard(functools.partial(splash_attention, window=window), q, k, v, segment_ids)
  raise _unknown(backend)


class Attention(nnx.Module):
  """GQA self-attention: n query heads share k key/value heads.

  ``backend`` is one of ``config.ATTENTION_BACKENDS``; it changes no parameter. ``rope_theta``
  is RoPE's base frequency or a :class:`Rope` (scaled frequencies); ``use_rope=False``
  leaves positions to the caller (learned position embeddings). ``bias`` adds biases to
  the four projections; ``sliding_window`` > 0 limits each token to that many latest tokens.

  >>> attn = Attention(64, 4, 2, 16, rope_theta=1e4, rngs=nnx.Rngs(0), std=0.02,
  ...                  param_dtype=jnp.float32, backend="xla")
  >>> y = attn(x, positions, segment_ids)  # x (b, t, 64)
  """

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope_theta: float | Rope, rngs: nnx.Rngs, std: float, param_dtype,
               backend: str = "xla", use_rope: bool = True, bias: bool = False,
               sliding_window: int = 0):
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
    self.rope = (rope_theta if isinstance(rope_theta, Rope) else Rope(theta=rope_theta)) if use_rope else None
    self.backend = backend
    self.sliding_window = sliding_window

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    q, k, v = self._qkv(x, positions)
    out = dot_product_attention(q, k, v, segment_ids, backend=self.backend,
                                window=self.sliding_window)  # (b, t, n, h)
    return self._out(out, x.dtype)

  def decode(self, x: jax.Array, positions: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
             index: jax.Array, start: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Attention of t new tokens over one layer's cache, with XLA einsums for every backend.

    x (b, t, d) at ``positions`` (b, t) fills cache slots index..index+t-1 of k_cache/v_cache
    (b, s, k, h); ``start`` (b,) is each row's first real slot (see :class:`KVCache`).
    Returns the output (b, t, d) and the updated k_cache, v_cache.
    """
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
    q = jnp.einsum("btd,dnh->btnh", x, self.q[...].astype(dt))  # (b, t, n, h)
    k = jnp.einsum("btd,dkh->btkh", x, self.k[...].astype(dt))  # (b, t, k, h)
    v = jnp.einsum("btd,dkh->btkh", x, self.v[...].astype(dt))
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
    y = jnp.einsum("btnh,nhd->btd", out, self.o[...].astype(dt))
    return y + self.o_bias[...].astype(dt) if self.bias else y
