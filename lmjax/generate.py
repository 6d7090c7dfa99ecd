"""Text generation with a KV cache: batched prompts, greedy or temperature / top-k / top-p
sampling, stop tokens per row.

Prompts are left-padded to one width (the longest one's length rounded up to a power of
two, :func:`prompt_width`: prompts of many lengths share a few programs), so every row
writes the same cache slot at each step and row b's tokens sit at positions ``slot - start[b]``. Jitted calls, each
donating the cache to the next: the prefill runs :meth:`Transformer.decode` over the padded
prompts into an empty cache, then a ``lax.while_loop`` draws one token per row and feeds it
back until every row has hit a stop token or ``max_new_tokens`` are out. A stopped row keeps
running but its outputs are padding. The i-th new token of every row is drawn with
``fold_in(jax.random.key(seed), i)``, so a seed gives the same text for the same batch.

Attention in the cache path is always the XLA einsum version (the cuDNN and splash
backends serve training only), and the model must not be pipelined (``mesh.stage = 1``;
:func:`load_run` and ``lmjax.load`` restore a pipelined run's checkpoint unpipelined).

Example::

  run = load_run("runs/tiny")  # or lmjax.load(...): both restore a pipelined run unpipelined
  generate(run.setup, run.params, run.tokenizer, ["def f(x):"], max_new_tokens=32,
           temperature=0.8, top_p=0.95)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from lmjax.mesh import make_rules, use_rules
from lmjax.model import Transformer
from lmjax.model.attention import KVCache
from lmjax.rundir import LOAD_MESH
from lmjax.state import Setup
from lmjax.trained import TrainedRun, load

# What the generation functions accept as the model: a Setup (uses its mesh and rules),
# a Transformer, or its nnx.GraphDef. The parameters are passed separately.
Model = Setup | Transformer | nnx.GraphDef
# The static jit argument standing for the model: a Setup (hashed by identity) or a GraphDef
# (hashed by value: its frozen ModelConfig is hashable), so equal models share programs.
Static = Setup | nnx.GraphDef


class Generation(NamedTuple):
  """The output of :func:`generate_ids` for b prompts and N = max_new_tokens."""
  tokens: np.ndarray  # (b, N) int32: new tokens; after a row's stop token, padding
  lengths: np.ndarray  # (b,) int32: tokens each row generated, its stop token included
  logits: np.ndarray | None  # (b, N, v) float32 each token was drawn from (return_logits)


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float | jax.Array = 1.0,
                  top_k: int = 0, top_p: float | jax.Array = 1.0) -> jax.Array:
  """Next tokens (b,) int32 from logits (b, v).

  ``temperature == 0`` is greedy (argmax). Otherwise a draw at ``temperature`` from the
  ``top_k`` most likely tokens (0: all), further cut to the fewest most likely tokens whose
  probability reaches ``top_p`` (the most likely token always stays). ``temperature`` and
  ``top_p`` may be traced scalars; ``top_k`` is a Python int, and a Python ``top_p`` of 1
  skips the sort that the cut needs.

  >>> sample_logits(logits, jax.random.key(0), temperature=0.8, top_k=40, top_p=0.95)
  """
  temperature = jnp.asarray(temperature, jnp.float32)
  scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)
  v = logits.shape[-1]
  nucleus = not (isinstance(top_p, (int, float)) and top_p >= 1)
  k = top_k if 0 < top_k < v else (v if nucleus else 0)
  if k == 0:
    drawn = jax.random.categorical(key, scaled, axis=-1)  # (b,)
  else:
    values, indices = jax.lax.top_k(scaled, k)  # (b, k), most likely first
    if nucleus:
      probs = jax.nn.softmax(values, axis=-1)
      before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
      values = jnp.where(before < top_p, values, -jnp.inf)
    choice = jax.random.categorical(key, values, axis=-1)  # (b,) index into the top k
    drawn = jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0]
  return jnp.where(temperature > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


def _static(model: Model) -> Static:
  return nnx.graphdef(model) if isinstance(model, nnx.Module) else model


def _graphdef(model: Static) -> nnx.GraphDef:
  return model.graphdef if isinstance(model, Setup) else model


def _rules(model: Static) -> dict:
  return model.rules if isinstance(model, Setup) else make_rules()


def _context(model: Model):
  """The mesh that a Setup's parameters live on (none for a bare model)."""
  return jax.set_mesh(model.mesh) if isinstance(model, Setup) else contextlib.nullcontext()


@functools.partial(jax.jit, static_argnames=("static", "max_len"))
def _init_cache(static: Static, params: Any, start: jax.Array, max_len: int) -> KVCache:
  with use_rules(_rules(static)):
    model = nnx.merge(_graphdef(static), params)
    return model.init_cache(start.shape[0], max_len, start)


