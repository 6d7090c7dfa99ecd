"""The masked-language-model objective (BERT): which tokens a step hides, and how it scores them.

``train.objective="masked"`` (with ``model.causal=False``, bidirectional attention) trains the
model to recover hidden tokens of each document from both sides. Every step:

* Of each row's real tokens (``segment_ids != 0``; special ids such as bos, eos, pad and the
  mask id itself never), each is selected independently with probability
  ``train.mask_fraction`` (15%).
* Of the selected, 80% become the mask id, 10% a token id drawn uniformly from the
  non-special ids, 10% stay as they are (so the model cannot trust an unmasked input).
* Targets are the *original* tokens at the same positions (not shifted); the loss (the
  batch's ``weights``) is on the selected tokens only. Positions and segment ids are unchanged.

The mask id is ``train.mask_token``'s (``tokenizer.token_id``), else the tokenizer's
unknown-token id: a sentencepiece tokenizer with byte fallback (all of lmjax's) never
produces it from text, so it is free to stand for "hidden".

Randomness: every draw comes from ``fold_in(fold_in(key(seed), "mask"), step)``, made on the
device inside the jitted train step, so it works for every data source (raw, prepared,
mixtures), resumes bit for bit (the step is in the checkpoint) and, with JAX's partitionable
threefry (``jax_threefry_partitionable``, on by default), draws the same bits on any mesh.
Evaluation masks batch i of the held-out data with a fixed key (``"eval"``, i): the same
tokens at every evaluation, so masked losses compare across steps.

  >>> setup = attach(build(cfg), tokenizer)                # the run tokenizer's ids
  >>> batch, metrics = training_batch(setup, step, batch)  # in the train step
  >>> sums = masked_eval_sums(setup, params, batch, index=0)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.config import ConfigError
from lmjax.mesh import host_to_global, replicated

_TRAIN_STREAM = 0x6D61736B  # "mask": the key stream of training masks
_EVAL_STREAM = 0x6576616C  # "eval": the fixed key stream of evaluation masks
MASK, RANDOM = 0.8, 0.1  # of the selected tokens: the shares masked and replaced at random
# lmjax's own sentencepiece tokenizers: pad 0, unk 1, bos 2, eos 3 (lmjax.data.tokenizer).
_LMJAX_PAD, _LMJAX_UNK, _LMJAX_BOS, _LMJAX_EOS = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Masking:
  """What the masked objective needs to know of the config and the tokenizer (hashable: a
  static jit argument)."""
  fraction: float  # train.mask_fraction
  mask_id: int
  special_ids: tuple[int, ...]  # sorted, within [0, vocab_size): never selected, never drawn
  vocab_size: int  # the tokenizer's: random replacements are drawn below it
  seed: int  # config.seed


def is_masked(cfg: Any) -> bool:
  return cfg.train.objective == "masked"


def masking(cfg: Any, tokenizer: Any) -> Masking:
  """The masking of a masked-objective ``cfg`` with ``tokenizer``'s ids. ConfigError naming
  ``train.mask_token`` when it is not in the vocabulary, or when it is "" and the tokenizer
  has no unknown token to stand in."""
  if cfg.train.mask_token:
    try:
      mask_id = int(tokenizer.token_id(cfg.train.mask_token))
    except (ValueError, KeyError) as e:  # DataError is a ValueError
      raise ConfigError(f"config.train.mask_token: {cfg.train.mask_token!r} is not a token of "
                        f"{tokenizer.path or 'the tokenizer'} ({e}); give one of its tokens.") from None
  else:
    mask_id = _unknown_id(tokenizer)
    if mask_id is None:
      raise ConfigError(f"config.train.mask_token: \"\" asks for the unknown-token id, and "
                        f"{tokenizer.path or 'the tokenizer'} has none; set train.mask_token "
                        "to one of its special tokens (e.g. \"[MASK]\").")
  special = {tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, mask_id, _unknown_id(tokenizer)}
  for piece in getattr(tokenizer, "special_tokens", ()):
    try:
      special.add(int(tokenizer.token_id(piece)))
    except (ValueError, KeyError):
      pass
  v = int(tokenizer.vocab_size)
  return Masking(fraction=float(cfg.train.mask_fraction), mask_id=mask_id,
                 special_ids=tuple(sorted(i for i in special if i is not None and 0 <= i < v)),
                 vocab_size=v, seed=int(cfg.seed))


def _unknown_id(tokenizer: Any) -> int | None:
  """The tokenizer's unknown-token id, or None if it has none."""
  unk = getattr(tokenizer, "unk_id", None)
  if unk is None:  # a sentencepiece tokenizer: its processor knows
    unk_fn = getattr(getattr(tokenizer, "processor", None), "unk_id", None)
    unk = unk_fn() if callable(unk_fn) else None
  return int(unk) if unk is not None and int(unk) >= 0 else None


