"""Training: the pure train step and the loop around it.

``train(cfg, workdir)`` is the whole job; the CLI and notebooks call it. Rerunning it with
the same ``workdir`` resumes from the newest checkpoint, data position included.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from tqdm import tqdm

from lmjax import config as config_lib
from lmjax import data as data_lib
from lmjax import evaluate as eval_lib
from lmjax import metrics as metrics_lib
from lmjax import frozen as frozen_lib
from lmjax import objectives, rundir, storage, workdir_lock
from lmjax.checkpoint import Checkpointer, CheckpointError
from lmjax.mesh import host_to_global, replicated
from lmjax.model import lora
from lmjax.metrics import MetricsWriter, RunSummary, Throughput, expert_load_scalars
from lmjax.model.moe import update_router_bias
from lmjax.optim import learning_rate_schedule
from lmjax.state import Batch, Setup, State, build, init_state, loss_and_grads



def train_step(setup: Setup, state: State, batch: Batch,
               frozen: dict[str, Any] | None = None) -> tuple[State, dict[str, jax.Array]]:
  """One optimizer update on ``batch``, accumulated over ``optim.grad_accum_steps`` microbatches.

  The loss is the mean over all real tokens of the batch, whatever the microbatching (the
  masked objective: over the tokens it hides, :func:`lmjax.objectives.training_batch`; dpo:
  over its pairs). ``frozen``: the parameters of ``setup.frozen`` (:mod:`lmjax.frozen`).
  """
  batch, objective_metrics = objectives.training_batch(setup, state["step"], batch)
  accum = setup.cfg.optim.grad_accum_steps
  z_loss = setup.cfg.train.z_loss
  m = setup.cfg.model

  # ((the weighted sum, sums that add up over microbatches), its gradient)
  grad_fn = functools.partial(loss_and_grads, setup.graphdef, z_loss=z_loss)
  if setup.frozen is not None:  # a DPO reference or a distillation teacher
    grad_fn = frozen_lib.objective_grads(setup, frozen)
  if accum == 1:
    (_, sums), grads = grad_fn(state["params"], batch)
  else:
    # (b, t) -> (accum, b/accum, t), keeping each device's rows on that device.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                         batch)

    def one(carry, mb):
      (_, sums), grads = grad_fn(state["params"], mb)
      return jax.tree.map(jnp.add, carry, (sums, grads)), None

    shapes = jax.eval_shape(grad_fn, state["params"], jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (shapes[0][1], shapes[1]))
    (sums, grads), _ = jax.lax.scan(one, zeros, micro)

  count = jnp.maximum(sums["weight"], 1.0)  # weighted tokens (dpo: pairs)
  objective = frozen_lib.step_metrics(setup, sums, count)
  loss = objective.pop("loss")  # the cross-entropy (the z-loss is reported apart), or the objective's
  grads = jax.tree.map(lambda g: g / count, grads)
  t = setup.cfg.train
  if t.debug_nan_at_step:
    poison = jnp.where(state["step"] + 1 == t.debug_nan_at_step, jnp.nan, 1.0)
    loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
  grad_norm = optax.global_norm(grads)  # before clipping (the optimizer clips)

  # A non-finite loss or gradient (or, optionally, a loss spike) leaves parameters and
  # optimizer state untouched; the step still counts, so data and schedule move on.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  window = state["loss_window"]
  seen = jnp.isfinite(window)
  n = jnp.sum(seen)
  mean = jnp.sum(jnp.where(seen, window, 0.0)) / jnp.maximum(n, 1)
  std = jnp.sqrt(jnp.sum(jnp.where(seen, (window - mean) ** 2, 0.0)) / jnp.maximum(n, 1))
  spike = (n == window.shape[0]) & (loss > mean + t.spike_threshold * std) if t.skip_spikes else jnp.array(False)
  # The window only learns from applied steps, so a lasting new loss level would be a spike
  # for ever: after spike_max_consecutive skipped in a row, the next spike is applied and the
  # window restarts empty (no detection until it refills: at least spike_window updates).
  accept_spike = state["spike_run"] >= t.spike_max_consecutive
  apply = finite & (~spike | accept_spike)
  window = jnp.where(apply & spike, jnp.full_like(window, jnp.nan), window)

  def update():  # of the parameters that train (a LoRA model's adapters), the rest kept
    trainable = lora.trainable(state["params"])
    updates, opt_state = setup.optimizer.update(grads, state["opt_state"], trainable)
    params = lora.combine(state["params"], optax.apply_updates(trainable, updates))
    if m.num_experts and m.router == "sigmoid" and m.router_bias_rate and not m.lora_rank:
      params = update_router_bias(params, sums["expert_load"], m.router_bias_rate)
    return params, opt_state

  # One conditional (as optax.apply_if_finite), not a select over every array: a select
  # keeps the old optimizer moments alive beside the new ones and costs a copy of each.
  params, opt_state = jax.lax.cond(apply, update, lambda: (state["params"], state["opt_state"]))
  new_state = {
      "step": state["step"] + 1,
      "params": params,
      "opt_state": opt_state,
      "loss_window": jnp.where(apply, window.at[state["step"] % window.shape[0]].set(loss), window),
      "spike_run": jnp.where(apply, 0, state["spike_run"] + spike.astype(jnp.int32)),
      "skipped": state["skipped"] + (~apply).astype(jnp.int32),
  }
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": optax.global_norm(new_state["params"]),
      "learning_rate": learning_rate_schedule(setup.cfg)(state["step"]),
      "tokens": count,
      **({"z_loss": sums["z"] / count} if z_loss else {}),
      **({"moe_aux_loss": sums["moe_aux"] / count, "router_z_loss": sums["router_z"] / count,
          "dropped_fraction": sums["dropped"] / jnp.maximum(sums["assigned"], 1.0),
          "expert_load": sums["expert_load"]} if m.num_experts else {}),
      "nonfinite": ~finite,
      "spike": spike,
      "skipped_steps": new_state["skipped"],
      **objective_metrics,
      **objective,  # dpo: its rewards (and tokens); distillation: ce and distill_kl
  }
  return new_state, metrics


def compile_train_step(setup: Setup) -> Callable:
  """The jitted train step (state donated, explicit shardings), called and lowered under the
  setup's mesh and rules: ``(state, batch)``, and a run with a frozen model (DPO,
  distillation) also that model's parameters, ``(state, batch, frozen)``."""
  shardings = (setup.state_shardings, setup.batch_sharding)
  if setup.frozen is not None:
    shardings += (frozen_lib.shardings(setup),)
  step = jax.jit(functools.partial(train_step, setup), in_shardings=shardings,
                 out_shardings=(setup.state_shardings, replicated(setup.mesh)), donate_argnums=0)

  def args(state, batch, frozen):
    return (state, batch) if setup.frozen is None else (state, batch, frozen)

  @functools.wraps(step)
  def call(state: State, batch: Batch, frozen: dict[str, Any] | None = None):
    with setup.context():
      return step(*args(state, batch, frozen))

  def lower(state, batch, frozen=None):
    with setup.context():
      return step.lower(*args(state, batch, frozen))

  call.lower = lower
  return call


