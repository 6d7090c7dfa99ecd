"""Metric writers (``metrics.jsonl``, TensorBoard, W&B, MLflow), throughput and MFU, the
progress bar's clock, the end-of-run summary and the warnings a run's start owes its user."""

from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from lmjax import config as config_lib
from lmjax import storage
from lmjax.model.config import ModelConfig
from lmjax.optim import learning_rate_schedule

TRACKERS = ("tensorboard", "wandb", "mlflow")  # train.trackers: besides metrics.jsonl (always)
SUMMARY_FILE = "summary.json"
# The keys optim.learning_rate_schedule reads.
SCHEDULE_KEYS = ("optim.learning_rate", "optim.schedule", "optim.warmup_steps", "optim.decay_steps",
                 "optim.decay_fraction", "optim.decay_shape", "optim.end_lr_fraction", "train.steps")

# Dense bf16 peak FLOP/s per device, by substrings of ``jax.Device.device_kind``.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12),
    ("TPU v6", 918e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
)


def flops_per_token(cfg: ml_collections.ConfigDict, num_params: int) -> float:
  """Training FLOPs per token: 6 * (matmul parameters a token uses) + 12 * l * n * h * t for
  attention.

  The input embedding (and a learned position table) is a lookup, not a matmul, so it is
  left out unless it is tied to the output projection; so are the experts a token is not
  routed to (:func:`inactive_params`). The attention term counts QK^T and AV without causal
  savings, over min(t, model.sliding_window) keys per query.
  """
  m = cfg.model
  lookups = (0 if m.tie_embeddings else m.vocab_size * m.embed_dim) + (
      m.max_seq_len * m.embed_dim if m.position_embedding == "learned" else 0) + inactive_params(m)
  keys = min(cfg.data.seq_len, m.sliding_window) if m.sliding_window > 0 else cfg.data.seq_len
  return 6.0 * (num_params - lookups) + 12.0 * m.num_layers * m.num_heads * m.head_dim * keys


# Per-expert load scalars are written while there are at most this many (layers x experts).
MAX_EXPERT_SCALARS = 256


def expert_load_scalars(m: ml_collections.ConfigDict, load: Any) -> dict[str, float]:
  """Metrics of a MoE step's ``expert_load`` (l_moe, E) (assignments per expert; None for a
  dense model): per MoE layer i (its index in the model), ``moe/layer{i}/max_load`` and
  ``min_load``, the busiest and idlest expert's share of the layer's assignments times E
  (1 = balanced), and, while layers x experts <= MAX_EXPERT_SCALARS, each expert's share
  ``moe/layer{i}/expert{j}``."""
  if load is None:
    return {}
  load = np.asarray(load, np.float64)
  share = load / np.maximum(load.sum(axis=-1, keepdims=True), 1.0)
  out = {}
  for i, row in zip(ModelConfig.from_config(m).moe_layers, share):
    out[f"moe/layer{i}/max_load"] = float(row.max() * row.size)
    out[f"moe/layer{i}/min_load"] = float(row.min() * row.size)
    if share.size <= MAX_EXPERT_SCALARS:
      out.update({f"moe/layer{i}/expert{j}": float(v) for j, v in enumerate(row)})
  return out


def inactive_params(m: ml_collections.ConfigDict) -> int:
  """Parameters of the routed experts a token does not go through: (E - k) experts per MoE
  layer (0 for a dense model). Total minus these is the active parameter count."""
  if not m.num_experts:
    return 0
  per_expert = (3 if m.mlp == "swiglu" else 2) * m.embed_dim * (m.expert_mlp_dim or m.mlp_dim)
  moe_layers = len(ModelConfig.from_config(m).moe_layers)
  return moe_layers * (m.num_experts - m.experts_per_token) * per_expert


def peak_flops_per_device(cfg: ml_collections.ConfigDict) -> float | None:
  if cfg.train.peak_flops_per_device > 0:
    return cfg.train.peak_flops_per_device
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_FLOPS:
    if name in kind:
      return peak
  return None


