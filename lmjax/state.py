"""A run's state from its config: the mesh, the model, the optimizer and the abstract,
sharded train state (:func:`build`), its creation (:func:`init_state`), and the loss.

Everything that trains, evaluates, plans, converts or generates starts here:

  setup = build(cfg)                   # validates; nothing allocated or compiled
  state = init_state(setup)            # parameters and optimizer state, created sharded
  scores = setup.score(state["params"], batch)  # per row: summed log-probability, weight
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from lmjax import config as config_lib
from lmjax.checkpoint import abstract_with_shardings
from lmjax.mesh import batch_sharding, host_to_global, make_mesh, replicated, rules_from_config, tree_shardings, use_rules
from lmjax.model import Transformer, count_params, logical_axes, lora
from lmjax.model.attention import check_backend
from lmjax.model.cross_entropy import cross_entropy, plain_cross_entropy
from lmjax.model.distill import Teacher, distill_cross_entropy, plain_distill_cross_entropy
from lmjax.model.pipeline_1f1b import pipeline_grads
from lmjax.optim import check_lr_multipliers, make_optimizer, opt_state_shardings

Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions (+ weights): (b, t)
# step, params, opt_state; loss_window (recent losses, for spike detection), spike_run (spikes
# skipped in a row) and skipped (updates not applied). The step draws no random numbers:
# everything it depends on is here.
State = dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)  # compared and hashed by identity (a jit key)
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
  masking: Any = None  # train.objective="masked": the tokenizer's ids (lmjax.objectives.attach)
  frozen: Any = None  # the frozen model a DPO or distillation run trains against (lmjax.frozen)

  def model(self, params: Any) -> Transformer:
    """The NNX module with ``params`` (e.g. to call it eagerly in a notebook)."""
    return nnx.merge(self.graphdef, params)

  def context(self):
    """The mesh and rules every computation of this setup traces under."""
    return _Context(self)

  @functools.cached_property
  def _score(self):
    def score(params, batch):  # per row: summed weighted log-probability, summed weight
      weights = token_weights(batch)
      logprob = loss_terms(self.graphdef, params, batch)[1]["logprob"]
      return {"logprob": jnp.sum(logprob * weights, axis=1), "weight": jnp.sum(weights, axis=1)}

    return jax.jit(score, in_shardings=(self.state_shardings["params"], self.batch_sharding),
                   out_shardings=replicated(self.mesh))

  def score(self, params: Any, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per row of a host batch (this process's rows): ``logprob``, the summed log-probability
    of its weighted targets (:func:`token_weights`), and ``weight``, their summed weight,
    for every row of the global batch, float32 (b,) on the host. Compiled once per setup."""
    with self.context():
      out = self._score(params, host_to_global(batch, self.mesh, self.batch_sharding))
    return jax.device_get(out)


class _Context:
  def __init__(self, setup: Setup):
    self._managers = (jax.set_mesh(setup.mesh), use_rules(setup.rules))

  def __enter__(self):
    for m in self._managers:
      m.__enter__()

  def __exit__(self, *exc):
    for m in reversed(self._managers):
      m.__exit__(*exc)


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
  # The optimizer sees the parameters that train: all, or a LoRA model's adapters.
  trainable = lora.trainable(abstract_params)
  check_lr_multipliers(cfg, trainable)
  abstract_opt, opt_shardings = opt_state_shardings(optimizer, trainable,
                                                    lora.trainable(param_shardings), mesh)
  shardings = {"step": replicated(mesh), "params": param_shardings, "opt_state": opt_shardings,
               "loss_window": replicated(mesh), "spike_run": replicated(mesh), "skipped": replicated(mesh)}
  abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
              "opt_state": abstract_opt,
              "loss_window": jax.ShapeDtypeStruct((cfg.train.spike_window,), jnp.float32),
              "spike_run": jax.ShapeDtypeStruct((), jnp.int32), "skipped": jax.ShapeDtypeStruct((), jnp.int32)}
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
            "opt_state": setup.optimizer.init(lora.trainable(params)),
            "loss_window": jnp.full((cfg.train.spike_window,), jnp.nan, jnp.float32),
            "spike_run": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}

  with setup.context():
    return init()


# -- the loss ------------------------------------------------------------------------------

def token_weights(batch: Batch) -> Any:
  """(b, t) weight of each target in the loss: padding (segment 0) never counts; a batch may
  weight tokens itself (``weights``, e.g. a fine-tuning batch that trains on responses only)."""
  if "weights" in batch:
    return batch["weights"]
  return (batch["segment_ids"] != 0).astype(np.float32)


