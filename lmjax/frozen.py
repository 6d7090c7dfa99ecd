"""Training against a frozen second model: DPO's reference and distillation's teacher.

``train.objective="dpo"`` trains on preference pairs (:mod:`lmjax.data.preference`) against
a reference run (``train.reference``, else ``train.init_from`` at ``train.init_step``); a
``train.teacher`` run makes a next-token run a distillation (``train.teacher_step``). Either
frozen model is another run's parameters, read with THAT run's own config (its shape may
differ from this run's; this run's execution settings, :data:`EXECUTION_KEYS`, apply) onto
this run's mesh, sharded by this run's rules. It is forward only: no gradient, no optimizer
state, not in this run's checkpoints; every call to ``lmjax.train`` reads it again (a resume
too). The two models must share the vocabulary and the tokenizer.

  setup = attach(build(cfg), tokenizer)        # setup.frozen: the graph and shardings, checked
  frozen = load(setup)                         # {"reference": params} | {"teacher": params} | {}
  state, metrics = compile_train_step(setup)(state, batch, frozen)

DPO (Rafailov et al. 2023), per pair: the policy's log-ratio ``pi = log p(chosen) - log
p(rejected)`` (sums over the response tokens: ``batch["preference"]`` is +1 on the chosen
response's targets, -1 on the rejected one's), the reference's ``rho`` likewise, and the loss
``-log sigmoid(beta (pi - rho))``, averaged over the pairs of the batch (summed per
microbatch, divided by the step's pair count). ``chosen_reward`` = beta (log p - log p_ref)
of the chosen response, ``rejected_reward`` of the rejected one, ``reward_margin`` their
difference (beta (pi - rho)), ``reward_accuracy`` the fraction of pairs with a positive
margin. Its gradient is that of a weighted cross-entropy: sum_i c_i nll_i with c_i = beta
sigmoid(-margin) preference_i of the pair, taken by :func:`lmjax.state.loss_and_grads`
(chunked head, pipelines, every gradient path of a causal run) after one forward pass of
each model for the margins: one policy forward more than the minimum.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lmjax import config as config_lib
from lmjax import rundir
from lmjax.checkpoint import CheckpointError, abstract_with_shardings
from lmjax.mesh import host_to_global, replicated, tree_shardings
from lmjax.model import Transformer, logical_axes
from lmjax.model.distill import Teacher
from lmjax.state import Batch, Setup, loss_and_grads, loss_terms

# How a frozen model runs is this run's choice; what it is (its shape) is its own run's.
EXECUTION_KEYS = ("compute_dtype", "remat", "scan_layers", "pipeline_microbatches",
                  "pipeline_repeats", "pipeline_schedule", "attention", "context_attention",
                  "context_load_balance", "loss_chunk")
DPO_METRICS = ("reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward")


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (part of a jit key)
class FrozenModel:
  """A frozen run's model on this run's mesh: what the train step needs besides its params."""
  role: str  # "reference" (dpo) | "teacher" (distillation)
  key: str  # the config key that names it: train.reference, train.init_from or train.teacher
  run: str  # its run directory
  step: int  # its checkpoint step; -1 = the newest usable
  cfg: ml_collections.ConfigDict  # its own config, with this run's EXECUTION_KEYS
  graphdef: nnx.GraphDef
  abstract: Any  # its parameters' ShapeDtypeStructs, carrying their shardings
  shardings: Any

  def forward(self, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
    """The final-normed hidden states (b, t, d') and the output projection (v, d'), frozen."""
    model = nnx.merge(self.graphdef, params)
    features = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"])[0]
    return jax.lax.stop_gradient((features, model.head.table[...]))


def _frozen_run(cfg: ml_collections.ConfigDict) -> tuple[str, str, str, int] | None:
  """(role, config key, run, step) of ``cfg``'s frozen model, or None."""
  t = cfg.train
  if t.objective == "dpo":
    if t.reference:
      return "reference", "train.reference", t.reference, -1
    return "reference", "train.init_from", t.init_from, t.init_step
  if t.teacher:
    return "teacher", "train.teacher", t.teacher, t.teacher_step
  return None


