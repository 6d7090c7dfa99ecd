"""Metric writers (TensorBoard event files and ``metrics.jsonl``), throughput and MFU."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections

# Dense bf16 peak FLOP/s per device, by substrings of ``jax.Device.device_kind``.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def flops_per_token(cfg: ml_collections.ConfigDict, num_params: int) -> float:
  """Training FLOPs per token: 6 * (matmul parameters) + 12 * l * n * h * t for attention.

  The input embedding (and a learned position table) is a lookup, not a matmul, so it is
  left out unless it is tied to the output projection. The attention term counts QK^T and
  AV without causal savings, over min(t, model.sliding_window) keys per query.
  """
  m = cfg.model
  lookups = (0 if m.tie_embeddings else m.vocab_size * m.embed_dim) + (
      m.max_seq_len * m.embed_dim if m.position_embedding == "learned" else 0)
  keys = min(cfg.data.seq_len, m.sliding_window) if m.sliding_window > 0 else cfg.data.seq_len
  return 6.0 * (num_params - lookups) + 12.0 * m.num_layers * m.num_heads * m.head_dim * keys


def peak_flops_per_device(cfg: ml_collections.ConfigDict) -> float | None:
  if cfg.train.peak_flops_per_device > 0:
    return cfg.train.peak_flops_per_device
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS:
    if name in kind:
      return peak
  return None


class Throughput:
  """Tokens/s and MFU over the steps since the last call to :meth:`rate`."""

  def __init__(self, cfg: ml_collections.ConfigDict, num_params: int):
    self.flops_per_token = flops_per_token(cfg, num_params)
    peak = peak_flops_per_device(cfg)
    self.peak = None if peak is None else peak * jax.device_count()
    self.reset()

  def reset(self) -> None:
    self.start = time.perf_counter()
    self.tokens = 0

  def add(self, tokens: int) -> None:
    self.tokens += tokens

  def rate(self) -> dict[str, float]:
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    tps = self.tokens / elapsed
    out = {"tokens_per_sec": tps, "model_flops_per_sec": tps * self.flops_per_token}
    if self.peak:
      out["mfu"] = out["model_flops_per_sec"] / self.peak
    self.reset()
    return out


class MetricsWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard; a no-op off process 0."""

  def __init__(self, workdir: str | Path, enabled: bool = True, keep_through_step: int | None = None):
    """``keep_through_step``: on a resume, records after the restored step are dropped
    (they will be written again), so the file holds each step once."""
    self.enabled = enabled
    self.path = Path(workdir) / "metrics.jsonl"
    self._tb = None
    if enabled:
      if keep_through_step is not None and self.path.exists():
        kept = [r for r in read_metrics(workdir) if r["step"] <= keep_through_step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
      self._file = open(self.path, "a")

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in scalars.items()}
    self._file.write(json.dumps({"step": step, **clean}) + "\n")
    self._file.flush()
    for k, v in clean.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()


def read_metrics(workdir: str | Path) -> list[dict[str, float]]:
  """The records of ``metrics.jsonl``, in order."""
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue  # a line cut short by a killed process
  return records