@functools.partial(jax.jit, static_argnames=("static",), donate_argnames=("cache",))
def _prefill(static: Static, params: Any, cache: KVCache,
             tokens: jax.Array) -> tuple[jax.Array, KVCache]:
  """tokens (b, t) into the cache -> logits of the last token (b, v) and the cache."""
  with use_rules(_rules(static)):
    model = nnx.merge(_graphdef(static), params)
    logits, cache = model.decode(tokens, cache, last_only=True)  # (b, 1, v)
    return logits[:, 0], cache


@functools.partial(jax.jit, donate_argnames=("cache",),
                   static_argnames=("static", "max_new_tokens", "top_k", "nucleus", "pad_id",
                                    "return_logits"))
def _decode(static: Static, params: Any, cache: KVCache, logits: jax.Array, key: jax.Array,
            stop: jax.Array, temperature: jax.Array, top_p: jax.Array, *, max_new_tokens: int,
            top_k: int, nucleus: bool, pad_id: int,
            return_logits: bool) -> tuple[jax.Array, jax.Array | None, KVCache]:
  """From the prefill's logits (b, v): new tokens (b, N), if asked their logits (b, N, v),
  and the cache (returned so that the donated buffers hold it throughout). Compiled per
  ``top_k`` and ``nucleus`` (top_p < 1); temperature and top_p are traced."""
  with use_rules(_rules(static)):
    model = nnx.merge(_graphdef(static), params)
    b, v = logits.shape
    n = max_new_tokens
    draw = lambda logits, i: sample_logits(logits, jax.random.fold_in(key, i),
                                           temperature=temperature, top_k=top_k,
                                           top_p=top_p if nucleus else 1.0)
    first = draw(logits, 0)  # (b,)
    tokens = jnp.full((b, n), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop)  # (b,)
    seen = jnp.zeros((b, n, v), jnp.float32).at[:, 0].set(logits) if return_logits else None

    def more(carry):
      i, _, done, _, _ = carry
      return (i < n) & ~jnp.all(done)

    def step(carry):
      i, tokens, done, cache, seen = carry
      previous = jax.lax.dynamic_slice_in_dim(tokens, i - 1, 1, axis=1)  # (b, 1)
      logits, cache = model.decode(previous, cache)  # (b, 1, v)
      new = jnp.where(done, pad_id, draw(logits[:, 0], i))  # (b,)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], i, axis=1)
      if seen is not None:
        seen = jax.lax.dynamic_update_slice_in_dim(seen, logits, i, axis=1)
      return i + 1, tokens, done | jnp.isin(new, stop), cache, seen

    carry = (jnp.ones((), jnp.int32), tokens, done, cache, seen)
    _, tokens, _, cache, seen = jax.lax.while_loop(more, step, carry)
    return tokens, seen, cache


def prompt_width(longest: int) -> int:
  """The padded prompt length of a batch whose longest prompt has ``longest`` tokens: the next
  power of two (at least 16), so that a chat's turns or a task's prompts of varied lengths
  share a few compiled programs. Left padding is masked and positions count from each
  prompt's first token: the padding changes no result."""
  return max(16, 1 << (longest - 1).bit_length())


