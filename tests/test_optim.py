"""Optimizer pieces: schedule, weight-decay mask, gradient clipping, and gradient
accumulation equal to one big batch."""

import jax
import numpy as np
import optax
import pytest

from lmjax.config import default_config
from lmjax.mesh import host_to_global
from lmjax.optim import learning_rate_schedule, weight_decay_mask
from lmjax.state import build, init_state, token_losses
from lmjax.trainer import compile_train_step


def test_schedule_warms_up_then_decays_to_the_floor():
  c = default_config()
  c.optim.learning_rate, c.optim.warmup_steps, c.train.steps, c.optim.end_lr_fraction = 1.0, 10, 110, 0.1
  lr = learning_rate_schedule(c)
  assert float(lr(0)) == 0.0 and np.isclose(float(lr(5)), 0.5) and np.isclose(float(lr(10)), 1.0)
  assert np.isclose(float(lr(60)), 0.55, atol=1e-6)  # half-way down the cosine
  assert np.isclose(float(lr(110)), 0.1) and np.isclose(float(lr(500)), 0.1)


def test_weight_decay_skips_norms_and_embeddings_unless_asked():
  params = {"embed": {"table": 0}, "lm_head": {"table": 0}, "final_norm": {"scale": 0},
            "blocks": {"attn_norm": {"scale": 0}, "mlp": {"gate": 0}, "attn": {"q": 0}}}
  mask = weight_decay_mask(params)
  assert mask["blocks"]["mlp"]["gate"] and mask["blocks"]["attn"]["q"]
  assert not (mask["embed"]["table"] or mask["lm_head"]["table"] or mask["final_norm"]["scale"]
              or mask["blocks"]["attn_norm"]["scale"])
  assert all(jax.tree.leaves(weight_decay_mask(params, decay_norms_and_embeddings=True)))


@pytest.mark.slow
def test_gradient_accumulation_equals_one_large_batch():
  def run(accum):
    c = default_config()
    m = c.model
    m.vocab_size, m.num_layers, m.embed_dim, m.head_dim, m.mlp_dim, m.max_seq_len = 64, 1, 32, 8, 64, 16
    c.data.seq_len, c.data.global_batch_size, c.optim.grad_accum_steps = 16, 8, accum
    c.mesh.fsdp, c.mesh.data = 2, 2  # microbatches stay sharded over 4 devices
    setup = build(c, jax.devices()[:4])
    rng = np.random.default_rng(0)
    seg = np.ones((8, 16), np.int32)
    seg[:3, 12:] = 0  # unequal token counts per microbatch: the mean must still be global
    batch = {"inputs": rng.integers(0, 64, (8, 16), dtype=np.int32),
             "targets": rng.integers(0, 64, (8, 16), dtype=np.int32),
             "segment_ids": seg, "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
    step = compile_train_step(setup)
    state, metrics = step(init_state(setup), host_to_global(batch, setup.mesh, setup.batch_sharding))
    return jax.device_get(state["params"]), jax.device_get(metrics)

  p1, m1 = run(1)
  p2, m2 = run(2)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  assert m2["tokens"] == m1["tokens"] == 8 * 16 - 12
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-6), p1, p2)


def test_the_step_clips_the_gradient_and_reports_its_norm_before_clipping():
  c = default_config()
  m = c.model
  m.vocab_size, m.num_layers, m.embed_dim, m.head_dim, m.mlp_dim, m.max_seq_len = 64, 1, 32, 8, 64, 16
  c.data.seq_len, c.data.global_batch_size = 16, 4
  # Adam's first step is g / (|g| + eps) per element: with an eps far above the clipped
  # gradient's elements it is proportional to the gradient, so clipping shows in the update.
  o = c.optim
  o.learning_rate, o.warmup_steps, o.weight_decay, o.eps, o.grad_clip_norm = 1.0, 0, 0.0, 1e-3, 1e-3
  setup = build(c, jax.devices()[:1])
  state = init_state(setup)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 64, (4, 16), dtype=np.int32),
           "targets": rng.integers(0, 64, (4, 16), dtype=np.int32),
           "segment_ids": np.ones((4, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1))}
  params = jax.device_get(state["params"])
  loss = lambda p: token_losses(setup.graphdef, p, batch)[0] / (4 * 16)  # every token counts
  with setup.context():
    grads = jax.device_get(jax.jit(jax.grad(loss))(params))
  norm = float(optax.global_norm(grads))
  assert norm > 20 * o.grad_clip_norm  # the clip bites
  new, metrics = compile_train_step(setup)(state, host_to_global(batch, setup.mesh, setup.batch_sharding))
  np.testing.assert_allclose(metrics["grad_norm"], norm, rtol=1e-5)  # before clipping

  adam_step = lambda g: -o.learning_rate * g / (np.abs(g) + o.eps)
  clipped = jax.tree.map(lambda g: adam_step(g * o.grad_clip_norm / norm), grads)
  unclipped = jax.tree.map(adam_step, grads)
  delta = jax.tree.map(np.subtract, jax.device_get(new["params"]), params)
  jax.tree.map(lambda d, want: np.testing.assert_allclose(d, want, rtol=1e-3, atol=1e-7), delta, clipped)
  far = lambda a, b: float(optax.global_norm(jax.tree.map(np.subtract, a, b))) > 0.5 * float(optax.global_norm(b))
  assert far(delta, unclipped)
