"""Optimizer pieces: schedules, optimizers (each as Optax builds it, training, its state
sharded and checkpointed), Muon per layer, learning-rate multipliers, weight-decay mask,
gradient clipping, and gradient accumulation equal to one big batch."""

import functools
import json

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from optax.contrib import MuonDimensionNumbers as Dims

from lmjax.checkpoint import FORMAT_VERSION, Checkpointer, IncompatibleCheckpoint
from lmjax.config import ConfigError, default_config
from lmjax.mesh import host_to_global
from lmjax.optim import learning_rate_schedule, make_optimizer, weight_decay_mask
from lmjax.plan import _device_bytes
from lmjax.state import build, init_state, token_losses
from lmjax.trainer import compile_train_step

SHAPES = {  # named as the model's parameters; the embedding is large enough for Adafactor to factor
    "blocks": {"attn": {"q": (2, 8, 2, 4), "o": (2, 2, 4, 8)}, "mlp": {"up": (2, 8, 16)}},
    "embed": {"table": (256, 128)}, "final_norm": {"scale": (8,)}}
DECAYED = {"blocks": {"attn": {"q": True, "o": True}, "mlp": {"up": True}},
           "embed": {"table": False}, "final_norm": {"scale": False}}
is_shape = lambda x: isinstance(x, tuple) and all(isinstance(n, int) for n in x)


def _random(seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), SHAPES, is_leaf=is_shape)


def _optim_cfg(name, **optim):
  """A constant learning rate and every hyper-parameter off its default, so a mis-wired one shows."""
  c = default_config()
  o = c.optim
  o.name, o.schedule, o.warmup_steps, o.learning_rate, o.grad_clip_norm = name, "constant", 0, 0.01, 2.0
  o.b1, o.b2, o.eps, o.weight_decay = 0.8, 0.9, 1e-6, 0.3
  o.lion_b1, o.lion_b2, o.muon_beta, o.muon_ns_steps, o.muon_rms = 0.7, 0.95, 0.9, 4, 0.3
  for key, value in optim.items():
    o[key] = value
  return c


def _updates(optimizer, grads_list, params):
  """The updates of successive steps from the same parameters (eager: the ops compile once
  for all the optimizers)."""
  state, out = optimizer.init(params), []
  for grads in grads_list:
    updates, state = optimizer.update(grads, state, params)
    out.append(jax.device_get(updates))
  return out


@functools.cache
def _two_steps(name, lr_multipliers=()):
  """:func:`_updates` of two steps of ``make_optimizer`` (``name``, or Optax's own when
  ``name`` is ``("optax", name)``)."""
  optimizer = _direct(name[1]) if isinstance(name, tuple) else make_optimizer(
      _optim_cfg(name, lr_multipliers=lr_multipliers))
  return _updates(optimizer, [_random(1), _random(2)], _random(0))  # grad norm ~ 180: clipped


def _schedule_closed_form(schedule, shape, step, peak=1.0, warmup=10, steps=110, fraction=0.2, end=0.1):
  if step < warmup:
    return peak * step / warmup
  if schedule == "constant":
    return peak
  if schedule in ("cosine", "linear"):
    x, drop = min((step - warmup) / (steps - warmup), 1.0), peak * (1 - end)
    return peak - drop * (x if schedule == "linear" else (1 - np.cos(np.pi * x)) / 2)
  start = steps - round(fraction * steps)  # wsd
  x = min(max(step - start, 0) / (steps - start), 1.0)
  progress = {"linear": x, "cosine": (1 - np.cos(np.pi * x)) / 2, "1-sqrt": np.sqrt(x)}[shape]
  return peak - peak * (1 - end) * progress


@pytest.mark.parametrize("schedule,shape", [("cosine", ""), ("linear", ""), ("constant", ""),
                                            ("wsd", "linear"), ("wsd", "cosine"), ("wsd", "1-sqrt")])
def test_each_schedule_follows_its_closed_form(schedule, shape):
  c = default_config()
  o = c.optim
  o.learning_rate, o.warmup_steps, c.train.steps, o.end_lr_fraction = 1.0, 10, 110, 0.1
  o.schedule, o.decay_shape, o.decay_fraction = schedule, shape or "linear", 0.2
  lr = learning_rate_schedule(c)
  steps = [0, 5, 10, 30, 60, 88, 93, 99, 104, 110, 500]  # the wsd decay is steps 88..110
  want = [_schedule_closed_form(schedule, shape, s) for s in steps]
  np.testing.assert_allclose([float(lr(s)) for s in steps], want, rtol=1e-6, atol=1e-7)


