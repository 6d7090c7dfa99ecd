"""Training: state initialisation (sharded, under jit), the train and eval steps, the loop.

``train(cfg, workdir)`` is the whole job; the CLI and notebooks call it. Rerunning it with
the same ``workdir`` resumes from the newest checkpoint, data position included.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lmjax import config as config_lib
from lmjax import data as data_lib
from lmjax.data import finetune as finetune_data
from lmjax.checkpoint import Checkpointer, abstract_with_shardings
from lmjax.mesh import batch_sharding, host_to_global, make_mesh, replicated, rules_from_config, tree_shardings, use_rules
from lmjax.metrics import MetricsWriter, Throughput
from lmjax.model import Transformer, count_params, logical_axes
from lmjax.model.attention import check_backend
from lmjax.optim import learning_rate_schedule, make_optimizer

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions: (b, t) int32
# step, params, opt_state; loss_window (recent losses, for spike detection) and skipped
# (updates not applied). The step draws no random numbers: everything it depends on is here.
State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything built from a config and a mesh before the first step."""
  cfg: ml_collections.ConfigDict
  mesh: Mesh
  rules: dict
  graphdef: nnx.GraphDef
  optimizer: optax.GradientTransformation
  abstract_state: State  # ShapeDtypeStructs carrying the target shardings
  state_shardings: State
  batch_sharding: NamedSharding
  num_params: int

  def model(self, params: Any) -> Transformer:
    """The NNX module with ``params`` (e.g. to call it eagerly in a notebook)."""
    return nnx.merge(self.graphdef, params)


def build(cfg: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> Setup:
  """Validates ``cfg``, builds the mesh over ``devices`` (default: all) and the abstract,
  sharded train state. Nothing is allocated or compiled."""
  devices = jax.devices() if devices is None else list(devices)
  config_lib.validate(cfg, num_devices=len(devices))
  try:
    check_backend(cfg.model.attention, devices[0].platform)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  mesh = make_mesh(cfg, devices)
  rules = rules_from_config(cfg)
  optimizer = make_optimizer(cfg)
  abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed),
                                                      num_stages=mesh.shape["stage"]))
  graphdef, abstract_params = nnx.split(abstract_model)
  abstract_params = abstract_params.to_pure_dict()
  param_shardings = tree_shardings(logical_axes(abstract_model), abstract_params, mesh, rules)
  abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, s: s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated(mesh))
  shardings = {"step": replicated(mesh), "params": param_shardings, "opt_state": opt_shardings,
               "loss_window": replicated(mesh), "skipped": replicated(mesh)}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
              "opt_state": abstract_opt,
              "loss_window": jax.ShapeDtypeStruct((cfg.train.spike_window,), jnp.float32),
              "skipped": jax.ShapeDtypeStruct((), jnp.int32)}
  return Setup(cfg=cfg, mesh=mesh, rules=rules, graphdef=graphdef, optimizer=optimizer,
               abstract_state=abstract_with_shardings(abstract, shardings),
               state_shardings=shardings,
               batch_sharding=batch_sharding(mesh, rules, (cfg.data.global_batch_size, cfg.data.seq_len)),
               num_params=count_params(abstract_params))


def init_state(setup: Setup) -> State:
  """Creates parameters and optimizer state directly sharded (never whole on one device)."""
  cfg = setup.cfg

  @functools.partial(jax.jit, out_shardings=setup.state_shardings)
  def init():
    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed), num_stages=setup.mesh.shape["stage"])
    params = nnx.split(model)[1].to_pure_dict()
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": setup.optimizer.init(params),
            "loss_window": jnp.full((cfg.train.spike_window,), jnp.nan, jnp.float32),
            "skipped": jnp.zeros((), jnp.int32)}

  with jax.set_mesh(setup.mesh), use_rules(setup.rules):
    return init()


