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
from lmjax import state as state_lib
from lmjax.state import build, init_state
from lmjax.trainer import compile_train_step
from tools.hlo import compile_partitioned

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
# The 1F1B schedule (lmjax.model.pipeline_1f1b): fewer, as many and more microbatches than stages.
ONE_F_ONE_B = dict(pipeline_schedule="1f1b")
LAYOUTS.update({
    "stage4_data2_1f1b_m2": (dict(stage=4, data=2), dict(ONE_F_ONE_B, pipeline_microbatches=2), 8),
    "stage4_data2_1f1b_m4": (dict(stage=4, data=2), ONE_F_ONE_B, 8),
    "stage4_data2_1f1b_m8": (dict(stage=4, data=2), dict(ONE_F_ONE_B, pipeline_microbatches=8), 8),
    "stage2_fsdp2_tensor2_1f1b_m4": (dict(stage=2, fsdp=2, tensor=2),
                                     dict(ONE_F_ONE_B, pipeline_microbatches=4), 8),
    # interleaved: 2 chunks per stage, one group of S microbatches and two
    "stage2_data4_1f1b_interleaved_m2": (dict(stage=2, data=4),
                                         dict(ONE_F_ONE_B, pipeline_repeats=2, pipeline_microbatches=2), 8),
    "stage2_fsdp4_1f1b_interleaved_m4": (dict(stage=2, fsdp=4),
                                         dict(ONE_F_ONE_B, pipeline_repeats=2, pipeline_microbatches=4), 8),
})
# Mixture of experts: layers 1 and 3 route over 8 experts (top-2, a shared expert), 0 and 2
# are dense; the same model on one device and on expert-parallel meshes.
MOE = dict(num_experts=8, experts_per_token=2, expert_mlp_dim=32, num_shared_experts=1,
           moe_every=2)
LAYOUTS.update({
    "moe_single": (dict(), MOE, 1),
    "moe_expert8": (dict(expert=8), MOE, 8),
    "moe_expert4_fsdp2": (dict(expert=4, fsdp=2), MOE, 8),
    "moe_expert2_tensor2_data2": (dict(expert=2, tensor=2, data=2), MOE, 8),
})
# Context parallelism: the sequence split over devices, every layer with a sliding window
# (over two packed documents); ring and all-gather attention, sequence parallelism.
WINDOW = dict(sliding_window=6)
LAYOUTS.update({
    "window_single": (dict(), WINDOW, 1),
    "window_context8_ring": (dict(context=8), WINDOW, 8),
    "window_context4_fsdp2_allgather": (dict(context=4, fsdp=2), dict(WINDOW, context_attention="allgather"), 8),
    "window_context2_tensor2_data2_ring_sp": (dict(context=2, tensor=2, data=2, sequence_parallel=True),
                                              WINDOW, 8),
    "tensor8_sp": (dict(tensor=8, sequence_parallel=True), dict(), 8),
})
BATCH, SEQ = 16, 16
# The steps compile at LLVM -O0 without LLVM's expensive passes: 2.5x less compile time, the
# same optimised HLO (what layouts differ in and what the tests read), results equal up to
# float32 rounding (which the comparisons allow for).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def config(name, dtype="float32"):
  """Layout ``name``'s config; ``dtype`` is the compute dtype (parameters stay float32)."""
  mesh, model, _ = LAYOUTS[name]
  c = default_config()
  m = c.model
  m.compute_dtype = dtype
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


def run(name, dtype="float32"):
  """Initial params, loss and gradients, then one train step; plus the compiled step and its
  HLO right after SPMD partitioning (tools/hlo.py; None on one device). ``dtype`` is the
  compute dtype."""
  return _run(name, dtype)  # one cache entry however dtype is passed


