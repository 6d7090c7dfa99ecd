"""Attention backends against the XLA reference, on CPU.

The cuDNN backend's call runs here with ``implementation="xla"`` (same arguments, XLA
math); the splash kernel runs in the Pallas interpreter.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from lmjax.config import ATTENTION_BACKENDS, MESH_AXES
from lmjax.mesh import axes_taken
from lmjax.model import attention as attn, kernels

cudnn_on_xla = functools.partial(kernels.cudnn_attention, implementation="xla")
splash_interpreted = functools.partial(kernels.splash_attention, interpret=True)


def _inputs(b, t, n, k, h, seed=0):
  """Random q, k, v and packed segment ids: 2-4 documents per row, then padding (id 0)."""
  rng = np.random.default_rng(seed)
  q, key, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, k, k))
  seg = np.zeros((b, t), np.int32)
  for i in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t - 4), 1 + i % 3, replace=False))
    seg[i] = np.searchsorted(cuts, np.arange(t), side="right") + 1
    seg[i, t - 1 - i % 3:] = 0  # 1-3 padding tokens at the end of every row
  return q, key, v, jnp.asarray(seg)


@jax.jit
def _reference(q, k, v, seg):
  return attn.xla_attention(q, k, v, attn.attention_mask(seg))


def _mesh(data=1, stage=1, fsdp=1, tensor=1):
  return jax.make_mesh((data, stage, fsdp, 1, 1, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 6)


@functools.partial(jax.jit, static_argnums=0)
def _grads(fn, q, k, v, seg):
  loss = lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, seg)))  # not a constant cotangent
  return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("kv_heads", [2, 1, 4])  # GQA, MQA, MHA
def test_cudnn_call_matches_reference(kv_heads):
  q, k, v, seg = _inputs(3, 16, 4, kv_heads, 8)
  assert (np.asarray(seg) == 0).any() and (np.asarray(seg).max(axis=1) > 1).all()
  np.testing.assert_allclose(jax.jit(cudnn_on_xla)(q, k, v, seg), _reference(q, k, v, seg),
                             rtol=1e-6, atol=1e-6)
  for got, want in zip(_grads(cudnn_on_xla, q, k, v, seg), _grads(_reference, q, k, v, seg)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [2, 1])  # GQA (MHA kernel), MQA kernel
def test_splash_kernel_matches_reference(kv_heads):
  q, k, v, seg = _inputs(2, 128, 4, kv_heads, 64, seed=1)
  np.testing.assert_allclose(jax.jit(splash_interpreted)(q, k, v, seg), _reference(q, k, v, seg),
                             rtol=1e-5, atol=1e-5)
  for got, want in zip(_grads(splash_interpreted, q, k, v, seg), _grads(_reference, q, k, v, seg)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_splash_needs_multiple_of_128():
  q, k, v, seg = _inputs(1, 96, 2, 1, 64)
  with pytest.raises(ValueError, match="multiple of 128"):
    splash_interpreted(q, k, v, seg)


@pytest.mark.parametrize("kv_heads", [2, 1])  # k divides the tensor axis; k = 1 is repeated to 2
def test_per_shard_splits_rows_and_heads(kv_heads):
  q, k, v, seg = _inputs(4, 16, 4, kv_heads, 8)
  seen = []

  def local(q, k, v, seg):
    seen.append((q.shape, k.shape, seg.shape))
    return cudnn_on_xla(q, k, v, seg)

  with jax.set_mesh(_mesh(data=2, fsdp=2, tensor=2)):
    out = jax.jit(lambda *a: kernels.per_shard(local, *a))(q, k, v, seg)
  assert seen == [((1, 16, 2, 8), (1, 16, 1, 8), (1, 16))]
  np.testing.assert_allclose(out, _reference(q, k, v, seg), rtol=1e-6, atol=1e-6)


def test_per_shard_splash_on_a_mesh():
  q, k, v, seg = _inputs(4, 128, 4, 2, 64, seed=2)
  with jax.set_mesh(_mesh(data=2, fsdp=2, tensor=2)):
    out = jax.jit(lambda *a: kernels.per_shard(splash_interpreted, *a))(q, k, v, seg)
  np.testing.assert_allclose(out, _reference(q, k, v, seg), rtol=1e-5, atol=1e-5)


def test_per_shard_inside_pipeline_stage_vmap():
  """Under vmap(spmd_axis_name=stage axes) the rows split over the remaining batch axes."""
  q, k, v, seg = _inputs(8, 16, 4, 2, 8)
  by_stage = lambda x: x.reshape(2, 4, *x.shape[1:])  # (stages, b/stages, ...)

  def staged(*args):
    with axes_taken("stage") as stage_axes:
      fn = lambda *a: kernels.per_shard(cudnn_on_xla, *a)
      return jax.vmap(fn, spmd_axis_name=stage_axes)(*args)

  with jax.set_mesh(_mesh(stage=2, fsdp=2, tensor=2)):
    out = jax.jit(staged)(*map(by_stage, (q, k, v, seg)))
  np.testing.assert_allclose(out.reshape(q.shape), _reference(q, k, v, seg), rtol=1e-6, atol=1e-6)


def test_xla_backend_is_the_reference_bit_for_bit():
  q, k, v, seg = _inputs(2, 16, 4, 2, 8)
  out = attn.dot_product_attention(q, k, v, seg, backend="xla")
  np.testing.assert_array_equal(out, attn.xla_attention(q, k, v, attn.attention_mask(seg)))
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    attn.dot_product_attention(q, k, v, seg, backend="flash")


def test_attention_module_backend_changes_no_parameters():
  make = lambda **kw: attn.Attention(32, 4, 2, 8, rope_theta=1e4, rngs=nnx.Rngs(0), std=0.02,
                                     param_dtype=jnp.float32, **kw)
  base, cudnn = make(), make(backend="cudnn")
  assert base.backend == "xla" and cudnn.backend == "cudnn"
  want, got = nnx.state(base, nnx.Param), nnx.state(cudnn, nnx.Param)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    make(backend="flash")


def test_check_backend():
  for platform in ("cpu", "gpu", "tpu"):
    attn.check_backend("xla", platform)
  attn.check_backend("cudnn", "gpu")
  attn.check_backend("splash", "tpu")
  with pytest.raises(ValueError, match=r"config\.model\.attention='cudnn' needs an NVIDIA GPU "
                                       r"\(platform is cpu\); use 'xla'"):
    attn.check_backend("cudnn", "cpu")
  with pytest.raises(ValueError, match=r"attention='splash' needs a TPU \(platform is cpu\)"):
    attn.check_backend("splash", "cpu")
  with pytest.raises(ValueError, match="config.model.attention='cudnn' needs"):
    attn.check_backend("cudnn", "tpu")
  with pytest.raises(ValueError, match="unknown"):
    attn.check_backend("flash", "cpu")
  attn.check_backend("blockwise", "cpu")
  assert set(ATTENTION_BACKENDS) == {"xla", "blockwise", "cudnn", "splash"}


@pytest.mark.parametrize("backend", ["cudnn", "splash"])
def test_sliding_window_on_every_backend(backend):
  """A window of w: token i sees j in (i - w, i] of its document, on each backend."""
  t, window = (128, 40) if backend == "splash" else (16, 5)
  q, k, v, seg = _inputs(2, t, 4, 2, 64 if backend == "splash" else 8, seed=3)
  want = jax.jit(lambda *a: attn.xla_attention(*a[:3], attn.attention_mask(a[3], window)))(q, k, v, seg)
  fn = cudnn_on_xla if backend == "cudnn" else splash_interpreted
  got = jax.jit(functools.partial(fn, window=window))(q, k, v, seg)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(want) - np.asarray(_reference(q, k, v, seg))).max() > 1e-3
  mask = np.asarray(attn.attention_mask(seg, window))[0, 0, 0]  # (t, s) of row 0
  i, j = np.nonzero(mask)
  assert (i - j).max() == window - 1 and (j <= i).all()


@pytest.mark.parametrize("kv_heads,window", [(2, 0), (1, 0), (4, 0), (2, 7)])
def test_blockwise_matches_reference_forward_and_backward(kv_heads, window):
  """16-query blocks over 48 tokens of packed documents and padding: the same outputs and
  gradients as the XLA reference, which holds all scores at once."""
  q, k, v, seg = _inputs(3, 48, 4, kv_heads, 8, seed=4)
  ref = jax.jit(lambda *a: attn.xla_attention(*a[:3], attn.attention_mask(a[3], window)))
  blockwise = functools.partial(kernels.blockwise_attention, window=window, block=16)
  np.testing.assert_allclose(jax.jit(blockwise)(q, k, v, seg), ref(q, k, v, seg), rtol=1e-5, atol=1e-5)
  for got, want in zip(_grads(blockwise, q, k, v, seg), _grads(ref, q, k, v, seg)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_blockwise_keeps_no_scores_for_the_backward():
  """What the backward pass saves: the inputs, the output and a (b, n, t) log-sum-exp;
  never the (b, n, t, t) scores the reference saves."""
  q, k, v, seg = _inputs(2, 256, 4, 2, 8, seed=5)
  saved = lambda fn: sum(x.size for x in jax.tree.leaves(jax.vjp(lambda *a: fn(*a, seg), q, k, v)[1]))
  reference = saved(lambda q, k, v, s: attn.xla_attention(q, k, v, attn.attention_mask(s)))
  blockwise = saved(kernels.blockwise_attention)
  inputs = q.size + k.size + v.size + seg.size
  assert blockwise <= inputs + q.size + 2 * 4 * 256 + 16  # + output + lse (b, n, t) + counters
  assert reference > 2 * 4 * 256 * 256  # the reference keeps probabilities (b, n, t, s)