def token_losses(graphdef: nnx.GraphDef, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over the weighted tokens, and their weight."""
  model = nnx.merge(graphdef, params)
  logits = model(batch["inputs"], batch["positions"], batch["segment_ids"])  # (b, t, v)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  # Padding (segment 0) never counts; a batch may also weight tokens itself (e.g. a
  # fine-tuning batch that trains on responses only).
  weights = batch["weights"] if "weights" in batch else (batch["segment_ids"] != 0).astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights)


def train_step(setup: Setup, state: State, batch: Batch) -> tuple[State, dict[str, jax.Array]]:
  """One optimizer update on ``batch``, accumulated over ``optim.grad_accum_steps`` microbatches.

  The loss is the mean over all real tokens of the batch, whatever the microbatching.
  """
  accum = setup.cfg.optim.grad_accum_steps
  grad_fn = jax.value_and_grad(functools.partial(token_losses, setup.graphdef), has_aux=True)

  if accum == 1:
    (loss_sum, count), grads = grad_fn(state["params"], batch)
  else:
    # (b, t) -> (accum, b/accum, t), keeping each device's rows on that device.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                         batch)

    def one(carry, mb):
      (loss_sum, count), grads = grad_fn(state["params"], mb)
      return jax.tree.map(jnp.add, carry, (loss_sum, count, grads)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, state["params"]))
    (loss_sum, count, grads), _ = jax.lax.scan(one, zeros, micro)

  count = jnp.maximum(count, 1.0)
  loss = loss_sum / count
  grads = jax.tree.map(lambda g: g / count, grads)
  t = setup.cfg.train
  if t.debug_nan_at_step:
    poison = jnp.where(state["step"] + 1 == t.debug_nan_at_step, jnp.nan, 1.0)
    loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
  grad_norm = optax.global_norm(grads)

  # A non-finite loss or gradient (or, optionally, a loss spike) leaves parameters and
  # optimizer state untouched; the step still counts, so data and schedule move on.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  window = state["loss_window"]
  seen = jnp.isfinite(window)
  n = jnp.sum(seen)
  mean = jnp.sum(jnp.where(seen, window, 0.0)) / jnp.maximum(n, 1)
  std = jnp.sqrt(jnp.sum(jnp.where(seen, (window - mean) ** 2, 0.0)) / jnp.maximum(n, 1))
  spike = (n == window.shape[0]) & (loss > mean + t.spike_threshold * std) if t.skip_spikes else jnp.array(False)
  apply = finite & ~spike

  def update():
    updates, opt_state = setup.optimizer.update(grads, state["opt_state"], state["params"])
    return optax.apply_updates(state["params"], updates), opt_state

  # One conditional (as optax.apply_if_finite), not a select over every array: a select
  # keeps the old optimizer moments alive beside the new ones and costs a copy of each.
  params, opt_state = jax.lax.cond(apply, update, lambda: (state["params"], state["opt_state"]))
  new_state = {
      "step": state["step"] + 1,
      "params": params,
      "opt_state": opt_state,
      "loss_window": jnp.where(apply, window.at[state["step"] % window.shape[0]].set(loss), window),
      "skipped": state["skipped"] + (~apply).astype(jnp.int32),
  }
  metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "param_norm": optax.global_norm(new_state["params"]),
      "learning_rate": learning_rate_schedule(setup.cfg)(state["step"]),
      "tokens": count,
      "nonfinite": ~finite,
      "spike": spike,
      "skipped_steps": new_state["skipped"],
  }
  return new_state, metrics


def eval_step(setup: Setup, params: Any, batch: Batch) -> dict[str, jax.Array]:
  loss_sum, count = token_losses(setup.graphdef, params, batch)
  return {"loss_sum": loss_sum, "tokens": count}


def compile_steps(setup: Setup) -> tuple[Callable, Callable]:
  """The jitted train step (state donated, explicit shardings) and eval step."""
  rep = replicated(setup.mesh)
  step = jax.jit(functools.partial(train_step, setup),
                 in_shardings=(setup.state_shardings, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, rep), donate_argnums=0)
  ev = jax.jit(functools.partial(eval_step, setup),
               in_shardings=(setup.state_shardings["params"], setup.batch_sharding),
               out_shardings=rep)

  def with_context(fn):
    @functools.wraps(fn)
    def call(*args):
      with jax.set_mesh(setup.mesh), use_rules(setup.rules):
        return fn(*args)
    call.lower = lambda *a: _lower(fn, setup, *a)
    return call

  return with_context(step), with_context(ev)


def _lower(fn, setup: Setup, *args):
  with jax.set_mesh(setup.mesh), use_rules(setup.rules):
    return fn.lower(*args)


def evaluate(setup: Setup, eval_fn: Callable, params: Any, iterator, max_batches: int) -> dict[str, float]:
  """Mean loss and perplexity over up to ``max_batches`` held-out batches."""
  loss_sum, tokens = 0.0, 0.0
  for i, batch in enumerate(iterator):
    if i >= max_batches:
      break
    out = jax.device_get(eval_fn(params, host_to_global(batch, setup.mesh, setup.batch_sharding)))
    loss_sum += float(out["loss_sum"])
    tokens += float(out["tokens"])
  if tokens == 0:
    return {}
  loss = loss_sum / tokens
  return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0)))}


def _say(message: str) -> None:
  """A one-line status message from process 0, kept clear of the progress bar."""
  if jax.process_index() == 0:
    from tqdm import tqdm
    tqdm.write(f"lmjax: {message}")


def _initial_params(cfg: ml_collections.ConfigDict, setup: Setup) -> Any:
  """The parameters of ``train.init_from``'s checkpoint, on this run's mesh."""
  source = Path(cfg.train.init_from)
  directory = source / "checkpoints" if (source / "checkpoints").is_dir() else source
  ckpt = Checkpointer(directory, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise config_lib.ConfigError(f"config.train.init_from: no checkpoint in {directory}.")
  step = cfg.train.init_step if cfg.train.init_step >= 0 else steps[-1]
  if step not in steps:
    raise config_lib.ConfigError(f"config.train.init_step: {step} is not among {steps} in {directory}.")
  ckpt.verify(step)
  ckpt.check_compatible(step, cfg, params_only=True)
  params = ckpt.restore_params(step, setup.abstract_state["params"])
  ckpt.manager.close()
  _say(f"parameters from {directory / str(step)}; optimizer state starts fresh")
  return params


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
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step)) or self.signal is not None
    return self.signal is not None


def train(cfg: ml_collections.ConfigDict, workdir: str | Path,
          devices: list[jax.Device] | None = None) -> list[dict[str, float]]:
  """Trains ``cfg`` in ``workdir`` (resuming from its newest usable checkpoint); returns
  the metric records written by this call.

  SIGTERM or Ctrl-C saves a checkpoint after the current step and returns; rerunning the
  same call resumes. Raises TrainingHalted on a non-finite loss under nan_policy='halt'.
  """
  workdir = Path(workdir)
  setup = build(cfg, devices)
  is_main = jax.process_index() == 0
  from lmjax.load import run_tokenizer  # fine-tuning speaks the pre-trained run's tokenizer
  tokenizer = run_tokenizer(cfg)
  if tokenizer.vocab_size != cfg.model.vocab_size:
    raise config_lib.ConfigError(
        f"config.model.vocab_size: {cfg.model.vocab_size} differs from the tokenizer's "
        f"vocabulary size {tokenizer.vocab_size} ({tokenizer.path}); set them equal.")
  workdir.mkdir(parents=True, exist_ok=True)
  if is_main:
    (workdir / "config.json").write_text(cfg.to_json(indent=2))

  proc = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if finetune_data.is_finetune(cfg.data):
    make_iterator = lambda: finetune_data.make_iterator(cfg, tokenizer, **proc)
    make_eval_iterator = lambda: finetune_data.make_iterator(cfg, tokenizer, split="eval", **proc)
  else:
    make_iterator = lambda: data_lib.make_train_iterator(cfg, tokenizer, **proc)
    make_eval_iterator = lambda: data_lib.make_eval_iterator(cfg, tokenizer, **proc)
  checkpointer = Checkpointer(workdir / "checkpoints", cfg)
  latest, state, train_iter = checkpointer.restore_latest(
      cfg, setup.abstract_state, make_iterator, warn=lambda m: _say(f"warning: {m}"))
  if latest is not None:
    _say(f"resuming from {checkpointer.directory / str(latest)} (step {latest})")
  else:
    state, train_iter = init_state(setup), make_iterator()
    if cfg.train.init_from:
      state["params"] = _initial_params(cfg, setup)
  start = int(jax.device_get(state["step"]))

  step_fn, eval_fn = compile_steps(setup)
  writer = MetricsWriter(workdir, enabled=is_main, keep_through_step=start)
  throughput = Throughput(cfg, setup.num_params)
  history: list[dict[str, float]] = []
  t = cfg.train
  bar = None
  if is_main and t.progress_bar and start < t.steps:
    from tqdm import tqdm
    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
  _say(f"model: {setup.num_params / 1e6:.2f}M parameters; mesh {dict(setup.mesh.shape)}; "
       f"tokenizer {tokenizer.path} (vocab {tokenizer.vocab_size}); steps {start}..{t.steps}")

  def log(step: int, fetched: list[tuple[int, dict]], extra: dict[str, float]) -> None:
    for s, m in fetched:
      if m["nonfinite"] and t.nan_policy == "halt":
        raise TrainingHalted(
            f"step {s}: loss {float(m['loss'])}, grad norm {float(m['grad_norm'])} "
            f"(train.nan_policy='halt'; the update was not applied). Newest checkpoint: "
            f"step {checkpointer.latest_step()} in {checkpointer.directory}.")
    record = {k: float(v) for k, v in fetched[-1][1].items() if k not in ("nonfinite", "spike")}
    record["loss"] = float(np.mean([m["loss"] for _, m in fetched]))
    record.update(extra)
    record.update(train_iter.metrics())  # data_skipped (+ per reason), data_truncated
    record["step"] = step
    writer.write(step, {k: v for k, v in record.items() if k != "step"})
    history.append(record)
    if bar is not None:
      bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record.get('tokens_per_sec', 0):.0f}")

  pending: list[tuple[int, dict[str, jax.Array]]] = []
  # CPU collectives across processes (gloo) can deadlock when many steps are queued
  # asynchronously; there, each step completes before the next is dispatched.
  sync_every_step = jax.process_count() > 1 and jax.default_backend() == "cpu"
  blocked = 0.0
  try:
    with _StopRequest() as stop:
      for step in range(start + 1, t.steps + 1):
        batch = host_to_global(next(train_iter), setup.mesh, setup.batch_sharding)
        with jax.transfer_guard("disallow"):
          state, metrics = step_fn(state, batch)
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
            extra.update(evaluate(setup, eval_fn, state["params"],
                                  make_eval_iterator(), t.eval_batches))
          log(step, fetched, extra)
          pending, blocked = [], 0.0
        if bar is not None:
          bar.update(1)
        stopping = stop.requested(step)
        if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.steps or stopping:
          blocked += checkpointer.save(step, state, train_iter, cfg)
        if stopping:
          if pending:
            log(step, jax.device_get(pending), {})
          checkpointer.wait()
          _say(f"stopped by signal {stop.signal} after step {step}; checkpoint saved in "
               f"{checkpointer.directory / str(step)}. Rerun the same command to resume.")
          break
  finally:
    checkpointer.close()
    writer.close()
    if bar is not None:
      bar.close()
  return history
