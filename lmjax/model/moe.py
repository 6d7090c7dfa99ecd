"""The mixture-of-experts feed-forward block: a router picks k of E experts per token; the
token goes through each (an MLP of ``expert_mlp_dim``) and the outputs are summed, weighted
by the router; shared experts, if any, see every token.

Routers (``config.model.router``):

- ``softmax`` (Mixtral): top-k of softmax(x W_r), the k probabilities renormalised to sum 1;
- ``sigmoid`` (DeepSeek-V3): s = sigmoid(x W_r); the top-k of s + b choose, the chosen s
  (renormalised) weigh. The bias b takes no gradient: after each update the train step moves
  it by ``router_bias_rate`` against each expert's load (:func:`update_router_bias`),
  balancing without an auxiliary loss.

Both scale the routed output by ``router_scale``. The losses over the real (non-padding)
tokens, returned per layer: load balancing E * sum_i f_i P_i (f_i the fraction of tokens
sent to expert i, summing to k; P_i the mean routing probability, for sigmoid the scores
normalised per token; k when balanced, as Switch, Mixtral and MaxText count it) and the
router z-loss mean(logsumexp(x W_r)^2) (ST-MoE).

Dispatch. ``capacity_factor`` 0 is dropless: each device sorts the assignments it receives
by expert and runs each projection as one grouped matmul (``jax.lax.ragged_dot``) over
them. A capacity factor c > 0 gives every expert at most C = ceil(c * t * k / E) of a
sequence's assignments (first choices before second choices, earlier tokens first); the
overflow is dropped, its share of the routed output is zero, and it is counted. The
capacity is per sequence so that what is dropped never depends on the mesh; capacity
buffers are dense (E, slots, d) blocks run as batched matmuls.

Expert parallelism. Expert weights (E, d, f) are split over the mesh axes of the logical
axis ``experts`` (the ``expert`` mesh axis), which also split the batch everywhere else.
Under ``shard_map`` each device sends every token assignment to the device holding its
expert with one all-to-all of fixed-size buffers (dropless: room for all of the device's
assignments per destination; capacity: the capacity), the experts run there, and a second
all-to-all brings the outputs back. FSDP-sharded expert weights are gathered inside, and
a tensor-sharded hidden width sums its partial outputs (psum), as the dense MLP does. Where
the batch cannot be split over the expert axis (a batch smaller than it), every device
keeps all tokens, runs its own experts on them and the partial outputs are summed.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmjax.mesh import activation_axes, constrain, logical_to_spec, mesh_rules
from lmjax.model.config import ModelConfig
from lmjax.model.layers import MLP, _gelu, _swiglu, param, weight

_EXPERT_AXES = {"gate": ("experts", "embed", "mlp"), "up": ("experts", "embed", "mlp"),
                "down": ("experts", "mlp", "embed")}


class MoE(nnx.Module):
  """Routed experts (+ shared experts) in place of a block's MLP.

  >>> moe = MoE(ModelConfig.from_config(cfg.model), rngs=nnx.Rngs(0))
  >>> y, stats = moe(x, segment_ids)  # x (b, t, d) -> (b, t, d); stats: see route()
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    e, d, f = cfg.num_experts, cfg.embed_dim, cfg.expert_mlp_dim or cfg.mlp_dim
    self.cfg = cfg
    self.router = param(rngs, (d, e), ("embed", None), pdt, std=cfg.init_std)  # (d, E)
    if cfg.router == "sigmoid":
      self.router_bias = param(None, (e,), (None,), pdt, fill=0.0)  # (E,), not trained
    if cfg.mlp == "swiglu":
      self.gate = param(rngs, (e, d, f), _EXPERT_AXES["gate"], pdt, std=cfg.init_std)
    self.up = param(rngs, (e, d, f), _EXPERT_AXES["up"], pdt, std=cfg.init_std)  # (E, d, f)
    self.down = param(rngs, (e, f, d), _EXPERT_AXES["down"], pdt, std=cfg.init_std)  # (E, f, d)
    if cfg.num_shared_experts:
      self.shared = MLP(d, f * cfg.num_shared_experts, rngs=rngs, std=cfg.init_std,
                        param_dtype=pdt, kind=cfg.mlp, quantization=cfg.quantization)

  def __call__(self, x: jax.Array, segment_ids: jax.Array, *,
               dropless: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    """x (b, t, d) -> (b, t, d) in x's dtype, and this layer's statistics (see :func:`route`).
    ``dropless`` ignores the capacity (generation)."""
    cfg = self.cfg
    bias = self.router_bias[...] if cfg.router == "sigmoid" else None
    idx, w, kept, rank, stats = route(cfg, x, self.router[...], bias, segment_ids,
                                      0.0 if dropless else cfg.capacity_factor)
    experts = {name: weight(getattr(self, name), x.dtype) for name in _EXPERT_AXES
               if hasattr(self, name)}
    y = dispatch(cfg, x, idx, w * kept, kept, rank, experts,
                 capacity=0 if dropless else capacity(cfg, x.shape[1]))
    if cfg.num_shared_experts:
      y = y + self.shared(x)
    return y, stats


def capacity(cfg: ModelConfig, t: int) -> int:
  """Assignments of one sequence of t tokens an expert takes; 0 = dropless."""
  if cfg.capacity_factor <= 0:
    return 0
  return max(1, math.ceil(cfg.capacity_factor * t * cfg.experts_per_token / cfg.num_experts))


def route(cfg: ModelConfig, x: jax.Array, router: jax.Array, bias: jax.Array | None,
          segment_ids: jax.Array, capacity_factor: float):
  """The router on x (b, t, d): expert ids ``idx`` (b, t, k), their weights ``w`` (float32,
  router_scale included), ``kept`` (b, t, k) (False for dropped assignments and, under a
  capacity, padding), ``rank`` (b, t, k) (the assignment's place in its expert's queue for
  its sequence) and ``stats`` over the real tokens: ``load`` (E,) assignments per expert
  (before any drop), ``aux`` and ``z`` (the balancing and z-losses), ``dropped`` and
  ``assigned`` (assignment counts) and ``tokens``."""
  e, k = cfg.num_experts, cfg.experts_per_token
  # The router weight is gathered whole (as FSDP gathers every weight), so the matmul keeps
  # the tokens' batch sharding.
  router = constrain(router.astype(jnp.float32), (None, None))
  logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), router)
  if cfg.router == "softmax":
    probs = jax.nn.softmax(logits, axis=-1)
    w, idx = jax.lax.top_k(probs, k)
    balance = probs
  else:
    scores = jax.nn.sigmoid(logits)
    _, idx = jax.lax.top_k(scores + jax.lax.stop_gradient(bias.astype(jnp.float32)), k)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    balance = scores / jnp.sum(scores, axis=-1, keepdims=True)
  w = w / jnp.sum(w, axis=-1, keepdims=True) * cfg.router_scale
  real = (segment_ids != 0).astype(jnp.float32)  # (b, t)
  tokens = jnp.sum(real)
  n = jnp.maximum(tokens, 1.0)
  chosen = jax.nn.one_hot(idx, e, dtype=jnp.float32)  # (b, t, k, E)
  load = jnp.einsum("btke,bt->e", chosen, real)
  p_mean = jnp.einsum("bte,bt->e", balance, real) / n
  aux = e * jnp.sum(jax.lax.stop_gradient(load / n) * p_mean)
  z = jnp.sum(real * jax.nn.logsumexp(logits, axis=-1) ** 2) / n
  b, t = segment_ids.shape
  if capacity_factor > 0:
    # Queue order within a sequence: all first choices (by position), then second choices...
    queue = (chosen * real[:, :, None, None]).swapaxes(1, 2).reshape(b, k * t, e)
    before = jnp.cumsum(queue, axis=1) - queue  # assignments ahead in the same expert's queue
    rank = jnp.sum(before * queue, axis=-1).reshape(b, k, t).swapaxes(1, 2).astype(jnp.int32)
    cap = max(1, math.ceil(capacity_factor * t * k / e))
    kept = (rank < cap) & (real[:, :, None] > 0)
  else:
    rank = jnp.zeros(idx.shape, jnp.int32)
    kept = jnp.ones(idx.shape, bool)
  assigned = k * tokens
  dropped = assigned - jnp.sum(kept * real[:, :, None])
  stats = {"load": load, "aux": aux, "z": z, "dropped": dropped, "assigned": assigned,
           "tokens": tokens}
  return idx, w, kept, rank, stats