def _direct(name):
  """``name`` built with Optax's own function and the numbers of :func:`_optim_cfg`, after
  clipping."""
  muon_dims = {"blocks": {"attn": {"q": Dims(1, (2, 3)), "o": Dims((1, 2), 3)}, "mlp": {"up": Dims(1, 2)}},
               "embed": {"table": None}, "final_norm": {"scale": None}}
  opt = {"adamw": lambda: optax.adamw(0.01, b1=0.8, b2=0.9, eps=1e-6, weight_decay=0.3, mask=DECAYED),
         "adafactor": lambda: optax.adafactor(0.01, weight_decay_rate=0.3 * 0.01, weight_decay_mask=DECAYED),
         "lion": lambda: optax.lion(0.01, b1=0.7, b2=0.95, weight_decay=0.3, mask=DECAYED),
         "muon": lambda: optax.contrib.muon(
             0.01, ns_steps=4, beta=0.9, eps=1e-6, weight_decay=0.3, adam_b1=0.8, adam_b2=0.9,
             adam_weight_decay=0.0, muon_weight_dimension_numbers=muon_dims, consistent_rms=0.3)}[name]()
  return optax.chain(optax.clip_by_global_norm(2.0), opt)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "muon"])
def test_each_optimizer_updates_as_optax_builds_it(name):
  for a, b in zip(_two_steps(name), _two_steps(("optax", name))):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-9), a, b)


def test_muon_orthogonalises_each_layer_matrix_and_leaves_embeddings_to_adamw():
  rng = np.random.default_rng(0)

  def ill_conditioned(rows, cols, scale):  # singular values from 1 to 0.01, times scale
    u, _ = np.linalg.qr(rng.normal(size=(rows, rows)))
    v, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    k = min(rows, cols)
    return scale * (u[:, :k] * np.logspace(0, -2, k)) @ v[:, :k].T

  grads = _random(1)
  grads["blocks"]["mlp"]["up"] = np.stack([ill_conditioned(8, 16, 1.0), ill_conditioned(8, 16, 1e3)]).astype(np.float32)
  grads["blocks"]["attn"]["o"] = np.stack([ill_conditioned(8, 8, 1e3), ill_conditioned(8, 8, 1.0)]).reshape(2, 2, 4, 8).astype(np.float32)
  cfg = _optim_cfg("muon", muon_rms=0.0, weight_decay=0.0, grad_clip_norm=0.0, muon_ns_steps=5, eps=1e-12)
  (u,) = _updates(make_optimizer(cfg), [grads], _random(0))
  for module, weight in ("mlp", "up"), ("attn", "o"):
    per_layer = u["blocks"][module][weight].reshape(2, 8, -1)  # (l, d | n h, f | d) matrices
    sv = np.linalg.svd(per_layer, compute_uv=False)  # (l, min)
    assert np.all(sv.max(axis=1) / sv.min(axis=1) < 2.0), sv  # orthogonalised (gradient: 100)
    norms = np.linalg.norm(per_layer, axis=(1, 2))
    np.testing.assert_allclose(norms[0], norms[1], rtol=0.1)  # each layer alone, whatever its scale
  # Adam's first step has the same size on every element; an orthogonalised matrix would not.
  emb = np.abs(u["embed"]["table"])
  np.testing.assert_allclose(emb, emb.flat[0], rtol=1e-3)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "muon"])
def test_lr_multipliers_scale_a_groups_whole_update(name):
  rules = (("blocks/mlp/.*", 3.0), ("blocks", 0.25), ("embed", 0.5))  # the first match wins
  factor = {"blocks": {"attn": {"q": 0.25, "o": 0.25}, "mlp": {"up": 3.0}}, "embed": {"table": 0.5},
            "final_norm": {"scale": 1.0}}
  # Weight decay (of parameters that are not zero) scales with the rest of the update.
  for b, s in zip(_two_steps(name), _two_steps(name, rules)):
    jax.tree.map(lambda x, y, m: np.testing.assert_array_equal(y, x * np.float32(m)), b, s, factor)


def test_lr_multipliers_that_select_no_parameter_are_config_errors():
  c = default_config()
  c.optim.lr_multipliers = (("embed", 0.1), ("blocks/attn/qq", 2.0))
  with pytest.raises(ConfigError, match=r"config.optim.lr_multipliers\[1\]: 'blocks/attn/qq' matches no parameter"):
    build(c, jax.devices()[:1])
  c.optim.lr_multipliers = (("embed", 0.1), ("embed/table", 2.0))
  with pytest.raises(ConfigError, match=r"config.optim.lr_multipliers\[1\]: every parameter .* earlier entry"):
    build(c, jax.devices()[:1])