def _default_masking(cfg: Any) -> Masking:
  """Without a tokenizer (planning, benchmarks): lmjax's own sentencepiece ids."""
  special = (_LMJAX_PAD, _LMJAX_UNK, _LMJAX_BOS, _LMJAX_EOS)
  return Masking(fraction=float(cfg.train.mask_fraction), mask_id=_LMJAX_UNK,
                 special_ids=special, vocab_size=int(cfg.model.vocab_size), seed=int(cfg.seed))


def attach(setup: Any, tokenizer: Any) -> Any:
  """``setup`` carrying the masking of its config with ``tokenizer``'s ids (itself unless
  the objective is masked). Do this before compiling the train step."""
  if not is_masked(setup.cfg):
    return setup
  return dataclasses.replace(setup, masking=masking(setup.cfg, tokenizer))


def setup_masking(setup: Any, tokenizer: Any = None) -> Masking:
  """The masking a masked-objective setup trains or evaluates with: the one :func:`attach`
  gave it, else ``tokenizer``'s, else lmjax's own tokenizer ids."""
  if getattr(setup, "masking", None) is not None:
    return setup.masking
  return masking(setup.cfg, tokenizer) if tokenizer is not None else _default_masking(setup.cfg)


# -- the masking itself ---------------------------------------------------------------------

def train_key(m: Masking, step: jax.Array | int) -> jax.Array:
  """The key of step ``step``'s masks (the step before its update, as ``state["step"]``)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(m.seed), _TRAIN_STREAM), step)


def eval_key(m: Masking, index: jax.Array | int) -> jax.Array:
  """The fixed key of evaluation batch ``index``'s masks (the same at every evaluation)."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(m.seed), _EVAL_STREAM), index)


def _non_special(m: Masking, r: jax.Array) -> jax.Array:
  """r uniform in [0, vocab - #special) -> uniform over the non-special ids (the r-th one)."""
  for s in m.special_ids:  # ascending: each special id at or below the running value shifts it
    r = r + (r >= s).astype(r.dtype)
  return r


def mask_batch(m: Masking, batch: dict[str, jax.Array], key: jax.Array) -> dict[str, jax.Array]:
  """The masked-objective batch of a packed batch (its ``inputs`` are the documents'
  tokens): ``inputs`` corrupted, ``targets`` the original tokens, ``weights`` 1 on the
  selected tokens and 0 elsewhere; ``positions`` and ``segment_ids`` as they were. Any
  ``weights`` of the incoming batch are replaced.

  >>> out = mask_batch(m, batch, train_key(m, step))  # all (b, t)
  """
  tokens = batch["inputs"]  # (b, t)
  k_select, k_action, k_random = jax.random.split(key, 3)
  special = jnp.asarray(m.special_ids or (-1,), tokens.dtype)
  eligible = (batch["segment_ids"] != 0) & ~jnp.isin(tokens, special)
  selected = eligible & (jax.random.uniform(k_select, tokens.shape) < m.fraction)
  action = jax.random.uniform(k_action, tokens.shape)
  drawn = _non_special(m, jax.random.randint(k_random, tokens.shape, 0,
                                             m.vocab_size - len(m.special_ids), tokens.dtype))
  corrupted = jnp.where(action < MASK, jnp.asarray(m.mask_id, tokens.dtype),
                        jnp.where(action < MASK + RANDOM, drawn, tokens))
  return {**batch, "inputs": jnp.where(selected, corrupted, tokens), "targets": tokens,
          "weights": selected.astype(jnp.float32)}