def dispatch(cfg: ModelConfig, x: jax.Array, idx: jax.Array, w: jax.Array, kept: jax.Array,
             rank: jax.Array, experts: dict[str, jax.Array], capacity: int) -> jax.Array:
  """sum_j w[..., j] * expert_{idx[..., j]}(x) over the kept assignments, (b, t, d) in x's
  dtype; on a mesh under ``shard_map`` with the token exchange described above."""
  mesh = jax.sharding.get_abstract_mesh()
  kind = cfg.mlp
  if mesh.empty or all(size == 1 for size in mesh.shape.values()):
    return _local_experts(x, idx, w, kept, rank, experts, kind=kind, capacity=capacity,
                          num_experts=cfg.num_experts)
  rules, shape = mesh_rules(), dict(mesh.shape)
  batch = tuple(activation_axes(x.shape, ("act_batch", "act_seq", "act_embed"))[0])
  specs = {name: logical_to_spec(_EXPERT_AXES[name], rules, a.shape, shape)
           for name, a in experts.items()}
  axes = lambda entry: () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
  spec_e, spec_d, spec_f = (axes(a) for a in specs["up"])
  if set(spec_e) <= set(batch):
    exchange, own = spec_e, ()
  elif not set(spec_e) & set(batch):
    exchange, own = (), spec_e
  else:
    raise ValueError(f"config.mesh.rules: 'experts' maps to mesh axes {spec_e}, of which only "
                     f"some split the batch ({batch}); map it to batch axes only, or to none.")
  f_gather = tuple(a for a in spec_f if a in batch)  # the batch needs the whole hidden width
  f_sum = tuple(a for a in spec_f if a not in batch)
  tokens = P(batch or None)

  def body(x, idx, w, kept, rank, experts):
    gathered = {}
    for name, a in experts.items():
      d_axis, f_axis = (1, 2) if name != "down" else (2, 1)
      if spec_d:
        a = jax.lax.all_gather(a, spec_d, axis=d_axis, tiled=True)
      if f_gather:
        a = jax.lax.all_gather(a, f_gather, axis=f_axis, tiled=True)
      gathered[name] = a
    y = _local_experts(x, idx, w, kept, rank, gathered, kind=kind, capacity=capacity,
                       num_experts=cfg.num_experts, exchange=exchange, own=own)
    return jax.lax.psum(y, f_sum + own) if f_sum + own else y

  in_specs = (tokens,) * 5 + ({name: specs[name] for name in experts},)
  return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=tokens)(
      x, idx, w, kept, rank, experts)


