"""Mixture of experts: the layer against a per-token NumPy reference (both routers, ties, an
expert no token picks, shared experts, capacity drops counted directly), on expert-parallel
meshes (the all-to-all exchange, and tokens replicated over the expert axis), one train step
on expert-parallel layouts equal to one device's, the compiled program's collectives and
per-device expert bytes, the router-bias update, metrics, generation and config errors."""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from lmjax.config import MESH_AXES, ConfigError, default_config, validate
from lmjax.mesh import make_rules, use_rules
from lmjax.metrics import expert_load_scalars, flops_per_token, inactive_params
from lmjax.model import ModelConfig, Transformer, count_params
from lmjax.model.moe import MoE, update_router_bias
from lmjax.state import build
from tests import layouts
from tools.hlo import collectives

E, K, D, F = 8, 2, 16, 12


def _cfg(**kw):
  c = default_config()
  m = c.model
  m.embed_dim, m.num_experts, m.experts_per_token, m.expert_mlp_dim = D, E, K, F
  for k, v in kw.items():
    m[k] = v
  return ModelConfig.from_config(m)


def _layer(cfg, seed=0):
  """A MoE layer with crafted router columns: experts 2 and 3 always tie, expert 7 is never
  chosen (x[..., 0] is 1 and its logit -100)."""
  moe = MoE(cfg, rngs=nnx.Rngs(seed))
  rng = np.random.default_rng(seed)
  router = rng.normal(0, 1.0, (D, E)).astype(np.float32)
  router[:, 3] = router[:, 2]
  router[:, 7] = 0.0
  router[0, 7] = -100.0
  moe.router[...] = jnp.asarray(router)
  for name in ("gate", "up", "down"):
    if hasattr(moe, name):
      p = getattr(moe, name)
      p[...] = jnp.asarray(rng.normal(0, 0.3, p.shape).astype(np.float32))
  if cfg.router == "sigmoid":
    moe.router_bias[...] = jnp.asarray(rng.normal(0, 0.5, (E,)).astype(np.float32))
  return moe


def _inputs(b, t, seed=1):
  x = np.random.default_rng(seed).normal(0, 1.0, (b, t, D)).astype(np.float32)
  x[..., 0] = 1.0
  seg = np.ones((b, t), np.int32)
  seg[0, t - 2:] = 0  # padding
  return x, seg


def _reference(moe, cfg, x, seg, capacity=0):
  """Each token through its top-k experts, weighted, in float64: (y, stats)."""
  p = {n: np.asarray(getattr(moe, n)[...], np.float64) for n in ("router", "gate", "up", "down")
       if hasattr(moe, n)}
  x = x.astype(np.float64)
  b, t, _ = x.shape
  logits = x @ p["router"]
  if cfg.router == "softmax":
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    pick, balance = probs, probs
  else:
    scores = 1 / (1 + np.exp(-logits))
    probs = scores
    pick = scores + np.asarray(moe.router_bias[...], np.float64)
    balance = scores / scores.sum(-1, keepdims=True)
  chosen = np.argsort(-pick, axis=-1, kind="stable")[..., :K]  # ties: the lower index first
  w = np.take_along_axis(probs, chosen, -1)
  w = w / w.sum(-1, keepdims=True) * cfg.router_scale
  kept = np.ones((b, t, K), bool)
  if capacity:
    kept[:] = False
    for row in range(b):
      count = np.zeros(E, int)
      for slot in range(K):  # first choices first, then by position
        for pos in range(t):
          if seg[row, pos] == 0:
            continue
          e = chosen[row, pos, slot]
          kept[row, pos, slot] = count[e] < capacity
          count[e] += 1
  silu = lambda a: a / (1 + np.exp(-a))
  y = np.zeros_like(x)
  for row in range(b):
    for pos in range(t):
      for slot in range(K):
        if not kept[row, pos, slot]:
          continue
        e, h = chosen[row, pos, slot], x[row, pos]
        if cfg.mlp == "swiglu":
          a = silu(h @ p["gate"][e]) * (h @ p["up"][e])
        else:
          u = h @ p["up"][e]
          a = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
        y[row, pos] += w[row, pos, slot] * (a @ p["down"][e])
  real = seg != 0
  load = np.zeros(E)
  for e in range(E):
    load[e] = np.sum((chosen == e) & real[..., None])
  n = real.sum()
  lse = np.log(np.exp(logits).sum(-1))
  stats = {"load": load, "aux": E * np.sum(load / n * balance[real].mean(0)),
           "z": np.sum(lse[real] ** 2) / n,
           "dropped": K * n - np.sum(kept & real[..., None]), "assigned": K * n}
  return y, stats, chosen


