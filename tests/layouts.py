"""One training step of a small model on a given mesh layout, for comparing layouts.

Imported by the sharding and pipeline tests (results are cached per layout, so each
layout compiles once per test session) and run as a script for the 16-device layout:
``python -m tests.layouts`` (sets 16 fake CPU devices itself).
"""

import functools
import os
import sys

if __name__ == "__main__":
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=16"
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import numpy as np

from lmjax.config import default_config
from lmjax.mesh import host_to_global, use_rules
from lmjax.state import build, init_state, token_losses
from lmjax.trainer import compile_train_step

# name -> (mesh sizes, model overrides, number of devices)
LAYOUTS = {
    "single": (dict(), dict(), 1),
    "single_unrolled_remat": (dict(), dict(scan_layers=False, remat="dots"), 1),
    "data8": (dict(data=8), dict(), 8),
    "fsdp8": (dict(fsdp=8), dict(), 8),
    "tensor8": (dict(tensor=8), dict(), 8),
    "data2_fsdp2_tensor2": (dict(data=2, fsdp=2, tensor=2), dict(), 8),
    "data2_fsdp2_tensor2_seq": (dict(data=2, fsdp=2, tensor=2, rules=(("act_seq", "tensor"),)),
                                dict(), 8),
    "stage4_data2": (dict(stage=4, data=2), dict(), 8),
    "stage4_data2_m8": (dict(stage=4, data=2), dict(pipeline_microbatches=8), 8),
    "stage4_data2_m2": (dict(stage=4, data=2), dict(pipeline_microbatches=2), 8),
    "stage2_fsdp2_tensor2": (dict(stage=2, fsdp=2, tensor=2), dict(), 8),
    "stage2_fsdp4_circular_m2": (dict(stage=2, fsdp=4), dict(pipeline_repeats=2, pipeline_microbatches=2), 8),
    "stage2_data4_circular_m4": (dict(stage=2, data=4), dict(pipeline_repeats=2, pipeline_microbatches=4), 8),
    "data2_stage2_fsdp2_tensor2": (dict(data=2, stage=2, fsdp=2, tensor=2), dict(), 16),
}
BATCH, SEQ = 16, 16


def config(name):
  mesh, model, _ = LAYOUTS[name]
  c = default_config()
  m = c.model
  m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = 64, 4, 32, 8, 4
  m.head_dim, m.mlp_dim, m.max_seq_len = 8, 64, SEQ
  c.data.seq_len, c.data.global_batch_size = SEQ, BATCH
  c.optim.warmup_steps = 0
  c.mesh.fsdp = 1
  for k, v in mesh.items():
    c.mesh[k] = v
  for k, v in model.items():
    m[k] = v
  return c


def batch():
  """Packed rows: two documents in even rows, padding at the end of row 1."""
  rng = np.random.default_rng(0)
  seg = np.ones((BATCH, SEQ), np.int32)
  seg[::2, 10:] = 2
  seg[1, 13:] = 0
  pos = np.where(seg == 2, np.arange(SEQ) - 10, np.arange(SEQ)).astype(np.int32)
  return {"inputs": rng.integers(0, 64, (BATCH, SEQ), dtype=np.int32),
          "targets": rng.integers(0, 64, (BATCH, SEQ), dtype=np.int32),
          "segment_ids": seg, "positions": pos}


@functools.lru_cache(maxsize=None)
def run(name):
  """Initial params, loss and gradients, then one train step; plus the compiled step."""
  cfg = config(name)
  setup = build(cfg, jax.devices()[: LAYOUTS[name][2]])
  state = init_state(setup)
  b = host_to_global(batch(), setup.mesh, setup.batch_sharding)
  params0 = jax.device_get(state["params"])

  def loss_and_grads(params, b):
    fn = functools.partial(token_losses, setup.graphdef)
    (s, n), g = jax.value_and_grad(fn, has_aux=True)(params, b)
    return s / n, jax.tree.map(lambda x: x / n, g)

  with jax.set_mesh(setup.mesh), use_rules(setup.rules):
    loss, grads = jax.jit(loss_and_grads)(state["params"], b)
  step_fn = compile_train_step(setup)
  compiled = step_fn.lower(state, b).compile()
  specs = jax.tree.map(lambda x: x.sharding.spec, state["params"])
  new_state, metrics = compiled(state, b)
  return dict(setup=setup, compiled=compiled, params0=params0, loss=float(loss),
              grads=jax.device_get(grads), metrics=jax.device_get(metrics),
              params1=jax.device_get(new_state["params"]), specs=specs,
              step=int(new_state["step"]))


def param_specs(name):
  """The PartitionSpec of every parameter of layout ``name``: what init_state creates them
  with (its out_shardings), read without compiling anything."""
  setup = build(config(name), jax.devices()[: LAYOUTS[name][2]])
  return jax.tree.map(lambda s: s.spec, setup.state_shardings["params"])


def assert_same_step(want, got):
  """``got`` equals ``want`` up to fp32 reordering of sums across devices."""
  # Same initial parameters: initialisation does not depend on the layout.
  jax.tree.map(np.testing.assert_array_equal, want["params0"], got["params0"])
  # Sharding splits sums into per-device partial sums followed by a reduction, so
  # fp32 results agree to a few ulps of the values summed, not bit for bit.
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               want["grads"], got["grads"])
  np.testing.assert_allclose(got["metrics"]["loss"], want["metrics"]["loss"], rtol=1e-6)
  np.testing.assert_allclose(got["metrics"]["grad_norm"], want["metrics"]["grad_norm"], rtol=1e-5)
  # Adam's first update is lr * g / (|g| + eps) with eps = 1e-8: where |g| is within a
  # few of eps, a rounding difference in g (a sum with cancellation) moves the update by
  # up to lr * eps * dg / (|g| + eps)^2. Where |g| > 1e-7 that is below 1e-6 and the
  # parameters must agree to it; elsewhere (a few elements) the update is bounded by lr = 3e-3.
  def same_update(g, a, b):
    sensitive = np.abs(g) <= 1e-7
    assert sensitive.mean() < 0.01
    np.testing.assert_allclose(a[~sensitive], b[~sensitive], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a[sensitive], b[sensitive], atol=2 * 3e-3)

  jax.tree.map(same_update, want["grads"], want["params1"], got["params1"])
  assert got["step"] == 1
  moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(want["params0"]),
                                                   jax.tree.leaves(want["params1"])))
  assert moved > 1e-4  # the update is not trivially zero


if __name__ == "__main__":
  assert jax.device_count() == 16, jax.devices()
  names = sys.argv[1:] or ["data2_stage2_fsdp2_tensor2"]
  for name in names:
    assert_same_step(run("single"), run(name))
    print(f"{name}: same loss, gradients and update as one device")
