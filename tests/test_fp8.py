"""FP8 projections (``model.quantization="fp8"``): current-scaling quantisation round
trips, the custom VJP against a hand-quantised reference and the float32 einsum, the model
against its bfloat16 self, a short training run, and a sharded step.

Tolerances: rounding to nearest in a format with m mantissa bits moves a value by at most
2^-(m+1) of itself (e4m3 2^-4, e5m2 2^-3) and by about 0.7 * 2^-m / sqrt(12) in root mean
square (e4m3 0.026, e5m2 0.052). A dot of two independently rounded operands is off by
their errors in quadrature relative to its norm: about 0.037 for e4m3 x e4m3 (forward) and
0.058 for e5m2 x e4m3 (dx, dw); the bounds below are about 1.35 times those.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmjax.config import default_config
from lmjax.mesh import host_to_global
from lmjax.model import Transformer
from lmjax.model.fp8 import E4M3, E5M2, dequantise, fp8_einsum, quantise
from lmjax.state import build, init_state, token_losses
from lmjax.trainer import compile_train_step, train
from tests import layouts
from tests.test_train import _cfg as train_cfg

FWD_TOL, GRAD_TOL = 0.05, 0.08  # relative Frobenius error of fp8 dots (see the module docstring)


def _rel(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize("dtype, rel, subnormal", [(E4M3, 2.0 ** -4, 2.0 ** -9),
                                                   (E5M2, 2.0 ** -3, 2.0 ** -16)])
def test_quantise_round_trip_within_the_format_precision(dtype, rel, subnormal):
  fmax = float(jnp.finfo(dtype).max)
  x = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
  for amax in (1e-30, 1e-3, 1.0, 3e4, 1e30):  # far outside the format's range unscaled
    xs = x * np.float32(amax / np.abs(x).max())
    q, scale_inv = quantise(jnp.asarray(xs), dtype)
    assert q.dtype == dtype and np.isclose(float(jnp.max(jnp.abs(q.astype(jnp.float32)))), fmax)
    back = np.asarray(dequantise(q, scale_inv, jnp.float32))
    # Relative error within the format's precision; fp8 subnormals (the smallest values of
    # a tensor) are within half their spacing, scaled back.
    bound = np.maximum(rel * np.abs(xs), 0.5 * subnormal * float(scale_inv))
    assert np.all(np.abs(back - xs) <= bound * (1 + 1e-6)), amax
    assert np.mean(np.abs(back - xs) <= rel * np.abs(xs)) > 0.99
  q, scale_inv = quantise(jnp.zeros((3, 4), jnp.bfloat16), dtype)
  back = dequantise(q, scale_inv, jnp.bfloat16)
  assert float(scale_inv) == 1.0 and back.dtype == jnp.bfloat16 and not np.any(np.asarray(back))


def test_fp8_einsum_and_its_gradients():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 64), np.float32)  # (b, t, d)
  w = 0.02 * rng.standard_normal((64, 4, 16), np.float32)  # (d, n, h)
  g = rng.standard_normal((2, 8, 4, 16), np.float32)  # cotangent (b, t, n, h)
  eq = "btd,dnh->btnh"
  exact = lambda x, w: jnp.einsum(eq, x, w, precision="highest")
  fp8 = lambda x, w: fp8_einsum(eq, x, w)
  dq = lambda t, fmt: dequantise(*quantise(t, fmt), jnp.float32)

  def grads(f, x, w):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(g.astype(y.dtype)))

  @jax.jit
  def compute(x, w):
    qx, qw = dq(x, E4M3), dq(w, E4M3)
    return dict(
        fp8=grads(fp8, x, w), exact=grads(exact, x, w),
        # The recipe by hand: e4m3 x and w forward; the cotangent in e5m2 (or e4m3) backward.
        by_hand=(exact(qx, qw), *jax.vjp(exact, qx, qw)[1](dq(g, E5M2))),
        e4m3_dx=jax.vjp(exact, qx, qw)[1](dq(g, E4M3))[0],
        bf16=grads(fp8, x.astype(jnp.bfloat16), w))

  r = compute(x, w)
  errors = [_rel(a, b) for a, b in zip(r["fp8"], r["exact"])]
  assert errors[0] < FWD_TOL and max(errors[1:]) < GRAD_TOL, errors
  assert min(errors) > 0.01, errors  # it is quantised
  for got, want in zip(r["fp8"], r["by_hand"]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert _rel(r["fp8"][1], r["e4m3_dx"]) > 0.02  # an e4m3 cotangent would not give this dx
  text = jax.jit(jax.grad(lambda x, w: jnp.sum(fp8(x, w) * g), (0, 1))).lower(x, w).as_text()
  assert "f8E5M2" in text and "f8E4M3FN" in text
  # A bfloat16 x: the result in jnp.result_type(x, w), each gradient in its operand's dtype.
  assert [a.dtype for a in r["bf16"]] == [jnp.float32, jnp.bfloat16, jnp.float32]
  assert max(_rel(a, b) for a, b in zip(r["bf16"], r["exact"])) < GRAD_TOL
  # Batch letters and an output order that needs a transpose.
  a, b = rng.standard_normal((3, 5, 7), np.float32), rng.standard_normal((3, 7, 2), np.float32)
  assert _rel(fp8_einsum("bij,bjk->bki", a, b), np.einsum("bij,bjk->bki", a, b)) < FWD_TOL
  with pytest.raises(ValueError, match="one operand only"):
    fp8_einsum("btd,df->bt", x, w[:, 0])


def _model_cfg(quantization):
  m = default_config().model
  m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = 97, 2, 32, 4, 2
  m.head_dim, m.mlp_dim, m.max_seq_len = 8, 48, 16
  m.compute_dtype, m.quantization = "bfloat16", quantization
  return m


def test_model_fp8_is_close_to_bfloat16_and_every_projection_learns():
  """Tolerances (measured: logits 0.02, projection gradients 0.07 to 0.11): the logits
  pass one fp8 dot per projection, about 0.037 each; a projection weight's gradient passes
  the e5m2 backward of every later one, each about 0.058."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 97, (4, 16)))
  results = {}
  for quantization in ("none", "fp8"):
    graphdef, params = nnx.split(Transformer(_model_cfg(quantization), rngs=nnx.Rngs(0)))

    def loss(params):
      logits = nnx.merge(graphdef, params)(tokens[:, :-1])
      logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)
      return -jnp.mean(logprobs), logits

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    results[quantization] = step(params)
    text = step.lower(params).as_text()
  # The scanned block's 7 projections (q, k, v, o, gate, up, down) take e4m3 operands
  # forward and, for dx and dw, an e5m2 cotangent backward; the LM head and attention's
  # scores and probabilities (9 dots forward and backward) stay in bfloat16.
  dots = [line for line in text.splitlines() if "dot_general" in line]
  e4m3 = [line for line in dots if "f8E4M3FN" in line]
  e5m2 = [line for line in dots if "f8E5M2" in line]
  assert (len(e4m3) - len(e5m2), len(e5m2), len(dots) - len(e4m3)) == (7, 14, 9), dots
  ((loss16, logits16), g16), ((loss8, logits8), g8) = results["none"], results["fp8"]
  assert 0 < _rel(logits8, logits16) < 0.04, _rel(logits8, logits16)
  assert abs(float(loss8) - float(loss16)) < 0.01
  for part, names in (("attn", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "down"))):
    for name in names:
      got, want = g8["blocks"][part][name][...], g16["blocks"][part][name][...]
      assert np.all(np.isfinite(got)) and np.all(np.abs(got).sum(axis=(1, 2)) > 0), name  # each layer
      assert _rel(got, want) < 0.15, (name, _rel(got, want))


