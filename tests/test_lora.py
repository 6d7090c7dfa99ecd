"""LoRA: adapters that start as a no-op, merge into the weights, train alone (only they have
optimizer state and gradients), shard like their base weights, fine-tune a pre-trained run,
resume bit for bit, and export as a plain model that ``transformers`` loads."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax import hf, rundir
from lmjax.checkpoint import Checkpointer
from lmjax.config import ConfigError, default_config, validate
from lmjax.mesh import host_to_global, use_rules
from lmjax.model import lora
from lmjax.state import build, init_state, loss_and_grads
from lmjax.trainer import compile_train_step
from tests import layouts
from tools import merge_lora as merge_lora_tool

ALL = ("q", "k", "v", "o", "gate", "up", "down")
TOKENS = np.arange(2 * 12, dtype=np.int32).reshape(2, 12) * 7 % 64


def _cfg(rank=4, targets=ALL, dtype="float32", **model):
  c = layouts.config("single", dtype)  # 4 layers, width 32, 8 heads (4 KV), vocab 64
  c.model.lora_rank, c.model.lora_targets = rank, targets
  c.model.update(model)
  return c


def _forward(setup, params, tokens=TOKENS):
  with jax.set_mesh(setup.mesh), use_rules(setup.rules):
    return np.asarray(jax.jit(lambda p, t: setup.model(p)(t))(params, jnp.asarray(tokens)))


def _randomize_b(params, seed=0, std=0.1):
  """``params`` with every adapter's B drawn at random (a trained adapter)."""
  rng = np.random.default_rng(seed)
  adapters = lora.trainable(params)
  new = jax.tree_util.tree_map_with_path(
      lambda path, x: (jax.device_put(rng.normal(0, std, x.shape).astype(x.dtype), x.sharding)
                       if str(path[-1].key).endswith(lora.SUFFIX_B) else x), adapters)
  return lora.combine(params, new)


@pytest.mark.parametrize("dtype,model", [
    ("float32", {}),
    ("bfloat16", dict(remat="full")),
    ("float32", dict(scan_layers=False, remat="dots")),
])
def test_fresh_adapters_reproduce_the_base_model_exactly(dtype, model):
  base = build(_cfg(0, dtype=dtype, **model), jax.devices()[:1])
  tuned = build(_cfg(4, dtype=dtype, **model), jax.devices()[:1])
  p_base, p_lora = init_state(base)["params"], init_state(tuned)["params"]
  # The adapters are drawn beside the base weights: the same seed gives the same base.
  jax.tree.map(np.testing.assert_array_equal, p_base, lora.base(p_lora))
  assert set(lora.trainable(p_lora)["blocks"]["attn"]) == {f"{p}{s}" for p in "qkvo"
                                                           for s in (lora.SUFFIX_A, lora.SUFFIX_B)}
  a = np.asarray(p_lora["blocks"]["attn"]["q_lora_a"])
  assert a.std() > 0 and np.abs(a).max() <= 1 / np.sqrt(32)  # kaiming-uniform over d = 32
  np.testing.assert_array_equal(_forward(tuned, p_lora), _forward(base, p_base))


@pytest.mark.parametrize("targets", [("q", "v"), ALL])
def test_merged_model_equals_the_adapted_one(targets):
  setup = build(_cfg(4, targets, lora_alpha=8.0), jax.devices()[:1])
  params = _randomize_b(init_state(setup)["params"])
  want = _forward(setup, params)
  base = _forward(build(_cfg(0), jax.devices()[:1]), lora.base(params))
  assert np.abs(want - base).max() > 1e-2  # the adapters matter
  merged, m = lora.merge_lora(params, setup.cfg.model)
  assert m.lora_rank == 0 and setup.cfg.model.lora_rank == 4 and not lora.has_adapters(merged)
  cfg = setup.cfg.copy_and_resolve_references()
  cfg.model = m
  plain = build(cfg, jax.devices()[:1])
  np.testing.assert_allclose(_forward(plain, merged), want, rtol=1e-5, atol=1e-5)
  # by hand, one layer: W + (alpha / r) A B
  attn = jax.device_get(params["blocks"]["attn"])
  delta = np.einsum("dr,rnh->dnh", attn["q_lora_a"][1], attn["q_lora_b"][1]) * 2.0
  np.testing.assert_allclose(merged["blocks"]["attn"]["q"][1], attn["q"][1] + delta, rtol=1e-6, atol=1e-7)