def attach(setup: Setup, tokenizer: Any) -> Setup:
  """``setup`` with its frozen model (:class:`FrozenModel`, built, nothing read but the
  frozen run's config and tokenizer), or ``setup`` itself when the run has none. Raises
  ConfigError naming the key when that run cannot serve: unreadable, another vocabulary or
  tokenizer than ``tokenizer`` (this run's), or a combination this objective does not take."""
  cfg = setup.cfg
  found = _frozen_run(cfg)
  if found is None:
    return setup
  role, key, run, step = found
  fail = lambda msg: config_lib.ConfigError(f"config.{key}: {msg}")
  m = cfg.model
  if role == "reference" and m.num_experts:
    raise config_lib.ConfigError(f"config.model.num_experts: {m.num_experts} with train.objective="
                                 "'dpo': DPO trains dense models (the router losses have no per-pair form).")
  if role == "reference" and cfg.train.z_loss:
    raise config_lib.ConfigError(f"config.train.z_loss: {cfg.train.z_loss} with train.objective='dpo', "
                                 "which adds no z-loss; set it to 0.")
  if role == "teacher" and setup.mesh.shape["stage"] > 1 and m.pipeline_schedule == "1f1b":
    raise config_lib.ConfigError("config.model.pipeline_schedule: distillation (train.teacher) "
                                 "runs pipelines with the 'gpipe' schedule, not '1f1b'.")
  try:
    fcfg = rundir.run_config(run, step if step >= 0 else None)
  except Exception as e:  # noqa: BLE001 - any unreadable run is the key's mistake
    raise fail(f"{run} cannot serve as the {role}: {str(e).splitlines()[0]}") from None
  for k in EXECUTION_KEYS:
    fcfg.model[k] = m[k]
  if fcfg.model.vocab_size != m.vocab_size:
    raise fail(f"{run}'s model.vocab_size is {fcfg.model.vocab_size}, this run's {m.vocab_size}: "
               f"the {role} must share this run's vocabulary and tokenizer.")
  try:
    ftok = rundir.run_tokenizer(fcfg)
  except Exception as e:  # noqa: BLE001
    raise fail(f"{run}'s tokenizer cannot be read: {str(e).splitlines()[0]}") from None
  if getattr(ftok, "sha256", None) != getattr(tokenizer, "sha256", None):
    raise fail(f"{run}'s tokenizer ({ftok.path}) is not this run's ({tokenizer.path}): the "
               f"{role} must share this run's vocabulary and tokenizer.")
  stages = setup.mesh.shape["stage"]
  if fcfg.model.num_layers % (stages * m.pipeline_repeats):
    raise fail(f"{run}'s {fcfg.model.num_layers} layers do not split into mesh.stage ({stages}) x "
               f"model.pipeline_repeats ({m.pipeline_repeats}) chunks.")
  return with_frozen(setup, fcfg, role, key=key, run=str(run), step=step)


def with_frozen(setup: Setup, frozen_cfg: ml_collections.ConfigDict, role: str, *, key: str = "",
                run: str = "", step: int = -1) -> Setup:
  """``setup`` with a frozen model of config ``frozen_cfg`` (its model, as it is) in ``role``:
  the graph and the shardings by ``setup``'s rules on its mesh (:func:`attach`'s last step)."""
  stages = setup.mesh.shape["stage"]
  abstract_model = nnx.eval_shape(lambda: Transformer(frozen_cfg.model, rngs=nnx.Rngs(0), num_stages=stages))
  graphdef, abstract = nnx.split(abstract_model)
  abstract = abstract.to_pure_dict()
  shardings = tree_shardings(logical_axes(abstract_model), abstract, setup.mesh, setup.rules)
  frozen = FrozenModel(role=role, key=key, run=run, step=step, cfg=frozen_cfg, graphdef=graphdef,
                       abstract=abstract_with_shardings(abstract, shardings), shardings=shardings)
  return dataclasses.replace(setup, frozen=frozen)


def load(setup: Setup, warn: Callable[[str], None] = print,
         say: Callable[[str], None] | None = None) -> dict[str, Any]:
  """The frozen model's parameters, sharded on ``setup``'s mesh: ``{role: params}``, or ``{}``
  when the run has none (``say`` is told where they came from). Raises ConfigError naming
  the key when no checkpoint serves."""
  fm = setup.frozen
  if fm is None:
    return {}
  target = types.SimpleNamespace(cfg=fm.cfg, abstract_state={"params": fm.abstract})
  try:
    step, params, _ = rundir.restore_params(fm.run, target, fm.step, warn=warn)
  except CheckpointError as e:
    raise config_lib.ConfigError(f"config.{fm.key}: {e}") from None
  if say is not None:
    say(f"{fm.role} model (frozen): {rundir.checkpoint_dir(fm.run) / str(step)}, "
        f"{sum(np.size(x) for x in jax.tree.leaves(params)) / 1e6:.2f}M parameters")
  return {fm.role: params}


def shardings(setup: Setup) -> dict[str, Any]:
  """The shardings of :func:`load`'s result."""
  return {} if setup.frozen is None else {setup.frozen.role: setup.frozen.shardings}


# -- the train step's objective ------------------------------------------------------------

def objective_grads(setup: Setup, frozen: dict[str, Any]) -> Callable:
  """``grad_fn(params, microbatch) -> ((total, sums), grads)`` of the run's objective
  against its frozen model; the sums add up over microbatches (:func:`step_metrics`)."""
  t = setup.cfg.train
  fm = setup.frozen
  if fm.role == "reference":
    return lambda params, mb: dpo_grads(setup, params, mb, frozen["reference"])

  def distill(params, mb):
    features, head = fm.forward(frozen["teacher"], mb)
    teacher = Teacher(features, head, t.distill_weight, t.distill_temperature)
    return loss_and_grads(setup.graphdef, params, mb, t.z_loss, teacher=teacher)

  return distill