@pytest.mark.slow
def test_training_in_fp8_follows_bfloat16(tmp_path):
  losses = {}
  for quantization in ("none", "fp8"):
    cfg = train_cfg(30)
    cfg.model.compute_dtype, cfg.model.quantization = "bfloat16", quantization
    cfg.train.checkpoint_every = 0
    losses[quantization] = [r["loss"] for r in train(cfg, tmp_path / quantization)]
  none, fp8 = np.array(losses["none"]), np.array(losses["fp8"])
  assert len(fp8) == 30 and np.all(np.isfinite(fp8)) and not np.array_equal(fp8, none)
  assert fp8[-5:].mean() < fp8[0] - 0.8  # it learns
  assert abs(fp8[-5:].mean() - none[-5:].mean()) < 0.05, (fp8[-5:], none[-5:])


def test_sharded_fp8_step_matches_one_device():
  """Amax is over the whole tensor, not per shard: a step on fsdp=4 x tensor=2 has one
  device's loss and gradient norm, to float32 reordering and the rare fp8 rounding it flips."""
  cfg = layouts.config("single")
  cfg.model.quantization, cfg.model.compute_dtype = "fp8", "bfloat16"
  cfg.mesh.fsdp, cfg.mesh.tensor = 4, 2
  setup = build(cfg)
  state = init_state(setup)
  params = jax.device_put(jax.device_get(state["params"]), jax.devices()[0])
  batch = layouts.batch()
  losses = jax.value_and_grad(functools.partial(token_losses, setup.graphdef), has_aux=True)
  (total, count), grads = jax.jit(losses)(params, batch)  # one device, no mesh
  want_loss, want_norm = total / count, optax.global_norm(grads) / count

  batch = host_to_global(batch, setup.mesh, setup.batch_sharding)
  compiled = compile_train_step(setup).lower(state, batch).compile()
  text = compiled.as_text()
  assert "f8e4m3fn[" in text and "f8e5m2[" in text
  _, metrics = compiled(state, batch)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-3)
  np.testing.assert_allclose(metrics["grad_norm"], want_norm, rtol=1e-2)
