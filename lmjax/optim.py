"""The optimizer, from ``config.optim``: global-norm clipping, then AdamW, Adafactor, Lion or
Muon (Optax) on a learning-rate schedule (cosine, warmup-stable-decay, constant or linear,
each after a linear warmup), a weight-decay mask that leaves norm scales, biases and
embeddings alone unless configured, and learning-rate multipliers per parameter group."""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from optax.contrib import MuonDimensionNumbers

from lmjax.config import ConfigError, wsd_decay_steps

# Block projections whose output is the residual stream: their last axis is d.
_INTO_RESIDUAL = ("o", "down")


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """The learning rate at each update count, by ``optim.schedule``, after a linear warmup
  from 0 to ``optim.learning_rate`` over ``optim.warmup_steps``:

  - cosine: cosine decay to ``end_lr_fraction`` of the peak over ``optim.decay_steps``
    (<= 0: the rest of ``train.steps``), then flat;
  - linear: the same with a linear decay;
  - wsd: the peak held until the last ``optim.decay_fraction`` of ``train.steps``, which
    decay to ``end_lr_fraction`` of it in ``optim.decay_shape``: linear, cosine, or 1-sqrt
    (``peak - (peak - end) * sqrt(progress)``, Hägele et al. 2024);
  - constant: the peak for ever.
  """
  o = cfg.optim
  peak, end, warm = o.learning_rate, o.learning_rate * o.end_lr_fraction, o.warmup_steps
  decay = o.decay_steps if o.decay_steps > 0 else max(cfg.train.steps - warm, 1)
  if o.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warm, decay_steps=warm + decay, end_value=end)
  warmup = optax.linear_schedule(0.0, peak, warm)
  if o.schedule == "constant":
    return optax.join_schedules([warmup, optax.constant_schedule(peak)], [warm])
  if o.schedule == "linear":
    return optax.join_schedules([warmup, optax.linear_schedule(peak, end, decay)], [warm])
  decay = wsd_decay_steps(cfg)
  if o.decay_shape == "linear":
    tail = optax.linear_schedule(peak, end, decay)
  elif o.decay_shape == "cosine":
    tail = optax.cosine_decay_schedule(peak, decay, alpha=o.end_lr_fraction)
  else:  # 1-sqrt
    tail = lambda count: peak - (peak - end) * jnp.sqrt(jnp.clip(count / decay, 0.0, 1.0))
  return optax.join_schedules([warmup, optax.constant_schedule(peak), tail],
                              [warm, cfg.train.steps - decay])


def _names(path: Sequence[Any]) -> list[str]:
  return [str(getattr(k, "key", k)) for k in path]


def param_path(path: Sequence[Any]) -> str:
  """A parameter's key path as the '/'-joined names ``optim.lr_multipliers`` matches, e.g.
  ``blocks/attn/q``."""
  return "/".join(_names(path))


def _is_matrix(names: list[str]) -> bool:
  """A projection matrix: not a norm scale, a bias or a (token, position) embedding or head."""
  return not (names[-1] in ("scale", "bias") or names[-1].endswith("_bias")
              or {"embed", "pos_embed", "lm_head"} & set(names))


def weight_decay_mask(params: Any, decay_norms_and_embeddings: bool = False) -> Any:
  """True for parameters that get weight decay: matrices, not norm scales, biases or
  (token and position) embeddings."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: decay_norms_and_embeddings or _is_matrix(_names(path)), params)


def muon_dimension_numbers(params: Any) -> Any:
  """Per parameter, how Muon sees it as matrices, or None for its AdamW part (embeddings, the
  head, norm scales, biases, as in the Muon papers). The layer axis of a block weight is a
  batch axis, so each layer's matrix is orthogonalised on its own: q, k, v (l, d, n, h)
  reduce over d into (n, h); o (l, n, h, d) reduces over (n, h) into d; gate, up (l, d, f)
  and down (l, f, d) reduce over their middle axis. A LoRA adapter's A (l, I..., r) reduces
  over its input axes into r, its B (l, r, O...) over r."""

  def dims(path, x):
    names = _names(path)
    if not _is_matrix(names) or x.ndim < 2:
      return None
    first = 1 if "blocks" in names else 0  # the stacked layer axis
    if names[-1].endswith("_lora_a"):
      return MuonDimensionNumbers(tuple(range(first, x.ndim - 1)), x.ndim - 1)
    if names[-1] in _INTO_RESIDUAL:
      return MuonDimensionNumbers(tuple(range(first, x.ndim - 1)), x.ndim - 1)
    return MuonDimensionNumbers(first, tuple(range(first + 1, x.ndim)))

  return jax.tree_util.tree_map_with_path(dims, params)


def lr_multipliers(params: Any, rules: Sequence[tuple[str, float]]) -> Any:
  """Per parameter: the multiplier of the first ``(regex, multiplier)`` of ``rules`` whose
  regex is found (``re.search``) in its :func:`param_path`, else 1.0."""
  compiled = [(re.compile(pattern), float(m)) for pattern, m in rules]

  def multiplier(path, _):
    name = param_path(path)
    return next((m for pattern, m in compiled if pattern.search(name)), 1.0)

  return jax.tree_util.tree_map_with_path(multiplier, params)


def check_lr_multipliers(cfg: ml_collections.ConfigDict, params: Any) -> None:
  """Raises ConfigError naming ``optim.lr_multipliers[i]`` for a regex that selects no
  parameter of ``params`` (none matches, or earlier entries take every one it matches)."""
  names = [param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  rules = cfg.optim.lr_multipliers
  taken: set[str] = set()
  for i, (pattern, _) in enumerate(rules):
    matched = {n for n in names if re.search(pattern, n)}
    if not matched:
      raise ConfigError(f"config.optim.lr_multipliers[{i}]: {pattern!r} matches no parameter; "
                        f"the parameters are {', '.join(names)}.")
    if matched <= taken:
      raise ConfigError(f"config.optim.lr_multipliers[{i}]: every parameter {pattern!r} matches "
                        f"({', '.join(sorted(matched))}) is taken by an earlier entry (the first "
                        "match wins).")
    taken |= matched


def with_lr_multipliers(inner: optax.GradientTransformation,
                        rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """``inner`` with each parameter's update multiplied by its :func:`lr_multipliers` entry:
  the same as that multiplier on its learning rate for every optimizer here (their state
  does not depend on the learning rate), decoupled weight decay included, as in a PyTorch
  param group. The state is ``inner``'s, so a run resumes under other multipliers."""

  inner = optax.with_extra_args_support(inner)

  def update(updates, state, params=None, **extra):
    updates, state = inner.update(updates, state, params, **extra)
    scale = lambda u, m: u if m == 1.0 else u * jnp.asarray(m, u.dtype)
    return jax.tree.map(scale, updates, lr_multipliers(updates, rules)), state

  return optax.GradientTransformationExtraArgs(inner.init, update)