def _local_experts(x, idx, w, kept, rank, experts, *, kind: str, capacity: int, num_experts: int,
                   exchange: tuple[str, ...] = (), own: tuple[str, ...] = ()) -> jax.Array:
  """One device's part of :func:`dispatch`: its tokens x (b, t, d) and assignments (b, t, k),
  the experts it holds (E_l, d, f), ``exchange`` the mesh axes over which assignments travel
  to their expert's device (all-to-all), ``own`` those over which every device sees the
  same tokens and runs only its own experts (the caller sums over them)."""
  b, t, d = x.shape
  k = idx.shape[-1]
  e_local = experts["up"].shape[0]
  ep = jax.lax.axis_size(exchange) if exchange else 1
  if own:
    idx = idx - jax.lax.axis_index(own) * e_local  # this device's experts are 0..E_l-1
    kept = kept & (idx >= 0) & (idx < e_local)
  idx, w, kept, rank = (a.reshape(b * t * k) for a in (idx, w, kept, rank))
  token = jnp.arange(b * t * k) // k
  dest, local = idx // e_local, idx % e_local  # destination device, expert there
  if capacity:
    per_expert = b * capacity  # slots per (source device, expert)
    slots = e_local * per_expert
    slot = local * per_expert + (token // t) * capacity + rank
  else:
    slots = b * t * k  # room for all of this device's assignments at any one destination
    onehot = jax.nn.one_hot(dest, ep, dtype=jnp.int32) * kept[:, None]
    slot = jnp.take_along_axis(jnp.cumsum(onehot, axis=0) - onehot, dest[:, None], axis=1)[:, 0]
  where = jnp.where(kept, dest * slots + slot, ep * slots)  # out of range: not sent
  rows = jnp.take(jnp.reshape(x, (b * t, d)), token, axis=0)  # (b t k, d): each assignment's token
  send = jnp.zeros((ep * slots, d), x.dtype).at[where].set(rows, mode="drop")
  swap = (lambda a: jax.lax.all_to_all(a, exchange, 0, 0, tiled=True)) if exchange else (lambda a: a)
  recv = swap(send)  # (ep * slots, d): block i came from device i
  if capacity:  # (ep, E_l, slots/E_l, d) -> per expert, batched
    h = recv.reshape(ep, e_local, per_expert, d).swapaxes(0, 1).reshape(e_local, ep * per_expert, d)
    mm = lambda a, name: jnp.einsum("ecd,edf->ecf", a, experts[name])
    out = _ffn(h, mm, kind)
    out = out.reshape(e_local, ep, per_expert, d).swapaxes(0, 1).reshape(ep * slots, d)
  else:  # sort what arrived by expert; one grouped matmul per projection
    ids = swap(jnp.full((ep * slots,), e_local, jnp.int32).at[where].set(local, mode="drop"))
    order = jnp.argsort(ids, stable=True)
    sizes = jnp.sum(jax.nn.one_hot(ids, e_local, dtype=jnp.int32), axis=0)  # (E_l,); padding: none
    mm = lambda a, name: jax.lax.ragged_dot(a, experts[name], sizes)
    out_sorted = _ffn(recv[order], mm, kind)
    filled = jnp.arange(ep * slots) < jnp.sum(sizes)
    out_sorted = jnp.where(filled[:, None], out_sorted, 0)
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
  back = swap(out)
  mine = jnp.take(back, jnp.minimum(where, ep * slots - 1), axis=0)  # (b t k, d)
  y = jnp.sum((mine.astype(jnp.float32) * (w * kept)[:, None]).reshape(b * t, k, d), axis=1)
  return y.reshape(b, t, d).astype(x.dtype)


def _ffn(h: jax.Array, mm, kind: str) -> jax.Array:
  """An expert MLP over rows h with matmul ``mm(h, name)`` (grouped or batched)."""
  if kind == "swiglu":
    return mm(_swiglu(mm(h, "gate"), mm(h, "up")), "down")
  return mm(_gelu(mm(h, "up")), "down")


def update_router_bias(params: Any, load: jax.Array, rate: float) -> Any:
  """DeepSeek-V3's auxiliary-loss-free balancing: every ``router_bias`` (l_moe, E) of
  ``params`` moves by ``rate`` towards balance, b += rate * sign(mean load - load), with
  ``load`` (l_moe, E) the step's assignments per expert of each MoE layer."""
  def step(path, p):
    if getattr(path[-1], "key", None) != "router_bias":
      return p
    delta = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    return p + (rate * delta).astype(p.dtype)
  return jax.tree_util.tree_map_with_path(step, params)
