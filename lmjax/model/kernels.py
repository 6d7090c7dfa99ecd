"""Attention kernels: the same function as :func:`lmjax.model.attention.xla_attention`
(causal or, with ``causal=False``, bidirectional; within packed documents; optionally a
sliding window) without materialising the (b, n, t, s) scores, and :func:`per_shard` to run
a per-device kernel on a mesh.

* :func:`blockwise_attention`: 128 queries at a time with a flash-style custom VJP that
  recomputes each block's scores from the saved log-sum-exp; plain XLA ops, any platform.
* :func:`cudnn_attention`: cuDNN flash attention through ``jax.nn.dot_product_attention``
  (NVIDIA GPUs, bf16/fp16).
* :func:`splash_attention`: the Pallas TPU splash-attention kernel.

All take q (b, t, n, h), k/v (b, s, k, h) with k dividing n, and segment_ids (b, t), and
give (b, t, n, h).

  >>> out = blockwise_attention(q, k, v, segment_ids, window=0)
  >>> out = blockwise_attention(q, k, v, segment_ids, causal=False)  # bidirectional (masked LM)
  >>> out = per_shard(functools.partial(cudnn_attention, window=0), q, k, v, segment_ids)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lmjax.mesh import activation_axes

MASKED = -1e30  # large negative instead of -inf: a row is never fully masked (diagonal)

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def causal_mask(t: int, s: int, window: int, offset: jax.Array | int = 0,
                causal: bool = True) -> jax.Array:
  """(t, s) boolean: query i (at slot offset + i) sees key slot j if j <= i and, with a
  window w > 0, j > i - w. ``causal=False`` (bidirectional): every j, and with a window
  only |i - j| < w (a symmetric window). The one definition of which positions see which,
  for the kernels and the reference's masks alike."""
  q = offset + jnp.arange(t, dtype=jnp.int32)[:, None]
  k = jnp.arange(s, dtype=jnp.int32)[None, :]
  distance = q - k  # (t, s)
  seen = distance >= 0 if causal else jnp.full(distance.shape, True)
  if window > 0:
    seen &= (distance if causal else jnp.abs(distance)) < window
  return seen


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def masked_softmax(scores: jax.Array, mask: jax.Array, dtype) -> jax.Array:
  """softmax(scores where mask, else -inf) over the last axis, in float32, returned in
  ``dtype`` (the dtype the probabilities are multiplied into the values in).

  Its backward keeps only those probabilities (ds = p (dp - sum(p dp))): autodiff of the
  same lines would keep the float32 masked scores, their float32 exponentials, the mask and
  the ``dtype`` copy, 4.5 times the bytes of (b, n, t, s) in bfloat16.
  """
  return jax.nn.softmax(jnp.where(mask, scores, MASKED), axis=-1).astype(dtype)


def _masked_softmax_fwd(scores, mask, dtype):
  probs = masked_softmax(scores, mask, dtype)
  return probs, probs


def _masked_softmax_bwd(dtype, probs, dprobs):
  p, dp = probs.astype(jnp.float32), dprobs.astype(jnp.float32)
  return p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)), None


masked_softmax.defvjp(_masked_softmax_fwd, _masked_softmax_bwd)


# -- blockwise (any platform) ---------------------------------------------------------------

BLOCK = 128  # queries per block of the blockwise backend


def _blocks(x: jax.Array, block: int) -> jax.Array:
  """(b, t, ...) -> (t/c, b, c, ...): c-query blocks first, for lax.map / lax.scan."""
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, t // block, block, *x.shape[2:]), 1, 0)


def _unblock(x: jax.Array) -> jax.Array:  # (t/c, b, c, ...) -> (b, t, ...)
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def grouped(x: jax.Array, kv: int) -> jax.Array:  # (b, t, n, h) -> (b, t, k, g, h)
  b, t, n, h = x.shape
  return x.reshape(b, t, kv, n // kv, h)


@functools.partial(jax.checkpoint, static_argnums=(5, 6))  # never save a block's mask or scores
def _block_scores(i: jax.Array, qi: jax.Array, k: jax.Array, seg_i: jax.Array, seg: jax.Array,
                  window: int, causal: bool) -> jax.Array:
  """Masked float32 scores (b, k, g, c, s) of query block i: qi (b, c, k, g, h)."""
  c, h = qi.shape[1], qi.shape[-1]
  s = jnp.einsum("bckgh,bskh->bkgcs", qi, k, preferred_element_type=jnp.float32) * (h ** -0.5)
  seen = causal_mask(c, k.shape[1], window, i * c, causal)
  mask = seen[None] & (seg_i[:, :, None] == seg[:, None, :])
  return jnp.where(mask[:, None, None], s, MASKED)  # mask (b, c, s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _blockwise(q, k, v, seg, window, block, causal):
  return _blockwise_fwd(q, k, v, seg, window, block, causal)[0]


def _blockwise_fwd(q, k, v, seg, window, block, causal):
  qb, sb = _blocks(grouped(q, k.shape[2]), block), _blocks(seg, block)

  def one(args):
    i, qi, si = args
    s = _block_scores(i, qi, k, si, seg, window, causal)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bkgcs,bskh->bckgh", (p / l).astype(v.dtype), v)
    return o, (m + jnp.log(l))[..., 0]  # log-sum-exp (b, k, g, c)

  o, lse = jax.lax.map(one, (jnp.arange(qb.shape[0]), qb, sb))
  out = _unblock(o).reshape(q.shape)
  return out, (q, k, v, seg, out, lse)


def _blockwise_bwd(window, block, causal, res, dout):
  q, k, v, seg, out, lse = res
  kv = k.shape[2]
  qb, ob, db = (_blocks(grouped(x, kv), block) for x in (q, out, dout))

  def one(carry, args):  # dk, dv accumulate over query blocks; dq is per block
    dk, dv = carry
    i, qi, oi, doi, lse_i, si = args
    p = jnp.exp(_block_scores(i, qi, k, si, seg, window, causal) - lse_i[..., None])  # (b, k, g, c, s)
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
                        window: int = 0, block: int = BLOCK, causal: bool = True) -> jax.Array:
  """:func:`lmjax.model.attention.xla_attention`'s function, ``block`` queries at a time
  (the gcd of t and ``block``), with a backward that recomputes each block's scores from
  the saved log-sum-exp: at most one block of (c, s) scores is alive, forward or backward.

  q (b, t, n, h), k/v (b, t, k, h), segment_ids (b, t) -> (b, t, n, h).
  """
  return _blockwise(q, k, v, segment_ids, window, math.gcd(q.shape[1], block), causal)


