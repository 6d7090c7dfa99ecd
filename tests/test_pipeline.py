"""Pipeline parallelism: every schedule equals the non-pipelined model, stages talk by
collective-permute of one microbatch, never by gathering the activation stack, the 1F1B
schedule's activation memory does not grow with the microbatches, and a pipelined run
evaluates while training and loads unpipelined for evaluation and generation."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax.config import ConfigError, default_config, validate
from lmjax.generate import generate, load_run
from lmjax.model.pipeline import bubble_fraction
from lmjax.state import build, init_state, loss_and_grads
from lmjax.trainer import compile_train_step, train
from tests.layouts import (BATCH, FAST_COMPILE, LAYOUTS, SEQ, assert_close_bf16_step, assert_same_step,
                           batch, config, run)

SCHEDULES = [
    "stage4_data2_m2",  # GPipe, fewer microbatches than stages
    "stage4_data2_m8",  # GPipe, more microbatches than stages
    "stage2_fsdp4_circular_m2",  # circular, 2 repeats of 2 stages, M = S
    "stage2_data4_circular_m4",  # circular, M > S (outputs wait for stage 0)
    "stage4_data2_1f1b_m2",  # 1F1B, M < S
    "stage4_data2_1f1b_m4",  # 1F1B, M = S
    "stage4_data2_1f1b_m8",  # 1F1B, M > S
    "stage2_fsdp2_tensor2_1f1b_m4",  # 1F1B, FSDP and tensor parallelism inside the stages
    "stage2_data4_1f1b_interleaved_m2",  # interleaved 1F1B, 2 chunks per stage, M = S
    "stage2_fsdp4_1f1b_interleaved_m4",  # interleaved 1F1B, two groups of S microbatches
]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULES)
def test_pipeline_schedules_equal_the_plain_model(name):
  assert_same_step(run("single"), run(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stage4_data2_1f1b_m4", "stage2_fsdp4_1f1b_interleaved_m4"])
def test_1f1b_in_bfloat16_is_within_its_rounding_of_one_device(name):
  assert_close_bf16_step(run("single", "bfloat16"), run(name, "bfloat16"), run("single"))


def test_bubble_fraction():
  assert bubble_fraction(4, 4) == 3 / 7
  assert bubble_fraction(4, 12) == 3 / 15
  assert bubble_fraction(4, 4, repeats=2) == 3 / 11  # circular shrinks the bubble
  assert bubble_fraction(1, 8) == 0


def _loop_collectives(hlo: str) -> dict[str, list[str]]:
  """Collective ops (with result shapes) inside while-loop bodies of an HLO module."""
  found: dict[str, list[str]] = {}
  for line in hlo.splitlines():
    m = re.search(r"= (\S+) (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)\(", line)
    if m and "/while/body/" in line:
      found.setdefault(m.group(2), []).append(m.group(1))
  return found


@pytest.mark.parametrize("name", ["stage4_data2_m8",
                                  pytest.param("stage4_data2_1f1b_m8", marks=pytest.mark.slow)])
def test_stages_communicate_by_collective_permute_of_one_microbatch(name):
  hlo = run(name)["compiled"].as_text()
  ops = _loop_collectives(hlo)
  # One microbatch per device: 16 rows / 8 microbatches / data 2 = 1 row of (t, d).
  one_microbatch = f"f32[1,1,{SEQ},32]"
  assert ops.get("collective-permute"), ops
  assert all(s.startswith(one_microbatch) for s in ops["collective-permute"]), ops
  assert "all-gather" not in ops, ops  # nothing gathers the activation stack per iteration
  assert "all-to-all" not in ops, ops
  # 1F1B: the activations cross the stage axis as one microbatch (the last stage's output
  # into the loss, stage 0's input gradient into the embedding), never the stage stack.
  acts = [s for s in ops.get("all-reduce", []) if s.startswith("f32[1,")]
  assert all(s.startswith(f"f32[1,{SEQ},32]") for s in acts), ops


@pytest.mark.slow
def test_1f1b_step_equals_gpipe_with_z_loss_accumulation_untied_head_and_remat():
  """The train step's metrics and update under 1F1B equal GPipe's (autodiff; equal to the
  plain model above) with what the layouts leave out: the z-loss, gradient accumulation,
  an untied output projection, learned positions and remat inside the stages."""
  def step(schedule):
    cfg = config("stage4_data2_m2")
    cfg.model.pipeline_schedule = schedule
    cfg.model.tie_embeddings, cfg.model.position_embedding, cfg.model.remat = False, "learned", "full"
    cfg.train.z_loss, cfg.optim.grad_accum_steps = 1e-2, 2
    setup = build(cfg, jax.devices())
    state = init_state(setup)
    b = jax.device_put(batch(), setup.batch_sharding)
    new, metrics = compile_train_step(setup).lower(state, b).compile(FAST_COMPILE)(state, b)
    return jax.device_get((new["params"], metrics))

  (want, want_m), (got, got_m) = step("gpipe"), step("1f1b")
  for k in ("loss", "z_loss", "grad_norm", "tokens"):
    np.testing.assert_allclose(got_m[k], want_m[k], rtol=1e-5, err_msg=k)
  assert want_m["z_loss"] > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), want, got)


def _activation_bytes(schedule, microbatches):
  """The compiled gradient's temp bytes per device on stage=4 x data=2, microbatches of 2
  rows each (the batch grows with them, as more microbatches in flight would)."""
  LAYOUTS["memory"] = (dict(stage=4, data=2), dict(pipeline_microbatches=microbatches,
                                                    pipeline_schedule=schedule), 8)
  cfg = config("memory")
  cfg.data.global_batch_size = 2 * microbatches
  setup = build(cfg, jax.devices())
  rows = jax.ShapeDtypeStruct((cfg.data.global_batch_size, SEQ), jnp.int32,
                              sharding=setup.batch_sharding)
  b = {k: rows for k in ("inputs", "targets", "segment_ids", "positions")}
  with setup.context():
    grads = jax.jit(functools.partial(loss_and_grads, setup.graphdef))
    compiled = grads.lower(setup.abstract_state["params"], b).compile(FAST_COMPILE)
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_1f1b_activation_memory_is_bounded_by_the_stages_not_the_microbatches():
  # Measured (tiny model, 2-row microbatches): 1F1B 146.6k -> 148.5k bytes for M = 2 -> 8
  # (the buffer of 2S - 1 stage inputs is fixed; only the token ids grow), GPipe 337k -> 611k.
  one_f = {m: _activation_bytes("1f1b", m) for m in (2, 8)}
  gpipe = {m: _activation_bytes("gpipe", m) for m in (2, 8)}
  assert one_f[8] <= 1.1 * one_f[2], one_f
  assert gpipe[8] > 1.5 * gpipe[2], gpipe
  assert one_f[8] < gpipe[8] / 2, (one_f, gpipe)


def test_pipeline_config_errors_name_the_key():
  cfg = config("stage4_data2")
  cfg.model.num_layers = 6
  with pytest.raises(ConfigError, match="config.model.num_layers: 6 layers cannot be split"):
    validate(cfg, num_devices=8)
  cfg = config("stage4_data2")
  cfg.model.pipeline_microbatches = 16  # 16 rows / 16 = 1 row, not divisible over data=2
  with pytest.raises(ConfigError, match="config.model.pipeline_microbatches: 16 microbatches"):
    validate(cfg, num_devices=8)
  cfg = config("stage2_fsdp4_circular_m2")
  cfg.model.pipeline_microbatches = 1
  with pytest.raises(ConfigError, match="circular pipeline .* needs at least as many microbatches"):
    validate(cfg, num_devices=8)
  cfg = config("stage2_fsdp4_circular_m2")
  cfg.model.pipeline_schedule, cfg.model.pipeline_microbatches = "1f1b", 3
  cfg.data.global_batch_size = 12
  with pytest.raises(ConfigError, match="config.model.pipeline_microbatches: an interleaved 1F1B "
                                        "pipeline .* got 3, not a multiple"):
    validate(cfg, num_devices=8)
  cfg.model.pipeline_schedule = "zero_bubble"
  with pytest.raises(ConfigError, match="config.model.pipeline_schedule"):
    validate(cfg, num_devices=8)


@pytest.mark.slow
def test_a_pipelined_run_evaluates_while_training_and_loads_unpipelined(tmp_path):
  """A 1F1B run on stage=2 x fsdp=4 evaluates at its eval steps; ``lmjax.load`` (``lmjax
  eval``) and ``load_run`` (``lmjax generate``, with or without the run's config) restore
  it on stage=1 x fsdp=8, where the held-out loss is the one training measured."""
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 2, 32, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 2, 1, 16
  c.model.max_seq_len = c.data.seq_len = 32
  c.model.pipeline_schedule = "1f1b"
  c.data.global_batch_size = 8
  c.mesh.stage = 2
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.eval_batches = 2, 1, 2, 1
  c.train.checkpoint_every, c.train.progress_bar = 0, False
  history = train(c, tmp_path)
  assert np.isfinite(history[-1]["eval_loss"]), history[-1]

  run = lmjax.load(tmp_path)
  assert dict(run.setup.mesh.shape)["stage"] == 1 and dict(run.setup.mesh.shape)["fsdp"] == 8
  assert run.model().num_stages == 1
  np.testing.assert_allclose(run.evaluate(max_batches=1)["loss"], history[-1]["eval_loss"],
                             rtol=1e-5)
  texts = generate(run.setup, run.params, run.tokenizer, ["The"], max_new_tokens=4,
                   temperature=0)
  for loaded in (load_run(tmp_path), load_run(tmp_path, c)):  # lmjax generate [--config]
    assert loaded.model().num_stages == 1
    assert generate(loaded.setup, loaded.params, loaded.tokenizer, ["The"], max_new_tokens=4,
                    temperature=0) == texts