@pytest.mark.parametrize("kw", [dict(router="softmax"),
                                dict(router="sigmoid", router_scale=2.5, mlp="gelu",
                                     num_shared_experts=1)], ids=["softmax", "sigmoid_gelu_shared"])
def test_dropless_equals_per_token_reference(kw):
  cfg = _cfg(**kw)
  moe = _layer(cfg)
  x, seg = _inputs(3, 10)
  y, stats = jax.jit(lambda x, s: moe(x, s))(jnp.asarray(x), jnp.asarray(seg))
  want, want_stats, chosen = _reference(moe, cfg, x, seg)
  if cfg.num_shared_experts:
    want = want + np.asarray(moe.shared(jnp.asarray(x)), np.float64)
  assert not np.any(chosen == 7)  # an expert without a token
  ties = np.sum(np.any(chosen == 2, -1) != np.any(chosen == 3, -1))
  assert ties > 0  # tokens where the tie between experts 2 and 3 decided
  np.testing.assert_allclose(np.asarray(y), want, atol=2e-5, rtol=1e-4)
  for key, value in want_stats.items():
    np.testing.assert_allclose(np.asarray(stats[key]), value, rtol=1e-5, atol=1e-5, err_msg=key)
  assert float(stats["dropped"]) == 0


def test_capacity_drops_match_a_direct_count():
  cfg = _cfg(capacity_factor=0.5)
  moe = _layer(cfg)
  x, seg = _inputs(3, 10)
  capacity = math.ceil(0.5 * 10 * K / E)
  y, stats = jax.jit(lambda x, s: moe(x, s))(jnp.asarray(x), jnp.asarray(seg))
  want, want_stats, _ = _reference(moe, cfg, x, seg, capacity=capacity)
  assert want_stats["dropped"] > 0.2 * want_stats["assigned"]
  assert float(stats["dropped"]) == want_stats["dropped"]
  np.testing.assert_allclose(np.asarray(y)[seg != 0], want[seg != 0], atol=2e-5, rtol=1e-4)


def _mesh(**sizes):
  shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
  n = math.prod(shape)
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=jax.devices()[:n])


@pytest.mark.parametrize("rows,sizes,capacity_factor", [
    (8, dict(expert=8), 0.0),  # tokens split over the expert axis: all-to-all
    pytest.param(8, dict(expert=4, fsdp=2), 0.5, marks=pytest.mark.slow),  # capacity buffers, FSDP-gathered experts
    pytest.param(4, dict(expert=2, tensor=2, data=2), 0.0, marks=pytest.mark.slow),  # the hidden width split: partial sums
    (1, dict(expert=8), 0.0),  # one row: every device keeps it and runs its own experts
], ids=["expert8", "expert4_fsdp2_capacity", "expert2_tensor2_data2", "one_row"])
def test_expert_parallel_layer_equals_reference(rows, sizes, capacity_factor):
  cfg = _cfg(capacity_factor=capacity_factor)
  moe = _layer(cfg)
  x, seg = _inputs(rows, 10)
  graphdef, state = nnx.split(moe)
  probe = np.random.default_rng(2).normal(size=x.shape).astype(np.float32) * (seg != 0)[..., None]

  def run(st, x, s):
    y, stats = nnx.merge(graphdef, st)(x, s)
    return jnp.sum(y * probe) + stats["aux"] + stats["z"], (y, stats)

  fn = jax.jit(jax.grad(run, argnums=(0, 1), has_aux=True))
  (want_grads, want_dx), _ = fn(state, x, seg)  # no mesh
  with jax.set_mesh(_mesh(**sizes)), use_rules(make_rules()):
    (grads, dx), (y, stats) = fn(state, x, seg)
  capacity = math.ceil(capacity_factor * 10 * K / E) if capacity_factor else 0
  want, want_stats, _ = _reference(moe, cfg, x, seg, capacity=capacity)
  np.testing.assert_allclose(np.asarray(y)[seg != 0], want[seg != 0], atol=2e-5, rtol=1e-4)
  assert float(stats["dropped"]) == want_stats["dropped"]
  np.testing.assert_allclose(np.asarray(dx), np.asarray(want_dx), atol=1e-5, rtol=1e-4)
  for key in ("router", "gate", "up", "down"):
    np.testing.assert_allclose(np.asarray(grads[key][...]), np.asarray(want_grads[key][...]),
                               atol=1e-5, rtol=1e-4, err_msg=key)