def _sharded_cfg(name):
  """A tiny model over fsdp 4 x tensor 2 with widths of 128 and more, so that Adafactor
  factors the embedding and the MLP and its factored statistics are sharded."""
  c = default_config()
  m, o = c.model, c.optim
  m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 128, 1, 128, 2, 2, 16, 256
  m.max_seq_len = c.data.seq_len = 16
  c.data.global_batch_size, c.mesh.fsdp, c.mesh.tensor = 8, 4, 2
  o.name, o.learning_rate = name, {"adafactor": 3e-2, "lion": 1e-3, "muon": 1e-2}[name]
  return c


@pytest.mark.parametrize("name", ["adafactor", "muon"])
def test_optimizer_states_unlike_the_parameters_are_sharded_and_round_trip(name, tmp_path):
  setup = build(_sharded_cfg(name))
  shardings = setup.state_shardings
  params = jax.tree.map(lambda a: jax.device_put(np.zeros(a.shape, a.dtype), a.sharding),
                        setup.abstract_state["params"])
  opt = jax.jit(setup.optimizer.init, out_shardings=shardings["opt_state"])(params)
  # Not zeros (a train step's state: the slow test below), sharded as the step keeps it.
  opt = jax.jit(lambda t: jax.tree.map(lambda x: x + 1 if x.dtype == np.float32 else x, t),
                out_shardings=shardings["opt_state"])(opt)
  spec = jax.sharding.PartitionSpec
  if name == "adafactor":
    factored = opt[1][0]  # up (l, d, f) = (1, 128, 256): rows (l, d) and columns (l, f)
    v_row, v_col = factored.v_row["blocks"]["mlp"]["up"], factored.v_col["blocks"]["mlp"]["up"]
    assert v_row.shape == (1, 128) and v_row.sharding.spec == spec(None, "fsdp")
    assert v_col.shape == (1, 256) and v_col.sharding.spec == spec(None, "tensor")
    assert factored.v["blocks"]["mlp"]["up"].shape == (1,)  # a placeholder, replicated
  else:
    muon = opt[1].inner_states["muon"].inner_state[0]
    assert muon.mu["blocks"]["attn"]["q"].sharding.spec == spec(None, "fsdp", "tensor", None)
    assert muon.ns_coeffs.sharding.spec == spec()
  assert _device_bytes(setup.abstract_state["opt_state"]) == sum(
      x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(opt))  # what a plan reports
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp_path / "state", {"opt_state": opt})
  with ocp.StandardCheckpointer() as checkpointer:
    back = checkpointer.restore(tmp_path / "state", {"opt_state": setup.abstract_state["opt_state"]})["opt_state"]
  jax.tree.map(np.testing.assert_array_equal, back, opt)
  assert [x.sharding for x in jax.tree.leaves(back)] == [x.sharding for x in jax.tree.leaves(opt)]


def test_a_checkpoint_of_another_optimizer_is_refused_by_name(tmp_path):
  cfg = default_config()
  cfg.optim.name = "lion"
  checkpointer = Checkpointer(tmp_path, cfg)
  checkpointer.manager.save(1, force=True, args=ocp.args.Composite(  # what the checks read
      state=ocp.args.StandardSave({"w": np.zeros(3)}), config=ocp.args.JsonSave(json.loads(cfg.to_json())),
      meta=ocp.args.JsonSave({"format_version": FORMAT_VERSION, "step": 1})))
  checkpointer.wait()
  checkpointer.check_compatible(1, cfg)
  checkpointer.check_compatible(1, default_config(), params_only=True)  # fine-tuning from it
  with pytest.raises(IncompatibleCheckpoint, match=r"holds lion optimizer state, but config.optim.name "
                                                   r"is 'adamw'. Resume with --config.optim.name=lion"):
    checkpointer.check_compatible(1, default_config())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adafactor", "lion", "muon"])
def test_each_optimizer_lowers_the_loss_on_a_sharded_mesh(name):
  c = _sharded_cfg(name)
  o = c.optim
  o.schedule, o.warmup_steps, o.decay_fraction, o.decay_shape, c.train.steps = "wsd", 0, 0.5, "1-sqrt", 8
  setup = build(c)
  state = init_state(setup)
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 128, (8, 16), dtype=np.int32),
           "targets": rng.integers(0, 128, (8, 16), dtype=np.int32),
           "segment_ids": np.ones((8, 16), np.int32), "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1))}
  batch = host_to_global(batch, setup.mesh, setup.batch_sharding)
  step, losses, rates = compile_train_step(setup), [], []
  for _ in range(6):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    rates.append(float(metrics["learning_rate"]))
  assert losses[-1] < losses[0] - 0.05, losses
  # The metric follows wsd: flat through step 4, then 1 - sqrt(1/4) of the way to the floor.
  np.testing.assert_allclose(rates, [o.learning_rate] * 5 + [o.learning_rate * 0.55], rtol=1e-6)

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
