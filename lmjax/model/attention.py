"""Grouped-query self-attention with RoPE and a packed-sequence causal mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax.mesh import constrain
from lmjax.model.layers import param, rope

_MASKED = -1e30  # large negative instead of -inf: a row is never fully masked (diagonal)


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """(b, 1, 1, t, s) boolean: causal and within the same packed document."""
  t = segment_ids.shape[1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  same_doc = segment_ids[:, :, None] == segment_ids[:, None, :]  # (b, t, s)
  return (causal[None] & same_doc)[:, None, None]


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


class Attention(nnx.Module):
  """GQA self-attention: n query heads share k key/value heads.

  >>> attn = Attention(64, 4, 2, 16, rope_theta=1e4, rngs=nnx.Rngs(0), std=0.02,
  ...                  param_dtype=jnp.float32)
  >>> y = attn(x, positions, segment_ids)  # x (b, t, 64)
  """

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               rope_theta: float, rngs: nnx.Rngs, std: float, param_dtype):
    self.q = param(rngs, (dim, num_heads, head_dim), ("embed", "heads", "head_dim"), param_dtype, std)
    self.k = param(rngs, (dim, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                   param_dtype, std)
    self.v = param(rngs, (dim, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                   param_dtype, std)
    self.o = param(rngs, (num_heads, head_dim, dim), ("heads", "head_dim", "embed"), param_dtype, std)
    self.rope_theta = rope_theta

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
    dt = x.dtype
    q = jnp.einsum("btd,dnh->btnh", x, self.q[...].astype(dt))  # (b, t, n, h)
    k = jnp.einsum("btd,dkh->btkh", x, self.k[...].astype(dt))  # (b, t, k, h)
    v = jnp.einsum("btd,dkh->btkh", x, self.v[...].astype(dt))
    q = constrain(rope(q, positions, self.rope_theta), ("act_batch", "act_seq", "act_heads", None))
    k = constrain(rope(k, positions, self.rope_theta), ("act_batch", "act_seq", "act_kv_heads", None))
    v = constrain(v, ("act_batch", "act_seq", "act_kv_heads", None))
    out = xla_attention(q, k, v, attention_mask(segment_ids))  # (b, t, n, h)
    return jnp.einsum("btnh,nhd->btd", out, self.o[...].astype(dt))