def base_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """``optim.name`` on :func:`learning_rate_schedule`, weight decay multiplied by the
  learning rate on the :func:`weight_decay_mask` parameters:

  - adamw: ``b1``, ``b2``, ``eps``;
  - adafactor: Optax's defaults (factored second moments of dims >= 128, decay rate 0.8,
    update clipping 1, the step relative to each parameter's RMS, no momentum);
  - lion: ``lion_b1``, ``lion_b2`` (Lion's own, 0.9 and 0.99);
  - muon: Newton-Schulz orthogonalised momentum (``muon_beta``, ``muon_ns_steps``,
    ``muon_rms``) per layer matrix (:func:`muon_dimension_numbers`); the rest by Optax's
    Muon AdamW part (``b1``, ``b2``, ``eps``; Nesterov, as the Muon part).
  """
  o = cfg.optim
  lr = learning_rate_schedule(cfg)
  mask = lambda params: weight_decay_mask(params, o.decay_norms_and_embeddings)
  if o.name == "adafactor":
    decay = (lambda count: o.weight_decay * lr(count)) if o.weight_decay else None
    return optax.adafactor(lr, weight_decay_rate=decay, weight_decay_mask=mask)
  if o.name == "lion":
    return optax.lion(lr, b1=o.lion_b1, b2=o.lion_b2, weight_decay=o.weight_decay, mask=mask)
  if o.name == "muon":
    # Muon's matrices are exactly the masked ones; its AdamW part decays only if asked.
    return optax.contrib.muon(
        lr, ns_steps=o.muon_ns_steps, beta=o.muon_beta, eps=o.eps, weight_decay=o.weight_decay,
        adam_b1=o.b1, adam_b2=o.b2,
        adam_weight_decay=o.weight_decay if o.decay_norms_and_embeddings else 0.0,
        muon_weight_dimension_numbers=muon_dimension_numbers,
        consistent_rms=o.muon_rms if o.muon_rms > 0 else None)
  return optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clipping (``optim.grad_clip_norm``), then :func:`base_optimizer` with the
  ``optim.lr_multipliers`` (when set)."""
  o = cfg.optim
  steps = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
  base = base_optimizer(cfg)
  steps.append(with_lr_multipliers(base, o.lr_multipliers) if o.lr_multipliers else base)
  return optax.chain(*steps)


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_params: Any,
                        param_shardings: Any, mesh: Mesh) -> tuple[Any, Any]:
  """The abstract optimizer state and its shardings. A state leaf shaped like its parameter
  takes the parameter's sharding; one shaped like it with an axis left out (Adafactor's
  factored row and column statistics) takes it without that axis' entry; anything else
  (counts, placeholders, Newton-Schulz coefficients) is replicated."""
  abstract = jax.eval_shape(optimizer.init, abstract_params)
  replicated = NamedSharding(mesh, PartitionSpec())

  def like(leaf, param, sharding):
    if not hasattr(leaf, "shape"):  # a masked-out entry (optax.MaskedNode)
      return leaf
    if leaf.shape == param.shape:
      return sharding
    spec = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
    for axis in range(param.ndim):
      if leaf.shape == param.shape[:axis] + param.shape[axis + 1:]:
        return NamedSharding(mesh, PartitionSpec(*spec[:axis], *spec[axis + 1:]))
    return replicated

  shardings = optax.tree_map_params(
      optimizer, like, abstract, abstract_params, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  return abstract, shardings