def _bytes(tree):
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_only_adapters_have_optimizer_state_and_gradients():
  full, tuned = build(_cfg(0), jax.devices()[:1]), build(_cfg(8, ("q", "v")), jax.devices()[:1])
  adapters = lora.trainable(tuned.abstract_state["params"])
  names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(adapters)}
  assert names == {f"['blocks']['attn']['{p}{s}']" for p in "qv" for s in (lora.SUFFIX_A, lora.SUFFIX_B)}
  # AdamW: two moments per trained parameter, nothing for the frozen base; besides, counts.
  adam = lambda s: s["opt_state"][1][0]
  moments = lambda s: _bytes(adam(s).mu) + _bytes(adam(s).nu)
  assert moments(tuned.abstract_state) == 2 * _bytes(adapters)
  assert _bytes(tuned.abstract_state["opt_state"]) - moments(tuned.abstract_state) <= 16
  assert moments(full.abstract_state) == 2 * _bytes(full.abstract_state["params"])
  assert moments(tuned.abstract_state) < moments(full.abstract_state) / 8  # rank 8 of width 32
  state = init_state(tuned)
  batch = jax.device_put(layouts.batch(), jax.devices()[0])
  _, grads = jax.jit(lambda p, b: loss_and_grads(tuned.graphdef, p, b))(state["params"], batch)
  assert jax.tree.structure(grads) == jax.tree.structure(adapters)
  # With B = 0, A's gradient is 0 (it reaches the loss through B); B's is not.
  attn = jax.device_get(grads["blocks"]["attn"])
  assert not attn["q_lora_a"].any() and attn["q_lora_b"].any()


def _one_step(cfg, seed=0):
  setup = build(cfg, jax.devices()[:1])
  state = init_state(setup)
  state["params"] = _randomize_b(state["params"], seed)
  before = jax.device_get(state["params"])
  state, metrics = compile_train_step(setup)(state, jax.device_put(layouts.batch(), jax.devices()[0]))
  return before, jax.device_get(state["params"]), jax.device_get(metrics)


@pytest.mark.slow
def test_accumulation_multipliers_and_muon_act_on_the_adapters():
  targets = ("q", "v", "o", "down")
  p0, p1, m1 = _one_step(_cfg(4, targets))
  cfg = _cfg(4, targets)
  cfg.optim.grad_accum_steps = 2
  _, p2, m2 = _one_step(cfg)
  np.testing.assert_allclose(m2["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m2["grad_norm"], m1["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2 * cfg.optim.learning_rate),
               p1, p2)
  cfg = _cfg(4, targets)
  cfg.optim.lr_multipliers = (("attn/q_lora", 0.0),)
  _, p3, _ = _one_step(cfg)
  attn0, attn3 = p0["blocks"]["attn"], p3["blocks"]["attn"]
  np.testing.assert_array_equal(attn3["q_lora_b"], attn0["q_lora_b"])  # multiplier 0
  assert not np.array_equal(attn3["v_lora_b"], attn0["v_lora_b"])
  cfg = _cfg(4, targets)
  cfg.optim.name, cfg.optim.lr_multipliers = "muon", (("attn/q", 0.5),)  # q's adapters only
  _, p4, m4 = _one_step(cfg)
  assert np.isfinite(m4["loss"]) and not np.array_equal(p4["blocks"]["mlp"]["down_lora_b"],
                                                        p0["blocks"]["mlp"]["down_lora_b"])
  jax.tree.map(np.testing.assert_array_equal, lora.base(p0), lora.base(p4))
  cfg.optim.lr_multipliers = (("attn/k$", 0.5),)  # matches a frozen weight only
  with pytest.raises(ConfigError, match=r"lr_multipliers\[0\]: 'attn/k\$' matches no parameter"):
    build(cfg, jax.devices()[:1])


def test_config_refuses_mlp_adapters_of_experts_and_1f1b():
  c = _cfg(4, ("q", "up"), num_experts=4, experts_per_token=2, expert_mlp_dim=16)
  with pytest.raises(ConfigError, match=r"model.lora_targets.*\['up'\] with model.num_experts=4"):
    validate(c)
  c.model.lora_targets = ("q", "o")
  validate(c)  # attention adapters in a mixture of experts are fine
  c = _cfg(4)
  c.mesh.stage, c.model.pipeline_schedule = 2, "1f1b"
  with pytest.raises(ConfigError, match="model.pipeline_schedule.*'1f1b' with model.lora_rank=4"):
    validate(c, num_devices=2)