class Throughput:
  """Tokens/s and MFU over the steps since the last call to :meth:`rate` or :meth:`reset`,
  and over all such windows (:meth:`mean`): the caller resets after what is not training
  (the first step's compilation, an eval)."""

  def __init__(self, cfg: ml_collections.ConfigDict, num_params: int):
    self.flops_per_token = flops_per_token(cfg, num_params)
    peak = peak_flops_per_device(cfg)
    self.peak = None if peak is None else peak * jax.device_count()
    self.total_tokens = self.total_sec = 0.0
    self.reset()

  def reset(self) -> None:
    self.start = time.perf_counter()
    self.tokens = 0

  def add(self, tokens: int) -> None:
    self.tokens += tokens

  def rate(self) -> dict[str, float]:
    elapsed = max(time.perf_counter() - self.start, 1e-9)
    self.total_tokens += self.tokens
    self.total_sec += elapsed
    out = self._rates(self.tokens / elapsed)
    self.reset()
    return out

  def mean(self) -> dict[str, float]:
    """Tokens/s (and MFU) over every window :meth:`rate` closed; {} before the first."""
    return self._rates(self.total_tokens / self.total_sec) if self.total_sec else {}

  def _rates(self, tps: float) -> dict[str, float]:
    out = {"tokens_per_sec": tps, "model_flops_per_sec": tps * self.flops_per_token}
    if self.peak:
      out["mfu"] = out["model_flops_per_sec"] / self.peak
    return out

  def mfu_note(self) -> str | None:
    """Why MFU is not reported (no known peak FLOP/s for the device), or None if it is."""
    if self.peak:
      return None
    kind = jax.devices()[0].device_kind
    return (f"MFU: not reported on {jax.default_backend()} (no known peak FLOP/s for device "
            f"kind {kind!r}); set train.peak_flops_per_device to measure it.")


# On an object store, metrics.jsonl and the event files are uploaded whole at most this often
# (seconds) and when the run ends; metrics.jsonl also at each checkpoint (MetricsWriter.flush).
FLUSH_EVERY = 30.0

def check_trackers(trackers: tuple[str, ...]) -> None:
  """ConfigError for an unknown tracker or one whose package is not installed."""
  for name in trackers:
    if name not in TRACKERS:
      raise config_lib.ConfigError(
          f"config.train.trackers: unknown tracker {name!r}; choose from {TRACKERS} "
          "(metrics.jsonl is always written).")
    if name != "tensorboard":
      try:
        importlib.import_module(name)
      except ImportError:
        raise config_lib.ConfigError(
            f"config.train.trackers: {name!r} needs the {name} package, which is not "
            f'installed: pip install "lmjax[{name}]".') from None


class _EventFiles:
  """tensorboardX's writer factory for ``gs://`` and ``s3://`` logdirs: event files through
  lmjax's storage layer, uploaded whole (object stores cannot append) at most every
  FLUSH_EVERY seconds and when closed."""

  def open(self, path: str) -> storage.WholeFileWriter:
    return storage.WholeFileWriter(path, every=FLUSH_EVERY)

  def directory_check(self, path: str) -> None:
    pass  # an object store has no directories to make


