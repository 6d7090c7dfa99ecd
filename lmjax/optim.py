"""The optimizer: Optax AdamW with warmup + cosine decay, global-norm clipping and a
weight-decay mask that leaves norm scales, biases and embeddings alone unless configured."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to ``optim.learning_rate``, then cosine decay to ``end_lr_fraction`` of it."""
  o = cfg.optim
  decay = o.decay_steps if o.decay_steps > 0 else max(cfg.train.steps - o.warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
      decay_steps=o.warmup_steps + decay, end_value=o.learning_rate * o.end_lr_fraction)


def weight_decay_mask(params: Any, decay_norms_and_embeddings: bool = False) -> Any:
  """True for parameters that get weight decay: matrices, not norm scales, biases or
  (token and position) embeddings."""

  def decays(path, x) -> bool:
    names = [str(getattr(k, "key", k)) for k in path]
    if decay_norms_and_embeddings:
      return True
    return not (names[-1] in ("scale", "bias") or names[-1].endswith("_bias")
                or {"embed", "pos_embed", "lm_head"} & set(names))

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = cfg.optim
  steps = [optax.clip_by_global_norm(o.grad_clip_norm)] if o.grad_clip_norm > 0 else []
  steps.append(optax.adamw(
      learning_rate_schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
      mask=lambda p: weight_decay_mask(p, o.decay_norms_and_embeddings)))
  return optax.chain(*steps)
