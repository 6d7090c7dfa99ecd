"""Pipeline parallelism: groups of layers on the ``stage`` mesh axis, fed microbatches.

The stacked block parameters ``(l, ...)`` are cut into ``S * R`` chunks of consecutive
layers. Chunk ``r * S + s`` runs on stage ``s`` in its ``r``-th repeat, so a microbatch
visits stages ``0 .. S-1`` R times (a circular schedule; R = 1 is GPipe). All stages run
at once, each on a different microbatch, as one ``vmap`` over the stage axis; after each
iteration activations move one stage on (a roll of the stage axis, which XLA lowers to a
collective-permute). The last stage's outputs go to a buffer indexed by microbatch, which
feeds stage 0 again in the next repeat and holds the result after the last.

Iterations: ``M * R + S - 1`` for ``M`` microbatches; the bubble (stage-iterations doing
no useful work) is ``(S - 1) / (M * R + S - 1)``. The circular schedule needs M >= S.

The math equals running the layers one after another: the same blocks see the same
inputs; only where and when they run changes. Training differentiates this loop by
autodiff (``model.pipeline_schedule = "gpipe"``), keeping every iteration's activations;
:mod:`lmjax.model.pipeline_1f1b` computes the gradient inside the loop instead ("1f1b").
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from lmjax.mesh import UNCONSTRAINED, axes_taken, constrain

_STATE = ("stage", "act_batch", "act_seq", "act_embed")


def bubble_fraction(num_stages: int, num_microbatches: int, repeats: int = 1) -> float:
  """Fraction of stage-iterations that do no useful work."""
  return (num_stages - 1) / (num_microbatches * repeats + num_stages - 1)


def microbatches(x: jax.Array, m: int) -> jax.Array:
  """(b, ...) -> (m, b/m, ...), microbatch i = rows i, i+m, ... (each device keeps its rows)."""
  return x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1)


def _unmicrobatch(x: jax.Array) -> jax.Array:
  return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def run_pipeline(layers_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array],
                 stacked: Any, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
                 num_stages: int, num_microbatches: int, repeats: int = 1) -> jax.Array:
  """Applies all stacked layers to ``x`` (b, t, d) with a pipeline schedule.

  ``layers_fn(params, x, positions, segment_ids)`` runs a chunk of consecutive layers
  whose parameters are ``stacked``'s leaves sliced to ``(layers_per_chunk, ...)``.
  """
  S, M, R = num_stages, num_microbatches, repeats
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  per_chunk = num_layers // (S * R)

  # Activations entering and leaving the pipeline are replicated over the stage axis
  # (stage 0 reads any microbatch locally); their batch stays split over the batch axes.
  with axes_taken("stage") as stage_axes:
    replicated_over_stages = lambda a: constrain(a, (None, "act_batch", "act_seq", "act_embed")[:a.ndim])
    xs = replicated_over_stages(microbatches(x, M))  # (M, mb, t, d)
    pos = replicated_over_stages(microbatches(positions, M))  # (M, mb, t)
    seg = replicated_over_stages(microbatches(segment_ids, M))

  # (l, ...) -> (R, S, l/(R*S), ...): [r, s] is chunk r*S + s. For R = 1 this is the
  # storage layout (contiguous layers per stage); for R > 1 it is resharded once per step.
  def by_stage(p):
    p = p.reshape(R, S, per_chunk, *p.shape[1:])
    return constrain(p, (None, "stage") + (UNCONSTRAINED,) * (p.ndim - 2))

  params = jax.tree.map(by_stage, stacked)
  stage_ids = jnp.arange(S)

  def stage_fn(p, repeat, h, pos_s, seg_s):  # one stage: p (R, l', ...), h (mb, t, d)
    if R == 1:
      chunk = jax.tree.map(lambda a: a[0], p)
    else:  # select this repeat's chunk without a gather across stages
      pick = jnp.arange(R) == repeat
      chunk = jax.tree.map(
          lambda a: jnp.sum(jnp.where(pick.reshape((R,) + (1,) * (a.ndim - 1)), a, 0), axis=0), p)
    with axes_taken("stage"):
      return layers_fn(chunk, h, pos_s, seg_s)

  stages = jax.vmap(stage_fn, in_axes=(1, 0, 0, 0, 0), spmd_axis_name=stage_axes or None)

  def run_stages(state, t, first):
    """One iteration: shift activations one stage on, feed stage 0, run every stage."""
    shifted = jnp.roll(state, 1, axis=0)  # stage s takes stage s-1's last output
    inputs = constrain(jnp.where((stage_ids == 0)[:, None, None, None], first[None], shifted),
                       _STATE)
    work = t - stage_ids  # the (repeat, microbatch) item each stage works on, flattened
    micro = jnp.mod(work, M)
    repeat = jnp.clip(work // M, 0, R - 1)
    out = constrain(stages(params, repeat, inputs, pos[micro], seg[micro]), _STATE)
    # The last stage's output: a masked sum over stages, so one microbatch crosses the
    # stage axis (an all-reduce), never the whole stack.
    last = jnp.sum(jnp.where((stage_ids == S - 1)[:, None, None, None], out, 0), axis=0)
    return out, last

  state = constrain(jnp.zeros((S,) + xs.shape[1:], x.dtype), _STATE)
  steps = jnp.arange(M * R + S - 1)
  if R == 1:
    # GPipe: microbatch m leaves the last stage at iteration m + S - 1; collect as scan
    # outputs, nothing carried but the stage activations.
    def iteration(state, t):
      return run_stages(state, t, xs[jnp.minimum(t, M - 1)])

    _, lasts = jax.lax.scan(iteration, state, steps)  # (M + S - 1, mb, t, d)
    with axes_taken("stage"):  # keeps the backward pass from sharding it over stages
      lasts = replicated_over_stages(lasts)
    return _unmicrobatch(lasts[S - 1:])

  # Circular: the last stage's output for (microbatch m, repeat r) waits in a buffer
  # until stage 0 takes it for repeat r + 1; after the last repeat the buffer holds the result.
  def iteration(carry, t):
    state, outputs = carry  # (S, mb, t, d), (M, mb, t, d)
    first = jnp.where(t < M, xs[t % M], outputs[t % M])  # repeat 0: fresh; later: circled back
    out, last = run_stages(state, t, first)
    done = t - (S - 1)
    slot = jnp.mod(done, M)
    keep = jax.lax.dynamic_index_in_dim(outputs, slot, keepdims=False)
    last = jnp.where((done >= 0) & (done < M * R), last, keep)
    outputs = jax.lax.dynamic_update_index_in_dim(outputs, last.astype(outputs.dtype), slot, 0)
    with axes_taken("stage"):
      outputs = replicated_over_stages(outputs)
    return (out, outputs), None

  with axes_taken("stage"):
    outputs = replicated_over_stages(jnp.zeros_like(xs))
  (_, outputs), _ = jax.lax.scan(iteration, (state, outputs), steps)
  return _unmicrobatch(outputs)