def _evaluate(setup: Setup, params: Any, batches, max_batches: int,
              frozen: dict[str, Any] | None = None) -> dict[str, float]:
  """Held-out loss and perplexity (the masked objective: masked loss and accuracy) over up to
  ``max_batches`` batches (none if it is empty); a run with a frozen model:
  :func:`lmjax.frozen.evaluate`'s metrics."""
  if setup.frozen is not None:
    return frozen_lib.evaluate(setup, params, frozen, batches, max_batches)
  out = eval_lib.perplexity(setup, params, None, batches, max_batches, allow_empty=True)
  return {f"eval_{k}": out[k] for k in ("loss", "perplexity", "masked_accuracy") if k in out}


def _say(message: str) -> None:
  """A one-line status message from process 0, kept clear of the progress bar."""
  if jax.process_index() == 0:
    tqdm.write(f"lmjax: {message}")


def _initial_params(cfg: ml_collections.ConfigDict, setup: Setup, init: Any) -> Any:
  """The parameters of ``train.init_from``'s checkpoint, on this run's mesh, over ``init``:
  a LoRA run from a run without adapters keeps its fresh adapters."""
  try:
    step, params, _ = rundir.restore_params(cfg.train.init_from, setup, cfg.train.init_step,
                                            warn=lambda m: _say(f"warning: {m}"))
  except CheckpointError as e:
    raise config_lib.ConfigError(f"config.train.init_from: {e}") from None
  _say(f"parameters from {rundir.checkpoint_dir(cfg.train.init_from) / str(step)}; "
       "optimizer state starts fresh")
  return lora.combine(init, params)


