"""The math does not change with the mesh: loss, gradients and one update on 8 (and 16)
fake devices equal the single-device result (in float32, and in bfloat16 compute within its
rounding), parameters are laid out as the rules table says, and FSDP gathers weights in the
compute dtype."""

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from lmjax.config import ConfigError
from lmjax.mesh import LOGICAL_AXES, RULES, make_rules
from lmjax.state import build
from tests.layouts import LAYOUTS, assert_close_bf16_step, assert_same_step, config, param_specs, run
from tools.hlo import collectives

ROOT = Path(__file__).resolve().parents[1]
EIGHT = ["single_unrolled_remat", "data8", "fsdp8", "tensor8", "data2_fsdp2_tensor2",
         "data2_fsdp2_tensor2_seq", "stage4_data2", "stage2_fsdp2_tensor2"]
BF16 = ["data2_fsdp2_tensor2", "data8", "fsdp8", "tensor8", "stage4_data2", "stage2_fsdp4_circular_m2"]


# One layout of three axes in the fast lane; the others with the slow tests.
@pytest.mark.parametrize("name", [n if n == "data2_fsdp2_tensor2" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in EIGHT])
def test_same_loss_gradients_and_update_as_one_device(name):
  assert_same_step(run("single"), run(name))


# bfloat16 compute: the three axes at once in the fast lane, each axis and the pipelines slow.
@pytest.mark.parametrize("name", [n if n == "data2_fsdp2_tensor2" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in BF16])
def test_bfloat16_loss_gradients_and_update_as_one_device(name):
  """Within bfloat16's rounding noise, measured by one device's float32 step: see
  tests/layouts.py assert_close_bf16_step for the bounds and why."""
  assert_close_bf16_step(run("single", "bfloat16"), run(name, "bfloat16"), run("single"))