class _TensorBoard:
  """Event files in ``workdir/tensorboard``; each event's wall time is the record's ``time``."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: Any, name: str):
    from tensorboardX import SummaryWriter, record_writer
    for prefix in storage.SCHEMES:
      record_writer.register_writer_factory(prefix, _EventFiles())
    self._tb = SummaryWriter(os.fspath(workdir / "tensorboard"))

  def write(self, step: int, scalars: dict[str, float], walltime: float) -> None:
    for k, v in scalars.items():
      if math.isfinite(v):
        self._tb.add_scalar(k, v, step, walltime=walltime)
    self._tb.flush()

  def close(self, status: str) -> None:
    self._tb.close()


class _Wandb:
  """A W&B run in ``workdir/wandb`` (offline too: ``WANDB_MODE=offline``)."""

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: Any, name: str):
    import wandb
    project = cfg.train.project or os.environ.get("WANDB_PROJECT") or "lmjax"
    # W&B keeps its files on local disk: a run in a bucket keeps them in lmjax's cache.
    local = (os.path.join(storage.cache_root(), "wandb") if storage.is_url(workdir)
             else os.fspath(workdir))
    os.makedirs(local, exist_ok=True)
    self._run = wandb.init(project=project, name=name, dir=local, config=cfg.to_dict())

  def write(self, step: int, scalars: dict[str, float], walltime: float) -> None:
    self._run.log(scalars, step=step)

  def close(self, status: str) -> None:
    self._run.summary["status"] = status
    self._run.finish(exit_code=0 if status in ("completed", "stopped") else 1)


class _Mlflow:
  """An MLflow run at ``$MLFLOW_TRACKING_URI`` (MLflow's default store if unset), with the
  config, flattened, as its parameters."""

  _STATUS = {"completed": "FINISHED", "stopped": "KILLED"}

  def __init__(self, cfg: ml_collections.ConfigDict, workdir: Any, name: str):
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient
    self._client = MlflowClient()
    experiment = cfg.train.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "lmjax"
    found = self._client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else self._client.create_experiment(experiment)
    run = self._client.create_run(experiment_id, run_name=name, tags={"lmjax.workdir": str(workdir)})
    self._run_id = run.info.run_id
    params = [Param(k, str(v)[:6000]) for k, v in config_lib._flat(cfg).items()]
    self._client.log_batch(self._run_id, params=params)

  def write(self, step: int, scalars: dict[str, float], walltime: float) -> None:
    from mlflow.entities import Metric
    ms = int(walltime * 1000)
    self._client.log_batch(self._run_id, metrics=[Metric(k, v, ms, step) for k, v in scalars.items()])

  def close(self, status: str) -> None:
    self._client.set_terminated(self._run_id, self._STATUS.get(status, "FAILED"))


class MetricsWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and the trackers of ``train.trackers``
  (TensorBoard, W&B, MLflow); a no-op off process 0, except that every process checks the
  trackers' packages (ConfigError naming the extra to install)."""

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True, keep_through_step: int | None = None,
               cfg: ml_collections.ConfigDict | None = None, started: float | None = None):
    """``keep_through_step``: on a resume, records after the restored step move to
    ``metrics.after-step-<N>.<time>.jsonl`` (they will be written again), so the file holds
    each step once and nothing is lost. ``started``: the
    ``time.time()`` that ``elapsed_sec`` counts from (default: now)."""
    cfg = cfg if cfg is not None else config_lib.default_config()
    check_trackers(cfg.train.trackers)
    self.enabled = enabled
    self.workdir = storage.path(workdir)
    self.path = self.workdir / "metrics.jsonl"
    self.started = time.time() if started is None else started
    self.status = "failed"  # until finish() says otherwise
    self.dropped: Any = None  # where records after keep_through_step were moved
    self._trackers: list[Any] = []
    if enabled:
      storage.makedirs(self.workdir)
      if keep_through_step is not None and self.path.exists():
        records = read_metrics(workdir)
        kept = [r for r in records if r["step"] <= keep_through_step]
        if len(kept) < len(records):  # kept aside, never lost
          self.dropped = self.workdir / f"metrics.after-step-{keep_through_step}.{time.strftime('%Y%m%dT%H%M%S')}.jsonl"
          storage.write_text(self.dropped, "".join(json.dumps(r) + "\n" for r in records
                                                   if r["step"] > keep_through_step))
          storage.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
      # On an object store the file is uploaded whole (at most every FLUSH_EVERY seconds).
      existing = self.path.read_bytes() if storage.is_url(self.path) and self.path.exists() else b""
      self._file = storage.WholeFileWriter(self.path, existing, every=FLUSH_EVERY)
      name = cfg.train.run_name or storage.absolute(self.workdir).name
      kinds = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow}
      try:
        for tracker in dict.fromkeys(cfg.train.trackers):
          self._trackers.append(kinds[tracker](cfg, self.workdir, name))
      except BaseException:
        self.close()
        raise

  def write(self, step: int, scalars: dict[str, Any]) -> dict[str, float]:
    """Writes one record: ``scalars`` with ``time`` (Unix seconds) and ``elapsed_sec`` added
    (the trackers keep their own wall clock in place of ``time``); returns the record."""
    now = time.time()
    clean = {k: float(v) for k, v in scalars.items()}
    clean.update(time=now, elapsed_sec=now - self.started)
    if self.enabled:
      self._file.write((json.dumps({"step": step, **clean}) + "\n").encode())
      self._upload(force=False)
      tracked = {k: v for k, v in clean.items() if k != "time"}
      for tracker in self._trackers:
        tracker.write(step, tracked, now)
    return clean

  def flush(self) -> None:
    """Uploads metrics.jsonl now (on an object store; a local file is always current)."""
    if self.enabled:
      self._upload(force=True)

  def _upload(self, force: bool) -> None:
    """Flushes metrics.jsonl; on an object store, an upload that still fails after the file
    system's retries is one StorageError (the records stay here for the next upload)."""
    try:
      self._file.flush(force=force)
    except Exception as e:  # noqa: BLE001 - any failure of the store becomes one line
      raise storage.StorageError(f"{storage.explain(self.path, e)} (uploading it failed; rerun "
                                 "the same command to resume from the newest checkpoint)") from e

  def finish(self, summary: dict[str, Any]) -> None:
    """Writes ``summary.json`` and marks the trackers' runs done with ``summary["status"]``."""
    self.status = summary["status"]
    if self.enabled:
      self._upload(force=True)
      storage.write_text(self.workdir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")

  def close(self) -> None:
    """Closes the files and the trackers' runs (failed unless :meth:`finish` came first)."""
    if self.enabled and not self._file.closed:
      self._file.close()
      while self._trackers:
        tracker = self._trackers.pop()
        try:
          tracker.close(self.status)
        except Exception as e:  # noqa: BLE001 - a tracker's failure must not hide the run's
          logging.getLogger("lmjax").warning("closing %s failed: %r", type(tracker).__name__[1:], e)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, float]]:
  """The records of ``metrics.jsonl``, in order."""
  path = storage.path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except ValueError:
      continue  # a line cut short by a killed process
  return records


