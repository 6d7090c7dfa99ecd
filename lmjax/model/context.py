"""Context parallelism: attention with the sequence split over the ``context`` mesh axis.

Every activation's sequence axis (logical ``act_seq``) is split over the mesh axes the
rules give it (``context`` by default), so each of C devices holds t/C positions of every
sequence. Everything but attention works per position; attention runs per device under
``jax.shard_map`` (:func:`lmjax.model.kernels.per_shard`) in one of two ways
(``config.model.context_attention``):

* ``"ring"``: the device's queries stay; key/value blocks (with their segment ids) travel
  around the ring of C devices by collective-permute, one block per step, and an online
  softmax folds each block in (flash attention across devices). Its backward passes the
  blocks around again with their key/value gradients, recomputing each block's scores from
  the saved log-sum-exp: no (t/C, t) scores are ever kept, only (t/C, t/C) at a time.
* ``"allgather"``: keys and values are all-gathered over the context axis (their gradient
  is the reduce-scatter) and the device's queries attend to all of them, as Llama 3 trained.
  Simpler, one collective, (t/C, t) scores per device.

Causal load balancing (``config.model.context_load_balance``): with contiguous slices,
the device holding the end of the sequence attends to C times the keys of the one holding
the start. Instead the sequence is cut into 2C chunks and device i holds chunks i and
2C-1-i (:func:`balance_order`): :class:`lmjax.model.transformer.Transformer` reorders the
tokens once before the first layer and the features back after the last. Masks are built
from each position's place in the original sequence, so packed documents (segment ids),
sliding windows and GQA work unchanged.

The math equals attention on one device: the same queries see the same keys.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.mesh import activation_axes
from lmjax.model.kernels import MASKED, grouped, masked_softmax, per_shard


def sequence_axes(t: int) -> tuple[str, ...]:
  """The mesh axes a sequence of length ``t`` splits over now (none outside a mesh)."""
  return tuple(activation_axes((t,), ("act_seq",))[0])


def shards(t: int) -> int:
  """How many devices a sequence of length ``t`` splits over now (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in sequence_axes(t)) if not mesh.empty else 1


def balance_order(t: int, c: int) -> np.ndarray:
  """The load-balanced order of t positions over c devices: device i's slice holds chunks
  i and 2c-1-i of 2c equal chunks. ``x[:, order]`` reorders; ``x[:, np.argsort(order)]``
  restores.

  >>> balance_order(8, 2)  # chunks of 2: [0 1 | 6 7] on device 0, [2 3 | 4 5] on device 1
  """
  chunks = np.arange(t).reshape(2 * c, t // (2 * c))
  return np.concatenate([np.concatenate([chunks[i], chunks[2 * c - 1 - i]]) for i in range(c)])


def _indices(device: jax.Array, c: int, size: int, balanced: bool) -> jax.Array:
  """Original positions (size,) of the slice that ``device`` (of c) holds."""
  if not balanced:
    return device * size + jnp.arange(size, dtype=jnp.int32)
  half = size // 2
  part = jnp.arange(half, dtype=jnp.int32)
  return jnp.concatenate([device * half + part, (2 * c - 1 - device) * half + part])


def _mask(q_idx, k_idx, q_seg, k_seg, window: int) -> jax.Array:
  """(b, tq, tk): causal in original positions, within a document and the window."""
  causal = k_idx[None, :] <= q_idx[:, None]
  if window > 0:
    causal &= q_idx[:, None] - k_idx[None, :] < window
  return causal[None] & (q_seg[:, :, None] == k_seg[:, None, :])


def _scores(qg, k, mask) -> jax.Array:
  """Masked float32 scores (b, k, g, tq, tk) of grouped queries qg over keys k."""
  s = jnp.einsum("bqkgh,bskh->bkgqs", qg, k, preferred_element_type=jnp.float32)
  return jnp.where(mask[:, None, None], s * (qg.shape[-1] ** -0.5), MASKED)


# -- ring -----------------------------------------------------------------------------------

def _ring_setup(axes, c, balanced, size):
  me = jax.lax.axis_index(axes)
  shift = lambda x: jax.lax.ppermute(x, axes, [(d, (d + 1) % c) for d in range(c)])
  holder = lambda step: _indices((me - step) % c, c, size, balanced)  # whose block, at step
  return _indices(me, c, size, balanced), holder, shift


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _ring(q, k, v, seg, axes, c, balanced, window):
  return _ring_fwd(q, k, v, seg, axes, c, balanced, window)[0]


def _ring_fwd(q, k, v, seg, axes, c, balanced, window):
  b, t, n, h = q.shape
  qg = grouped(q, k.shape[2])
  q_idx, holder, shift = _ring_setup(axes, c, balanced, t)

  def step(carry, j):
    k_b, v_b, seg_b, m, l, o = carry
    mask = _mask(q_idx, holder(j), seg, seg_b, window)
    s = _scores(qg, k_b, mask)  # (b, k, g, t, t)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(mask[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
    scale = jnp.exp(m - m_new)
    l = l * scale + jnp.sum(p, axis=-1)
    o = o * scale[..., None] + jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v_b.dtype), v_b,
                                          preferred_element_type=jnp.float32)
    k_b, v_b, seg_b = shift(k_b), shift(v_b), shift(seg_b)  # the next block arrives
    return (k_b, v_b, seg_b, m_new, l, o), None

  g = n // k.shape[2]
  stats = jnp.full((b, k.shape[2], g, t), MASKED, jnp.float32)
  init = (k, v, seg, stats, jnp.zeros_like(stats), jnp.zeros((b, k.shape[2], g, t, h), jnp.float32))
  (_, _, _, m, l, o), _ = jax.lax.scan(step, init, jnp.arange(c))
  out = (o / l[..., None]).astype(q.dtype)  # (b, k, g, t, h); every query sees itself
  out = jnp.moveaxis(out, 3, 1).reshape(b, t, n, h)
  return out, (q, k, v, seg, out, m + jnp.log(l))