def test_adapters_shard_like_their_weights_and_the_step_matches_one_device():
  cfg8 = _cfg(4)
  cfg8.mesh.update(data=2, fsdp=2, tensor=2)
  one, eight = build(_cfg(4), jax.devices()[:1]), build(cfg8, jax.devices()[:8])
  specs = jax.tree.map(lambda s: tuple(s.spec) + (None,) * 8, eight.state_shardings["params"])
  shapes = eight.abstract_state["params"]["blocks"]
  for module, name, n_in in [("attn", "q", 1), ("attn", "k", 1), ("attn", "v", 1), ("attn", "o", 2),
                             ("mlp", "gate", 1), ("mlp", "up", 1), ("mlp", "down", 1)]:
    m, nd = specs["blocks"][module], shapes[module][name].ndim  # (l, inputs..., outputs...)
    w, a, b = m[name], m[name + lora.SUFFIX_A], m[name + lora.SUFFIX_B]
    assert a[:1 + n_in] == w[:1 + n_in] and a[1 + n_in] is None, (name, w, a)
    assert b[0] == w[0] and b[1] is None and b[2:nd + 1 - n_in] == w[1 + n_in:nd], (name, w, b)
  assert specs["blocks"]["attn"]["q"][:3] == (None, "fsdp", "tensor")  # the mesh splits them
  # The optimizer's moments are sharded like the adapters.
  spec = lambda tree: jax.tree.map(lambda s: s.spec, tree)
  assert spec(eight.state_shardings["opt_state"][1][0].mu) == spec(
      lora.trainable(eight.state_shardings["params"]))

  batch = layouts.batch()
  results = []
  for setup in (one, eight):
    state = init_state(setup)
    state["params"] = _randomize_b(state["params"], std=0.05)
    before = jax.device_get(state["params"])
    b = host_to_global(batch, setup.mesh, setup.batch_sharding)
    state, metrics = compile_train_step(setup)(state, b)
    results.append((before, jax.device_get(state["params"]), jax.device_get(metrics)))
  (p0, p1, m1), (q0, q1, m8) = results
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, lora.base(p0), lora.base(p1))  # frozen
  jax.tree.map(np.testing.assert_array_equal, lora.base(q0), lora.base(q1))
  lr = one.cfg.optim.learning_rate
  for a, b, a0 in zip(jax.tree.leaves(lora.trainable(p1)), jax.tree.leaves(lora.trainable(q1)),
                      jax.tree.leaves(lora.trainable(p0))):
    np.testing.assert_allclose(b, a, atol=2 * lr + 1e-6)  # Adam's sign-like first step
    assert np.isclose(b, a, rtol=1e-5, atol=1e-6).mean() > 0.99
  assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(lora.trainable(p0)),
                                                 jax.tree.leaves(lora.trainable(p1)))) > lr / 2


@pytest.mark.slow
def test_gpipe_pipelined_lora_step_equals_one_device():
  results = []
  for mesh, devices in ((dict(), 1), (dict(stage=2, fsdp=2, tensor=2), 8)):
    cfg = _cfg(4)
    cfg.mesh.update(mesh)
    setup = build(cfg, jax.devices()[:devices])
    state = init_state(setup)
    state["params"] = _randomize_b(state["params"], std=0.05)
    state, metrics = compile_train_step(setup)(state, host_to_global(layouts.batch(), setup.mesh,
                                                                     setup.batch_sharding))
    results.append((jax.device_get(metrics), jax.device_get(state["params"])))
  (m1, p1), (m8, p8) = results
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
  np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, atol=1e-5), p1, p8)


# -- a LoRA fine-tune of a pre-trained run ---------------------------------------------------

def _run_cfg(steps, rank=0):
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 2, 64, 128
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 16
  c.model.max_seq_len = c.data.seq_len = 64
  c.data.global_batch_size = 8
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 2
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.progress_bar = steps, 1, 0, False
  c.train.checkpoint_every, c.mesh.fsdp = 0, 1
  c.model.lora_rank, c.model.lora_targets = rank, ALL
  return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrained")
  lmjax.train(_run_cfg(6), workdir, devices=jax.devices()[:1])
  return workdir


@pytest.fixture(scope="module")
def tuned(pretrained, tmp_path_factory):
  """12 LoRA steps (rank 8, every projection) from ``pretrained`` on a repetitive text."""
  workdir = tmp_path_factory.mktemp("lora")
  source = workdir.parent / "lines.txt"
  source.write_text("\n\n".join(f"row {i % 5}: the quick brown fox jumps over the lazy dog"
                                  for i in range(200)))
  cfg = _run_cfg(12, rank=8)
  cfg.train.init_from, cfg.data.source, cfg.optim.warmup_steps = str(pretrained), str(source), 0
  cfg.optim.decay_steps = 12  # the schedule of a run stopped early too
  history = lmjax.train(cfg, workdir, devices=jax.devices()[:1])
  return workdir, cfg, history


