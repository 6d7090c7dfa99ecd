"""The math does not change with the mesh: loss, gradients and one update on 8 fake devices
equal the single-device result, and parameters are laid out as the rules table says."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmjax.config import default_config
from lmjax.mesh import host_to_global
from lmjax.train import build, compile_steps, init_state, token_losses

MESHES = {
    "single": dict(data=1, fsdp=1, tensor=1),
    "data8": dict(data=8, fsdp=1, tensor=1),
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}


def _cfg(mesh):
  c = default_config()
  m = c.model
  m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = 64, 2, 32, 4, 2
  m.head_dim, m.mlp_dim, m.max_seq_len = 8, 64, 16
  c.data.seq_len, c.data.global_batch_size = 16, 8
  c.optim.warmup_steps = 0
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


def _batch():
  rng = np.random.default_rng(0)
  seg = np.ones((8, 16), np.int32)
  seg[::2, 10:] = 2
  seg[1, 13:] = 0
  pos = np.where(seg == 2, np.arange(16) - 10, np.arange(16)).astype(np.int32)
  return {"inputs": rng.integers(0, 64, (8, 16), dtype=np.int32),
          "targets": rng.integers(0, 64, (8, 16), dtype=np.int32),
          "segment_ids": seg, "positions": pos}


@functools.lru_cache(maxsize=None)
def _run(name):
  mesh = MESHES[name]
  cfg = _cfg(mesh)
  devices = jax.devices()[: 1 if name == "single" else 8]
  setup = build(cfg, devices)
  state = init_state(setup)
  batch = host_to_global(_batch(), setup.mesh, setup.batch_sharding)
  params0 = jax.device_get(state["params"])

  def loss_and_grads(params, batch):
    (s, n), g = jax.value_and_grad(functools.partial(token_losses, setup.graphdef), has_aux=True)(params, batch)
    return s / n, jax.tree.map(lambda x: x / n, g)

  with jax.set_mesh(setup.mesh):
    loss, grads = jax.jit(loss_and_grads)(state["params"], batch)
  step_fn, _ = compile_steps(setup)
  shardings = jax.tree.map(lambda x: x.sharding.spec, state["params"])
  new_state, metrics = step_fn(state, batch)
  return dict(params0=params0, loss=float(loss), grads=jax.device_get(grads),
              metrics=jax.device_get(metrics), params1=jax.device_get(new_state["params"]),
              specs=shardings, step=int(new_state["step"]))


@pytest.mark.parametrize("name", [n for n in MESHES if n != "single"])
def test_same_loss_gradients_and_update_as_one_device(name):
  want, got = _run("single"), _run(name)
  # Same initial parameters: initialisation does not depend on the layout.
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), want["params0"], got["params0"])
  # fp32 sums are reordered by sharding (partial sums per device, then all-reduce), so
  # results agree to a few ulps of the values involved, not bit for bit.
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
               want["grads"], got["grads"])
  np.testing.assert_allclose(got["metrics"]["loss"], want["metrics"]["loss"], rtol=1e-6)
  np.testing.assert_allclose(got["metrics"]["grad_norm"], want["metrics"]["grad_norm"], rtol=1e-5)
  # Adam's first update is lr * g / (|g| + eps): where |g| is near eps, a gradient
  # rounding difference moves the update by up to a fraction of lr, so the parameters
  # are compared to 0.1% of the step size (lr = 3e-3 here).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=3e-6),
               want["params1"], got["params1"])
  assert got["step"] == 1
  # The update is not trivially zero.
  moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(want["params0"]),
                                                   jax.tree.leaves(want["params1"])))
  assert moved > 1e-4


def test_parameter_shardings_follow_the_rules_table():
  specs = _run("fsdp8")["specs"]
  assert specs["embed"]["table"] == P(None, "fsdp")  # (vocab, embed): embed -> fsdp
  assert specs["blocks"]["mlp"]["gate"] == P(None, "fsdp", None)  # (layers, embed, mlp)
  assert specs["blocks"]["attn_norm"]["scale"] == P(None, None)  # norms replicated
  specs = _run("data2_fsdp2_tensor2")["specs"]
  assert specs["embed"]["table"] == P("tensor", "fsdp")
  assert specs["blocks"]["mlp"]["gate"] == P(None, "fsdp", "tensor")
  assert specs["blocks"]["mlp"]["down"] == P(None, "tensor", "fsdp")
  assert specs["blocks"]["attn"]["q"] == P(None, "fsdp", "tensor", None)
  assert specs["blocks"]["attn"]["k"] == P(None, "fsdp", "tensor", None)
  data_specs = jax.tree.leaves(_run("data8")["specs"], is_leaf=lambda x: isinstance(x, P))
  assert data_specs and all(all(a is None for a in s) for s in data_specs)  # replicated


def test_sharded_arrays_hold_a_fraction_per_device():
  cfg = _cfg(MESHES["fsdp8"])
  setup = build(cfg, jax.devices())
  gate = setup.abstract_state["params"]["blocks"]["mlp"]["gate"]
  assert gate.sharding.shard_shape(gate.shape) == (2, 4, 64)  # embed 32 / 8
  mu = setup.abstract_state["opt_state"]
  leaves = [x for x in jax.tree.leaves(mu) if x.shape == gate.shape]
  assert leaves and all(x.sharding.shard_shape(x.shape) == (2, 4, 64) for x in leaves)


def test_config_rules_override_the_table():
  cfg = _cfg(MESHES["data2_fsdp2_tensor2"])
  cfg.mesh.rules = (("embed", None), ("mlp", ("fsdp", "tensor")))
  params = build(cfg, jax.devices()).abstract_state["params"]
  assert params["blocks"]["mlp"]["gate"].sharding.spec == P(None, None, ("fsdp", "tensor"))
  assert params["embed"]["table"].sharding.spec == P("tensor", None)
  cfg.mesh.rules = (("embed", "pipeline"),)
  with pytest.raises(Exception, match=r"config.mesh.rules\[0\]: unknown mesh axis 'pipeline'"):
    build(cfg, jax.devices())