MOE_LAYOUTS = [pytest.param("moe_expert8", marks=pytest.mark.slow),
               pytest.param("moe_expert4_fsdp2", marks=pytest.mark.slow),
               "moe_expert2_tensor2_data2"]


@pytest.mark.parametrize("name", MOE_LAYOUTS)
def test_train_step_on_expert_parallel_layouts_equals_one_device(name):
  want, got = layouts.run("moe_single"), layouts.run(name)
  layouts.assert_same_step(want, got)
  for key in ("moe_aux_loss", "router_z_loss"):
    np.testing.assert_allclose(got["metrics"][key], want["metrics"][key], rtol=1e-5)
  np.testing.assert_array_equal(got["metrics"]["expert_load"], want["metrics"]["expert_load"])
  assert float(want["metrics"]["dropped_fraction"]) == 0
  assert want["metrics"]["moe_aux_loss"] > 0 and want["metrics"]["router_z_loss"] > 0


@pytest.mark.slow
def test_tokens_travel_by_all_to_all_and_experts_stay_split():
  """The expert-parallel step exchanges tokens with all-to-all, never gathers the experts'
  weights over the expert axis, and each device holds 1/8 of every expert weight."""
  single, ep = layouts.run("moe_single"), layouts.run("moe_expert8")
  text = ep["partitioned"]
  assert collectives(text, "all-to-all")  # dispatch and return, forward and backward
  e = layouts.MOE["num_experts"]
  for c in collectives(text, "all-gather"):
    assert e not in c.shape[:2] or len(c.shape) < 3, c  # no (.., E, d, f) expert stack gathered
  setup = ep["setup"]
  for name in ("gate", "up", "down"):
    whole = single["params0"]["blocks"]["moe"][name]
    sharding = setup.state_shardings["params"]["blocks"]["moe"][name]
    shard = sharding.shard_shape(whole.shape)
    assert math.prod(shard) * e == whole.size, (name, shard)


def test_sigmoid_router_bias_moves_against_the_load_and_takes_no_gradient():
  load = jnp.array([[4.0, 0.0, 2.0, 2.0], [1.0, 1.0, 1.0, 5.0]])
  params = {"blocks": {"moe": {"router_bias": jnp.zeros((2, 4)), "router": jnp.ones((2, 3, 4))}}}
  out = update_router_bias(params, load, 0.01)
  np.testing.assert_allclose(out["blocks"]["moe"]["router_bias"],
                             [[-0.01, 0.01, 0.0, 0.0], [0.01, 0.01, 0.01, -0.01]])
  np.testing.assert_array_equal(out["blocks"]["moe"]["router"], params["blocks"]["moe"]["router"])
  cfg = _cfg(router="sigmoid")
  moe = _layer(cfg)
  x, seg = _inputs(2, 6)
  graphdef, state = nnx.split(moe)
  grads = jax.jit(jax.grad(lambda st: jnp.sum(nnx.merge(graphdef, st)(x, seg)[0] ** 2)))(state)
  assert not np.any(np.asarray(grads["router_bias"][...]))
  assert np.any(np.asarray(grads["router"][...]))


