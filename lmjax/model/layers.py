"""Building blocks of the decoder: parameters with logical axes, RMSNorm and LayerNorm,
embeddings, the SwiGLU and GELU MLPs and rotary position embeddings (with Llama 3 and
linear frequency scaling).

Dimension letters in shape comments: b batch, t sequence, d model width, f MLP width,
n query heads, k key/value heads, h head width, v vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.mesh import constrain
from lmjax.model import lora
from lmjax.model.config import ModelConfig
from lmjax.model.fp8 import fp8_einsum


def param(rngs: nnx.Rngs | None, shape: Sequence[int], axes: Sequence[str | None], dtype,
          std: float | None = None, fill: float = 1.0) -> nnx.Param:
  """A parameter carrying its logical axis names; normal(std) init, or ``fill`` (ones;
  zeros for biases) when std is None.

  >>> w = param(nnx.Rngs(0), (16, 64), ("embed", "mlp"), jnp.float32, std=0.02)
  """
  assert len(shape) == len(axes), (shape, axes)
  if std is None:
    value = jnp.full(shape, fill, dtype)
  else:
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


def weight(p: nnx.Param, dtype) -> jax.Array:
  """Parameter ``p`` in the compute ``dtype``, cast where it is stored: the cast keeps the
  parameter's sharding, so the gather that a sharded weight needs before its matmul (FSDP,
  every layer) moves compute-dtype bytes, half of float32's in bfloat16.

  >>> w = weight(self.up, jnp.bfloat16)  # (d, f) bfloat16, sharded like self.up
  """
  x = p[...]
  if x.dtype == dtype:
    return x
  axes = tuple(p.get_metadata()["out_sharding"])[-x.ndim:]  # a scanned layer's slice has no "layers"
  return constrain(x.astype(dtype), axes)


def project(eq: str, x: jax.Array, p: nnx.Param, dtype, quantization: str = "none") -> jax.Array:
  """A dense projection ``einsum(eq, x, p)`` in the compute ``dtype``: the matmul of every
  attention and MLP projection (not the embedding, the LM head or attention's scores).
  ``quantization`` (``config.model.quantization``): "none", or "fp8" for e4m3 operands and
  e5m2 gradients with current scaling (:func:`lmjax.model.fp8.fp8_einsum`).

  >>> y = project("btd,df->btf", x, self.up, jnp.bfloat16, "fp8")  # (b, t, f) bfloat16
  """
  if quantization == "fp8":
    return fp8_einsum(eq, x, weight(p, dtype))
  if quantization != "none":
    raise ValueError(f"config.model.quantization={quantization!r} is unknown; use 'none' or 'fp8'.")
  return jnp.einsum(eq, x, weight(p, dtype))


class RMSNorm(nnx.Module):
  """Root-mean-square layer norm with a learned scale, computed in float32.

  >>> y = RMSNorm(16, eps=1e-6, param_dtype=jnp.float32)(jnp.ones((2, 3, 16)))
  """

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.scale = param(None, (dim,), ("norm",), param_dtype)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return _rms_norm(x, self.scale[...], self.eps)


class LayerNorm(nnx.Module):
  """Layer norm (mean-centred, biased variance) with a learned scale and bias, in float32.

  >>> y = LayerNorm(16, eps=1e-5, param_dtype=jnp.float32)(jnp.ones((2, 3, 16)))
  """

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.scale = param(None, (dim,), ("norm",), param_dtype)
    self.bias = param(None, (dim,), ("norm",), param_dtype, fill=0.0)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return _layer_norm(x, self.scale[...], self.bias[...], self.eps)


# The norms and the MLP activations are recomputed in the backward pass from their inputs
# (jax.checkpoint): what stays alive for it is x in the compute dtype, not the float32 copies
# and intermediate products autodiff would keep (two float32 (b, t, d) arrays per norm in
# bfloat16, three (b, t, f) arrays per SwiGLU), for a few elementwise operations.
_recomputed = functools.partial(jax.checkpoint, prevent_cse=False)


@functools.partial(_recomputed, static_argnums=(2,))
def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


@functools.partial(_recomputed, static_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
  y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


@_recomputed
def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  return jax.nn.silu(gate) * up


@_recomputed
def _gelu(up: jax.Array) -> jax.Array:
  return jax.nn.gelu(up, approximate=True)


def make_norm(kind: str, dim: int, *, eps: float, param_dtype) -> RMSNorm | LayerNorm:
  """``config.model.norm``: "rmsnorm" or "layernorm"."""
  return {"rmsnorm": RMSNorm, "layernorm": LayerNorm}[kind](dim, eps=eps, param_dtype=param_dtype)


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
    return jnp.einsum("btd,vd->btv", x, weight(self.table, x.dtype))


class MLP(nnx.Module):
  """Feed-forward block. ``kind="swiglu"``: down(silu(x gate) * (x up)) (Llama);
  ``kind="gelu"``: down(gelu_tanh(x up)) (GPT-2). ``bias`` adds a bias to each projection;
  ``quantization`` is the projections' (see :func:`project`); ``adapters`` adds LoRA adapters to
  those of its targets among gate, up and down (:mod:`lmjax.model.lora`).

  >>> mlp = MLP(16, 48, rngs=nnx.Rngs(0), std=0.02, param_dtype=jnp.float32)
  """

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, std: float, param_dtype,
               kind: str = "swiglu", bias: bool = False, quantization: str = "none",
               adapters: lora.Adapters | None = None):
    if kind not in ("swiglu", "gelu"):
      raise ValueError(f"config.model.mlp={kind!r} is unknown; use 'swiglu' or 'gelu'.")
    self.kind = kind
    self.quantization = quantization
    if kind == "swiglu":
      self.gate = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype, std=std)  # (d, f)
    self.up = param(rngs, (dim, hidden), ("embed", "mlp"), param_dtype, std=std)  # (d, f)
    self.down = param(rngs, (hidden, dim), ("mlp", "embed"), param_dtype, std=std)  # (f, d)
    self.bias = bias
    if bias:
      if kind == "swiglu":
        self.gate_bias = param(None, (hidden,), ("mlp",), param_dtype, fill=0.0)
      self.up_bias = param(None, (hidden,), ("mlp",), param_dtype, fill=0.0)
      self.down_bias = param(None, (dim,), ("norm",), param_dtype, fill=0.0)
    lora.attach(self, rngs, adapters, {"gate": 1, "up": 1, "down": 1} if kind == "swiglu"
                else {"up": 1, "down": 1})

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype

    def up(name: str) -> jax.Array:  # x (b, t, d) -> (b, t, f)
      y = project("btd,df->btf", x, getattr(self, name), dt, self.quantization)
      y = lora.add(self, name, "btd,df->btf", x, y)
      return y + getattr(self, f"{name}_bias")[...].astype(dt) if self.bias else y

    u = up("up")
    h = _swiglu(up("gate"), u) if self.kind == "swiglu" else _gelu(u)
    h = constrain(h, ("act_batch", "act_seq", "act_mlp"))
    out = lora.add(self, "down", "btf,fd->btd", h, project("btf,fd->btd", h, self.down, dt,
                                                         self.quantization))
    return out + self.down_bias[...].astype(dt) if self.bias else out


@dataclasses.dataclass(frozen=True)
class Rope:
  """Rotary position embedding settings; :meth:`frequencies` gives the (h/2,) inverse
  frequencies and :attr:`attention_scaling` the factor cos and sin are multiplied by.
  ``scaling``: "none"; "linear" divides every frequency by ``factor`` (positions /
  factor); "llama3" divides the low frequencies (wavelength over ``original_max_len /
  low_freq_factor``) by ``factor``, keeps the high ones (under ``original_max_len /
  high_freq_factor``) and blends in between, as Llama 3.1+ do; "yarn" (YaRN) keeps the
  dimensions that turn more than ``beta_fast`` times in ``original_max_len`` positions,
  divides those turning fewer than ``beta_slow`` times by ``factor``, ramps linearly in
  between (ends rounded to whole dimensions if ``truncate``) and scales cos and sin by
  ``attention_factor`` (0: 0.1 ln(factor) + 1, or with ``mscale`` and ``mscale_all_dim``
  both set, (0.1 mscale ln(factor) + 1) / (0.1 mscale_all_dim ln(factor) + 1)), as
  Hugging Face ``transformers`` does.

  >>> Rope(theta=5e5, scaling="llama3", factor=32.0).frequencies(64)  # (32,)
  >>> Rope(scaling="yarn", factor=4.0, original_max_len=4096).attention_scaling  # 1.1386
  """
  theta: float = 10000.0
  scaling: str = "none"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 0.0
  mscale_all_dim: float = 0.0
  attention_factor: float = 0.0
  truncate: bool = True

  def frequencies(self, h: int) -> np.ndarray:
    freqs = 1.0 / self.theta ** (np.arange(0, h, 2, dtype=np.float32) / np.float32(h))
    if self.scaling == "none":
      return freqs.astype(np.float32)
    if self.scaling == "linear":
      return (freqs / self.factor).astype(np.float32)
    if self.scaling == "yarn":
      return self._yarn(freqs, h)
    if self.scaling != "llama3":
      raise ValueError(f"config.model.rope_scaling={self.scaling!r} is unknown; use none, linear, "
                       "llama3 or yarn.")
    wavelen = 2 * math.pi / freqs
    low, high = self.original_max_len / self.low_freq_factor, self.original_max_len / self.high_freq_factor
    smooth = (self.original_max_len / wavelen - self.low_freq_factor) / (
        self.high_freq_factor - self.low_freq_factor)
    blended = (1 - smooth) * freqs / self.factor + smooth * freqs
    out = np.where(wavelen > low, freqs / self.factor, np.where(wavelen < high, freqs, blended))
    return out.astype(np.float32)

  def _yarn(self, freqs: np.ndarray, h: int) -> np.ndarray:
    # The dimension (of h) whose frequency turns ``turns`` times in original_max_len positions.
    dim = lambda turns: (h * math.log(self.original_max_len / (turns * 2 * math.pi))
                         / (2 * math.log(self.theta)))
    low, high = dim(self.beta_fast), dim(self.beta_slow)
    if self.truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, h - 1)
    ramp = np.clip((np.arange(h // 2, dtype=np.float32) - low) / (high - low if high != low else 0.001), 0, 1)
    return (freqs / self.factor * ramp + freqs * (1 - ramp)).astype(np.float32)

  @property
  def attention_scaling(self) -> float:
    """What cos and sin are multiplied by: 1 but for YaRN (see the class)."""
    if self.scaling != "yarn":
      return 1.0
    if self.attention_factor:
      return self.attention_factor
    grow = lambda m: 0.1 * m * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0
    return grow(self.mscale) / grow(self.mscale_all_dim) if self.mscale and self.mscale_all_dim else grow(1.0)

  @classmethod
  def from_config(cls, cfg: ModelConfig) -> Rope:
    """The settings of a :class:`ModelConfig`."""
    return cls(theta=cfg.rope_theta, scaling=cfg.rope_scaling, factor=cfg.rope_scaling_factor,
               low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
               original_max_len=cfg.rope_original_max_len, beta_fast=cfg.rope_beta_fast,
               beta_slow=cfg.rope_beta_slow, mscale=cfg.rope_mscale,
               mscale_all_dim=cfg.rope_mscale_all_dim, attention_factor=cfg.rope_attention_factor,
               truncate=cfg.rope_truncate)


def rope(x: jax.Array, positions: jax.Array, theta: float | Rope) -> jax.Array:
  """Rotary position embedding (half-split layout) of x (b, t, n, h) at positions (b, t);
  ``theta`` is the base frequency or a :class:`Rope`."""
  spec = theta if isinstance(theta, Rope) else Rope(theta=theta)
  freqs = jnp.asarray(spec.frequencies(x.shape[-1]))  # (h/2,)
  angles = positions.astype(jnp.float32)[..., None] * freqs  # (b, t, h/2)
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  if spec.attention_scaling != 1.0:  # YaRN
    sin, cos = sin * np.float32(spec.attention_scaling), cos * np.float32(spec.attention_scaling)
  sin, cos = sin[:, :, None, :], cos[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
