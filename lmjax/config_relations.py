"""Checks between config fields that :func:`lmjax.config.validate` runs: the model's own
(:func:`check_model`) and those of the model and batch against the mesh
(:func:`check_parallelism`). ``fail(key, message)`` raises the ConfigError naming the key."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Fail = Callable[[str, str], None]
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the projections LoRA can adapt


def check_model(m: Any, d: Any, fail: Fail) -> None:
  """``config.model`` against itself and ``config.data``."""
  if m.num_heads % m.num_kv_heads:
    fail("model.num_kv_heads",
         f"model.num_heads ({m.num_heads}) must be divisible by model.num_kv_heads ({m.num_kv_heads}).")
  if m.head_dim % 2 and m.position_embedding == "rope":
    fail("model.head_dim", f"must be even for RoPE, got {m.head_dim}.")
  if m.rope_scaling != "none" and m.rope_scaling_factor < 1:
    fail("model.rope_scaling_factor", f"must be >= 1, got {m.rope_scaling_factor}.")
  if m.rope_scaling == "llama3" and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
    fail("model.rope_high_freq_factor",
         f"llama3 RoPE scaling needs 0 < model.rope_low_freq_factor ({m.rope_low_freq_factor}) "
         f"< model.rope_high_freq_factor ({m.rope_high_freq_factor}).")
  if m.rope_scaling == "yarn" and not 0 < m.rope_beta_slow < m.rope_beta_fast:
    fail("model.rope_beta_fast", f"yarn RoPE scaling needs 0 < model.rope_beta_slow ({m.rope_beta_slow}) "
                                 f"< model.rope_beta_fast ({m.rope_beta_fast}).")
  if m.rope_scaling in ("llama3", "yarn") and m.rope_original_max_len <= 0:
    fail("model.rope_original_max_len", f"must be positive, got {m.rope_original_max_len}.")
  if m.attention == "cudnn":
    if m.compute_dtype != "bfloat16":
      fail("model.compute_dtype", f"attention 'cudnn' needs bfloat16, got {m.compute_dtype!r}.")
    if m.head_dim % 8 or m.head_dim > 256:
      fail("model.head_dim", f"attention 'cudnn' needs a multiple of 8 up to 256, got {m.head_dim}.")
    if d.seq_len % 2:
      fail("data.seq_len", f"attention 'cudnn' needs an even sequence length, got {d.seq_len}.")
  if m.attention == "splash" and d.seq_len % 128:
    fail("data.seq_len", f"attention 'splash' needs a multiple of 128, got {d.seq_len}.")
  moe_part = m.num_layers - m.first_dense_layers  # the layers MoE and dense alternate in
  if m.num_experts and m.experts_per_token > m.num_experts:
    fail("model.experts_per_token", f"must be in [1, model.num_experts={m.num_experts}], got {m.experts_per_token}.")
  if m.num_experts and (moe_part <= 0 or moe_part % m.moe_every):
    fail("model.moe_every", f"the {moe_part} layers after model.first_dense_layers ({m.first_dense_layers}"
                            f") must be a positive multiple of model.moe_every ({m.moe_every}).")


def check_objective(cfg: Any, fail: Fail) -> None:
  """``train.objective`` against the model, the data format, LoRA and distillation."""
  m, d, t = cfg.model, cfg.data, cfg.train
  for target in m.lora_targets:
    if target not in LORA_TARGETS:
      fail("model.lora_targets", f"unknown projection {target!r}; choose from {LORA_TARGETS}.")
  if m.lora_rank and not m.lora_targets:
    fail("model.lora_targets", f"empty with model.lora_rank={m.lora_rank}; name the projections to adapt.")
  mlp_targets = [x for x in m.lora_targets if x in ("gate", "up", "down")]
  if m.lora_rank and m.num_experts and mlp_targets:
    fail("model.lora_targets", f"{mlp_targets} with model.num_experts={m.num_experts}: LoRA adapts a "
                               "mixture of experts' attention only; choose among q, k, v, o.")
  if (t.objective == "masked") == m.causal:
    fail("model.causal", f"{m.causal} with train.objective={t.objective!r}: the masked objective needs "
                         "model.causal=False (bidirectional attention), every other one True.")
  if t.objective == "masked" and d.format != "text":
    fail("data.format", f"{d.format!r} with train.objective='masked': the masked objective hides "
                        "tokens of whole documents; use data.format='text'.")
  if (t.objective == "dpo") != (d.format == "preference"):
    fail("data.format", f"{d.format!r} with train.objective={t.objective!r}: preference pairs "
                        "(data.format='preference') train with train.objective='dpo', and only they do.")
  if t.objective == "dpo" and not (t.reference or t.init_from):
    fail("train.reference", "dpo needs a frozen reference model: set train.reference or train.init_from "
                            "to a run directory.")
  if t.teacher and t.objective != "causal":
    fail("train.teacher", f"distillation trains with the next-token objective; got "
                          f"train.objective={t.objective!r}.")


def check_parallelism(cfg: Any, shape: dict[str, int], fail: Fail) -> None:
  """The batch, the model and the resolved mesh ``shape`` (axis -> size) against each other."""
  m, d, o = cfg.model, cfg.data, cfg.optim
  batch_shards = shape["data"] * shape["fsdp"] * shape["expert"]
  if d.global_batch_size % (batch_shards * o.grad_accum_steps):
    fail("data.global_batch_size", f"{d.global_batch_size} must be divisible by mesh data*fsdp*expert "
                                   f"({batch_shards}) times optim.grad_accum_steps ({o.grad_accum_steps}).")
  if shape["expert"] > 1 and m.num_experts % shape["expert"]:
    fail("mesh.expert", f"{shape['expert']} does not divide model.num_experts ({m.num_experts}).")
  stages = shape["stage"]
  if stages > 1:
    chunks = stages * m.pipeline_repeats
    if m.num_layers % chunks:
      fail("model.num_layers", f"{m.num_layers} layers cannot be split into mesh.stage "
                               f"({stages}) x model.pipeline_repeats ({m.pipeline_repeats}) chunks.")
    micro = m.pipeline_microbatches if m.pipeline_microbatches > 0 else stages
    rows = d.global_batch_size // o.grad_accum_steps
    if rows % (micro * batch_shards):
      fail("model.pipeline_microbatches",
           f"{micro} microbatches of the {rows}-row batch (data.global_batch_size / "
           f"optim.grad_accum_steps) must each divide over mesh data*fsdp*expert ({batch_shards}).")
    if m.lora_rank and m.pipeline_schedule == "1f1b":
      fail("model.pipeline_schedule", f"'1f1b' with model.lora_rank={m.lora_rank}: LoRA pipelines "
                                      "with the 'gpipe' schedule only.")
    if m.num_experts:
      fail("mesh.stage", f"{stages} pipeline stages with model.num_experts={m.num_experts}: MoE "
                         "models do not pipeline; use mesh.stage=1 (expert, fsdp, tensor).")
    if m.pipeline_schedule == "1f1b" and m.pipeline_repeats > 1 and micro % stages:
      fail("model.pipeline_microbatches",
           f"an interleaved 1F1B pipeline (model.pipeline_repeats={m.pipeline_repeats}) "
           f"passes groups of mesh.stage ({stages}) microbatches; got {micro}, not a multiple.")
    if m.pipeline_repeats > 1 and micro < stages:
      fail("model.pipeline_microbatches",
           f"a circular pipeline (model.pipeline_repeats={m.pipeline_repeats}) needs at least "
           f"as many microbatches as stages ({stages}), got {micro}.")
  context = shape["context"]
  if context > 1:
    pieces = context * (2 if m.context_load_balance else 1)
    if d.seq_len % pieces:
      fail("data.seq_len", f"{d.seq_len} must divide into mesh.context ({context}) x "
           f"{'2 chunks (model.context_load_balance)' if m.context_load_balance else '1'} = {pieces} "
           "equal pieces.")
    if not m.causal:
      fail("mesh.context", f"{context} with model.causal=False: bidirectional attention does not "
           "split the sequence; use mesh.context=1.")
    if m.num_experts:
      fail("mesh.context", f"{context} with model.num_experts={m.num_experts}: MoE models do not "
           "split the sequence yet; use mesh.context=1.")
    if stages > 1:
      fail("mesh.context", f"{context} with mesh.stage={stages}: pipelined models do not split the "
           "sequence; use one of them.")
    if m.attention not in ("xla", "blockwise"):
      fail("model.attention", f"{m.attention!r} with mesh.context={context}: context parallelism "
           "computes attention itself (model.context_attention); use 'xla' or 'blockwise'.")