def training_batch(setup: Any, step: jax.Array,
                   batch: dict[str, jax.Array]) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
  """The train step's hook: ``(batch, metrics)``. For the masked objective, step ``step``'s
  masked batch and ``tokens`` (the real tokens the step read: throughput counts them, not
  only the masked ones) and ``masked_tokens``; any other objective's batch as it is, {}."""
  if not is_masked(setup.cfg):
    return batch, {}
  real = jnp.sum(batch["segment_ids"] != 0).astype(jnp.float32)
  out = mask_batch(setup_masking(setup), batch, train_key(setup_masking(setup), step))
  return out, {"tokens": real, "masked_tokens": jnp.sum(out["weights"])}


# -- evaluation -----------------------------------------------------------------------------

def _eval_terms(graphdef: nnx.GraphDef, params: Any, batch: dict[str, jax.Array], m: Masking,
                index: jax.Array, chunk: int) -> dict[str, jax.Array]:
  """Summed negative log-likelihood and correct argmax predictions over the masked tokens of
  ``batch`` masked with evaluation key ``index``, and their count; the logits are formed
  ``chunk`` positions at a time."""
  batch = mask_batch(m, batch, eval_key(m, index))
  model = nnx.merge(graphdef, params)
  x = model.features(batch["inputs"], batch["positions"], batch["segment_ids"])  # (b, t, d)
  b, t = batch["targets"].shape
  c = np.gcd(t, chunk) if chunk > 0 else t
  split = lambda a: jnp.moveaxis(a.reshape(b, t // c, c, *a.shape[2:]), 1, 0)  # (t/c, b, c, ...)

  def one(args):
    xc, tc = args  # (b, c, d), (b, c)
    logits = model.logits(xc)  # (b, c, v) float32
    hit = jnp.arange(logits.shape[-1], dtype=tc.dtype) == tc[..., None]
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return nll, (jnp.argmax(logits, axis=-1) == tc).astype(jnp.float32)

  nll, correct = jax.lax.map(one, (split(x), split(batch["targets"])))  # (t/c, b, c)
  w = split(batch["weights"])
  return {"nll": jnp.sum(nll * w), "correct": jnp.sum(correct * w), "weight": jnp.sum(w)}


@functools.lru_cache(maxsize=8)
def _eval_fn(setup: Any, m: Masking):
  chunk = setup.cfg.model.loss_chunk
  fn = lambda params, batch, index: _eval_terms(setup.graphdef, params, batch, m, index, chunk)
  return jax.jit(fn, in_shardings=(setup.state_shardings["params"], setup.batch_sharding, None),
                 out_shardings=replicated(setup.mesh))


def masked_eval_sums(setup: Any, params: Any, batch: dict[str, np.ndarray], index: int,
                     tokenizer: Any = None) -> dict[str, float]:
  """``nll``, ``correct`` and ``weight`` summed over the masked tokens of a host batch (this
  process's rows) masked with evaluation key ``index``. Compiled once per setup."""
  fn = _eval_fn(setup, setup_masking(setup, tokenizer))
  with setup.context():
    out = fn(params, host_to_global(batch, setup.mesh, setup.batch_sharding), jnp.int32(index))
  return {k: float(v) for k, v in jax.device_get(out).items()}