@pytest.mark.slow
def test_all_four_axes_on_sixteen_devices():
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=16"}
  out = subprocess.run([sys.executable, "-m", "tests.layouts", "data2_stage2_fsdp2_tensor2"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout + out.stderr[-3000:]
  assert "data2_stage2_fsdp2_tensor2: same loss, gradients and update" in out.stdout


def test_parameter_shardings_follow_the_rules_table():
  specs = param_specs("fsdp8")
  assert specs["embed"]["table"] == P(None, "fsdp")  # (vocab, embed): embed -> fsdp
  assert specs["blocks"]["mlp"]["gate"] == P(None, "fsdp", None)  # (layers, embed, mlp)
  assert specs["blocks"]["attn_norm"]["scale"] == P(None, None)  # norms replicated
  specs = param_specs("data2_fsdp2_tensor2")
  assert specs["embed"]["table"] == P("tensor", "fsdp")
  assert specs["blocks"]["mlp"]["gate"] == P(None, "fsdp", "tensor")
  assert specs["blocks"]["mlp"]["down"] == P(None, "tensor", "fsdp")
  assert specs["blocks"]["attn"]["q"] == P(None, "fsdp", "tensor", None)
  assert specs["blocks"]["attn"]["k"] == P(None, "fsdp", "tensor", None)
  specs = param_specs("tensor8")
  assert specs["blocks"]["attn"]["q"] == P(None, None, "tensor", None)  # 8 heads / 8
  assert specs["blocks"]["attn"]["k"] == P(None, None, None, None)  # 4 kv heads: replicated
  specs = param_specs("stage4_data2")
  assert specs["blocks"]["mlp"]["gate"] == P("stage", None, None)  # one layer per stage
  assert specs["embed"]["table"] == P(None, None)
  data_specs = jax.tree.leaves(param_specs("data8"), is_leaf=lambda x: isinstance(x, P))
  assert data_specs and all(all(a is None for a in s) for s in data_specs)  # replicated


def test_config_rules_override_the_table():
  cfg = config("data2_fsdp2_tensor2")
  cfg.mesh.rules = (("embed", None), ("mlp", ("fsdp", "tensor")))
  params = build(cfg, jax.devices()).abstract_state["params"]
  assert params["blocks"]["mlp"]["gate"].sharding.spec == P(None, None, ("fsdp", "tensor"))
  assert params["embed"]["table"].sharding.spec == P("tensor", None)
  cfg.mesh.rules = (("embed", "pipeline"),)
  with pytest.raises(Exception, match=r"config.mesh.rules\[0\]: unknown mesh axis 'pipeline'"):
    build(cfg, jax.devices())


def test_activation_rules_follow_the_parameter_rules():
  assert {name for name, _ in RULES} <= set(LOGICAL_AXES)
  rules = make_rules()
  assert set(rules) == set(LOGICAL_AXES)
  assert rules["act_heads"] == rules["heads"] == "tensor" and rules["act_vocab"] == "tensor"
  assert rules["head_dim"] is rules["norm"] is rules["act_embed"] is None
  assert rules["act_seq"] == rules["act_res_seq"] == "context"
  moved = make_rules((("heads", "fsdp"), ("mlp", ["fsdp", "tensor"])))
  assert moved["heads"] == moved["act_heads"] == "fsdp"  # act_heads follows heads
  assert moved["act_mlp"] == ("fsdp", "tensor") and moved["act_kv_heads"] == "tensor"
  alone = make_rules((("act_heads", None),))
  assert alone["act_heads"] is None and alone["heads"] == "tensor"
  cfg = config("data2_fsdp2_tensor2")
  cfg.mesh.rules = (("act_seq", "tensor"), ("emebd", None))  # a typo
  with pytest.raises(ConfigError, match=r"config.mesh.rules\[1\]: unknown logical axis 'emebd'"):
    build(cfg, jax.devices())


def _state_bytes(name):
  return run(name)["compiled"].memory_analysis().argument_size_in_bytes


@pytest.mark.slow
def test_per_device_memory_falls_with_the_mesh():
  """From the compiled step's memory analysis: the state each device holds."""
  single = _state_bytes("single")
  # FSDP shards every parameter and optimizer moment whose embed dim divides by 8
  # (norm scales stay replicated: ~1% of the bytes here).
  assert 1 / 8 <= _state_bytes("fsdp8") / single < 1 / 8 * 1.1
  # Tensor parallelism splits heads, MLP and vocab 8 ways; the 4 KV heads and norms don't split.
  setup = run("tensor8")["setup"]
  kv = sum(x.size for k in ("k", "v") for x in [setup.abstract_state["params"]["blocks"]["attn"][k]])
  assert 1 / 8 <= _state_bytes("tensor8") / single < 1 / 8 + 3 * kv * 4 / single + 0.01
  # Data parallelism replicates.
  assert _state_bytes("data8") / single > 0.99
  # Pipeline stages hold their own layers; embedding and final norm are replicated.
  params = run("single")["setup"].abstract_state["params"]
  block_bytes = 3 * 4 * sum(x.size for x in jax.tree.leaves(params["blocks"]))  # params, mu, nu
  expected = (single - block_bytes) + block_bytes / 4
  assert abs(_state_bytes("stage4_data2") - expected) / single < 0.01


@pytest.mark.slow
def test_compiled_state_bytes_match_the_shardings():
  for name in ("fsdp8", "tensor8", "stage4_data2"):
    r = run(name)
    shard_bytes = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                      for x in jax.tree.leaves(r["setup"].abstract_state))
    assert shard_bytes <= _state_bytes(name) < shard_bytes * 1.02 + 4096, name  # + the batch


def test_tensor_parallel_forward_has_one_reduction_per_sublayer():
  """Megatron-style: per layer, the forward pass all-reduces the attention output and the
  MLP output (b, t, d) once each, and gathers nothing. (The loss, in a loop of its own over
  chunks of positions, reduces over the vocabulary, which tensor splits: the logits' max and
  the hidden states' gradient.)"""
  layer, loss = [], []
  for line in run("tensor8")["compiled"].as_text().splitlines():
    m = re.search(r"= (\S+) (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)\(", line)
    if m and "/jvp()/while/body/" in line and "transpose(" not in line:
      op = re.search(r'op_name="([^"]*)"', line).group(1).rsplit("closed_call/", 1)[-1]
      in_loss = op.startswith(("bcv,", "reduce_max", "reduce_sum"))  # lmjax.model.cross_entropy
      (loss if in_loss else layer).append((m.group(2), m.group(1).split("{")[0], op))
  assert sorted(layer) == [("all-reduce", "f32[16,16,32]", "btf,fd->btd/dot_general"),
                           ("all-reduce", "f32[16,16,32]", "btnh,nhd->btd/dot_general")], layer
  assert {kind for kind, _, _ in loss} <= {"all-reduce"}, loss


def _weight_gathers(name, dtype):
  """The all-gathers of FSDP-sharded weights in layout ``name``'s train step with compute
  ``dtype``, from its HLO right after SPMD partitioning: those whose result has a parameter's
  shape (a block parameter's without the layer axis) with only its fsdp axis gathered."""
  r = run(name, dtype)
  mesh = dict(r["setup"].mesh.shape)
  shapes = set()
  for (path, x), spec in zip(jax.tree_util.tree_leaves_with_path(r["params0"]),
                             jax.tree.leaves(r["specs"], is_leaf=lambda s: isinstance(s, P))):
    axes = [() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec]
    axes += [()] * (x.ndim - len(axes))
    if any("fsdp" in a for a in axes):
      others = [int(np.prod([mesh[a] for a in ax if a != "fsdp"])) for ax in axes]
      shape = tuple(n // k for n, k in zip(x.shape, others))
      shapes.add(shape[1:] if jax.tree_util.keystr(path).startswith("['blocks']") else shape)
  return [c for c in collectives(r["partitioned"], "all-gather") if c.shape in shapes]


@pytest.mark.parametrize("name", ["data2_fsdp2_tensor2", pytest.param("fsdp8", marks=pytest.mark.slow)])
def test_fsdp_gathers_weights_in_the_compute_dtype(name):
  """Each weight is cast to the compute dtype where it is stored, sharded (layers.weight), so
  FSDP's gathers move bfloat16, half float32's bytes. Read from the program the SPMD
  partitioner writes (tools/hlo.py): XLA:CPU's later float-normalization upcasts bfloat16
  collectives to float32 (no bfloat16 collectives on CPU), GPU and TPU keep them."""
  bf16, f32 = _weight_gathers(name, "bfloat16"), _weight_gathers(name, "float32")
  assert {c.dtype for c in bf16} == {"bf16"}, bf16
  assert {c.dtype for c in f32} == {"f32"}, f32
  # The same gathers in both dtypes: the 7 block matrices once in the forward scan and again
  # in the backward scan (its residuals are the sharded weights), the tied embedding once
  # (the logits' forward and backward share it).
  assert len(bf16) == len(f32) == 7 * 2 + 1, (bf16, f32)
  assert sum(c.runs for c in bf16) == 7 * 2 * 4 + 1  # 4 layers
  bf16_bytes, f32_bytes = (sum(c.bytes * c.runs for c in g) for g in (bf16, f32))
  assert 2 * bf16_bytes == f32_bytes
