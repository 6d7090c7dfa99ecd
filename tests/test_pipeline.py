"""Pipeline parallelism: every schedule equals the non-pipelined model, and stages talk
by collective-permute of one microbatch, never by gathering the activation stack."""

import re

import jax
import pytest

from lmjax.config import ConfigError, validate
from lmjax.model.pipeline import bubble_fraction
from tests.layouts import BATCH, SEQ, assert_same_step, config, run

SCHEDULES = [
    "stage4_data2_m2",  # GPipe, fewer microbatches than stages
    "stage4_data2_m8",  # GPipe, more microbatches than stages
    "stage2_fsdp4_circular_m2",  # circular, 2 repeats of 2 stages, M = S
    "stage2_data4_circular_m4",  # circular, M > S (outputs wait for stage 0)
]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCHEDULES)
def test_pipeline_schedules_equal_the_plain_model(name):
  assert_same_step(run("single"), run(name))


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


def test_stages_communicate_by_collective_permute_of_one_microbatch():
  hlo = run("stage4_data2_m8")["compiled"].as_text()
  ops = _loop_collectives(hlo)
  # One microbatch per device: 16 rows / 8 microbatches / data 2 = 1 row of (t, d).
  one_microbatch = f"f32[1,1,{SEQ},32]"
  assert ops.get("collective-permute"), ops
  assert all(s.startswith(one_microbatch) for s in ops["collective-permute"]), ops
  assert "all-gather" not in ops, ops  # nothing gathers the activation stack per iteration
  assert "all-to-all" not in ops, ops


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