@pytest.mark.slow
def test_interleaved_and_first_dense_layers_run_in_order():
  """first_dense_layers=1, moe_every=2 over 5 layers: dense 0, 1, then MoE 2, dense 3, MoE 4;
  the model equals running its blocks one by one in that order."""
  c = default_config().model
  c.num_layers, c.embed_dim, c.num_experts, c.expert_mlp_dim = 5, D, E, F
  c.num_heads, c.num_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size = 2, 1, 8, 24, 50
  c.first_dense_layers, c.moe_every = 1, 2
  cfg = ModelConfig.from_config(c)
  assert cfg.moe_layers == (2, 4)
  model = Transformer(c, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 7)), jnp.int32)
  got, stats = model.forward(tokens)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  dense, moe = params["dense_blocks"], params["blocks"]
  assert jax.tree.leaves(dense)[0].shape[0] == 3 and jax.tree.leaves(moe)[0].shape[0] == 2
  blocks = nnx.split(model.blocks)[0], nnx.split(model.dense_blocks)[0]
  layer = lambda g, p, i: nnx.merge(g, jax.tree.map(lambda a: a[i], p))
  order = [(blocks[1], dense, 0), (blocks[1], dense, 1), (blocks[0], moe, 0),
           (blocks[1], dense, 2), (blocks[0], moe, 1)]
  positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
  x = model.embed_tokens(tokens, positions)
  for g, p, i in order:
    x, _ = layer(g, p, i)(x, positions, jnp.ones((2, 7), jnp.int32))
  np.testing.assert_allclose(np.asarray(got), np.asarray(model.final_norm(x)), atol=1e-5)
  assert stats["load"].shape == (2, E)


@pytest.mark.slow
def test_decode_equals_the_forward_pass():
  c = default_config().model
  c.num_experts, c.expert_mlp_dim, c.num_shared_experts = E, F, 1
  model = Transformer(c, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, c.vocab_size, (2, 9)), jnp.int32)
  want = model(tokens)
  cache = model.init_cache(2, 12)
  prefill, cache = model.decode(tokens[:, :6], cache)
  np.testing.assert_allclose(np.asarray(prefill), np.asarray(want[:, :6]), atol=1e-4)
  for i in range(6, 9):
    step, cache = model.decode(tokens[:, i:i + 1], cache)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(want[:, i]), atol=1e-4)


def test_active_parameters_and_flops():
  c = default_config()
  m = c.model
  m.num_experts, m.experts_per_token, m.expert_mlp_dim, m.num_layers = 8, 2, 64, 4
  m.first_dense_layers, m.num_shared_experts = 1, 1
  total = count_params(nnx.state(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))),
                                 nnx.Param))
  per_expert = 3 * m.embed_dim * 64
  assert inactive_params(m) == 3 * 6 * per_expert
  dense = default_config()
  dense.model.num_layers = 4
  dense_total = count_params(nnx.state(nnx.eval_shape(lambda: Transformer(dense.model, rngs=nnx.Rngs(0))), nnx.Param))
  # active: the dense model's, with 3 layers' MLPs (3 x 128 x 384) replaced by the router,
  # two routed experts and the shared one
  active = dense_total - 3 * 3 * 128 * 384 + 3 * (128 * 8 + 3 * per_expert)
  assert total - inactive_params(m) == active
  assert flops_per_token(c, total) == flops_per_token(dense, dense_total) + 6.0 * (active - dense_total)


def test_expert_load_metrics():
  m = default_config().model
  m.num_experts, m.num_layers, m.first_dense_layers = 4, 3, 1
  out = expert_load_scalars(m, np.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 2.0, 2.0]]))
  assert out["moe/layer1/max_load"] == 1.0 and out["moe/layer1/min_load"] == 1.0
  assert out["moe/layer2/max_load"] == 2.0 and out["moe/layer2/min_load"] == 0.0
  assert out["moe/layer2/expert2"] == 0.25
  assert expert_load_scalars(m, None) == {}


