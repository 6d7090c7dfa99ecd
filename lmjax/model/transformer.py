"""The decoder-only Transformer: blocks stacked along a ``layers`` axis and run with a scan."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
import ml_collections

from lmjax.mesh import constrain
from lmjax.model import context, lora
from lmjax.model.attention import STACKED_CACHE_AXES, Attention, KVCache
from lmjax.model.config import ModelConfig
from lmjax.model.layers import MLP, Embed, Rope, make_norm, param
from lmjax.model.moe import MoE
from lmjax.model.pipeline import run_pipeline

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

_ACT = ("act_batch", "act_res_seq", "act_embed")  # the residual stream


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)), the MLP dense or,
  with ``moe``, a mixture of experts (:class:`lmjax.model.moe.MoE`).

  >>> block = Block(ModelConfig.from_config(default_config().model), rngs=nnx.Rngs(0))
  >>> y, stats = block(x, positions, segment_ids)  # x (b, t, d) -> (b, t, d); stats: MoE's ({} if dense)
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, moe: bool = False):
    pdt = jnp.dtype(cfg.param_dtype)
    adapters = lora.Adapters.from_config(cfg)
    self.attn_norm = make_norm(cfg.norm, cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt)
    self.attn = Attention(cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                          rope_theta=Rope.from_config(cfg), rngs=rngs, std=cfg.init_std,
                          param_dtype=pdt, backend=cfg.attention,
                          use_rope=cfg.position_embedding == "rope", bias=cfg.attention_bias,
                          sliding_window=cfg.sliding_window, quantization=cfg.quantization,
                          context_attention=cfg.context_attention,
                          context_load_balance=cfg.context_load_balance, causal=cfg.causal,
                          adapters=adapters)
    self.mlp_norm = make_norm(cfg.norm, cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt)
    if moe:
      self.moe = MoE(cfg, rngs=rngs)
    else:
      self.mlp = MLP(cfg.embed_dim, cfg.mlp_dim, rngs=rngs, std=cfg.init_std, param_dtype=pdt,
                     kind=cfg.mlp, bias=cfg.mlp_bias, quantization=cfg.quantization,
                     adapters=adapters)

  def __call__(self, x: jax.Array, positions: jax.Array,
               segment_ids: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    x = x + self.attn(self.attn_norm(x), positions, segment_ids)
    x = constrain(x, _ACT)
    h, stats = self._feed_forward(self.mlp_norm(x), segment_ids)
    return constrain(x + h, _ACT), stats

  def _feed_forward(self, x: jax.Array, segment_ids: jax.Array,
                    dropless: bool = False) -> tuple[jax.Array, dict[str, jax.Array]]:
    if hasattr(self, "moe"):
      return self.moe(x, segment_ids, dropless=dropless)
    return self.mlp(x), {}

  def decode(self, x: jax.Array, positions: jax.Array, k_cache: jax.Array, v_cache: jax.Array,
             index: jax.Array, start: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The block on t new tokens attending over this layer's cache (b, s, k, h)."""
    h, k_cache, v_cache = self.attn.decode(self.attn_norm(x), positions, k_cache, v_cache, index,
                                           start)
    x = constrain(x + h, _ACT)
    segment_ids = jnp.ones(x.shape[:2], jnp.int32)
    x = x + self._feed_forward(self.mlp_norm(x), segment_ids, dropless=True)[0]
    return constrain(x, _ACT), k_cache, v_cache