def generate_ids(model: Model, params: Any, prompts: Sequence[Sequence[int]], *,
                 max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, stop_tokens: Sequence[int] = (), seed: int = 0,
                 pad_id: int = 0, return_logits: bool = False) -> Generation:
  """Continues each prompt (a list of token ids, bos included if wanted) by up to
  ``max_new_tokens`` tokens; a row stops after it produces one of ``stop_tokens``.

  ``model`` is a Setup (the parameters stay on its mesh), a Transformer or its GraphDef;
  ``params`` the parameters (a pure dict such as ``state["params"]``, or an nnx.State).
  Sampling as in :func:`sample_logits`. Compiled once per Setup or model architecture
  (Transformers or GraphDefs of equal configs share the programs), batch size, padded
  prompt length (:func:`prompt_width`), ``max_new_tokens``, ``top_k`` and whether ``top_p < 1``.

  >>> out = generate_ids(model, nnx.state(model), [[2, 17, 9], [2, 5]], max_new_tokens=8,
  ...                    temperature=0)
  >>> out.tokens  # (2, 8)
  """
  static = _static(model)
  module = nnx.merge(_graphdef(static), params)
  if module.num_stages != 1:
    raise ValueError(f"generation needs an unpipelined model (num_stages == 1), got "
                     f"{module.num_stages}; build it on a mesh with mesh.stage=1 (lmjax.load "
                     "and load_run restore a pipelined run so).")
  cfg = module.cfg
  if not cfg.causal:
    raise ValueError("generate: the model is bidirectional (model.causal=False, trained with "
                     "train.objective='masked'): it cannot generate text left to right.")
  prompts = [list(map(int, p)) for p in prompts]
  if not prompts:
    raise ValueError("generate: no prompts.")
  if max_new_tokens < 1:
    raise ValueError(f"generate: max_new_tokens must be at least 1, got {max_new_tokens}.")
  if not temperature >= 0 or top_k < 0 or not 0 < top_p <= 1:  # nan too
    raise ValueError(f"generate: need temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got "
                     f"temperature={temperature}, top_k={top_k}, top_p={top_p}.")
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"generate: prompt {i} is empty; start it with the bos token.")
    if min(p) < 0 or max(p) >= cfg.vocab_size:
      raise ValueError(f"generate: prompt {i} holds token ids outside [0, {cfg.vocab_size}).")
  longest = max(map(len, prompts))
  if longest + max_new_tokens - 1 > cfg.max_seq_len:
    raise ValueError(f"generate: the longest prompt ({longest} tokens) plus max_new_tokens "
                     f"({max_new_tokens}) reach position {longest + max_new_tokens - 2}, past "
                     f"model.max_seq_len={cfg.max_seq_len}; shorten them.")

  b = len(prompts)
  width = prompt_width(longest)
  tokens = np.full((b, width), pad_id, np.int32)  # left-padded prompts (b, t)
  start = np.array([width - len(p) for p in prompts], np.int32)  # (b,)
  for row, p in enumerate(prompts):
    tokens[row, start[row]:] = p
  stop = np.asarray(sorted(set(map(int, stop_tokens))) or [-1], np.int32)  # -1: none
  with _context(model):
    # The last new token is never fed back: the cache holds t + N - 1 slots.
    cache = _init_cache(static, params, jnp.asarray(start), max_len=width + max_new_tokens - 1)
    logits, cache = _prefill(static, params, cache, jnp.asarray(tokens))
    out, seen, _ = _decode(static, params, cache, logits, jax.random.key(seed), jnp.asarray(stop),
                           jnp.float32(temperature), jnp.float32(top_p),
                           max_new_tokens=max_new_tokens, top_k=int(top_k), nucleus=top_p < 1,
                           pad_id=int(pad_id), return_logits=return_logits)
    out, seen = jax.device_get((out, seen))
  hit = np.isin(out, stop)  # (b, N)
  lengths = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, max_new_tokens).astype(np.int32)
  return Generation(tokens=np.asarray(out, np.int32), lengths=lengths,
                    logits=None if seen is None else np.asarray(seen))


def generate(model: Model, params: Any, tokenizer: Any, prompts: Sequence[str], *,
             max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             stop_tokens: Sequence[int] | None = None, seed: int = 0) -> list[str]:
  """The text each prompt continues with (the prompt itself and the stop token left out),
  spaces included: ``prompt + text`` is the decoded whole.

  Each prompt is encoded as ``[bos] + tokenizer.encode(prompt)``, as training documents
  are; ``stop_tokens`` defaults to the tokenizer's eos. Arguments as :func:`generate_ids`.

  >>> generate(run.setup, run.params, run.tokenizer, ["def f(x):", "The"], max_new_tokens=32,
  ...          temperature=0)
  """
  stop = (tokenizer.eos_id,) if stop_tokens is None else tuple(stop_tokens)
  ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
  out = generate_ids(model, params, ids, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_k=top_k, top_p=top_p, stop_tokens=stop, seed=seed,
                     pad_id=tokenizer.pad_id)
  texts = []
  for prompt, row, n in zip(ids, out.tokens, out.lengths):
    row = row[:n]
    if n and row[-1] in stop:
      row = row[:-1]
    texts.append(tokenizer.decode_continuation(prompt, row))  # " is" after "The", not "is"
  return texts


def load_run(workdir: str | os.PathLike, cfg: ml_collections.ConfigDict | None = None,
             step: int | None = None, devices: list[jax.Device] | None = None) -> TrainedRun:
  """A training run's checkpoint (default: the newest usable one), for generation: the
  run's own config on :data:`lmjax.rundir.LOAD_MESH`, or ``cfg``'s mesh, unpipelined
  (:func:`lmjax.rundir.loading_config`). A LoRA run's adapters are merged into its weights,
  so decoding costs what the base model's does."""
  return load(workdir, step, cfg=cfg, devices=devices,
              mesh=LOAD_MESH if cfg is None else None, merge=True)


