"""The shipped Mixtral-shaped configs: Mixtral-8x7B's shapes, total and active parameter
counts and expert sharding through ``jax.eval_shape`` (nothing allocated); the small CPU
config is the same family shrunk, and it trains, logging its experts' load."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

import lmjax
from lmjax.config import MESH_AXES, ConfigError, resolve_mesh_shape, validate
from lmjax.metrics import inactive_params
from lmjax.state import build

ROOT = Path(__file__).resolve().parents[1]


def _load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_mixtral_8x7b_validates_with_experts_on_the_mesh():
  cfg = _load("mixtral_8x7b")
  m = cfg.model
  assert (m.num_experts, m.experts_per_token, m.router, m.capacity_factor) == (8, 2, "softmax", 0.0)
  assert (m.first_dense_layers, m.moe_every, m.num_shared_experts) == (0, 1, 0)  # every layer MoE
  assert (m.vocab_size, m.rope_theta, m.tie_embeddings, m.attention) == (32000, 1e6, False, "cudnn")
  assert cfg.optim.grad_accum_steps == 2  # what `lmjax plan` needs on 256 H100s
  validate(cfg, num_devices=8)
  validate(cfg, num_devices=256)
  shape = dict(zip(MESH_AXES, resolve_mesh_shape(cfg, 256)))
  assert shape == {"data": 1, "stage": 1, "fsdp": 32, "expert": 8, "context": 1, "tensor": 1}  # 32 nodes of 8
  with pytest.raises(ConfigError, match="config.mesh: the fixed axes"):
    validate(cfg, num_devices=12)  # the expert axis needs a multiple of 8 devices


def test_mixtral_8x7b_shapes_and_parameter_counts_without_allocating():
  cfg = _load("mixtral_8x7b")
  cfg.model.attention = "xla"  # the cudnn kernel needs a GPU; parameters are the same
  setup = build(cfg, jax.devices())  # expert=8, fsdp=1 on 8 devices
  assert setup.num_params == 46_702_792_704  # Mixtral-8x7B: 46.7B
  assert setup.num_params - inactive_params(cfg.model) == 12_879_925_248  # 12.9B active
  assert dict(setup.mesh.shape) == {"data": 1, "stage": 1, "fsdp": 1, "expert": 8, "context": 1, "tensor": 1}
  params = setup.abstract_state["params"]
  assert params["embed"]["table"].shape == params["lm_head"]["table"].shape == (32000, 4096)
  attn, moe = params["blocks"]["attn"], params["blocks"]["moe"]
  assert "mlp" not in params["blocks"] and "dense_blocks" not in params  # every layer is MoE
  assert attn["q"].shape == (32, 4096, 32, 128) and attn["k"].shape == (32, 4096, 8, 128)
  assert moe["router"].shape == (32, 4096, 8)
  assert moe["gate"].shape == moe["up"].shape == (32, 8, 4096, 14336)
  assert moe["down"].shape == (32, 8, 14336, 4096)
  for name in ("gate", "up", "down"):  # one expert of every layer per device
    a = moe[name]
    assert a.sharding.shard_shape(a.shape) == (32, 1, *a.shape[2:]), name


def test_mixtral_8x7b_experts_split_over_expert_and_fsdp():
  cfg = _load("mixtral_8x7b")
  cfg.model.attention = "xla"
  cfg.mesh.expert = 4  # fsdp fills the other 2
  setup = build(cfg, jax.devices())
  up = setup.abstract_state["params"]["blocks"]["moe"]["up"]
  assert up.sharding.shard_shape(up.shape) == (32, 2, 2048, 14336)  # experts / 4, width / 2


def test_small_mixtral_is_the_8x7b_family_shrunk():
  small = _load("mixtral")
  local = _load("mixtral", "runlocal")
  assert _load("mixtral_8x7b", "runlocal").to_dict() == local.to_dict()  # one CPU run of both
  assert local.model.to_dict() == small.model.to_dict() and local.train.steps == 200
  assert small.model.num_heads // small.model.num_kv_heads == 4  # Mixtral's 32 / 8
  assert small.model.mlp_dim / small.model.embed_dim == 14336 / 4096
  assert _load("mixtral", "window=64,runlocal").model.sliding_window == 64
  assert small.model.sliding_window == 0
  setup = build(small, jax.devices()[:1])
  assert setup.num_params == 3_099_264
  assert setup.num_params - inactive_params(small.model) == 1_034_880


@pytest.mark.slow
def test_small_mixtral_trains_and_logs_expert_load(tmp_path):
  cfg = _load("mixtral", "runlocal")  # all 8 devices on FSDP, experts unsplit
  cfg.train.update(steps=4, log_every=2, eval_every=4, eval_batches=1, progress_bar=False,
                   trackers=())
  history = lmjax.train(cfg, tmp_path / "run")
  assert [r["step"] for r in history] == [1, 2, 4]
  first, last = history[0], history[-1]
  assert np.isfinite(last["eval_loss"]) and last["loss"] < first["loss"] < 7.0  # log(1024) = 6.93
  assert last["dropped_fraction"] == 0.0  # dropless
  assert 1.5 < last["moe_aux_loss"] < 8.0  # k = 2 when balanced, at most E = 8
  assert last["router_z_loss"] > 0
  for i in (0, 1):
    shares = [last[f"moe/layer{i}/expert{j}"] for j in range(8)]
    assert sum(shares) == pytest.approx(1.0)
    assert last[f"moe/layer{i}/max_load"] == pytest.approx(8 * max(shares))
    assert last[f"moe/layer{i}/min_load"] == pytest.approx(8 * min(shares))
    assert last[f"moe/layer{i}/min_load"] <= 1.0 <= last[f"moe/layer{i}/max_load"]
  assert "moe/layer2/max_load" not in last