def restart_clock(bar: Any) -> None:
  """Restarts a tqdm bar's elapsed time and rate at its current count, so that its rate
  and ETA leave out what came before (the first step's compilation)."""
  n = bar.n
  bar.refresh = lambda *args, **kwargs: None  # reset() would draw the bar at 0 once
  try:
    bar.reset()  # the clock and the smoothed rate
  finally:
    del bar.refresh
  bar.n = bar.last_print_n = bar.initial = n
  bar.refresh()


def _duration(seconds: float) -> str:
  seconds = round(seconds)
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class RunSummary:
  """What one ``train`` call did: steps, tokens, time, throughput, final losses, skipped
  steps and data records; :meth:`finish` gives ``summary.json``'s dict and the lines to print."""

  def __init__(self, workdir: str | os.PathLike, checkpoints: str | os.PathLike, start_step: int,
               target_step: int, started: float, throughput: Throughput):
    self.workdir, self.checkpoints = str(workdir), storage.path(checkpoints)
    self.start_step, self.target_step = start_step, target_step
    self.started, self.loop_started = started, time.time()
    self.throughput = throughput
    self.tokens, self.first_step_sec = 0.0, None
    self.last: dict[str, float] = {}
    self.eval_loss = None

  def add(self, record: dict[str, float], step_tokens: list[float]) -> None:
    """One logged record and the real tokens of each step it covers."""
    if self.first_step_sec is None:  # the first record is the first step, compilation included
      self.first_step_sec = time.time() - self.loop_started
    self.tokens += sum(step_tokens)
    self.last = record
    self.eval_loss = record.get("eval_loss", self.eval_loss)

  def finish(self, stopped: bool = False, stop_signal: int | None = None
             ) -> tuple[dict[str, Any], list[str]]:
    """``summary.json``'s dict and the printed lines; ``stopped``: before ``target_step``, on
    ``stop_signal`` (None: another process's)."""
    stop_signal = stop_signal if stopped else None
    end = int(self.last.get("step", self.start_step))
    mean = self.throughput.mean()
    skipped = {k.split("/", 1)[1]: int(v) for k, v in self.last.items() if k.startswith("data_skipped/")}
    out = {
        "status": "stopped" if stopped else "completed",
        "stop_signal": stop_signal, "workdir": self.workdir,
        "checkpoint": str(self.checkpoints / str(end)),
        "start_step": self.start_step, "end_step": end, "target_step": self.target_step,
        "steps": end - self.start_step, "wall_sec": time.time() - self.started,
        "first_step_sec": self.first_step_sec, "tokens": int(self.tokens),
        "tokens_per_sec": mean.get("tokens_per_sec"), "mfu": mean.get("mfu"),
        "loss": self.last.get("loss"), "eval_loss": self.eval_loss,
        "skipped_steps": int(self.last.get("skipped_steps", 0)),
        "data_skipped": int(self.last.get("data_skipped", 0)), "data_skipped_by_reason": skipped,
        "data_truncated": int(self.last.get("data_truncated", 0)),
    }
    how = "completed" if not stopped else (
        f"stopped by signal {stop_signal}" if stop_signal else "stopped with the other processes")
    first = f" (first step, compiling: {_duration(self.first_step_sec)})" if self.first_step_sec else ""
    rate = f" at {mean['tokens_per_sec']:,.0f} tokens/s" if mean else ""
    if mean.get("mfu"):
      rate += f" (MFU {mean['mfu']:.1%})"
    losses = f"loss {out['loss']:.4g}" if out["loss"] is not None else "no loss"
    if self.eval_loss is not None:
      losses += f", eval loss {self.eval_loss:.4g}"
    data = f"{out['data_skipped']:,} data records skipped" + (
        " (" + ", ".join(f"{k}: {n:,}" for k, n in sorted(skipped.items())) + ")" if skipped else "")
    if out["data_truncated"]:
      data += f", {out['data_truncated']:,} documents truncated"
    lines = [
        f"summary: {how}, steps {self.start_step}..{end} of {self.target_step} in "
        f"{_duration(out['wall_sec'])}{first}; {out['tokens']:,} tokens{rate}; {losses}; "
        f"{out['skipped_steps']} skipped steps; {data}.",
        f"run directory {self.workdir}: checkpoint step {end}, {SUMMARY_FILE}, metrics.jsonl.",
    ]
    return out, lines


def schedule_change(cfg: ml_collections.ConfigDict, saved: dict[str, Any], step: int) -> str | None:
  """A one-line warning when resuming at ``step`` under ``cfg`` changes the learning rate
  from what the checkpoint's config ``saved`` (a dict) would give; None when it does not."""
  old, changed = copy.deepcopy(cfg), []
  for key in SCHEDULE_KEYS:
    section, name = key.split(".")
    was = saved.get(section, {}).get(name, cfg[section][name])
    if was != cfg[section][name]:
      changed.append(f"{key} {was} -> {cfg[section][name]}")
      old[section][name] = was
  if not changed:
    return None
  steps = np.arange(step, max(old.train.steps, cfg.train.steps) + 1)
  was, now = (np.asarray(learning_rate_schedule(c)(steps)) for c in (old, cfg))
  if np.array_equal(was, now):
    return None  # e.g. train.steps alone changed under a fixed optim.decay_steps
  return (f"the learning-rate schedule differs from the checkpoint's ({'; '.join(changed)}): from "
          f"step {step + 1} on the learning rate follows the new schedule ({now[0]:.4g} at step "
          f"{step + 1}, was {was[0]:.4g}); set the old values to keep the old schedule.")