@pytest.mark.slow
def test_lora_finetune_trains_only_adapters_and_resumes_bit_exactly(pretrained, tuned, tmp_path):
  workdir, cfg, history = tuned
  losses = [r["loss"] for r in history]
  assert losses[-1] < losses[0] - 0.1 and np.all(np.diff(losses)[2:] < 0.01), losses
  setup = build(cfg, jax.devices()[:1])
  _, base_run, _ = rundir.restore_params(pretrained, setup)  # base weights only, adapters absent
  assert not lora.has_adapters(base_run)
  _, params, _ = rundir.restore_params(workdir, setup)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(base_run), jax.device_get(lora.base(params)))
  assert all(np.asarray(b).any() for b in jax.tree.leaves(lora.trainable(params)))
  # Stopped half-way and resumed: the same parameters and optimizer state, bit for bit.
  half = cfg.copy_and_resolve_references()
  half.train.steps = 6
  lmjax.train(half, tmp_path, devices=jax.devices()[:1])
  resumed = lmjax.train(cfg, tmp_path, devices=jax.devices()[:1])
  assert [r["loss"] for r in resumed] == losses[6:]
  ckpt = Checkpointer(tmp_path / "checkpoints", read_only=True)
  a = Checkpointer(workdir / "checkpoints", read_only=True)
  abstract = setup.abstract_state
  s1, s2 = a.restore(12, abstract), ckpt.restore(12, abstract)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(s1), jax.device_get(s2))
  with pytest.raises(Exception, match="different model.*model.lora_rank, lora_targets: checkpoint"):
    other = cfg.copy_and_resolve_references()
    other.model.lora_rank, other.train.steps = 2, 13
    lmjax.train(other, tmp_path, devices=jax.devices()[:1])  # another rank: another model
  assert Checkpointer(tmp_path / "checkpoints", read_only=True).all_steps() == [6, 12]  # kept


@pytest.mark.slow
def test_loaded_lora_run_is_merged_and_evaluates_as_the_adapted_model(tuned):
  workdir, cfg, _ = tuned
  merged = lmjax.load(workdir, devices=jax.devices()[:1])
  apart = lmjax.load(workdir, devices=jax.devices()[:1], merge=False)
  assert merged.cfg.model.lora_rank == 0 and not lora.has_adapters(merged.params)
  assert apart.cfg.model.lora_rank == 8 and lora.has_adapters(apart.params)
  want, got = (r.evaluate(cfg.data.source, max_batches=2) for r in (apart, merged))
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
  np.testing.assert_allclose(_forward(merged.setup, merged.params),
                             _forward(apart.setup, apart.params), rtol=1e-5, atol=1e-5)
  # tools/merge_lora.py writes the merged run: a plain model, the same weights.
  out = workdir.parent / "merged"
  merge_lora_tool.main([str(workdir), str(out)])
  copy = lmjax.load(out, devices=jax.devices()[:1])
  assert copy.cfg.model.lora_rank == 0 and copy.step == merged.step
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),  # 8 devices here
               jax.device_get(copy.params), jax.device_get(merged.params))
  assert copy.tokenizer.path == merged.tokenizer.path
  # A plain config cannot read the adapters: merge first.
  plain = rundir.run_config(workdir)
  plain.model.lora_rank = 0
  with pytest.raises(Exception, match="tools/merge_lora.py"):
    lmjax.load(workdir, cfg=plain, devices=jax.devices()[:1])


def test_exported_lora_run_loads_in_transformers_as_a_plain_llama(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = _cfg(4, ALL, lora_alpha=8.0)
  cfg.model.init_std, cfg.model.tie_embeddings = 0.1, False
  setup = build(cfg, jax.devices()[:1])
  params = _randomize_b(init_state(setup)["params"])
  Checkpointer(tmp_path / "run" / "checkpoints", cfg).save_params(0, params, cfg)
  config = hf.export_checkpoint(tmp_path / "run", tmp_path / "out", say=lambda m: None)
  assert config["architectures"] == ["LlamaForCausalLM"]
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                           attn_implementation="eager").eval()
  assert type(back).__name__ == "LlamaForCausalLM"
  with torch.no_grad():
    got = back(torch.tensor(TOKENS, dtype=torch.long)).logits.float().numpy()
  np.testing.assert_allclose(got, _forward(setup, params), rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # compiles three steps of a model
def test_bench_lora_section_measures_the_optimizer_state_it_saves():
  sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
  import bench  # noqa: PLC0415 - tools/bench.py imports its siblings from tools/
  model = dict(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
               vocab_size=64, max_seq_len=16)
  r = bench.lora_rows(model, seq=16, rows=2, rounds=1)
  full, qv, every = r["full fine-tune"], r["LoRA r=8 q,v"], r["LoRA r=8 all"]
  assert full["trained"] == full["params"] and qv["trained"] == 1 * (32 * 8 + 8 * 32 + 32 * 8 + 8 * 16)
  assert qv["opt_bytes"] < every["opt_bytes"] < full["opt_bytes"] / 2
  assert all(x["step_s"] > 0 and x["temp_bytes"] > 0 for x in r.values())
