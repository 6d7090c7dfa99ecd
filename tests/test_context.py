"""Long sequences: context parallelism (the sequence split over the ``context`` mesh axis,
ring and all-gather attention, causal load balancing) and Megatron sequence parallelism
equal one device; per-device activation memory falls with the context axis."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import ConfigError, default_config, validate
from lmjax.mesh import make_mesh, rules_from_config, use_rules
from lmjax.model import context
from lmjax.model.attention import attention_mask, xla_attention
from lmjax.state import build, init_state, token_losses
from tests.layouts import assert_same_step, run


def test_balance_order_gives_each_device_chunks_i_and_2c_minus_1_minus_i():
  order = context.balance_order(16, 4)  # 8 chunks of 2
  slices = order.reshape(4, 4)  # device i's 4 positions
  assert slices[0].tolist() == [0, 1, 14, 15] and slices[3].tolist() == [6, 7, 8, 9]
  assert sorted(order.tolist()) == list(range(16))
  # every device attends causally to the same number of (query, key) pairs
  work = [sum(p + 1 for p in s) for s in slices]
  assert len(set(work)) == 1, work


def _qkv(b=2, t=32, n=4, kv=2, h=8):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))
  seg = np.ones((b, t), np.int32)
  seg[:, 10:24], seg[:, 24:] = 2, 3  # three packed documents
  seg[1, 28:] = 0  # padding
  return q, k, v, jnp.asarray(seg)


# (mesh sizes, kind, load balancing, sliding window): both kinds on the three meshes of the
# train-step tests, balanced and in order, with and without a window, GQA (4 heads, 2 kv).
CASES = [
    (dict(context=8), "ring", True, 0),
    (dict(context=8), "allgather", True, 5),
    (dict(context=4, fsdp=2), "ring", False, 5),
    (dict(context=4, fsdp=2), "allgather", False, 0),
    (dict(context=2, tensor=2, data=2), "ring", True, 5),
    (dict(context=2, tensor=2, data=2), "allgather", True, 0),
]


def test_context_attention_and_its_gradients_equal_one_device():
  """Ring and all-gather attention on a split sequence (reordered for load balancing or
  not), against the reference einsum attention of the whole sequence on one device."""
  q, k, v, seg = _qkv()
  t = q.shape[1]
  for sizes, kind, balanced, window in CASES:
    cfg = default_config()
    cfg.mesh.fsdp = 1
    for axis, size in sizes.items():
      cfg.mesh[axis] = size
    mesh = make_mesh(cfg)
    c = mesh.shape["context"]
    order = context.balance_order(t, c) if balanced else np.arange(t)
    back = np.argsort(order)
    loss = lambda out: jnp.sum(out * jnp.cos(out))  # a gradient that is not the output itself

    def ref(q, k, v):
      return loss(xla_attention(q, k, v, attention_mask(seg, window)))

    def split(q, k, v):
      return loss(context.context_attention(q, k, v, seg[:, order], kind=kind, balanced=balanced,
                                            window=window))

    with jax.set_mesh(mesh), use_rules(rules_from_config(cfg)):
      fn = jax.jit(jax.value_and_grad(split, argnums=(0, 1, 2)))
      value, grads = fn(q[:, order], k[:, order], v[:, order])
      out = jax.jit(lambda q, k, v: context.context_attention(
          q, k, v, seg[:, order], kind=kind, balanced=balanced, window=window))(
              q[:, order], k[:, order], v[:, order])
    want_value, want_grads = jax.value_and_grad(ref, argnums=(0, 1, 2))(q, k, v)
    case = (sizes, kind, balanced, window)
    np.testing.assert_allclose(np.asarray(out)[:, back],
                               xla_attention(q, k, v, attention_mask(seg, window)), atol=2e-6,
                               err_msg=str(case))
    np.testing.assert_allclose(value, want_value, rtol=1e-5, err_msg=str(case))
    for got, want in zip(grads, want_grads):
      np.testing.assert_allclose(np.asarray(got)[:, back], want, atol=2e-5, err_msg=str(case))


def test_ring_attention_passes_blocks_around_and_keeps_no_full_scores():
  """The ring's compiled HLO moves keys and values with collective-permutes (no all-gather
  of them), the all-gather variant gathers them; the ring's largest score block is
  (t/C, t/C)."""
  q, k, v, seg = _qkv()
  cfg = default_config()
  cfg.mesh.fsdp, cfg.mesh.context = 1, 8
  mesh = make_mesh(cfg)
  texts = {}
  for kind in ("ring", "allgather"):
    f = jax.grad(lambda q, k, v: jnp.sum(context.context_attention(q, k, v, seg, kind=kind)),
                 argnums=(0, 1, 2))
    with jax.set_mesh(mesh), use_rules(rules_from_config(cfg)):
      texts[kind] = jax.jit(f).lower(q, k, v).compile().as_text()
  assert "collective-permute" in texts["ring"] and "all-gather" not in texts["ring"]
  assert "all-gather" in texts["allgather"] and "collective-permute" not in texts["allgather"]
  # scores (b, k, g, tq, tk): 4 x 4 per step in the ring, 4 x 32 gathered
  assert re.search(r"f32\[2,2,2,4,4\]", texts["ring"]) and not re.search(r"f32\[2,2,2,4,32\]", texts["ring"])
  assert re.search(r"f32\[2,2,2,4,32\]", texts["allgather"])


CONTEXT_LAYOUTS = ["window_context8_ring", "window_context4_fsdp2_allgather",
                   "window_context2_tensor2_data2_ring_sp"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONTEXT_LAYOUTS)
def test_train_step_with_the_sequence_split_equals_one_device(name):
  """Loss, gradients and update with packed documents and a sliding window in every layer."""
  assert_same_step(run("window_single"), run(name))


@pytest.mark.slow
def test_sequence_parallel_tensor_layout_equals_one_device_and_scatters_the_residual():
  """Megatron sequence parallelism: the same step as one device, and in the partitioned
  forward pass each sublayer's output (b, t, d) is summed over tensor and kept split along
  the sequence: an all-reduce whose only user is the sequence slice of this device, the
  pattern XLA's GPU and TPU compilers turn into a reduce-scatter (ReduceScatterCreator; the
  CPU compiler leaves it as it is). Each sublayer's input is all-gathered along the
  sequence. Without it the output is all-reduced and kept whole (tests/test_sharding.py)."""
  r = run("tensor8_sp")
  assert_same_step(run("single"), r)
  lines = r["partitioned"].splitlines()
  forward = [l for l in lines if "/jvp()/while/body/" in l and "transpose(" not in l
             and not re.search(r'op_name="[^"]*closed_call/(bcv,|bcd,)', l)]  # not the loss's
  sums = [re.match(r"\s*(%\S+) = f32\[16,16,32\]\S* all-reduce\(", l) for l in forward]
  sums = [m.group(1) for m in sums if m]
  assert len(sums) == 2, sums  # attention and MLP outputs
  for name in sums:
    users = [l.split("=")[1].split("(")[0].strip() for l in lines
             if re.search(re.escape(name) + r"[,)]", l) and not l.strip().startswith(name + " ")]
    assert users == ["f32[16,2,32]{2,1,0} dynamic-slice"], (name, users)  # 16 / 8 positions
  gathers = [l for l in forward if re.search(r"= f32\[16,16,32\]\S* all-gather\(", l)]
  assert len(gathers) == 2, gathers  # the inputs of the q/k/v and the MLP's first projections


def _activation_bytes(c: int, seq: int = 256) -> int:
  """Temporaries of one compiled loss-and-gradient step with the sequence over c devices."""
  cfg = default_config()
  m = cfg.model
  m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = 64, 2, 32, 4, 2
  m.head_dim, m.mlp_dim, m.max_seq_len = 8, 64, seq
  cfg.data.seq_len, cfg.data.global_batch_size = seq, 1
  cfg.mesh.fsdp, cfg.mesh.context = 1, c
  setup = build(cfg, jax.devices()[:c])
  state = init_state(setup)
  batch = {k: jax.ShapeDtypeStruct((1, seq), jnp.int32, sharding=setup.batch_sharding)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  grad = jax.grad(lambda p, b: token_losses(setup.graphdef, p, b)[0])
  with jax.set_mesh(setup.mesh), use_rules(setup.rules):
    compiled = jax.jit(grad).lower(state["params"], batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_activation_memory_per_device_falls_with_the_context_axis():
  """From the compiled step: the temporaries (scores, activations) per device at context 1,
  2 and 8 for a 256-token sequence fall about as 1/C."""
  sizes = {c: _activation_bytes(c) for c in (1, 2, 8)}
  for c in (2, 8):
    assert sizes[c] < sizes[1] / c * 1.6, sizes


@pytest.mark.parametrize("change, key", [
    (dict(context=8, seq_len=24), "data.seq_len"),  # 24 is not 16 equal pieces
    (dict(context=2, num_experts=4), "mesh.context"),
    (dict(context=2, stage=2), "mesh.context"),
    (dict(context=2, attention="cudnn"), "model.attention"),
])
def test_context_parallel_configs_that_cannot_work_are_refused_by_name(change, key):
  cfg = default_config()
  cfg.mesh.fsdp = 1
  cfg.data.global_batch_size = 8
  for k, v in change.items():
    section = cfg.mesh if k in ("context", "stage") else cfg.data if k == "seq_len" else cfg.model
    section[k] = v
  if "attention" in change:
    cfg.model.compute_dtype = "bfloat16"
  with pytest.raises(ConfigError, match=re.escape(f"config.{key}")):
    validate(cfg, num_devices=cfg.mesh.context * cfg.mesh.stage)
