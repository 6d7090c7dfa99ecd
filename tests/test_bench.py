"""The benchmarks' hand-written reference step (tools/reference_step.py) computes what
lmjax's train step computes: same loss, gradients and update from the same parameters and
batch, so ``tools/bench.py mfu`` compares like with like."""

import functools

import jax
import numpy as np
import pytest

from lmjax.optim import learning_rate_schedule
from lmjax.state import build, init_state, token_losses
from lmjax.trainer import compile_train_step
from tests import layouts
from tools import reference_step as ref

# LLVM without its optimisation passes: these programs compile in half the time, and the
# arithmetic (the HLO, the matmul kernels, IEEE semantics) is the same.
_QUICK = {"xla_backend_optimization_level": 0}


def _compiled(jitted, *args):
  return jitted.lower(*args).compile(_QUICK)


@pytest.mark.slow
def test_reference_step_equals_lmjax_train_step():
  cfg = layouts.config("single")  # packed rows with two documents and padding (layouts.batch)
  setup = build(cfg, jax.devices()[:1])
  state = init_state(setup)
  params = jax.device_get(state["params"])
  batch = jax.device_put(layouts.batch(), jax.devices()[0])
  ref_state = ref.init_from_lmjax(cfg, state["params"])
  step_fn = compile_train_step(setup)
  new_state, metrics = jax.device_get(_compiled(step_fn, state, batch)(state, batch))
  ref_step = ref.compile_step(cfg)
  ref_state, ref_loss = _compiled(ref_step, ref_state, batch)(ref_state, batch)
  got = jax.device_get(ref.to_lmjax(ref_state["params"]))
  assert jax.tree.structure(got) == jax.tree.structure(params)
  np.testing.assert_allclose(float(ref_loss), metrics["loss"], rtol=1e-6)

  # Adam's first update, lr * (g / (|g| + eps) + weight decay), checks the sign of every
  # gradient and the optimizer (the next test checks the gradients themselves). Where |g|
  # is within a few eps (1e-8) of 0, rounding may move it by up to lr.
  def same_update(a, b):
    close = np.isclose(b, a, rtol=1e-5, atol=1e-6)
    assert close.mean() > 0.99, close.mean()
    np.testing.assert_allclose(b, a, atol=2 * cfg.optim.learning_rate)

  jax.tree.map(same_update, new_state["params"], got)
  assert not np.allclose(got["blocks"]["mlp"]["up"], params["blocks"]["mlp"]["up"])


def test_reference_loss_and_grads_untied_remat_accumulated():
  cfg = layouts.config("single")
  cfg.model.tie_embeddings, cfg.model.remat, cfg.optim.grad_accum_steps = False, "dots_no_batch", 2
  setup = build(cfg, jax.devices()[:1])
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda x: rng.normal(0, 0.02, x.shape).astype(np.float32),
                        setup.abstract_state["params"])
  batch = layouts.batch()

  def lmjax_loss_and_grads(params, b):
    (s, n), g = jax.value_and_grad(functools.partial(token_losses, setup.graphdef), has_aux=True)(params, b)
    return s / n, jax.tree.map(lambda x: x / n, g)

  loss, grads = jax.device_get(_compiled(jax.jit(lmjax_loss_and_grads), params, batch)(params, batch))
  ref_params = ref.from_lmjax(params)
  ref_fn = _compiled(jax.jit(functools.partial(ref.loss_and_grads, cfg)), ref_params, batch)
  ref_loss, ref_grads = jax.device_get(ref_fn(ref_params, batch))
  np.testing.assert_allclose(ref_loss, loss, rtol=1e-6)
  ref_grads = ref.to_lmjax(ref_grads)
  assert jax.tree.structure(ref_grads) == jax.tree.structure(grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-7), grads, ref_grads)


def test_reference_schedule_equals_lmjax():
  cfg = layouts.config("single")
  cfg.optim.warmup_steps, cfg.train.steps = 10, 100
  steps = np.array([0, 5, 10, 50, 99, 100, 150])
  np.testing.assert_allclose(ref.schedule(cfg)(steps), learning_rate_schedule(cfg)(steps), rtol=1e-6)
