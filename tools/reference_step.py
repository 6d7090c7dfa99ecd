"""A minimal hand-written JAX train step of the lmjax model: the benchmarks' reference.

Plain ``jnp`` and no framework: token embedding, RMSNorm, RoPE (half-split), grouped-query
causal attention within packed documents with the softmax in float32, SwiGLU, tied or
untied head, cross-entropy over the real tokens (segment id != 0); ``jax.value_and_grad``;
Optax AdamW with global-norm clipping and lmjax's schedule and weight-decay mask; the
layers stacked and run by ``lax.scan`` (with the configured remat policy); ``jax.jit``
with the state donated, on one device. It reads the same ``config.model`` / ``config.optim``
fields as lmjax, so it computes the same function on the same shapes, and
``tools/bench.py mfu`` times lmjax's step against it (``tests/test_bench.py`` checks that
the loss and gradients agree).

Parameters live in a flat layout of their own (``from_lmjax`` copies lmjax's in):

  embed (v, d), head (v, d) if untied, final_norm (d,), and per layer, stacked (l, ...):
  attn_norm (d,), wq (d, n, h), wk (d, k, h), wv (d, k, h), wo (n, h, d),
  mlp_norm (d,), w_gate (d, f), w_up (d, f), w_down (f, d)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

Params = dict[str, Any]
Batch = dict[str, jax.Array]  # inputs, targets, segment_ids, positions: (b, t) int32

_LAYER_KEYS = {  # reference name -> path in lmjax's params["blocks"]
    "attn_norm": ("attn_norm", "scale"), "wq": ("attn", "q"), "wk": ("attn", "k"),
    "wv": ("attn", "v"), "wo": ("attn", "o"), "mlp_norm": ("mlp_norm", "scale"),
    "w_gate": ("mlp", "gate"), "w_up": ("mlp", "up"), "w_down": ("mlp", "down"),
}
_MASKED = -1e30
_REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def from_lmjax(params: dict) -> Params:
  """lmjax's parameter dict (``state["params"]``) in the reference layout (new arrays)."""
  blocks = params["blocks"]
  out = {"embed": params["embed"]["table"], "final_norm": params["final_norm"]["scale"],
         "layers": {name: blocks[a][b] for name, (a, b) in _LAYER_KEYS.items()}}
  if "lm_head" in params:
    out["head"] = params["lm_head"]["table"]
  return jax.tree.map(jnp.copy, out)


def to_lmjax(params: Params) -> dict:
  """The inverse of :func:`from_lmjax` (e.g. to compare gradients with lmjax's)."""
  blocks: dict = {}
  for name, (a, b) in _LAYER_KEYS.items():
    blocks.setdefault(a, {})[b] = params["layers"][name]
  out = {"embed": {"table": params["embed"]}, "final_norm": {"scale": params["final_norm"]},
         "blocks": blocks}
  if "head" in params:
    out["lm_head"] = {"table": params["head"]}
  return out


def _rms(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  x32 = x.astype(jnp.float32)
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """x (b, t, n, h), sin/cos (b, t, 1, h/2): rotates the two halves of h."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _attention(q, k, v, mask, segment_ids, backend: str) -> jax.Array:
  """q (b, t, n, h), k/v (b, t, k, h) -> (b, t, n, h); causal within documents."""
  if backend == "cudnn":  # cuDNN flash attention, as lmjax's "cudnn" backend calls it
    same_doc = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]  # (b, 1, t, s)
    return jax.nn.dot_product_attention(q, k, v, mask=same_doc, is_causal=True,
                                        implementation="cudnn")
  b, t, n, h = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, n // kv, h)  # (b, t, k, g, h)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * h ** -0.5
  probs = jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(b, t, n, h)


def forward(m: ml_collections.ConfigDict, params: Params, inputs: jax.Array,
            positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Logits (b, t, v) in float32 of model config ``m`` (``config.model``)."""
  if m.attention not in ("xla", "cudnn"):
    raise ValueError(f"the reference step has no {m.attention!r} attention; use 'xla' or 'cudnn'.")
  dt = jnp.dtype(m.compute_dtype)
  b, t = inputs.shape
  x = jnp.take(params["embed"], inputs, axis=0).astype(dt)  # (b, t, d)
  freqs = m.rope_theta ** (-jnp.arange(0, m.head_dim, 2, dtype=jnp.float32) / m.head_dim)
  angles = positions.astype(jnp.float32)[..., None] * freqs  # (b, t, h/2)
  sin, cos = jnp.sin(angles)[:, :, None], jnp.cos(angles)[:, :, None]  # (b, t, 1, h/2)
  causal = jnp.tril(jnp.ones((t, t), bool))
  mask = (causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :]))[:, None, None]

  def layer(x, p):  # x (b, t, d); p: one layer's parameters
    y = _rms(x, p["attn_norm"], m.norm_eps)
    q = _rope(jnp.einsum("btd,dnh->btnh", y, p["wq"].astype(dt)), sin, cos)
    k = _rope(jnp.einsum("btd,dkh->btkh", y, p["wk"].astype(dt)), sin, cos)
    v = jnp.einsum("btd,dkh->btkh", y, p["wv"].astype(dt))
    o = _attention(q, k, v, mask, segment_ids, m.attention)  # (b, t, n, h)
    x = x + jnp.einsum("btnh,nhd->btd", o, p["wo"].astype(dt))
    y = _rms(x, p["mlp_norm"], m.norm_eps)
    g = jnp.einsum("btd,df->btf", y, p["w_gate"].astype(dt))
    u = jnp.einsum("btd,df->btf", y, p["w_up"].astype(dt))
    return x + jnp.einsum("btf,fd->btd", jax.nn.silu(g) * u, p["w_down"].astype(dt))

  if m.remat != "none":
    layer = jax.checkpoint(layer, policy=_REMAT[m.remat], prevent_cse=False)
  if m.scan_layers:
    x = jax.lax.scan(lambda x, p: (layer(x, p), None), x, params["layers"])[0]
  else:
    for i in range(m.num_layers):
      x = layer(x, jax.tree.map(lambda a: a[i], params["layers"]))
  x = _rms(x, params["final_norm"], m.norm_eps)
  head = params["head"] if "head" in params else params["embed"]
  return jnp.einsum("btd,vd->btv", x, head.astype(dt)).astype(jnp.float32)