def _ring_bwd(axes, c, balanced, window, res, dout):
  q, k, v, seg, out, lse = res
  b, t, n, h = q.shape
  kv = k.shape[2]
  qg, og, dg = (grouped(x, kv) for x in (q, out, dout))
  q_idx, holder, shift = _ring_setup(axes, c, balanced, t)
  delta = jnp.einsum("bqkgh,bqkgh->bkgq", dg.astype(jnp.float32), og.astype(jnp.float32))

  def step(carry, j):  # the block, its gradients so far, and dq travel; dq stays
    k_b, v_b, seg_b, dk_b, dv_b, dq = carry
    mask = _mask(q_idx, holder(j), seg, seg_b, window)
    p = jnp.where(mask[:, None, None], jnp.exp(_scores(qg, k_b, mask) - lse[..., None]), 0.0)
    dv_b = dv_b + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(dg.dtype), dg,
                             preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqkgh,bskh->bkgqs", dg, v_b, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta[..., None]) * (h ** -0.5)).astype(q.dtype)
    dq = dq + jnp.einsum("bkgqs,bskh->bqkgh", ds, k_b, preferred_element_type=jnp.float32)
    dk_b = dk_b + jnp.einsum("bkgqs,bqkgh->bskh", ds, qg, preferred_element_type=jnp.float32)
    # after c moves every block and its gradients are home again
    return tuple(shift(x) for x in (k_b, v_b, seg_b, dk_b, dv_b)) + (dq,), None

  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  init = (k, v, seg, zeros(k), zeros(v), zeros(qg))
  (_, _, _, dk, dv, dq), _ = jax.lax.scan(step, init, jnp.arange(c))
  return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _ring_local(q, k, v, seg, *, axes, c, balanced, window):
  return _ring(q, k, v, seg, axes, c, balanced, window)


# -- all-gather -----------------------------------------------------------------------------

def _allgather_local(q, k, v, seg, *, axes, c, balanced, window):
  b, t, n, h = q.shape
  me = jax.lax.axis_index(axes)
  gather = lambda x: jax.lax.all_gather(x, axes, axis=1, tiled=True)  # device order
  k_all, v_all, seg_all = gather(k), gather(v), gather(seg)  # (b, c*t, ...)
  k_idx = jnp.concatenate([_indices(d, c, t, balanced) for d in range(c)])
  mask = _mask(_indices(me, c, t, balanced), k_idx, seg, seg_all, window)
  qg = grouped(q, k.shape[2])
  s = jnp.einsum("bqkgh,bskh->bkgqs", qg, k_all, preferred_element_type=jnp.float32)
  probs = masked_softmax(s * (h ** -0.5), mask[:, None, None], v.dtype)
  out = jnp.einsum("bkgqs,bskh->bqkgh", probs, v_all)
  return out.reshape(b, t, n, h)


_LOCAL = {"ring": _ring_local, "allgather": _allgather_local}


def context_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                      kind: str = "ring", balanced: bool = True, window: int = 0) -> jax.Array:
  """Causal attention within packed documents (and a sliding ``window``) of a sequence
  split over the context mesh axes, by ``kind`` ("ring" or "allgather"). The positions
  are in :func:`balance_order` when ``balanced``, else in order.

  q (b, t, n, h), k/v (b, t, k, h), segment_ids (b, t) -> (b, t, n, h), t the full length.
  """
  t = q.shape[1]
  axes = sequence_axes(t)
  fn = functools.partial(_LOCAL[kind], axes=axes, c=shards(t), balanced=balanced, window=window)
  return per_shard(fn, q, k, v, segment_ids, split_sequence=True)