def _pair_logps(graphdef: nnx.GraphDef, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Per row: the summed log-probability of the chosen and of the rejected response (b,)."""
  pref = batch["preference"]
  logprob = loss_terms(graphdef, params, {**batch, "weights": jnp.abs(pref)})[1]["logprob"]
  return (jnp.sum(jnp.where(pref > 0, logprob, 0.0), axis=1),
          jnp.sum(jnp.where(pref < 0, logprob, 0.0), axis=1))


def _dpo_sums(beta: float, policy: tuple, reference: tuple, batch: Batch) -> tuple[dict, jax.Array]:
  """The DPO sums over the pairs of ``batch`` and each row's margin (0 on rows without a pair)."""
  pairs = jnp.any(batch["preference"] != 0, axis=1).astype(jnp.float32)
  chosen = beta * (policy[0] - reference[0]) * pairs
  rejected = beta * (policy[1] - reference[1]) * pairs
  margin = chosen - rejected
  sums = {"dpo": jnp.sum(jax.nn.softplus(-margin) * pairs), "weight": jnp.sum(pairs),
          "chosen_reward": jnp.sum(chosen), "rejected_reward": jnp.sum(rejected),
          "reward_margin": jnp.sum(margin), "reward_accuracy": jnp.sum((margin > 0) * pairs),
          "tokens": jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)}
  return sums, margin


def dpo_grads(setup: Setup, params: Any, batch: Batch, reference: Any) -> tuple[tuple, Any]:
  """``((loss sum, sums), grads)`` of the DPO loss summed over the pairs of ``batch``."""
  beta = setup.cfg.train.dpo_beta
  ref = _pair_logps(setup.frozen.graphdef, jax.lax.stop_gradient(reference), batch)
  sums, margin = _dpo_sums(beta, _pair_logps(setup.graphdef, params, batch), ref, batch)
  # d(-log sigmoid(margin)) / d logprob_i = -beta sigmoid(-margin) preference_i: the gradient
  # of the cross-entropy weighted by c_i = beta sigmoid(-margin) preference_i.
  coef = jax.lax.stop_gradient(beta * jax.nn.sigmoid(-margin))
  weighted = {**batch, "weights": coef[:, None] * batch["preference"]}
  _, grads = loss_and_grads(setup.graphdef, params, weighted)
  return (sums["dpo"], sums), grads


def step_metrics(setup: Setup, sums: dict[str, jax.Array], count: jax.Array) -> dict[str, jax.Array]:
  """The objective's ``loss`` and metrics from the step's ``sums`` over ``count`` (the
  weighted tokens; dpo: the pairs)."""
  fm, t = setup.frozen, setup.cfg.train
  if fm is None:
    return {"loss": sums["nll"] / count}
  if fm.role == "reference":
    out = {"loss": sums["dpo"] / count, "tokens": sums["tokens"]}
    out.update({k: sums[k] / count for k in DPO_METRICS})
    return out
  ce, kl = sums["nll"] / count, sums["kl"] / count
  w, temp = t.distill_weight, t.distill_temperature
  return {"loss": (1.0 - w) * ce + w * temp * temp * kl, "ce": ce, "distill_kl": kl}


# -- evaluation ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _eval_sums(setup: Setup) -> Callable:
  """Jitted ``(params, frozen, batch) -> sums`` over one global batch."""
  fm, t = setup.frozen, setup.cfg.train

  def sums(params, frozen, batch):
    if fm.role == "reference":
      ref = _pair_logps(fm.graphdef, frozen["reference"], batch)
      return _dpo_sums(t.dpo_beta, _pair_logps(setup.graphdef, params, batch), ref, batch)[0]
    features, head = fm.forward(frozen["teacher"], batch)
    teacher = Teacher(features, head, t.distill_weight, t.distill_temperature)
    terms = loss_terms(setup.graphdef, params, batch, teacher=teacher)[1]
    return {k: terms[k] for k in ("nll", "kl", "weight")}

  return jax.jit(sums, in_shardings=(setup.state_shardings["params"], shardings(setup),
                                     setup.batch_sharding), out_shardings=replicated(setup.mesh))


def evaluate(setup: Setup, params: Any, frozen: dict[str, Any], batches,
             max_batches: int | None) -> dict[str, float]:
  """Held-out metrics of a run with a frozen model over up to ``max_batches`` batches
  (``{}`` if there are none): dpo: ``eval_loss`` (the DPO loss) and ``eval_`` + each of
  :data:`DPO_METRICS`; distillation: ``eval_loss`` (cross-entropy), ``eval_perplexity`` and
  ``eval_distill_kl``."""
  total: dict[str, float] = {}
  fn = _eval_sums(setup)
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    with setup.context():
      out = jax.device_get(fn(params, frozen, host_to_global(batch, setup.mesh, setup.batch_sharding)))
    for k, v in out.items():
      total[k] = total.get(k, 0.0) + float(np.asarray(v, np.float64))
  if not total.get("weight"):
    return {}
  n = total["weight"]
  if setup.frozen.role == "reference":
    return {"eval_loss": total["dpo"] / n, **{f"eval_{k}": total[k] / n for k in DPO_METRICS}}
  loss = total["nll"] / n
  return {"eval_loss": loss, "eval_perplexity": float(np.exp(min(loss, 50.0))),
          "eval_distill_kl": total["kl"] / n}
