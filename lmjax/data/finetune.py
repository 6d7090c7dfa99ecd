"""Fine-tuning data: prompt/response pairs from JSONL, the loss on the response only.

``data.source`` names the JSONL files (``.gz`` too) as raw sources do: a file, directory or
glob, local or a ``gs://`` / ``s3://`` URL.

Each line ``{"prompt": str, "response": str}`` (field names from ``data.prompt_field`` and
``data.response_field``) becomes ``[bos] + prompt + response + [eos]``; ``weights`` are 1
on the response's tokens and its eos, 0 on the prompt. Examples are packed whole into rows
of ``data.seq_len`` (first fit in order; an example longer than a row is cut to it), with
``segment_ids`` and ``positions`` per example, shuffled per epoch by ``(seed, epoch)``.
The iterator's state is ``{"epoch", "row"}``: resumable, and the same for every process
(each reads the slice ``[i*B/P, (i+1)*B/P)`` of every global batch).
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections
import numpy as np

from lmjax.data.packing import DataIterator
from lmjax.data.readers import DataError, open_file
from lmjax.data.sources import SPLIT_SEED, SkipLog, resolve_paths, split_documents
from lmjax.data.tokenizer import Tokenizer


def read_pairs(source: str, prompt_field: str, response_field: str) -> list[tuple[str, str]]:
  """(prompt, response) pairs from JSONL files; a bad line raises naming file and line."""
  pairs = []
  for path in resolve_paths(source, SkipLog("fail")):
    with open_file(path) as f:
      for i, raw in enumerate(f, 1):
        if not raw.strip():
          continue
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise DataError(f"{path}:{i}: invalid UTF-8 at byte {e.start} of the line ({e.reason}); "
                          "re-encode the file as UTF-8") from None
        try:
          record = json.loads(line)
          prompt, response = record[prompt_field], record[response_field]
          assert isinstance(prompt, str) and isinstance(response, str) and response
        except (ValueError, KeyError, TypeError, AssertionError):
          raise DataError(f"{path}:{i}: expected a JSON object with string fields "
                          f"{prompt_field!r} and {response_field!r} (non-empty), got {line[:200]!r}") from None
        pairs.append((prompt, response))
  if not pairs:
    raise DataError(f"data.source={source!r}: no prompt/response pairs")
  return pairs


def pack_pairs(pairs: list[tuple[str, str]], tokenizer: Tokenizer,
               seq_len: int) -> dict[str, np.ndarray]:
  """All examples packed into rows: (rows, seq_len) arrays incl. ``weights``."""
  examples = []
  for prompt, response in pairs:
    p = [tokenizer.bos_id] + tokenizer.encode(prompt)
    r = tokenizer.encode(response) + [tokenizer.eos_id]
    seq = (p + r)[: seq_len + 1]
    w = ([0.0] * (len(p) - 1) + [1.0] * len(r))[: len(seq) - 1]  # weight of each target
    examples.append((seq[:-1], seq[1:], w))
  rows: list[list[tuple]] = []
  space: list[int] = []
  for ex in examples:  # first fit, in order
    for k, free in enumerate(space):
      if len(ex[0]) <= free:
        rows[k].append(ex)
        space[k] -= len(ex[0])
        break
    else:
      rows.append([ex])
      space.append(seq_len - len(ex[0]))
  out = {k: np.zeros((len(rows), seq_len), np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
  out["weights"] = np.zeros((len(rows), seq_len), np.float32)
  for r, row in enumerate(rows):
    at = 0
    for s, (inp, tgt, w) in enumerate(row, 1):
      n = len(inp)
      out["inputs"][r, at:at + n], out["targets"][r, at:at + n] = inp, tgt
      out["segment_ids"][r, at:at + n], out["positions"][r, at:at + n] = s, np.arange(n)
      out["weights"][r, at:at + n] = w
      at += n
  return out


class FinetuneIterator(DataIterator):
  """Global batches of packed rows (prompt/response, preference pairs), reshuffled every
  epoch; endless, or with ``passes`` that many epochs, the last batch padded with all-zero
  rows. ``counts``: what packing skipped or cut (:meth:`DataIterator.counts`)."""

  topology_independent = True

  def __init__(self, rows: dict[str, np.ndarray], batch_size: int, seed: int, shuffle: bool,
               process_index: int = 0, process_count: int = 1, *, passes: int | None = None,
               counts: dict[str, int] | None = None):
    self.rows, self.batch, self.seed, self.shuffle = rows, batch_size, seed, shuffle
    self.num_rows = len(rows["inputs"])
    self.lo = process_index * batch_size // process_count
    self.hi = (process_index + 1) * batch_size // process_count
    self.position = 0  # rows consumed since the start of epoch 0
    self.end = None if passes is None else passes * self.num_rows
    self._counts = dict(counts or {})

  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_rows)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)

  def __next__(self) -> dict[str, np.ndarray]:
    if self.end is not None and self.position >= self.end:
      raise StopIteration
    idx, real = [], []
    for k in range(self.position + self.lo, self.position + self.hi):
      real.append(self.end is None or k < self.end)
      epoch, i = divmod(k, self.num_rows) if real[-1] else (0, 0)
      idx.append(self._order(epoch)[i] if real[-1] else 0)
    self.position += self.batch
    out = {key: value[np.array(idx, np.int64)] for key, value in self.rows.items()}
    if not all(real):
      for value in out.values():
        value[~np.array(real)] = 0
    return out

  def counts(self) -> dict[str, int]:
    return dict(self._counts)

  def get_state(self) -> dict[str, Any]:
    return {"rows": self.position}

  def set_state(self, state: dict[str, Any]) -> None:
    self.position = int(state["rows"])


def is_finetune(data_cfg: ml_collections.ConfigDict) -> bool:
  """Whether ``data.source`` holds prompt/response pairs (``data.format``)."""
  return data_cfg.format == "prompt_response"


def pairs_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *, split: str = "train",
                   process_index: int = 0, process_count: int = 1) -> FinetuneIterator:
  """The train split (all but ``data.eval_fraction`` of the pairs) or the eval split;
  :func:`lmjax.data.make_iterator` calls it when ``data.format="prompt_response"``."""
  d = cfg.data
  train, evals = split_documents(read_pairs(d.source, d.prompt_field, d.response_field),
                                 d.eval_fraction, SPLIT_SEED)  # held out like raw documents
  rows = pack_pairs(evals if split == "eval" else train, tokenizer, d.seq_len)
  return FinetuneIterator(rows, d.global_batch_size, cfg.seed, d.shuffle and split == "train",
                          process_index, process_count)