class Transformer(nnx.Module):
  """Llama-style decoder LM. ``cfg`` is ``config.model`` (a ConfigDict, a dict or a
  :class:`ModelConfig`), kept as a frozen :class:`ModelConfig` in ``self.cfg``; its ``norm``,
  ``mlp``, ``position_embedding`` and bias options also make it GPT-2 (LayerNorm, GELU MLP,
  learned positions, biases).

  >>> model = Transformer(default_config().model, rngs=nnx.Rngs(0))
  >>> logits = model(tokens)  # tokens (b, t) int32 -> (b, t, v) float32

  Generation with a KV cache (``num_stages == 1``), prompts left-padded:

  >>> cache = model.init_cache(batch=2, max_len=32, start=jnp.array([0, 3]))
  >>> logits, cache = model.decode(prompts, cache)  # prefill: prompts (2, t)
  >>> logits, cache = model.decode(next_tokens, cache)  # one step: next_tokens (2, 1)
  """

  def __init__(self, cfg: ModelConfig | ml_collections.ConfigDict, *, rngs: nnx.Rngs,
               num_stages: int = 1):
    self.cfg = cfg = ModelConfig.from_config(cfg)  # hashable: the GraphDef is a jit key
    self.num_stages = num_stages  # pipeline stages the blocks are spread over (mesh "stage")
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed = Embed(cfg.vocab_size, cfg.embed_dim, rngs=rngs, std=cfg.init_std, param_dtype=pdt)
    if cfg.position_embedding == "learned":
      self.pos_embed = param(rngs, (cfg.max_seq_len, cfg.embed_dim), (None, "embed"), pdt,
                             std=cfg.init_std)  # (max_seq_len, d)

    def make_blocks(count: int, moe: bool) -> Block:  # params stacked (count, ...)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make(rngs):
        return Block(cfg, rngs=rngs, moe=moe)
      return make(rngs.split(count))

    # A dense model stacks every block in ``blocks``; a MoE model stacks its MoE blocks there
    # and its dense ones (the first_dense_layers, and those between MoE layers) in
    # ``dense_blocks``; :meth:`_walk` runs them in layer order.
    moe_layers = len(cfg.moe_layers)
    self.blocks = make_blocks(moe_layers or cfg.num_layers, moe=moe_layers > 0)
    if moe_layers and cfg.num_layers > moe_layers:
      self.dense_blocks = make_blocks(cfg.num_layers - moe_layers, moe=False)
    self.final_norm = make_norm(cfg.norm, cfg.embed_dim, eps=cfg.norm_eps, param_dtype=pdt)
    if not cfg.tie_embeddings:
      self.lm_head = Embed(cfg.vocab_size, cfg.embed_dim, rngs=rngs, std=cfg.init_std,
                           param_dtype=pdt)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """tokens (b, t) -> logits (b, t, v) in float32.

    ``positions`` restart at 0 for each packed document and ``segment_ids`` (0 = padding)
    keep attention within a document; both default to one document per row.
    """
    return self.logits(self.forward(tokens, positions, segment_ids)[0])

  def logits(self, features: jax.Array) -> jax.Array:
    """The output projection of :meth:`features` (b, t, d): logits (b, t, v) in float32."""
    logits = self.head.attend(features).astype(jnp.float32)
    return constrain(logits, ("act_batch", "act_seq", "act_vocab"))  # (b, t, v)

  @property
  def head(self) -> Embed:
    """The output projection: the token embedding when tied, else ``lm_head``."""
    return self.embed if self.cfg.tie_embeddings else self.lm_head

  def features(self, tokens: jax.Array, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """The final-normed hidden states (b, t, d) in the compute dtype: what the output
    projection (:attr:`head`) turns into logits. Arguments as for ``__call__``."""
    return self.forward(tokens, positions, segment_ids)[0]

  def forward(self, tokens: jax.Array, positions: jax.Array | None = None,
              segment_ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:meth:`features`, and the MoE layers' statistics stacked (l_moe, ...) (``{}`` for a
    dense model; see :func:`lmjax.model.moe.route`)."""
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    c = context.shards(t)
    balance = c > 1 and self.cfg.context_load_balance  # equal causal work per context device
    if balance:
      order = context.balance_order(t, c)
      tokens, positions, segment_ids = (a[:, order] for a in (tokens, positions, segment_ids))
    x = self.embed_tokens(tokens, positions)  # (b, t, d)
    x, stats = self._run_blocks(x, positions, segment_ids)
    x = self.final_norm(x)
    if balance:
      x = constrain(x[:, np.argsort(order)], _ACT)
    return x, stats

  def embed_tokens(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    """Token embeddings (plus learned position embeddings) in the compute dtype: (b, t, d)."""
    dt = jnp.dtype(self.cfg.compute_dtype)
    x = self.embed(tokens, dt)
    if self.cfg.position_embedding == "learned":
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
    return constrain(x, _ACT)

  def _run_blocks(self, x: jax.Array, positions: jax.Array,
                  segment_ids: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.cfg
    if self.num_stages == 1:
      block = self._block_fn()
      return self._walk(x, lambda x, graphdef, params, i: block(graphdef, x, params, positions,
                                                                segment_ids))
    layers = self.stage_layers()
    micro = cfg.pipeline_microbatches if cfg.pipeline_microbatches > 0 else self.num_stages
    x = run_pipeline(layers, nnx.split(self.blocks)[1], x, positions, segment_ids,
                     num_stages=self.num_stages, num_microbatches=micro,
                     repeats=cfg.pipeline_repeats)
    return x, {}

  def _block_fn(self):
    """``block(graphdef, x, layer_params, positions, segment_ids) -> (x, stats)``, remat'd
    as ``config.model.remat`` says."""
    def block(graphdef, x, layer_params, positions, segment_ids):
      return nnx.merge(graphdef, layer_params)(x, positions, segment_ids)

    if self.cfg.remat != "none":
      block = jax.checkpoint(block, policy=REMAT_POLICIES[self.cfg.remat], prevent_cse=False,
                             static_argnums=(0,))
    return block

  def stage_layers(self):
    """``layers(params, x, positions, segment_ids) -> x``: consecutive blocks of a dense
    model whose parameters are :attr:`blocks`' leaves sliced to ``(l', ...)`` (a pipeline
    stage's chunk)."""
    graphdef, block = nnx.graphdef(self.blocks), self._block_fn()
    scan_layers = self.cfg.scan_layers

    def layers(params, x, positions, segment_ids):
      step = lambda carry, p: (block(graphdef, carry, p, positions, segment_ids)[0], None)
      return _scan(step, x, params, scan_layers)[0]

    return layers

  def _walk(self, carry: Any, step) -> tuple[Any, dict[str, jax.Array]]:
    """Runs ``step(carry, graphdef, layer_params, i) -> (carry, stats)`` over the layers in
    order (i the layer's index); returns the carry and the MoE layers' stats stacked."""
    cfg = self.cfg
    scan = lambda f, carry, xs: _scan(f, carry, xs, cfg.scan_layers)
    main_def, main = nnx.split(self.blocks)
    on = lambda graphdef: (lambda c, xs: step(c, graphdef, *xs))
    if not cfg.moe_layers:
      return scan(on(main_def), carry, (main, jnp.arange(cfg.num_layers)))[0], {}
    k, p, n = cfg.first_dense_layers, cfg.moe_every, len(cfg.moe_layers)
    dense_def, dense = nnx.split(self.dense_blocks) if hasattr(self, "dense_blocks") else (None, None)
    if k:
      first = jax.tree.map(lambda a: a[:k], dense)
      carry = scan(on(dense_def), carry, (first, jnp.arange(k)))[0]
    between = (jax.tree.map(lambda a: a[k:].reshape(n, p - 1, *a.shape[1:]), dense)
               if p > 1 else None)  # the p - 1 dense layers before each MoE layer

    def unit(c, xs):
      dense_params, moe_params, i = xs  # i: the MoE layer's index
      if p > 1:
        c = scan(on(dense_def), c, (dense_params, i - (p - 1) + jnp.arange(p - 1)))[0]
      return step(c, main_def, moe_params, i)

    return scan(unit, carry, (between, main, jnp.asarray(cfg.moe_layers)))

  def init_cache(self, batch: int, max_len: int, start: jax.Array | None = None) -> KVCache:
    """An empty :class:`KVCache` of ``max_len`` slots per row, in the compute dtype.

    ``start`` (b,) gives each row's left padding: its first real slot (default 0).
    """
    cfg = self.cfg
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)  # (l, b, s, k, h)
    zeros = lambda: constrain(jnp.zeros(shape, jnp.dtype(cfg.compute_dtype)), STACKED_CACHE_AXES)
    start = jnp.zeros((batch,), jnp.int32) if start is None else jnp.asarray(start, jnp.int32)
    return KVCache(k=zeros(), v=zeros(), index=jnp.zeros((), jnp.int32), start=start)

  def decode(self, tokens: jax.Array, cache: KVCache, *,
             last_only: bool = False) -> tuple[jax.Array, KVCache]:
    """tokens (b, t) written at cache slots index..index+t-1 -> logits (b, t, v) in float32
    (``last_only``: (b, 1, v) of the last token) and the cache advanced by t.

    A prefill is a call with the (left-padded) prompts, a decode step one with t = 1; both
    give the logits of the full forward pass. Attention uses the XLA einsums for every
    ``config.model.attention`` backend. Needs ``num_stages == 1`` (checkpoints restore onto
    a mesh with ``mesh.stage = 1``).
    """
    if self.num_stages != 1:
      raise ValueError(f"decoding with a KV cache needs num_stages == 1, got {self.num_stages}; "
                       "build the model on a mesh with mesh.stage=1 (checkpoints restore onto "
                       "any mesh).")
    t = tokens.shape[1]
    slots = cache.index + jnp.arange(t, dtype=jnp.int32)  # (t,)
    positions = jnp.maximum(slots[None, :] - cache.start[:, None], 0)  # (b, t); padding at 0
    x = self.embed_tokens(tokens, positions)  # (b, t, d)

    # The stacked cache rides in the carry and layer i's slice is written back in place,
    # so the cache is never held twice (as it would be as a scan input and output).
    def block(carry, graphdef, params, i):  # carry: x (b, t, d), k and v (l, b, s, k, h)
      x, k, v = carry
      x, k_i, v_i = nnx.merge(graphdef, params).decode(x, positions, k[i], v[i], cache.index,
                                                       cache.start)  # k_i, v_i (b, s, k, h)
      k = constrain(jax.lax.dynamic_update_index_in_dim(k, k_i, i, 0), STACKED_CACHE_AXES)
      v = constrain(jax.lax.dynamic_update_index_in_dim(v, v_i, i, 0), STACKED_CACHE_AXES)
      return (x, k, v), {}

    x, k, v = self._walk((x, cache.k, cache.v), block)[0]
    if last_only:
      x = x[:, -1:]
    logits = self.logits(self.final_norm(x))
    return logits, KVCache(k=k, v=v, index=cache.index + t, start=cache.start)


def _scan(f, carry: Any, xs: Any, scan: bool) -> tuple[Any, Any]:
  """``jax.lax.scan(f, carry, xs)``, or the same as a Python loop (``scan`` False)."""
  if scan:
    return jax.lax.scan(f, carry, xs)
  outs = []
  for i in range(jax.tree.leaves(xs)[0].shape[0]):
    carry, out = f(carry, jax.tree.map(lambda a: a[i], xs))
    outs.append(out)
  return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)


def logical_axes(abstract_model: nnx.Module) -> dict[str, Any]:
  """The parameters' logical axis names, as a pure dict shaped like the parameters."""
  state = nnx.state(abstract_model, nnx.Param)
  names = jax.tree.map(lambda v: tuple(v.get_metadata()["out_sharding"]), state,
                       is_leaf=lambda x: isinstance(x, nnx.Variable))
  return names.to_pure_dict() if hasattr(names, "to_pure_dict") else names


def count_params(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