# -- cuDNN (NVIDIA GPUs) --------------------------------------------------------------------

def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                    window: int = 0, implementation: str = "cudnn",
                    causal: bool = True) -> jax.Array:
  """``jax.nn.dot_product_attention`` with causal (or, ``causal=False``, bidirectional) +
  same-document masking.

  q (b, t, n, h), k/v (b, s, k, h) with k dividing n (GQA is native, no repeat),
  segment_ids (b, t) -> (b, t, n, h). ``is_causal`` lets cuDNN skip the tiles above the
  diagonal; the same-document mask is a (b, 1, t, s) boolean that cuDNN adds as a bias; a
  sliding ``window`` is cuDNN's local window; cuDNN has no right-hand window, so a
  bidirectional model's symmetric window joins the boolean mask instead.
  ``implementation="xla"`` runs the same call on any platform.
  """
  same_doc = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # (b, 1, t, s)
  local = (window - 1, 0) if window > 0 and causal else None
  if window > 0 and not causal:
    same_doc &= causal_mask(q.shape[1], k.shape[1], window, causal=False)[None, None]
  return jax.nn.dot_product_attention(q, k, v, mask=same_doc, is_causal=causal,
                                      local_window_size=local, implementation=implementation)


# -- splash (TPUs) --------------------------------------------------------------------------

def _splash_block(t: int) -> int:
  """The largest splash tile (512, 256 or 128) that divides sequence length t."""
  for block in (512, 256, 128):
    if t % block == 0:
      return block
  raise ValueError(f"splash attention needs the sequence length to be a multiple of 128, got {t}; "
                   f"change data.seq_len or use config.model.attention='xla'.")


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     window: int = 0, interpret: bool = False, causal: bool = True) -> jax.Array:
  """The Pallas TPU splash kernel: causal (``causal=False``: full) or, with ``window``,
  local (symmetric when bidirectional) mask and ``SegmentIds``, vmapped over the batch.

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
  if window > 0:
    head_mask = splash.LocalMask((t, t), (window - 1, 0 if causal else window - 1), 0)
  else:
    head_mask = splash.CausalMask((t, t)) if causal else splash.FullMask((t, t))
  mask = splash.MultiHeadMask([head_mask] * n)
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


# -- one kernel per device ------------------------------------------------------------------

def per_shard(fn: AttentionFn, q: jax.Array, k: jax.Array, v: jax.Array,
              segment_ids: jax.Array, *, split_sequence: bool = False) -> jax.Array:
  """Runs ``fn(q, k, v, segment_ids)`` on each device's rows and heads under ``shard_map``.

  Outside a mesh it calls ``fn`` directly. Rows split over the ``act_batch`` mesh axes,
  heads over the ``act_heads`` axes that divide n; when those do not divide k, each
  key/value head is repeated the fewest times that makes them (keeping every query head
  with its own key/value head). The sequence splits over the ``act_seq`` axes only with
  ``split_sequence`` (context parallelism: ``fn`` then exchanges keys and values itself).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn(q, k, v, segment_ids)
  b, t, n, h = q.shape
  batch_axes, seq_axes, head_axes = activation_axes((b, t, n), ("act_batch", "act_seq", "act_heads"))
  shards = math.prod(mesh.shape[a] for a in head_axes)
  kv = k.shape[2]
  repeat = math.lcm(kv, shards) // kv  # lcm(k, shards) divides n as both k and shards do
  if repeat > 1:
    k, v = jnp.repeat(k, repeat, axis=2), jnp.repeat(v, repeat, axis=2)  # (b, s, k*repeat, h)
  rows = batch_axes or None
  seq = (seq_axes or None) if split_sequence else None
  heads = head_axes or None
  qkv_spec = P(rows, seq, heads, None)
  sharded = jax.shard_map(fn, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(rows, seq)),
                          out_specs=qkv_spec, check_vma=False)
  return sharded(q, k, v, segment_ids)
