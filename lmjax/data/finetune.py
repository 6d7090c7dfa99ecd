"""Fine-tuning data: prompt/response pairs from JSONL, the loss on the response only; the
packer and iterator that chat conversations (:mod:`lmjax.data.chat`) share.

``data.source`` names the JSONL files (``.gz`` too) as raw sources do: a file, directory or
glob, local or a ``gs://`` / ``s3://`` URL.

Each line ``{"prompt": str, "response": str}`` (field names from ``data.prompt_field`` and
``data.response_field``) becomes ``[bos] + prompt + response + [eos]``; ``weights`` are 1
on the response's tokens and its eos, 0 on the prompt (an example longer than a row is cut
to it). :func:`pack_examples` packs examples whole into rows of ``data.seq_len`` (first fit
in order), with ``segment_ids`` and ``positions`` per example; :class:`FinetuneIterator`
shuffles the rows per epoch by ``(seed, epoch)``. Its state is ``{"rows": n}``, the rows
consumed: resumable, and the same for every process (each reads the slice
``[i*B/P, (i+1)*B/P)`` of every global batch). The held-out split (``data.eval_fraction``
of the examples, chosen as raw documents are) is read once, its last batch padded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from lmjax.data.packing import DataIterator
from lmjax.data.readers import DataError, open_file
from lmjax.data.sources import SPLIT_SEED, SkipLog, resolve_paths, split_documents
from lmjax.data.tokenizer import Tokenizer


def jsonl_lines(source: str) -> Iterator[tuple[str, int, str]]:
  """(file, line number, text) of every non-blank line of the JSONL files ``source`` names;
  a line that is not UTF-8 raises DataError naming its file and line."""
  for path in resolve_paths(source, SkipLog("fail")):
    with open_file(path) as f:
      for i, raw in enumerate(f, 1):
        if not raw.strip():
          continue
        try:
          yield path, i, raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise DataError(f"{path}:{i}: invalid UTF-8 at byte {e.start} of the line ({e.reason}); "
                          "re-encode the file as UTF-8") from None


def read_pairs(source: str, prompt_field: str, response_field: str) -> list[tuple[str, str]]:
  """(prompt, response) pairs from JSONL files; a bad line raises naming file and line."""
  pairs = []
  for path, i, line in jsonl_lines(source):
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


Example = tuple[list[int], list[int], list[float]]  # inputs, targets, the weight of each target


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
  return pack_examples(examples, seq_len)


def pack_examples(examples: list[Example], seq_len: int) -> dict[str, np.ndarray]:
  """Whole examples (each at most ``seq_len`` positions) packed into rows, first fit in
  order: (rows, seq_len) ``inputs``, ``targets``, ``segment_ids`` (1, 2, ... per example,
  0 on padding), ``positions`` and float32 ``weights``. No example is ever split."""
  rows: list[list[Example]] = []
  space: list[int] = []
  for ex in examples:  # first fit, in order
    if len(ex[0]) > seq_len:
      raise ValueError(f"an example of {len(ex[0])} positions does not fit a row of {seq_len}")
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
  """Global batches of packed rows (prompt/response pairs, conversations), reshuffled every
  epoch.

  ``epochs=-1`` repeats forever; otherwise the iterator ends after ``epochs`` passes over the
  rows, its last batch padded with all-zero rows (the eval split is one pass). ``counts``
  are the records skipped or truncated while the rows were made (:meth:`DataIterator.counts`).
  """

  topology_independent = True

  def __init__(self, rows: dict[str, np.ndarray], batch_size: int, seed: int, shuffle: bool,
               process_index: int = 0, process_count: int = 1, *, epochs: int = -1,
               counts: dict[str, int] | None = None):
    self.rows, self.batch, self.seed, self.shuffle = rows, batch_size, seed, shuffle
    self.num_rows = len(rows["inputs"])
    self.lo = process_index * batch_size // process_count
    self.hi = (process_index + 1) * batch_size // process_count
    self.end = None if epochs == -1 else epochs * self.num_rows  # rows in all
    self._counts = dict(counts or {})
    self.position = 0  # rows consumed since the start of epoch 0
    self._epoch_order: tuple[int, np.ndarray] | None = None

  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_rows)
    if self._epoch_order is None or self._epoch_order[0] != epoch:
      self._epoch_order = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_rows))
    return self._epoch_order[1]

  def __next__(self) -> dict[str, np.ndarray]:
    if self.end is not None and self.position >= self.end:
      raise StopIteration
    if not self.num_rows:
      raise StopIteration  # an empty split repeated forever is still empty
    idx = []
    for k in range(self.position + self.lo, self.position + self.hi):
      epoch, i = divmod(k, self.num_rows)
      idx.append(-1 if self.end is not None and k >= self.end else self._order(epoch)[i])
    self.position += self.batch
    idx = np.array(idx, np.int64)
    return {key: np.where((idx >= 0).reshape((-1,) + (1,) * (value.ndim - 1)), value[idx], 0)
            .astype(value.dtype) for key, value in self.rows.items()}

  def get_state(self) -> dict[str, Any]:
    return {"rows": self.position}

  def set_state(self, state: dict[str, Any]) -> None:
    self.position = int(state["rows"])

  def counts(self) -> dict[str, int]:
    return dict(self._counts)


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
  return rows_iterator(cfg, rows, split=split, process_index=process_index,
                       process_count=process_count)


def rows_iterator(cfg: ml_collections.ConfigDict, rows: dict[str, np.ndarray], *, split: str,
                  process_index: int = 0, process_count: int = 1,
                  counts: dict[str, int] | None = None) -> FinetuneIterator:
  """The iterator over packed rows of ``split``: training rows shuffled per epoch
  (``data.shuffle``) for ``data.num_epochs``; eval rows once, in order."""
  d = cfg.data
  if split == "train" and not len(rows["inputs"]):
    skipped = f" (skipped: {dict(counts)})" if counts else ""
    raise DataError(f"data.source={d.source!r}: no training examples{skipped}; add examples or "
                    "lower data.eval_fraction.")
  if split == "train" and (d.num_epochs == 0 or d.num_epochs < -1):
    raise DataError(f"data.num_epochs must be positive or -1 (forever), got {d.num_epochs}.")
  return FinetuneIterator(rows, d.global_batch_size, cfg.seed, d.shuffle and split == "train",
                          process_index, process_count,
                          epochs=1 if split == "eval" else d.num_epochs, counts=counts)