@functools.lru_cache(maxsize=None)
def _run(name, dtype):
  cfg = config(name, dtype)
  setup = build(cfg, jax.devices()[: LAYOUTS[name][2]])
  state = init_state(setup)
  b = host_to_global(batch(), setup.mesh, setup.batch_sharding)
  params0 = jax.device_get(state["params"])

  def loss_and_grads(params, b):  # the train step's gradient (the 1F1B schedule's, if set)
    (s, terms), g = state_lib.loss_and_grads(setup.graphdef, params, b)
    return s / terms["weight"], jax.tree.map(lambda x: x / terms["weight"], g)

  with jax.set_mesh(setup.mesh), use_rules(setup.rules):
    lowered = jax.jit(loss_and_grads).lower(state["params"], b)
    loss, grads = lowered.compile(FAST_COMPILE)(state["params"], b)
  step = compile_train_step(setup).lower(state, b)
  compiled, partitioned = compile_partitioned(step, FAST_COMPILE)
  specs = jax.tree.map(lambda x: x.sharding.spec, state["params"])
  new_state, metrics = compiled(state, b)
  return dict(setup=setup, compiled=compiled, partitioned=partitioned, params0=params0,
              loss=float(loss), grads=jax.device_get(grads), metrics=jax.device_get(metrics),
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


def _per_layer(tree):
  """{path: float64 array} of every parameter, the stacked blocks' split into their layers."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    key, x = jax.tree_util.keystr(path), np.asarray(x, np.float64)
    stacked = key.startswith("['blocks']")
    out.update({f"{key}[{i}]": x[i] for i in range(len(x))} if stacked else {key: x})
  return out


def assert_close_bf16_step(want, got, fp32):
  """``got``, a layout's step with bfloat16 compute (float32 master weights), equals ``want``,
  one device's, within bfloat16's rounding noise, which ``fp32`` (one device's float32-compute
  step) measures.

  bfloat16 keeps 8 significant bits, so each rounding is off by up to 2^-9 of its value. The
  matmul outputs, the residual stream and every sublayer's output are rounded, four layers
  deep: on one device that puts 0.7-1.4% (2^-8 is 0.4%) between the bfloat16 and the float32
  gradient of each parameter and layer, ||g_bf16 - g_f32||: the noise floor. A layout moves
  roundings without adding kinds: tensor parallelism rounds each device's partial sum of an
  attention or MLP output before the all-reduce; data and FSDP sum the per-device gradients
  (each over that device's rows, rounded) in bfloat16; a pipeline sums microbatches. So
  ``got - want`` is the difference of two noise patterns of the floor's size: up to sqrt(2)
  x the floor were they independent, measured at most 1.27x (median 0.8-1.0x) on data8,
  fsdp8, tensor8, data2_fsdp2_tensor2, stage4_data2, stage2_fsdp2_tensor2 and
  stage2_fsdp4_circular_m2 (both share the rounding of the weights). The bound is 2x the
  floor for the loss, the gradient norm and each parameter's gradient, per layer: one
  layer's gradient scaled by 1.02 fails, as does a gradient missing a reduction over a mesh
  axis (the data axis: the grad norm is 0.50 for 0.68) or a pipeline feeding the wrong
  microbatch.

  The update: Adam's first step moves each parameter by lr * g / (|g| + eps), about
  lr * sign(g) (weight decay is the same on every layout). Elementwise a layout's gradient is
  at most 6.6 sigma from one device's (sigma: the floor's rms per element of that parameter
  and layer, measured on the same layouts), so where |g| >= 16 sigma the sign is the same and
  the update moves only through eps, by at most lr * eps * 8 sigma / (16 sigma * 8 sigma) =
  lr * eps / (16 sigma): there parameters agree to that, plus 1e-6 for float32's rounding of
  p + update (an update scaled by 1.003 fails). Nearer zero a rounding can flip the sign (an
  update 2 lr apart); such flips may be at most twice as many as between bfloat16 and float32
  on one device (measured 108-148 against 164 of 51,488 parameters).
  """
  jax.tree.map(np.testing.assert_array_equal, want["params0"], got["params0"])
  jax.tree.map(np.testing.assert_array_equal, fp32["params0"], got["params0"])
  for value in (lambda r: r["loss"], lambda r: r["metrics"]["loss"],
                lambda r: r["metrics"]["grad_norm"]):
    assert abs(value(got) - value(want)) <= 2 * abs(value(want) - value(fp32)), (
        value(got), value(want), value(fp32))
  g, g32, g_got = _per_layer(want["grads"]), _per_layer(fp32["grads"]), _per_layer(got["grads"])
  p0, p1, p1_got = _per_layer(want["params0"]), _per_layer(want["params1"]), _per_layer(got["params1"])
  p1_32 = _per_layer(fp32["params1"])
  o = want["setup"].cfg.optim
  flips = flips_floor = 0
  for k in g:
    floor = np.linalg.norm(g[k] - g32[k])
    assert np.linalg.norm(g_got[k] - g[k]) <= 2 * floor, (k, np.linalg.norm(g_got[k] - g[k]) / floor)
    sigma = floor / np.sqrt(g[k].size)
    sure = np.abs(g[k]) >= 16 * sigma
    np.testing.assert_allclose(p1_got[k][sure], p1[k][sure], rtol=0,
                               atol=o.learning_rate * o.eps / (16 * sigma) + 1e-6, err_msg=k)
    np.testing.assert_allclose(p1_got[k], p1[k], rtol=0, atol=2 * o.learning_rate + 1e-6, err_msg=k)
    flips += np.sum(np.abs(p1_got[k] - p1[k]) > o.learning_rate)
    flips_floor += np.sum(np.abs(p1_32[k] - p1[k]) > o.learning_rate)
  assert flips <= 2 * flips_floor, (flips, flips_floor)
  assert got["step"] == 1
  assert max(np.abs(p1[k] - p0[k]).max() for k in p0) > o.learning_rate / 2  # the update is not zero


if __name__ == "__main__":
  assert jax.device_count() == 16, jax.devices()
  names = sys.argv[1:] or ["data2_stage2_fsdp2_tensor2"]
  for name in names:
    assert_same_step(run("single"), run(name))
    print(f"{name}: same loss, gradients and update as one device")
