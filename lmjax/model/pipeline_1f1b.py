"""The 1F1B pipeline schedule: a pipelined step's loss and gradient, computed stage by stage.

:mod:`lmjax.model.pipeline` runs the forward pass as a loop and lets autodiff differentiate
it, which keeps every iteration's activations until the backward pass: memory grows with
the number of microbatches ``M``. Here the gradient is computed by hand inside the loop
("one forward, one backward"). At tick ``t`` stage ``s``

- runs the forward of microbatch ``t - s`` on its input (stage 0: the embedded tokens;
  the others: stage ``s - 1``'s output of the previous tick) and keeps that input;
- the last stage's output goes straight into the final norm, the output projection and
  the loss; their gradient w.r.t. the output starts that microbatch's backward pass;
- runs the backward of microbatch ``t - 2(S - 1) + s``: ``jax.vjp`` of its layers,
  recomputed from the kept input, with the gradient w.r.t. its output from stage ``s + 1``
  (the last stage: the loss's). The parameter gradients add up per stage; the gradient
  w.r.t. the input moves to stage ``s - 1`` (stage 0: into the embedding's gradient).

All stages run at once as one ``vmap`` over the ``stage`` axis (``spmd_axis_name``);
activations move one stage on and gradients one stage back per tick (rolls, lowered to
collective-permutes). A microbatch's input waits at stage ``s`` from its forward to its
backward, ``2(S - 1 - s)`` ticks, so a buffer of ``2S - 1`` microbatch inputs per stage
serves any ``M``: activation memory is bounded by the stages, not the microbatches.

Interleaved (``repeats`` R > 1, Megatron's virtual stages): stage ``s`` holds the chunks
``r S + s`` of ``S R`` chunks of layers, and microbatches go in groups of ``S``: a group
passes the stages R times (the last stage's output feeds stage 0 directly, one chunk on),
then the next group enters; backwards run in the reverse order. The buffer holds ``2 S R
- 1`` chunk inputs.

Ticks: ``M R + S R + S - 2``. The first ``S R - 1`` only run forwards and the last ``S R
- 1`` only backwards (a condition on the tick, not a mask), so each stage spends the time
of ``M R + S - 1`` chunk forwards and as many backwards: the bubble is ``(S - 1) / (M R + S
- 1)``, GPipe's and the circular schedule's. The price is one more forward per microbatch
and chunk (the recomputation, as ``model.remat = "full"`` pays for GPipe).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from lmjax.mesh import UNCONSTRAINED, axes_taken, constrain
from lmjax.model.pipeline import microbatches

_STATE = ("stage", "act_batch", "act_seq", "act_embed")
_ACT = ("act_batch", "act_seq", "act_embed")

Embed = Callable[[Any, dict], jax.Array]  # (rest, microbatch) -> x (mb, t, d)
Layers = Callable[[Any, jax.Array, dict], jax.Array]  # (chunk params, x, microbatch) -> y
Head = Callable[[Any, jax.Array, dict], tuple[jax.Array, dict]]  # (rest, y, mb) -> loss, sums


def buffer_size(num_stages: int, repeats: int = 1) -> int:
  """Microbatch inputs each stage keeps: those between their forward and backward ticks."""
  return 2 * num_stages * repeats - 1


def pipeline_grads(embed: Embed, layers: Layers, head: Head, rest: Any, stacked: Any,
                   batch: dict[str, jax.Array], *, num_stages: int, num_microbatches: int,
                   repeats: int = 1) -> tuple[tuple[jax.Array, dict], tuple[Any, Any]]:
  """The summed loss of ``batch`` split into microbatches, and its gradients, by 1F1B.

  ``embed(rest, mb)`` gives the blocks' input (mb, t, d) for microbatch ``mb`` (``batch``'s
  arrays cut to its rows); ``layers(chunk, x, mb)`` runs a chunk of consecutive blocks whose
  parameters are ``stacked``'s leaves sliced to ``(l / (S R), ...)``; ``head(rest, y, mb)``
  gives the loss to differentiate and a dict of sums to report (not differentiated) from
  the blocks' output. ``rest`` holds every parameter outside the blocks. ``repeats`` R > 1
  interleaves (needs M a multiple of S).

  Returns ``((loss, sums), (rest_grads, stacked_grads))``, summed over microbatches: what
  ``jax.value_and_grad(f, argnums=(0, 1), has_aux=True)`` of the unpipelined sum gives.
  """
  S, M, R = num_stages, num_microbatches, repeats
  SR, B = S * R, buffer_size(S, R)
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  stage_ids = jnp.arange(S)
  at_stage = lambda mask, a: mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim))

  with axes_taken("stage") as stage_axes:  # microbatches: replicated over the stage axis
    mbs = jax.tree.map(lambda a: constrain(microbatches(a, M), (None, "act_batch", "act_seq")),
                       batch)  # (M, mb, t)

  def by_stage(p):  # (l, ...) -> (R, S, l/(R S), ...): [r, s] is chunk r S + s
    p = p.reshape(R, S, num_layers // SR, *p.shape[1:])
    return constrain(p, (None, "stage") + (UNCONSTRAINED,) * (p.ndim - 2))

  params = jax.tree.map(by_stage, stacked)
  one = lambda i: jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), mbs)
  per_stage = lambda i: jax.tree.map(lambda a: a[jnp.clip(i, 0, M - 1)], mbs)  # (S, mb, t)

  # A stage's w-th forward and v-th backward: groups of S microbatches, each group passing
  # the stages R times (repeat r: chunk r S + s), backwards in the reverse order.
  def forward_item(w):  # -> (repeat, microbatch)
    g, k = jnp.divmod(w, SR)
    return k // S, g * S + k % S

  def backward_item(v):  # -> (repeat, microbatch, the item's forward index)
    g, k = jnp.divmod(v, SR)
    r = R - 1 - k // S
    return r, g * S + k % S, g * SR + r * S + k % S

  def chunk(p, r):  # a stage's (R, l', ...) -> repeat r's (l', ...), no gather across stages
    if R == 1:
      return jax.tree.map(lambda a: a[0], p)
    return jax.tree.map(lambda a: jnp.sum(jnp.where(at_stage(jnp.arange(R) == r, a), a, 0), axis=0), p)

  def stage_forward(p, r, x, mb):
    with axes_taken("stage"):
      return layers(chunk(p, r), x, mb)

  def stage_backward(p, r, x, dy, mb):
    with axes_taken("stage"):
      _, vjp = jax.vjp(lambda c, x: layers(c, x, mb), chunk(p, r), x)
      return vjp(dy)

  vmapped = lambda f, n: jax.vmap(f, in_axes=(1,) + (0,) * n, spmd_axis_name=stage_axes or None)
  forwards, backwards = vmapped(stage_forward, 3), vmapped(stage_backward, 4)

  def slot_mask(w, valid):  # (S, B, 1, 1, 1): each working stage's buffer slot of item w[s]
    hit = (jnp.mod(w, B)[:, None] == jnp.arange(B)[None, :]) & valid[:, None]
    return hit[:, :, None, None, None]

  def forward(c, t):
    w = t - stage_ids
    r, m = forward_item(w)
    valid = (w >= 0) & (w < M * R)
    x0 = constrain(embed(rest, one(jnp.clip(m[0], 0, M - 1))), _ACT)
    shifted = jnp.roll(c["act"], 1, axis=0)  # stage s takes stage s-1's output (0: S-1's)
    inputs = jnp.where(at_stage((stage_ids == 0) & (r == 0), shifted), x0[None], shifted)
    inputs = constrain(inputs, _STATE)
    out = constrain(forwards(params, r, inputs, per_stage(m)), _STATE)
    saved = jnp.where(slot_mask(w, valid), inputs[:, None], c["saved"])
    return {**c, "act": out, "saved": constrain(saved, ("stage", None) + _ACT)}

  def loss(c, t):  # the last stage's output of this tick, after the last chunk
    mb = one(forward_item(t - (S - 1))[1])
    last = jnp.sum(jnp.where(at_stage(stage_ids == S - 1, c["act"]), c["act"], 0), axis=0)
    value, vjp, sums = jax.vjp(lambda r, y: head(r, y, mb), rest, constrain(last, _ACT),
                               has_aux=True)
    d_rest, dy = vjp(jnp.ones_like(value))
    return {**c, "dy": constrain(dy, _ACT), "d_rest": _add(c["d_rest"], d_rest),
            "value": c["value"] + value, "sums": _add(c["sums"], sums)}

  def backward(c, t):
    v = t - (SR + S - 2) + stage_ids
    r, m, w = backward_item(v)
    valid = (v >= 0) & (v < M * R)
    shifted = jnp.roll(c["grad"], -1, axis=0)  # stage s takes stage s+1's input gradient
    dy = jnp.where(at_stage((stage_ids == S - 1) & (r == R - 1), shifted), c["dy"][None], shifted)
    dy = constrain(jnp.where(at_stage(valid, dy), dy, 0), _STATE)
    x = jnp.sum(jnp.where(slot_mask(w, valid), c["saved"], 0), axis=1)
    dp, dx = backwards(params, r, constrain(x, _STATE), dy, per_stage(m))
    dx = constrain(jnp.where(at_stage(valid, dx), dx, 0), _STATE)
    pick = (jnp.arange(R)[:, None] == r[None, :]) & valid[None, :]  # (R, S)
    d_stacked = jax.tree.map(lambda g, d: g + jnp.where(at_stage(pick, g), d[None], 0).astype(g.dtype),
                             c["d_stacked"], dp)
    c = {**c, "grad": dx, "d_stacked": d_stacked}
    # Stage 0's input gradient after its first chunk: into the embedding.
    r0, m0, _ = backward_item(v[0])
    return jax.lax.cond(valid[0] & (r0 == 0), embed_grad, lambda c, m: c, c, m0)

  def embed_grad(c, m):
    dx0 = constrain(jnp.sum(jnp.where(at_stage(stage_ids == 0, c["grad"]), c["grad"], 0), axis=0), _ACT)
    mb = one(jnp.clip(m, 0, M - 1))
    _, vjp = jax.vjp(lambda r: embed(r, mb), rest)
    return {**c, "d_rest": _add(c["d_rest"], vjp(dx0)[0])}

  def tick(c, t):
    last_r = forward_item(t - (S - 1))[0]
    c = jax.lax.cond(t < M * R + S - 1, forward, lambda c, t: c, c, t)
    c = jax.lax.cond((t >= S - 1) & (t < M * R + S - 1) & (last_r == R - 1), loss,
                     lambda c, t: c, c, t)
    c = jax.lax.cond(t >= SR - 1, backward, lambda c, t: c, c, t)
    return c, None

  x_shape = jax.eval_shape(embed, rest, one(0))
  state = lambda: constrain(jnp.zeros((S,) + x_shape.shape, x_shape.dtype), _STATE)
  value_shape, sums_shape = jax.eval_shape(head, rest, x_shape, one(0))
  zeros = lambda tree: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), tree)
  carry = {
      "act": state(), "grad": state(), "dy": constrain(jnp.zeros(x_shape.shape, x_shape.dtype), _ACT),
      "saved": constrain(jnp.zeros((S, B) + x_shape.shape, x_shape.dtype), ("stage", None) + _ACT),
      "d_stacked": jax.tree.map(lambda p: constrain(jnp.zeros_like(p), (None, "stage") + (UNCONSTRAINED,)
                                                    * (p.ndim - 2)), params),
      "d_rest": zeros(rest), "value": zeros(value_shape), "sums": zeros(sums_shape),
  }
  c, _ = jax.lax.scan(tick, carry, jnp.arange(M * R + SR + S - 2))
  d_stacked = jax.tree.map(lambda g: g.reshape(num_layers, *g.shape[3:]), c["d_stacked"])
  return (c["value"], c["sums"]), (c["d_rest"], d_stacked)


def _add(a: Any, b: Any) -> Any:
  return jax.tree.map(lambda x, y: x + y.astype(x.dtype), a, b)