class TrainingHalted(RuntimeError):
  """Training stopped on a non-finite loss or gradient (``train.nan_policy='halt'``)."""


class _StopRequest:
  """SIGTERM (a preemption notice) or Ctrl-C asks the loop to save and stop after the
  current step; across processes, JAX's preemption sync point makes all stop together."""

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      return bool(multihost_utils.reached_preemption_sync_point(step)) or self.signal is not None
    return self.signal is not None


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike,
          devices: list[jax.Device] | None = None) -> list[dict[str, float]]:
  """Trains ``cfg`` in ``workdir`` (resuming from its newest usable checkpoint); returns
  the metric records written by this call.

  SIGTERM or Ctrl-C saves a checkpoint after the current step and returns; rerunning the
  same call resumes. Raises TrainingHalted on a non-finite loss under nan_policy='halt'.
  The run holds ``workdir`` (:mod:`lmjax.workdir_lock`) until it returns or raises: another
  run on it raises WorkdirInUse at once. A start that is refused (another model, another
  vocabulary) leaves the directory as it was.
  """
  started = time.time()
  workdir = storage.path(workdir)
  with workdir_lock.hold(workdir, warn=lambda m: _say(f"warning: {m}")):
    return _train(cfg, workdir, devices, started)


def _train(cfg: ml_collections.ConfigDict, workdir: os.PathLike, devices: list[jax.Device] | None,
           started: float) -> list[dict[str, float]]:
  """:func:`train` once the workdir is held (since ``started``, Unix seconds)."""
  metrics_lib.check_trackers(cfg.train.trackers)
  setup = build(cfg, devices)
  is_main = jax.process_index() == 0
  tokenizer = rundir.run_tokenizer(cfg)  # fine-tuning speaks the pre-trained run's tokenizer
  rundir.check_vocab(cfg, tokenizer)
  setup = objectives.attach(setup, tokenizer)  # the masked objective's ids
  setup = frozen_lib.attach(setup, tokenizer)  # a DPO reference or a teacher, checked
  storage.makedirs(workdir)

  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  make_iterator = lambda: data_lib.make_iterator(cfg, tokenizer, split="train", **proc)
  make_eval_iterator = lambda: data_lib.make_iterator(cfg, tokenizer, split="eval", **proc)
  checkpointer = Checkpointer(workdir / rundir.CHECKPOINTS, cfg)
  latest, state, train_iter = checkpointer.restore_latest(
      cfg, setup.abstract_state, make_iterator, warn=lambda m: _say(f"warning: {m}"))
  if latest is not None:
    _say(f"resuming from {checkpointer.directory / str(latest)} (step {latest})")
  else:
    state, train_iter = init_state(setup), make_iterator()
    if cfg.train.init_from:
      state["params"] = _initial_params(cfg, setup, state["params"])
  frozen = frozen_lib.load(setup, warn=lambda m: _say(f"warning: {m}"), say=_say)  # never checkpointed
  if is_main:  # only now that the start is accepted
    storage.write_text(workdir / rundir.CONFIG_FILE, cfg.to_json(indent=2))
  start = int(jax.device_get(state["step"]))

  step_fn = compile_train_step(setup)
  writer = MetricsWriter(workdir, enabled=is_main, keep_through_step=start, cfg=cfg, started=started)
  throughput = Throughput(cfg, setup.num_params)
  history: list[dict[str, float]] = []
  t = cfg.train
  bar = None
  if is_main and t.progress_bar and start < t.steps:
    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
  _say(f"model: {setup.num_params / 1e6:.2f}M parameters; mesh {dict(setup.mesh.shape)}; "
       f"tokenizer {tokenizer.path} (vocab {tokenizer.vocab_size}); steps {start}..{t.steps}")
  if throughput.mfu_note():
    _say(throughput.mfu_note())
  if latest is not None:
    change = metrics_lib.schedule_change(cfg, checkpointer.saved_config(latest), latest)
    if change:
      _say(f"warning: {change}")
  if writer.dropped is not None:
    _say(f"warning: {writer.path} held steps after {start}, the step this run "
         + ("resumes from" if latest is not None else "starts from (no checkpoint to resume)")
         + f"; those records were moved to {writer.dropped}")
  summary = RunSummary(workdir, checkpointer.directory, start, t.steps, started, throughput)

  def log(step: int, fetched: list[tuple[int, dict]], extra: dict[str, float]) -> None:
    for s, m in fetched:
      if m["nonfinite"] and t.nan_policy == "halt":
        raise TrainingHalted(
            f"step {s}: loss {float(m['loss'])}, grad norm {float(m['grad_norm'])} "
            f"(train.nan_policy='halt'; the update was not applied). Newest checkpoint: "
            f"step {checkpointer.latest_step()} in {checkpointer.directory}.")
    last = dict(fetched[-1][1])
    record = expert_load_scalars(cfg.model, last.pop("expert_load", None))
    record.update({k: float(v) for k, v in last.items() if k not in ("nonfinite", "spike")})
    record["loss"] = float(np.mean([m["loss"] for _, m in fetched]))
    record.update(extra)
    record.update(train_iter.metrics())  # data_skipped (+ per reason), data_truncated
    record = {"step": step, **writer.write(step, record)}
    history.append(record)
    summary.add(record, [float(m["tokens"]) for _, m in fetched])
    if bar is not None:
      bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record.get('tokens_per_sec', 0):.0f}")

  pending: list[tuple[int, dict[str, jax.Array]]] = []
  # CPU collectives across processes (gloo) can deadlock when many steps are queued
  # asynchronously; there, each step completes before the next is dispatched.
  sync_every_step = jax.process_count() > 1 and jax.default_backend() == "cpu"
  blocked = 0.0
  failed = True
  try:
    with _StopRequest() as stop:
      for step in range(start + 1, t.steps + 1):
        batch = host_to_global(next(train_iter), setup.mesh, setup.batch_sharding)
        with jax.transfer_guard("disallow"):
          state, metrics = step_fn(state, batch, frozen)
        if sync_every_step:
          jax.block_until_ready(metrics)
        pending.append((step, metrics))
        if step == start + 1:  # compile time stays out of the throughput
          log(step, jax.device_get(pending), {})
          throughput.reset()
          pending = []
        elif step % t.log_every == 0 or step == t.steps:
          fetched = jax.device_get(pending)
          for _, m in fetched:
            throughput.add(int(m["tokens"]))
          extra = throughput.rate()
          extra["checkpoint_blocked_sec"] = blocked
          if t.eval_every and (step % t.eval_every == 0 or step == t.steps):
            extra.update(_evaluate(setup, state["params"], make_eval_iterator(), t.eval_batches, frozen))
            throughput.reset()  # the eval's time stays out of the next window's tokens/s
          log(step, fetched, extra)
          pending, blocked = [], 0.0
        if bar is not None:
          bar.update(1)
          if step == start + 1:  # the bar's rate and ETA leave out the compilation
            metrics_lib.restart_clock(bar)
        stopping = stop.requested(step)
        if stopping and pending:
          log(step, jax.device_get(pending), {})
          pending = []
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps or stopping:
          writer.flush()  # a checkpoint's steps are in metrics.jsonl before the checkpoint is
          blocked += checkpointer.save(step, state, train_iter, cfg)
        if stopping:
          checkpointer.wait()
          _say(f"stopped by signal {stop.signal} after step {step}; checkpoint saved in "
               f"{checkpointer.directory / str(step)}. Rerun the same command to resume.")
          break
      if history:
        result, lines = summary.finish(stopping and step < t.steps, stop.signal)
        writer.finish(result)
        for line in lines:
          _say(line)
      else:
        _say(f"nothing to train: {workdir} is at step {start} of train.steps={t.steps}.")
    failed = False
  finally:
    # A failed run's error is the one to report: closing must not hide it behind another
    # (a store that keeps failing fails the closing uploads too).
    errors = []
    for close in (checkpointer.close, writer.close, bar.close if bar is not None else None):
      try:
        if close is not None:
          close()
      except Exception as e:  # noqa: BLE001 - raised below unless the run already failed
        errors.append(e)
    if errors and not failed:
      raise errors[0]
  return history