def loss_terms(m: ml_collections.ConfigDict, params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
  """Summed next-token cross-entropy over the real tokens, and their number."""
  logits = forward(m, params, batch["inputs"], batch["positions"], batch["segment_ids"])
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(
      logits, batch["targets"][..., None], axis=-1)[..., 0]  # (b, t)
  weights = (batch["segment_ids"] != 0).astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(weights)


def schedule(cfg: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to the peak, cosine decay to ``end_lr_fraction`` of it."""
  o = cfg.optim
  decay = o.decay_steps if o.decay_steps > 0 else max(cfg.train.steps - o.warmup_steps, 1)
  return optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, o.warmup_steps, o.warmup_steps + decay, o.learning_rate * o.end_lr_fraction)


def optimizer(cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW on :func:`schedule`; no weight decay on norm scales
  and embeddings (unless ``optim.decay_norms_and_embeddings``)."""
  o = cfg.optim

  def mask(params):
    everything = o.decay_norms_and_embeddings
    return {k: (jax.tree.map(lambda _: everything, v) if k != "layers" else
                {n: everything or not n.endswith("norm") for n in v})
            for k, v in params.items()}

  adamw = optax.adamw(schedule(cfg), b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=mask)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw) if o.grad_clip_norm > 0 else adamw


def init(cfg: ml_collections.ConfigDict, params: Params) -> dict[str, Any]:
  """The train state: parameters (reference layout) and optimizer state."""
  return {"params": params, "opt_state": optimizer(cfg).init(params)}


def init_from_lmjax(cfg: ml_collections.ConfigDict, params: dict) -> dict[str, Any]:
  """The train state from lmjax's parameters, as new arrays on their device (one program)."""
  return jax.jit(lambda p: init(cfg, from_lmjax(p)))(params)


def loss_and_grads(cfg: ml_collections.ConfigDict, params: Params, batch: Batch) -> tuple[jax.Array, Params]:
  """Mean loss over the real tokens and its gradients, over ``optim.grad_accum_steps``
  microbatches (row i goes to microbatch i % accum, as in lmjax)."""
  grad_fn = jax.value_and_grad(lambda p, b: loss_terms(cfg.model, p, b), has_aux=True)
  accum = cfg.optim.grad_accum_steps
  if accum == 1:
    (loss_sum, count), grads = grad_fn(params, batch)
  else:
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1),
                         batch)  # (accum, b/accum, t)

    def one(carry, mb):
      (s, n), g = grad_fn(params, mb)
      return jax.tree.map(jnp.add, carry, (s, n, g)), None

    zeros = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
    (loss_sum, count, grads), _ = jax.lax.scan(one, zeros, micro)
  count = jnp.maximum(count, 1.0)
  return loss_sum / count, jax.tree.map(lambda g: g / count, grads)


def train_step(cfg: ml_collections.ConfigDict, state: dict, batch: Batch) -> tuple[dict, jax.Array]:
  """One AdamW update; returns the new state and the loss before it."""
  loss, grads = loss_and_grads(cfg, state["params"], batch)
  updates, opt_state = optimizer(cfg).update(grads, state["opt_state"], state["params"])
  return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss


def compile_step(cfg: ml_collections.ConfigDict):
  """``train_step`` for ``cfg`` under ``jax.jit`` with the state donated."""
  return jax.jit(lambda state, batch: train_step(cfg, state, batch), donate_argnums=0)
