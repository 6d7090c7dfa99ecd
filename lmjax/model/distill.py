"""Knowledge distillation's loss, a chunk of positions at a time, as
:mod:`lmjax.model.cross_entropy` computes the next-token loss: neither model's (b, t, v)
logits are ever held whole, forward or backward.

Per target with weight ``m`` (the batch's token weight), student logits ``s`` and teacher
logits ``u`` (both float32, from each model's final hidden states and output projection):

  loss = m * ((1 - w) * CE(s, target) + w * T^2 * KL(softmax(u / T) || softmax(s / T)) + z lse(s)^2)

``w`` is ``train.distill_weight``, ``T`` ``train.distill_temperature`` (Hinton et al.'s T^2
keeps the KL's gradient on the scale of the cross-entropy's) and ``z`` the z-loss weight. The
teacher is frozen: its hidden states and projection get no gradient. As in
:func:`lmjax.model.cross_entropy.cross_entropy` the gradient of the weighted sum is formed in
the forward pass, chunk by chunk: d loss / d s = m ((1 - w)(p - onehot) + 2 z lse p + w T (q_T - p_T))
with p = softmax(s), q_T = softmax(s / T) and p_T = softmax(u / T).

  >>> total, nll, lse, kl = distill_cross_entropy(x, w, targets, weights, teacher, z=0.0, chunk=1024)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lmjax.mesh import constrain
from lmjax.model.cross_entropy import _HEAD, _LOGITS, _chunks, _logits, _padded, _target_logit, _unchunk


class Teacher(NamedTuple):
  """What the student's loss needs of a frozen teacher for one batch."""
  features: jax.Array  # (b, t, d') the teacher's final-normed hidden states
  head: jax.Array  # (v, d') its output projection
  weight: float  # w: the KL's share of the loss
  temperature: float  # T


def _kl(s: jax.Array, u: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """KL(softmax(u/T) || softmax(s/T)) over the last axis, and both tempered softmaxes."""
  log_q = jax.nn.log_softmax(s / temperature, axis=-1)
  log_p = jax.nn.log_softmax(u / temperature, axis=-1)
  p = jnp.exp(log_p)
  return jnp.sum(p * (log_p - log_q), axis=-1), jnp.exp(log_q), p


def _forward(x, w32, xt, wt32, targets, weights, alpha, temperature, z, chunk, with_grads: bool):
  t = x.shape[1]
  dt = x.dtype
  w = constrain(w32.astype(dt), _HEAD)
  wt = constrain(wt32.astype(xt.dtype), _HEAD)
  c, padded = min(chunk, t), _padded(chunk, t)
  weights = weights.astype(jnp.float32)
  if padded != t:  # padding has weight 0
    pad = lambda a: jnp.pad(a, [(0, 0), (0, padded - t)] + [(0, 0)] * (a.ndim - 2))
    x, xt, targets, weights = pad(x), pad(xt), pad(targets), pad(weights)

  def one(dw, args):
    xc, xtc, tc, mc = args  # (b, c, d), (b, c, d'), (b, c), (b, c)
    logits, lse = _logits(xc, w)
    u = constrain(jnp.einsum("bcd,vd->bcv", xtc, wt, preferred_element_type=jnp.float32), _LOGITS)
    nll = lse - _target_logit(logits, tc)
    kl, q, p_t = _kl(logits, u, temperature)
    if not with_grads:
      return dw, (nll, lse, kl, None)
    p = jnp.exp(logits - lse[..., None])
    hit = jnp.arange(logits.shape[-1], dtype=tc.dtype) == tc[..., None]
    d = ((1.0 - alpha) * (p - hit) + (2.0 * z * lse)[..., None] * p
         + alpha * temperature * (q - p_t))
    dlogits = constrain((mc[..., None] * d).astype(dt), _LOGITS)
    dx = jnp.einsum("bcv,vd->bcd", dlogits, w)
    dw = dw + jnp.einsum("bcv,bcd->vd", dlogits, xc, preferred_element_type=jnp.float32)
    return constrain(dw, _HEAD), (nll, lse, kl, dx)

  dw0 = constrain(jnp.zeros(w32.shape, jnp.float32), _HEAD) if with_grads else None
  dw, (nll, lse, kl, dx) = jax.lax.scan(
      one, dw0, (_chunks(x, c), _chunks(xt, c), _chunks(targets, c), _chunks(weights, c)))
  nll, lse, kl = (_unchunk(a)[:, :t] for a in (nll, lse, kl))
  weights = weights[:, :t]
  total = jnp.sum(weights * ((1.0 - alpha) * nll + z * lse * lse
                             + alpha * temperature * temperature * kl))
  grads = (_unchunk(dx)[:, :t], dw.astype(w32.dtype)) if with_grads else None
  return (total, nll, lse, kl), grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _distill(x, w, xt, wt, targets, weights, alpha, temperature, z, chunk):
  return _forward(x, w, xt, wt, targets, weights, alpha, temperature, z, chunk, False)[0]


def _fwd(x, w, xt, wt, targets, weights, alpha, temperature, z, chunk):
  out, grads = _forward(x, w, xt, wt, targets, weights, alpha, temperature, z, chunk, True)
  return out, grads


def _bwd(alpha, temperature, z, chunk, res, cotangents):
  del alpha, temperature, z, chunk
  dx, dw = res
  g = cotangents[0]  # of the loss sum; the per-position outputs are not differentiated
  return (g.astype(dx.dtype) * dx, g * dw, None, None, None, None)  # the teacher: frozen


_distill.defvjp(_fwd, _bwd)


def distill_cross_entropy(x: jax.Array, w: jax.Array, targets: jax.Array, weights: jax.Array,
                          teacher: Teacher, z: float = 0.0,
                          chunk: int = 1024) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The student's final hidden states x (b, t, d) and output projection w (v, d), targets and
  weights (b, t), the ``teacher`` -> the weighted loss sum (module docstring; differentiable
  w.r.t. x and w), and per position nll, lse and kl (b, t) float32, for reporting."""
  xt, wt = jax.lax.stop_gradient((teacher.features, teacher.head))
  return _distill(x, w, xt, wt, targets, weights, float(teacher.weight),
                  float(teacher.temperature), float(z), chunk)


def plain_distill_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                                teacher: Teacher, z: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The same function from the student's whole float32 logits (b, t, v) and the teacher's
  (computed whole here), by autodiff (``config.model.loss_chunk = 0``): the reference the
  chunked one is tested against."""
  xt, wt = jax.lax.stop_gradient((teacher.features, teacher.head))
  teacher_logits = jnp.einsum("btd,vd->btv", xt, wt.astype(xt.dtype), preferred_element_type=jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  kl = _kl(logits, teacher_logits, teacher.temperature)[0]
  weights = weights.astype(jnp.float32)
  w, temp = teacher.weight, teacher.temperature
  total = jnp.sum(weights * ((1.0 - w) * nll + z * lse * lse + w * temp * temp * kl))
  return total, nll, lse, kl