def loss_terms(graphdef: nnx.GraphDef, params: Any, batch: Batch, z_loss: float = 0.0,
               teacher: Teacher | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The forward pass and the next-token cross-entropy, written once for training,
  evaluation and scoring: the weighted sum to differentiate (cross-entropy plus ``z_loss``
  times the z-loss, plus a MoE model's router losses) and, not differentiated, ``logprob``
  (b, t) of each target, the summed ``nll`` and ``z`` (logsumexp^2) over the weighted tokens
  and their ``weight``.

  With a ``teacher`` (distillation) the sum is :mod:`lmjax.model.distill`'s mix of
  cross-entropy and KL to the teacher, and ``kl`` (its summed KL over the weighted tokens)
  joins the terms.

  A MoE model adds ``moe_aux`` and ``router_z`` (its load-balancing and router z-losses,
  means over MoE layers, times ``weight`` so that microbatches add up), ``expert_load``
  (l_moe, E) assignments per expert, and the ``dropped`` and ``assigned`` assignment
  counts. The router losses enter the sum with ``model.moe_aux_loss`` and
  ``model.moe_z_loss`` times ``weight``: after the train step divides by the weight, each
  is its weight times its batch mean.

  ``config.model.loss_chunk`` > 0 (the default) computes the output projection and the loss
  a chunk of positions at a time (:mod:`lmjax.model.cross_entropy`); 0 takes whole logits.
  """
  model = nnx.merge(graphdef, params)
  features, moe = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"])
  total, terms = _head_terms(model, features, batch, z_loss, teacher)
  if moe:
    weight = terms["weight"]
    aux, router_z = jnp.mean(moe["aux"]), jnp.mean(moe["z"])
    total = total + weight * (model.cfg.moe_aux_loss * aux + model.cfg.moe_z_loss * router_z)
    terms.update(jax.lax.stop_gradient({
        "moe_aux": weight * aux, "router_z": weight * router_z, "expert_load": moe["load"],
        "dropped": jnp.sum(moe["dropped"]), "assigned": jnp.sum(moe["assigned"])}))
  return total, terms


def _head_terms(model: Transformer, features: jax.Array, batch: Batch, z_loss: float,
                teacher: Teacher | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """:func:`loss_terms` from the final-normed hidden states (b, t, d), MoE terms aside."""
  weights = token_weights(batch)
  if teacher is not None:
    if model.cfg.loss_chunk > 0:
      total, nll, lse, kl = distill_cross_entropy(features, model.head.table[...], batch["targets"],
                                                  weights, teacher, z_loss, model.cfg.loss_chunk)
    else:
      total, nll, lse, kl = plain_distill_cross_entropy(model.logits(features), batch["targets"],
                                                        weights, teacher, z_loss)
  elif model.cfg.loss_chunk > 0:
    total, nll, lse = cross_entropy(features, model.head.table[...], batch["targets"],
                                    weights, z_loss, model.cfg.loss_chunk)
  else:
    total, nll, lse = plain_cross_entropy(model.logits(features), batch["targets"], weights, z_loss)
  nll, lse = jax.lax.stop_gradient(nll), jax.lax.stop_gradient(lse)
  terms = {"logprob": -nll, "nll": jnp.sum(weights * nll), "z": jnp.sum(weights * lse * lse),
           "weight": jnp.sum(weights)}
  if teacher is not None:
    terms["kl"] = jnp.sum(weights * jax.lax.stop_gradient(kl))
  return total, terms


def loss_and_grads(graphdef: nnx.GraphDef, params: Any, batch: Batch, z_loss: float = 0.0,
                   teacher: Teacher | None = None) -> tuple[tuple[jax.Array, dict[str, jax.Array]], Any]:
  """``((total, terms), grads)``: :func:`loss_terms`' weighted sum, its terms but
  ``logprob``, and the sum's gradient w.r.t. the parameters that train,
  ``lora.trainable(params)`` (all of them, or a LoRA model's adapters). A pipelined model
  (``num_stages > 1``) with ``model.pipeline_schedule = "1f1b"`` computes them by the 1F1B
  schedule (:mod:`lmjax.model.pipeline_1f1b`), every other one by autodiff. ``teacher``:
  distillation (:func:`loss_terms`), not with the 1F1B schedule."""
  model = nnx.merge(graphdef, params)
  if model.num_stages == 1 or model.cfg.pipeline_schedule != "1f1b":
    def objective(trainable):  # the frozen rest of params closed over
      total, terms = loss_terms(graphdef, lora.combine(params, trainable), batch, z_loss, teacher)
      return total, {k: v for k, v in terms.items() if k != "logprob"}
    return jax.value_and_grad(objective, has_aux=True)(lora.trainable(params))

  if teacher is not None:
    raise ValueError("distillation runs the GPipe schedule, not model.pipeline_schedule='1f1b'")
  stacked = params["blocks"]  # a dense model without LoRA (neither MoE nor LoRA models do 1F1B)
  rest = {k: v for k, v in params.items() if k != "blocks"}
  with_rest = lambda r: nnx.merge(graphdef, {**r, "blocks": stacked})
  layers = model.stage_layers()

  def head(r, y, mb):
    m = with_rest(r)
    total, terms = _head_terms(m, m.final_norm(y), mb, z_loss)
    return total, {k: v for k, v in terms.items() if k != "logprob"}

  micro = model.cfg.pipeline_microbatches
  (total, terms), (d_rest, d_stacked) = pipeline_grads(
      lambda r, mb: with_rest(r).embed_tokens(mb["inputs"], mb["positions"]),
      lambda p, x, mb: layers(p, x, mb["positions"], mb["segment_ids"]), head, rest, stacked,
      {**batch, "weights": token_weights(batch)}, num_stages=model.num_stages,
      num_microbatches=micro if micro > 0 else model.num_stages,
      repeats=model.cfg.pipeline_repeats)
  return (total, terms), {**d_rest, "blocks": d_stacked}


def token_losses(graphdef: nnx.GraphDef, params: Any, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over the weighted tokens (differentiable), and their weight."""
  total, terms = loss_terms(graphdef, params, batch)
  return total, terms["weight"]
