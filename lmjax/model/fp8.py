"""FP8 matmuls with current (per-tensor, just-in-time) scaling: ``config.model.quantization="fp8"``.

The recipe of NVIDIA Transformer Engine's ``Float8CurrentScaling`` and MaxText's fp8 path:
the forward operands (activations x and weights w) are cast to float8_e4m3fn and the
gradient flowing back (the cotangent of the output) to float8_e5m2, each after multiplying
by a scale that maps the tensor's own amax (largest magnitude) onto the format's largest
value (e4m3: 448, e5m2: 57344). The scale is computed from the tensor itself at every call,
so the scaling is stateless: no amax history lives in the train state or the checkpoint.
The dots take fp8 operands, accumulate in float32 and are rescaled by the product of the
two inverse scales; the output is in the operands' (compute) dtype, bfloat16 or float32
(float32 compute is allowed: the fp8 operands are the same, only the result skips a
bfloat16 rounding). A scale comes from the whole tensor, so one row's result depends
slightly on the other rows of its batch.

The backward is the standard one: dx = g w and dw = x g, each an fp8 dot of the e5m2
cotangent against the e4m3 operand saved by the forward (so the residuals are fp8 too).

  >>> y = fp8_einsum("btd,df->btf", x, w)  # x (b, t, d), w (d, f) -> (b, t, f), in the dtype of x and w
  >>> q, scale_inv = quantise(x, E4M3)  # x ~= dequantise(q, scale_inv, x.dtype)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

E4M3 = jnp.float8_e4m3fn  # forward operands: 4 exponent bits, 3 mantissa bits, max 448
E5M2 = jnp.float8_e5m2  # gradients: 5 exponent bits (range), 2 mantissa bits, max 57344
_F32_MAX = float(jnp.finfo(jnp.float32).max)


def quantise(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """``x`` in the fp8 ``dtype`` with current scaling: q = x * s with s = fmax / amax(x),
  computed in float32, clipped to the format's range. Returns q (x's shape, ``dtype``)
  and the float32 scalar 1 / s that :func:`dequantise` multiplies back.

  An all-zero x gets s = 1; a tiny amax gives at most float32's largest s; a non-finite
  x gives a non-finite q, so NaN and inf propagate to the loss as they would unquantised.
  """
  fmax = float(jnp.finfo(dtype).max)
  x32 = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x32))
  scale = jnp.minimum(jnp.where(amax > 0, fmax / amax, 1.0), _F32_MAX)
  q = jnp.clip(x32 * scale, -fmax, fmax).astype(dtype)  # e4m3fn has no inf: over fmax is NaN
  return q, 1.0 / scale


def dequantise(q: jax.Array, scale_inv: jax.Array, dtype) -> jax.Array:
  """The inverse of :func:`quantise`: q * scale_inv in ``dtype``."""
  return (q.astype(jnp.float32) * scale_inv).astype(dtype)


def _specs(eq: str) -> tuple[str, str, str]:
  """The letters of a two-operand einsum ``eq`` ("btd,df->btf"); a ValueError for what a
  single dot_general cannot do (ellipses, repeated letters, a letter summed over one operand)."""
  eq = eq.replace(" ", "")
  try:
    ins, out = eq.split("->")
    a, b = ins.split(",")
  except ValueError:
    raise ValueError(f"fp8_einsum: {eq!r} is not a two-operand einsum 'xs,ws->out'.") from None
  for s in (a, b, out):
    if not s.isalpha() or len(set(s)) != len(s):
      raise ValueError(f"fp8_einsum: {eq!r}: each operand needs distinct letters, no '...'.")
  for s, others in ((a, b + out), (b, a + out), (out, a + b)):
    if set(s) - set(others):
      raise ValueError(f"fp8_einsum: {eq!r}: letters {sorted(set(s) - set(others))} appear "
                       f"in one operand only.")
  return a, b, out


def _dot(a: jax.Array, b: jax.Array, sa: str, sb: str, sout: str) -> jax.Array:
  """einsum ``sa,sb->sout`` as one dot_general accumulating in float32 (then a transpose)."""
  batch = [c for c in sa if c in sb and c in sout]
  contract = [c for c in sa if c in sb and c not in sout]
  dims = (([sa.index(c) for c in contract], [sb.index(c) for c in contract]),
          ([sa.index(c) for c in batch], [sb.index(c) for c in batch]))
  y = jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
  got = batch + [c for c in sa if c not in sb] + [c for c in sb if c not in sa]
  return jnp.transpose(y, [got.index(c) for c in sout])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fp8_einsum(eq: str, x_dtype: np.dtype, w_dtype: np.dtype, x: jax.Array,
                w: jax.Array) -> jax.Array:
  return _forward(eq, x_dtype, w_dtype, x, w)[0]


def _forward(eq, x_dtype, w_dtype, x, w):
  sx, sw, sout = _specs(eq)
  qx, x_inv = quantise(x, E4M3)
  qw, w_inv = quantise(w, E4M3)
  y = _dot(qx, qw, sx, sw, sout) * (x_inv * w_inv)
  return y.astype(jnp.result_type(x_dtype, w_dtype)), (qx, x_inv, qw, w_inv)


def _backward(eq, x_dtype, w_dtype, saved, g):
  sx, sw, sout = _specs(eq)
  qx, x_inv, qw, w_inv = saved
  qg, g_inv = quantise(g, E5M2)
  dx = _dot(qg, qw, sout, sw, sx) * (g_inv * w_inv)  # g (out) . w -> x's letters
  dw = _dot(qx, qg, sx, sout, sw) * (x_inv * g_inv)  # x . g (out) -> w's letters
  return dx.astype(x_dtype), dw.astype(w_dtype)


_fp8_einsum.defvjp(_forward, _backward)


def fp8_einsum(eq: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """``jnp.einsum(eq, x, w)`` with x and w in e4m3 and the backward's cotangent in e5m2,
  each with its own current (per-tensor amax) scale; the result in jnp.result_type(x, w),
  dx in x's dtype, dw in w's. ``eq`` is any two-operand einsum a single dot_general
  computes: contracted, batch and free letters, no ellipsis.

  >>> y = fp8_einsum("btnh,nhd->btd", out, wo)  # (b, t, n, h) . (n, h, d) -> (b, t, d)
  """
  _specs(eq)  # errors at the call, not inside the VJP
  return _fp8_einsum(eq, np.dtype(x.dtype), np.dtype(w.dtype), x, w)
