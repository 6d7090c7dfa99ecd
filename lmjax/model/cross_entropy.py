"""The output projection and the next-token cross-entropy in one pass, a chunk of positions at
a time: the (b, t, v) logits are never held whole, forward or backward.

:func:`cross_entropy` takes the final hidden states x (b, t, d), the output-projection weight
(v, d), the targets and their weights, and returns the weighted loss sum, and per position the
negative log-likelihood and the log-sum-exp (the log partition function). It walks the
sequence ``chunk`` positions at a time; a chunk's logits (b, c, v) are computed from x in the
compute dtype with float32 accumulation, and everything after (the log-sum-exp, the softmax)
is float32.

Its gradient is computed *in the forward pass*, chunk by chunk, for the weighted loss sum
(the one scalar a train step differentiates): d loss / d logits = w_i ((1 + 2 z lse_i) p_i -
onehot(target_i)) is formed per chunk, cast to the compute dtype, and multiplied into dx (b, c,
d) and a float32 dW (v, d) accumulated over chunks; the backward pass only scales them by the
incoming cotangent. That is the same three matmuls as plain autodiff (logits, dx, dW) with
no recomputation, while plain autodiff keeps the float32 logits (and their bf16 copy) alive
from the forward to the backward pass. Called without differentiation (evaluation, scoring)
it computes the forward only.

``z`` adds the z-loss (PaLM; ``train.z_loss``): z * lse^2 per weighted position, which keeps
the log partition function near 0 and the logits from drifting in bfloat16.

  >>> loss_sum, nll, lse = cross_entropy(x, w, targets, weights, z=1e-4, chunk=1024)
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from lmjax.mesh import constrain

_LOGITS = ("act_batch", "act_seq", "act_vocab")
_HEAD = ("vocab", "embed")


def _chunks(a: jax.Array, chunk: int) -> jax.Array:
  """(b, t, ...) -> (t/c, b, c, ...): a scan over chunks of positions, rows kept whole."""
  b, t = a.shape[:2]
  return jnp.moveaxis(a.reshape(b, t // chunk, chunk, *a.shape[2:]), 1, 0)


def _unchunk(a: jax.Array) -> jax.Array:
  """(t/c, b, c, ...) -> (b, t, ...)."""
  n, b, c = a.shape[:3]
  return jnp.moveaxis(a, 0, 1).reshape(b, n * c, *a.shape[3:])


def _logits(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """A chunk's float32 logits (b, c, v) from x (b, c, d) and w (v, d) in the compute dtype,
  and their log-sum-exp (b, c)."""
  logits = constrain(jnp.einsum("bcd,vd->bcv", x, w, preferred_element_type=jnp.float32), _LOGITS)
  return logits, jax.nn.logsumexp(logits, axis=-1)


def _target_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """logits (b, c, v) at targets (b, c) -> (b, c), without a gather over a sharded vocabulary."""
  hit = jnp.arange(logits.shape[-1], dtype=targets.dtype) == targets[..., None]
  return jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)


def _padded(chunk: int, t: int) -> int:
  """Positions after padding t up to a whole number of chunks (one chunk if chunk >= t)."""
  c = min(chunk, t)
  return math.ceil(t / c) * c


def _prepare(x, targets, weights, chunk):
  """Pads the sequence to whole chunks (padding has weight 0) and returns the chunk size."""
  t = x.shape[1]
  c, padded = min(chunk, t), _padded(chunk, t)
  if padded != t:
    pad = lambda a: jnp.pad(a, [(0, 0), (0, padded - t)] + [(0, 0)] * (a.ndim - 2))
    x, targets, weights = pad(x), pad(targets), pad(weights)
  return x, targets, weights, c


def _forward(x, w32, targets, weights, z, chunk, with_grads: bool):
  b, t, d = x.shape
  dt = x.dtype
  w = constrain(w32.astype(dt), _HEAD)
  x, targets, weights, c = _prepare(x, targets, weights.astype(jnp.float32), chunk)

  def one(dw, args):
    xc, tc, wc = args  # (b, c, d), (b, c), (b, c)
    logits, lse = _logits(xc, w)
    nll = lse - _target_logit(logits, tc)
    if not with_grads:
      return dw, (nll, lse, None)
    p = jnp.exp(logits - lse[..., None])
    hit = jnp.arange(logits.shape[-1], dtype=tc.dtype) == tc[..., None]
    dlogits = ((wc * (1.0 + 2.0 * z * lse))[..., None] * p - jnp.where(hit, wc[..., None], 0.0))
    dlogits = constrain(dlogits.astype(dt), _LOGITS)
    dx = jnp.einsum("bcv,vd->bcd", dlogits, w)
    dw = dw + jnp.einsum("bcv,bcd->vd", dlogits, xc, preferred_element_type=jnp.float32)
    return constrain(dw, _HEAD), (nll, lse, dx)

  dw0 = constrain(jnp.zeros(w32.shape, jnp.float32), _HEAD) if with_grads else None
  dw, (nll, lse, dx) = jax.lax.scan(one, dw0, (_chunks(x, c), _chunks(targets, c), _chunks(weights, c)))
  nll, lse = _unchunk(nll)[:, :t], _unchunk(lse)[:, :t]
  weights = weights[:, :t]
  total = jnp.sum(weights * (nll + z * lse * lse))
  grads = (_unchunk(dx)[:, :t], dw.astype(w32.dtype)) if with_grads else None
  return (total, nll, lse), grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array,
                  z: float = 0.0, chunk: int = 1024) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x (b, t, d) in the compute dtype, the output projection w (v, d) (float32 master
  weights: cast here, its gradient stays float32), targets (b, t) int, weights (b, t) ->
  the weighted loss sum sum(weights * (nll + z lse^2)), nll (b, t) and lse (b, t) float32.

  Only the loss sum is differentiable (x and w get its gradient); nll and lse are for
  reporting: a cotangent on them is ignored.
  """
  return _forward(x, w, targets, weights, z, chunk, with_grads=False)[0]


def _fwd(x, w, targets, weights, z, chunk):
  out, grads = _forward(x, w, targets, weights, z, chunk, with_grads=True)
  return out, grads


def _bwd(z, chunk, grads, cotangents):
  del z, chunk
  g = cotangents[0]  # of the loss sum; nll and lse are not differentiated through
  dx, dw = grads
  return (g.astype(dx.dtype) * dx, g * dw, None, None)


cross_entropy.defvjp(_fwd, _bwd)


def plain_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                        z: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The same function as :func:`cross_entropy` from whole float32 logits (b, t, v), by
  autodiff (``config.model.loss_chunk = 0``): the reference it is tested against."""
  lse = jax.nn.logsumexp(logits, axis=-1)
  nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  return jnp.sum(weights * (nll + z * lse * lse)), nll, lse