@pytest.mark.parametrize("change,message", [
    (dict(num_experts=4, experts_per_token=5), "config.model.experts_per_token: must be in"),
    (dict(num_experts=4, num_layers=3, moe_every=2), "config.model.moe_every: the 3 layers"),
    (dict(num_experts=4, first_dense_layers=2), "config.model.moe_every: the 0 layers"),
    (dict(num_experts=4, mesh_expert=8, mesh_fsdp=1), "config.mesh.expert: 8 does not divide"),
    (dict(num_experts=4, mesh_stage=2, mesh_fsdp=4), "config.mesh.stage: 2 pipeline stages"),
    (dict(num_experts=4, router="top1"), "config.model.router: must be one of"),
])
def test_config_errors(change, message):
  c = default_config()
  for key, value in change.items():
    if key.startswith("mesh_"):
      c.mesh[key[5:]] = value
    else:
      c.model[key] = value
  with pytest.raises(ConfigError, match=message):
    validate(c, num_devices=8)


def test_checkpoint_of_another_expert_shape_is_refused_by_name(tmp_path):
  import copy
  import lmjax
  from lmjax.checkpoint import Checkpointer, IncompatibleCheckpoint
  cfg = default_config()
  m = cfg.model
  m.vocab_size, m.embed_dim, m.num_heads, m.head_dim, m.mlp_dim, m.num_experts = 97, 32, 4, 8, 48, 4
  shapes = nnx.split(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))))[1].to_pure_dict()
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes)
  Checkpointer(tmp_path / "checkpoints", cfg).save_params(0, params, cfg)
  for key, value in (("num_experts", 2), ("router", "sigmoid"), ("num_shared_experts", 1)):
    other = copy.deepcopy(cfg)
    other.model[key] = value
    with pytest.raises(IncompatibleCheckpoint, match=f"holds a different model .model.{key}: checkpoint"):
      lmjax.load(tmp_path, cfg=other, devices=jax.devices()[:1])
  assert lmjax.load(tmp_path, cfg=cfg, devices=jax.devices()[:1]).params["blocks"]["moe"]["up"].shape == (2, 4, 32, 48)


@pytest.mark.slow
def test_moe_run_writes_its_metrics_and_resumes_exactly(tmp_path):
  """A sigmoid-router MoE on the default corpus: metrics.jsonl and TensorBoard get the router
  losses and expert loads, the router bias moves, and a run stopped at step 3 and resumed
  equals one that ran 6 steps (the bias is in the checkpoint)."""
  import lmjax
  from lmjax.metrics import read_metrics
  from lmjax.trainer import train

  def cfg(steps):
    c = default_config()
    m = c.model
    m.num_layers, m.embed_dim, m.mlp_dim, m.num_heads, m.num_kv_heads, m.head_dim = 2, 32, 64, 2, 1, 16
    m.num_experts, m.expert_mlp_dim, m.router, m.router_bias_rate = 4, 32, "sigmoid", 0.01
    m.max_seq_len = c.data.seq_len = 32
    c.data.global_batch_size = 8  # over fsdp=8: the experts FSDP-sharded
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.checkpoint_every = steps, 1, 0, 3
    c.train.progress_bar = False
    return c

  full = train(cfg(6), tmp_path / "full")
  train(cfg(3), tmp_path / "split")
  resumed = train(cfg(6), tmp_path / "split")
  assert [r["loss"] for r in resumed] == [r["loss"] for r in full[3:]]
  record = read_metrics(tmp_path / "full")[-1]
  for key in ("moe_aux_loss", "router_z_loss", "dropped_fraction", "moe/layer0/max_load",
              "moe/layer1/min_load", "moe/layer1/expert3"):
    assert key in record, key
  assert record["dropped_fraction"] == 0 and record["moe/layer0/max_load"] >= 1.0
  events = b"".join(p.read_bytes() for p in (tmp_path / "full" / "tensorboard").glob("events.*"))
  assert b"moe/layer1/max_load" in events and b"router_z_loss" in events
  # +-0.01 a step: after 3 steps an odd multiple of 0.01 (never 0), the same in both runs at 6
  bias = lambda run, step: np.asarray(lmjax.load(tmp_path / run, step).params["blocks"]["moe"]["router_bias"])
  np.testing.assert_allclose(np.abs(bias("split", 3)) / 0.01 % 2, 1, atol=1e-3)
  np.testing.assert_array_equal(bias("split", 6), bias("full", 6))
