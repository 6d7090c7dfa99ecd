"""`lmjax plan`: exact state bytes, the compiled memory estimate, its verdict and suggestions,
attention kernels planned with the blockwise backend, and the command line. Shipped model
shapes, small batches; compiled results are shared through module fixtures (and
lmjax.plan's cache)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmjax import plan as plan_lib
from lmjax.config import ConfigError, default_config
from lmjax.config_file import parse_size
from lmjax.metrics import flops_per_token

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def _load(name, **overrides):
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config()
  for key, value in overrides.items():
    section, field = key.split("__")
    cfg[section][field] = value
  return cfg


@pytest.fixture(scope="module")
def plan_8b():
  """Llama-3-8B (cudnn attention: planned with the stand-in) on fsdp=8, 8 rows of 1024."""
  cfg = _load("llama_8b", data__global_batch_size=8, data__seq_len=1024)
  return plan_lib.plan(cfg, 8, accelerator="h100", suggest=False)


@pytest.mark.slow
def test_state_bytes_per_device_are_exact(plan_8b):
  mem = plan_8b.measured.memory
  norms = 2 * 32 * 4096 + 4096  # attn_norm, mlp_norm per layer, final norm: replicated
  assert plan_8b.num_params == 8_030_261_248
  assert mem.params == 4 * ((plan_8b.num_params - norms) // 8 + norms)  # fp32 over fsdp=8
  assert 0 <= mem.opt_state - 2 * mem.params <= 64  # AdamW mu and nu, plus int32 counts
  assert mem.batch == 4 * 4 * 1 * 1024  # inputs, targets, segment_ids, positions: 1 row each
  assert abs(mem.xla_arguments - mem.state_and_batch) < 2**20  # XLA agrees
  assert plan_8b.replicated[0] == 3 and plan_8b.replicated[1] == 4 * norms
  assert plan_8b.largest_shard[:3] == ("blocks.mlp.down", (32, 14336, 4096), (32, 14336, 512))
  assert mem.temp > mem.params  # gradients alone are as large as the parameters
  assert mem.total == mem.state_and_batch + mem.temp + mem.outputs + mem.code


def test_flops_and_step_time(plan_8b):
  p = plan_8b
  assert p.tokens == 8 * 1024
  assert p.model_flops == flops_per_token(p.cfg, p.num_params) * p.tokens
  # XLA's matmuls (loops x trip count, all devices) = model FLOPs + remat and attention extra.
  assert 1.0 < p.measured.dot_flops * 8 / p.model_flops < 1.5
  # cost_analysis is per device and counts the layer scan's body once.
  assert p.measured.xla_flops < p.model_flops / 8 / 4
  assert p.step_seconds() == pytest.approx(p.model_flops / (8 * 989e12))
  assert p.tokens_per_second == pytest.approx(p.tokens / p.step_seconds(0.4))
  assert p.stand_in and p.scores_bytes == 1 * 32 * 1024 * 1024 * 4
  assert p.block_bytes == 1 * 32 * 128 * 1024 * 4


def test_verdict_flips_with_the_memory(plan_8b):
  total = plan_8b.total_bytes
  fits = plan_lib.plan(plan_8b.cfg, 8, memory_bytes=int(total / 0.9) + 2**20, suggest=False)
  short = plan_lib.plan(plan_8b.cfg, 8, memory_bytes=int(total / 0.9) - 2**20, suggest=False)
  assert fits.total_bytes == short.total_bytes == total  # the same compile, cached
  assert fits.fits and not short.fits
  assert "fits" in plan_lib.format_plan(fits) and "DOES NOT FIT" in plan_lib.format_plan(short)
  report = plan_lib.format_plan(fits)
  for needle in ("parameters", "optimizer state", "activations, temporaries", "model FLOPs",
                 "XLA cost_analysis", "per device", "at 40% MFU", "planned with the 'blockwise' backend",
                 "128.00 MiB per layer", "XLA's CPU compiler"):
    assert needle in report, needle


@pytest.mark.slow
def test_suggestion_is_the_cheapest_that_fits_and_fits_when_planned_again():
  cfg = _load("llama_1b", data__global_batch_size=16, data__seq_len=2048)  # 2 rows/device
  base = plan_lib.plan(cfg, 8, suggest=False)
  full = plan_lib.plan(_load("llama_1b", data__global_batch_size=16, model__remat="full"), 8,
                       suggest=False)
  accum = plan_lib.plan(_load("llama_1b", data__global_batch_size=16, optim__grad_accum_steps=2),
                        8, suggest=False)
  assert accum.total_bytes < full.total_bytes < base.total_bytes
  # Room for accumulation but not for full remat: remat is tried first (cheaper) and fails.
  memory = int((accum.total_bytes + full.total_bytes) / 2 / 0.9)
  p = plan_lib.plan(cfg, 8, memory_bytes=memory)
  assert not p.fits
  assert [c.overrides for c in p.candidates] == [{"model.remat": "full"},
                                                 {"optim.grad_accum_steps": 2}]
  assert p.suggestion.overrides == {"optim.grad_accum_steps": 2}
  report = plan_lib.format_plan(p)
  assert "suggestion: add --config.optim.grad_accum_steps=2" in report and "too big" in report
  plan_lib._measure_saved.cache_clear()  # compile it afresh
  again = plan_lib.plan(_load("llama_1b", data__global_batch_size=16, optim__grad_accum_steps=2),
                        8, memory_bytes=memory)
  assert again.fits and again.total_bytes == p.suggestion.measured.memory.total


@pytest.mark.slow
def test_nothing_fits_says_how_many_devices_the_state_needs():
  p = plan_lib.plan(default_config(), 8, memory_bytes="1MiB", max_compiles=0)
  state = 3 * 4 * p.num_params  # fp32 parameters and two moments
  assert p.suggestion is None and p.min_devices == pytest.approx(state / (0.9 * 2**20), abs=1)
  assert "nothing tried fits" in plan_lib.format_plan(p)


def test_bad_config_or_mesh_fails_before_compiling(monkeypatch):
  monkeypatch.setattr(plan_lib, "_measure", lambda *a: pytest.fail("compiled a bad config"))
  cfg = _load("llama_8b", model__num_kv_heads=5)
  with pytest.raises(ConfigError, match=r"config.model.num_kv_heads: model.num_heads \(32\)"):
    plan_lib.plan(cfg, 8)
  with pytest.raises(ConfigError, match="config.mesh: the fixed axes .* which does not divide the 8"):
    plan_lib.plan(_load("llama_8b", mesh__tensor=3), 8)
  with pytest.raises(ConfigError, match="config.data.global_batch_size: 512 must be divisible"):
    plan_lib.plan(_load("llama_8b"), 6)
  with pytest.raises(RuntimeError, match="needs as many JAX devices.*jax_num_cpu_devices"):
    plan_lib.plan(_load("llama_8b"), 16)
  with pytest.raises(ValueError, match="unknown accelerator 'h900'"):
    plan_lib.plan(_load("llama_8b"), 8, accelerator="h900")


def test_parse_size():
  assert parse_size("80GiB") == 80 * GiB
  assert parse_size("80GB") == 80 * 10**9
  assert parse_size("16G") == 16 * GiB
  assert parse_size("1.5TiB") == int(1.5 * 2**40)
  assert parse_size("512 mib") == 512 * 2**20
  assert parse_size("4096") == 4096
  for bad in ("eighty", "80XB", "80iB", ""):
    with pytest.raises(ValueError, match="cannot read"):
      parse_size(bad)
  assert set(plan_lib.ACCELERATORS) == {"h100", "h200", "a100-40gb", "a100-80gb", "l4", "tpu-v4",
                                        "tpu-v5e", "tpu-v5p", "tpu-v6e"}
  assert plan_lib.ACCELERATORS["tpu-v5e"].memory_bytes == 16 * GiB


@pytest.mark.slow
def test_matmul_flops_count_loops_by_trip_count():
  cfg = default_config()
  cfg.model.num_layers = 4
  scanned = plan_lib.plan(cfg, 1, suggest=False)
  cfg.model.scan_layers = False
  unrolled = plan_lib.plan(cfg, 1, suggest=False)
  assert scanned.measured.dot_flops == pytest.approx(unrolled.measured.dot_flops, rel=1e-3)
  assert scanned.measured.dot_flops == pytest.approx(scanned.model_flops, rel=0.05)
  assert scanned.measured.xla_flops < 0.6 * unrolled.measured.xla_flops  # the body once


def _cli(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "lmjax.cli", "plan", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
def test_cli_plans_on_more_fake_devices_than_the_tests_have():
  out = _cli("--config", "configs/llama_1b.py", "--devices", "16", "--memory", "24GiB",
             "--accelerator", "a100-80gb", "--mfu", "0.5",
             "--config.data.global_batch_size=16", "--config.data.seq_len=512")
  assert out.returncode == 0, out.stderr
  for needle in ("16 devices: data 1, stage 1, fsdp 16, expert 1, context 1, tensor 1", "a100-80gb: 24.00 GiB",
                 "of 21.60 GiB usable", "at 50% MFU", "memory per device"):
    assert needle in out.stdout, needle


@pytest.mark.slow
def test_cli_bad_config_fails_naming_the_key():
  out = _cli("--config", "configs/llama_8b.py", "--devices", "256", "--config.model.num_kv_heads=5")
  assert out.returncode == 2 and "error: config.model.num_kv_heads" in out.stderr
  out = _cli("--config", "configs/llama_70b.py", "--devices", "12")  # tensor=8
  assert out.returncode == 2 and "error: config.mesh: the fixed axes" in out.stderr
  out = _cli("--config", "configs/llama_8b.py")
  assert out.returncode == 2 and "lmjax plan: the following arguments are required: --devices" in out.stderr


@pytest.mark.slow
def test_moe_plan_counts_active_flops_and_splits_experts():
  def moe(**mesh):
    cfg = default_config()
    cfg.model.num_experts, cfg.model.expert_mlp_dim = 8, 256
    cfg.mesh.fsdp = 1
    for axis, size in mesh.items():
      cfg.mesh[axis] = size
    return cfg

  ep, dp = plan_lib.plan(moe(expert=8), 8, suggest=False), plan_lib.plan(moe(data=8), 8, suggest=False)
  m = ep.cfg.model
  experts = 2 * 8 * 3 * m.embed_dim * 256  # 2 MoE layers x 8 experts x (gate, up, down)
  assert ep.num_params == dp.num_params and ep.model_flops == dp.model_flops
  assert ep.micro_rows == dp.micro_rows == 2  # 16 rows over expert=8 as over data=8
  assert ep.model_flops == flops_per_token(ep.cfg, ep.num_params) * ep.tokens
  attention = 12 * m.num_layers * m.num_heads * m.head_dim * ep.cfg.data.seq_len
  assert ep.model_flops == (6 * (ep.num_params - experts * 6 // 8) + attention) * ep.tokens
  # experts split 8 ways, everything else replicated on both meshes: parameters only
  assert dp.measured.memory.params - ep.measured.memory.params == 4 * experts * 7 // 8
  assert plan_lib._all_to_all_bytes(m, ep.mesh, 2, ep.cfg.data.seq_len) > 0  # in the estimate
  report = plan_lib.format_plan(ep)
  assert "active: 2 of 8 experts per token" in report and "expert 8" in report
