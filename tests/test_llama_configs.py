"""The shipped Llama-3 8B and 70B configs: shapes, parameter counts and shardings through
``jax.eval_shape`` (nothing allocated)."""

import importlib.util
from pathlib import Path

import jax
import pytest

from lmjax.config import validate
from lmjax.state import build

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _on_cpu(cfg):
  cfg.model.attention = "xla"  # the cudnn kernel needs a GPU; parameters are the same
  return cfg


@pytest.mark.parametrize("name", ["llama_8b", "llama_70b"])
def test_shipped_llama_configs_validate(name):
  cfg = _load(name)
  validate(cfg, num_devices=8)
  assert cfg.model.attention == "cudnn" and not cfg.model.tie_embeddings
  assert cfg.data.seq_len == cfg.model.max_seq_len == 8192


def test_llama_8b_shapes_without_allocating():
  setup = build(_on_cpu(_load("llama_8b")), jax.devices())
  assert setup.num_params == 8_030_261_248  # Llama-3-8B
  params = setup.abstract_state["params"]
  assert params["embed"]["table"].shape == params["lm_head"]["table"].shape == (128256, 4096)
  attn, mlp = params["blocks"]["attn"], params["blocks"]["mlp"]
  assert attn["q"].shape == (32, 4096, 32, 128) and attn["k"].shape == (32, 4096, 8, 128)
  assert mlp["gate"].shape == (32, 4096, 14336)
  assert attn["q"].sharding.shard_shape(attn["q"].shape) == (32, 512, 32, 128)  # embed over fsdp=8


def test_llama_70b_shapes_without_allocating():
  setup = build(_on_cpu(_load("llama_70b")), jax.devices())  # tensor=8, fsdp=1 on 8 devices
  assert setup.num_params == 70_553_706_496  # Llama-3-70B
  assert dict(setup.mesh.shape) == {"data": 1, "stage": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 8}
  params = setup.abstract_state["params"]
  q, gate = params["blocks"]["attn"]["q"], params["blocks"]["mlp"]["gate"]
  assert q.shape == (80, 8192, 64, 128) and gate.shape == (80, 8192, 28672)
  assert q.sharding.shard_shape(q.shape) == (80, 8192, 8, 128)  # heads over tensor=8
  assert gate.sharding.shard_shape(gate.shape) == (80, 8192, 3584)
