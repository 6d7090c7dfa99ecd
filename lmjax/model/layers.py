"""Building blocks of the decoder: parameters with logical axes, RMSNorm, embeddings,
SwiGLU MLP and rotary position embeddings.

Dimension letters in shape comments: b batch, t sequence, d model width, f MLP width,
n query heads, k key/value heads, h head width, v vocabulary.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lmjax.mesh import constrain


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str], dtype,
          std: float | None = None) -> nnx.Param:
  """A parameter carrying its logical axis names; normal(std) init, or ones when std is None.

  >>> w = param(nnx.Rngs(0), (16, 64), ("embed", "mlp"), jnp.float32, std=0.02)
  """
  assert len(shape) == len(axes), (shape, axes)
  if std is None:
    value = jnp.ones(shape, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm with a learned scale, computed in float32.

  >>> y = RMSNorm(16, eps=1e-6, param_dtype=jnp.float32)(jnp.ones((2, 3, 16)))
  """

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.scale = param(None, (dim,), ("norm",), param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Embed(nnx.Module):
  """Token embedding table; ``attend`` reuses it as the output projection (tied weights).

  >>> emb = Embed(100, 16, rngs=nnx.Rngs(0), std=0.02, param_dtype=jnp.float32)
  >>> x = emb(jnp.zeros((2, 5), jnp.int32), jnp.float32)  # (2, 5, 16)
  """

  def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, std: float, param_dtype):
    self.table = param(rngs, (vocab, dim), ("vocab", "embed"), param_dtype, std=std)  # (v, d)

  def __call__(self, ids: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.table[...], ids, axis=0).astype(dtype)  # (b, t, d)

  def attend(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("btd,vd->btv", x, self.table[...].astype(x.dtype))


class MLP(nnx.Module):
  """SwiGLU feed-forward: wo(silu(x wg) * (x wu)).

  >>> mlp = MLP(16, 48, rngs=nnx.Rngs(0), std=0.02, param_dtype=jnp.float32)
  """

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, std: float, param_dtype):
    self.gate = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype, std=std)  # (d, f)
    self.up = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype, std=std)  # (d, f)
    self.down = param(rngs, (hidden, dim), ("mlp", "embed"), param_dtype, std=std)  # (f, d)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    g = jnp.einsum("btd,df->btf", x, self.gate[...].astype(dt))
    u = jnp.einsum("btd,df->btf", x, self.up[...].astype(dt))
    h = constrain(jax.nn.silu(g) * u, ("act_batch", "act_seq", "act_mlp"))
    return jnp.einsum("btf,fd->btd", h, self.down[...].astype(dt))


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (half-split layout) of x (b, t, n, h) at positions (b, t)."""
  h = x.shape[-1]
  freqs = theta ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)  # (h/2,)
  angles = positions.astype(jnp.float32)[..., None] * freqs  # (b, t, h/2)
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
