"""Evaluation: perplexity and bits per byte on held-out text, and log-likelihood scoring of
multiple-choice items (accuracy), the way evaluation harnesses do it.

  results = perplexity(setup, params, tokenizer, batches)
  results = multiple_choice(setup, params, tokenizer, read_choices("items.jsonl"))

Multiple-choice items are JSONL lines ``{"context": str, "choices": [str, ...], "label": int}``.
Each choice is scored by the summed log-probability of its tokens after the context;
``accuracy`` takes the best sum, ``accuracy_norm`` the best sum per UTF-8 byte of the choice
(lm-evaluation-harness's ``acc`` and ``acc_norm``).

A masked-LM run (``train.objective="masked"``, bidirectional) has no next-token
probabilities: :func:`perplexity` reports its masked-token loss and accuracy instead
(:func:`masked_loss`), and multiple-choice scoring refuses it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmjax import objectives, storage
from lmjax.config import ConfigError
from lmjax.data.readers import DataError
from lmjax.state import token_weights

Batch = dict[str, np.ndarray]


def _adds_dummy_prefix(tokenizer) -> bool:
  return tokenizer.leading_space() is not None


def target_bytes(tokenizer, batch: Batch) -> np.ndarray:
  """(b, t) UTF-8 bytes of document text each target token covers. A tokenizer that adds
  a space before each text has the first token after ``bos`` cover one byte less."""
  out = token_bytes(tokenizer)[batch["targets"]]
  spaced = tokenizer.leading_space()
  if spaced is not None:
    out = out - ((batch["inputs"] == tokenizer.bos_id) & spaced[batch["targets"]])
  return out


def token_bytes(tokenizer) -> np.ndarray:
  """(v,) UTF-8 bytes of text each token stands for (0 for bos, eos, pad and unknown tokens);
  any kind of tokenizer (:meth:`lmjax.data.Tokenizer.token_bytes`)."""
  return tokenizer.token_bytes()


def loss_sums(setup, params, batches: Iterable[Batch], max_batches: int | None = None,
              tokenizer=None) -> dict[str, float]:
  """Summed loss (nats) and weight of the targets of up to ``max_batches`` batches, and,
  with a ``tokenizer``, the UTF-8 bytes of text they cover: the one evaluation loop."""
  loss_sum = tokens = text_bytes = 0.0
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    scores = setup.score(params, batch)
    loss_sum -= float(np.sum(scores["logprob"], dtype=np.float64))
    tokens += float(np.sum(scores["weight"], dtype=np.float64))
    if tokenizer is not None:
      weights = np.asarray(token_weights(batch), np.float64)
      text_bytes += float(np.sum(target_bytes(tokenizer, batch) * weights))
  return {"loss_sum": loss_sum, "tokens": tokens, "bytes": text_bytes}


def perplexity(setup, params, tokenizer, batches: Iterable[Batch], max_batches: int | None = None,
               *, allow_empty: bool = False) -> dict[str, float]:
  """Mean loss (nats/token), perplexity and, with a ``tokenizer``, bits per byte over the
  real target tokens. No tokens at all raise ValueError (``allow_empty``: return {}).
  A masked-LM run: :func:`masked_loss` instead."""
  if objectives.is_masked(setup.cfg):
    return masked_loss(setup, params, tokenizer, batches, max_batches, allow_empty=allow_empty)
  sums = loss_sums(setup, params, batches, max_batches, tokenizer)
  if sums["tokens"] == 0:
    if allow_empty:
      return {}
    raise DataError("no tokens to evaluate: the held-out split or source is empty; give "
                    "another --eval_source")
  loss = sums["loss_sum"] / sums["tokens"]
  out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": sums["tokens"]}
  if tokenizer is not None:
    out["bits_per_byte"] = sums["loss_sum"] / math.log(2) / max(sums["bytes"], 1.0)
    out["bytes"] = sums["bytes"]
  return out


def masked_loss(setup, params, tokenizer, batches: Iterable[Batch], max_batches: int | None = None,
                *, allow_empty: bool = False) -> dict[str, float]:
  """A masked-LM run's ``loss`` (mean cross-entropy, nats, over the masked tokens),
  ``masked_accuracy`` (the share of them predicted exactly) and ``masked_tokens``. Batch i
  is masked with a fixed key (:func:`lmjax.objectives.eval_key`), the same at every
  evaluation. No perplexity: a bidirectional model sees the token's context on both sides,
  so its loss is no next-token likelihood of the text."""
  nll = correct = weight = 0.0
  for i, batch in enumerate(batches):
    if max_batches is not None and i >= max_batches:
      break
    sums = objectives.masked_eval_sums(setup, params, batch, i, tokenizer)
    nll, correct, weight = nll + sums["nll"], correct + sums["correct"], weight + sums["weight"]
  if weight == 0:
    if allow_empty:
      return {}
    raise DataError("no tokens to evaluate: the held-out split or source is empty; give "
                    "another --eval_source")
  return {"loss": nll / weight, "masked_accuracy": correct / weight, "masked_tokens": weight}


def document_batches(documents: Sequence[str], tokenizer, seq_len: int, batch_size: int) -> list[Batch]:
  """Each document as ``[bos] + ids + [eos]`` in rows of ``seq_len`` predictions (a long
  document continues in the next row, without the earlier context); rows padded."""
  rows = []
  for doc in documents:
    ids = [tokenizer.bos_id] + tokenizer.encode(doc) + [tokenizer.eos_id]
    for start in range(0, len(ids) - 1, seq_len):
      chunk = ids[start:start + seq_len + 1]
      rows.append((chunk[:-1], chunk[1:]))
  return _batches(rows, [None] * len(rows), seq_len, batch_size)


def _batches(rows, weights, seq_len: int, batch_size: int) -> list[Batch]:
  """Pads (inputs, targets[, weights]) rows to full (batch_size, seq_len) batches."""
  out = []
  for b in range(0, len(rows), batch_size):
    batch = {k: np.zeros((batch_size, seq_len), np.int32)
             for k in ("inputs", "targets", "segment_ids", "positions")}
    batch["weights"] = np.zeros((batch_size, seq_len), np.float32)
    for r, ((inp, tgt), w) in enumerate(zip(rows[b:b + batch_size], weights[b:b + batch_size])):
      n = len(inp)
      batch["inputs"][r, :n], batch["targets"][r, :n] = inp, tgt
      batch["segment_ids"][r, :n] = 1
      batch["positions"][r, :n] = np.arange(n)
      batch["weights"][r, :n] = 1.0 if w is None else w
    out.append(batch)
  return out


def read_text(path: str | Path, what: str) -> str:
  """The UTF-8 text of file ``path`` (a local path or a URL); DataError naming it when it is
  missing or not UTF-8 (``what`` it should hold, e.g. "multiple-choice JSONL")."""
  try:
    return storage.path(path).read_bytes().decode("utf-8")
  except FileNotFoundError:
    storage.check(path)  # a URL's bucket that is missing or refused, named as such
    raise DataError(f"{path}: no such file; give {what}.") from None
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: invalid UTF-8 at byte {e.start}; give {what} in UTF-8.") from None


def read_choices(path: str | Path) -> list[dict[str, Any]]:
  """Multiple-choice items from JSONL (a local path or a URL); a malformed line, a file that
  is missing, no UTF-8 text or holds no item raises DataError naming the file (and line)."""
  items = []
  for i, line in enumerate(read_text(path, "multiple-choice JSONL").splitlines(), 1):
    if not line.strip():
      continue
    try:
      item = json.loads(line)
      assert isinstance(item["context"], str) and isinstance(item["choices"], list)
      assert all(isinstance(c, str) for c in item["choices"]) and len(item["choices"]) >= 2
      assert isinstance(item["label"], int) and 0 <= item["label"] < len(item["choices"])
    except (ValueError, KeyError, TypeError, AssertionError):
      raise DataError(f"{path}:{i}: expected {{\"context\": str, \"choices\": [str, str, ...], "
                       f"\"label\": index}}, got {line[:200]!r}") from None
    items.append(item)
  if not items:
    raise DataError(f"{path}: no multiple-choice items; give one JSON object per line")
  return items


def choice_loglikelihoods(setup, params, tokenizer, items: Sequence[dict[str, Any]],
                          batch_size: int | None = None) -> list[list[float]]:
  """Summed log-probability of each choice's tokens given ``[bos] + context``. A context too
  long for the sequence is cut from the left. A masked-LM run raises ConfigError."""
  if objectives.is_masked(setup.cfg):
    raise ConfigError("multiple-choice scoring needs next-token probabilities; this run trained "
                      "with train.objective='masked' (a bidirectional model) and has none.")
  seq_len = setup.cfg.data.seq_len
  batch_size = batch_size or setup.cfg.data.global_batch_size
  rows, weights, owners = [], [], []
  for i, item in enumerate(items):
    context = [tokenizer.bos_id] + tokenizer.encode(item["context"])
    for j, choice in enumerate(item["choices"]):
      cont = tokenizer.encode(choice)
      if not cont:
        raise ValueError(f"item {i}: choice {j} ({choice!r}) has no tokens")
      ids = (context + cont)[-(seq_len + 1):]
      w = np.zeros(len(ids) - 1, np.float32)
      w[-len(cont):] = 1.0  # the choice's tokens, as predicted after what precedes them
      rows.append((ids[:-1], ids[1:]))
      weights.append(w)
      owners.append((i, j))
  scores = [[0.0] * len(item["choices"]) for item in items]
  batches = _batches(rows, weights, seq_len, batch_size)
  for b, batch in enumerate(batches):
    sums = setup.score(params, batch)["logprob"]
    for r in range(batch_size):
      k = b * batch_size + r
      if k < len(owners):
        i, j = owners[k]
        scores[i][j] = float(sums[r])
  return scores


def multiple_choice(setup, params, tokenizer, items: Sequence[dict[str, Any]]) -> dict[str, float]:
  """Accuracy by summed log-likelihood, and per byte of the choice (acc_norm)."""
  scores = choice_loglikelihoods(setup, params, tokenizer, items)
  correct = correct_norm = 0
  for item, s in zip(items, scores):
    norm = [v / max(len(c.encode("utf-8")), 1) for v, c in zip(s, item["choices"])]
    correct += int(np.argmax(s) == item["label"])
    correct_norm += int(np.argmax(norm) == item["label"])
  n = len(items)
  return {"accuracy": correct / n, "accuracy_norm": correct_norm / n, "items": n}


def token_batches(rows: Sequence[tuple[list[int], list[int]]], weights: Sequence[Any],
                  seq_len: int, batch_size: int) -> list[Batch]:
  """(inputs, targets) token rows, each with its per-target weights (None: all 1), padded to
  full (batch_size, seq_len) batches for ``Setup.score``: the batching
  :func:`choice_loglikelihoods` scores with, for scorers that tokenise themselves."""
  return _batches(rows, weights, seq_len, batch_size)
