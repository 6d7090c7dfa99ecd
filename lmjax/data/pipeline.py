"""The input pipeline: raw documents through Grain, or prepared rows (:mod:`lmjax.data.prepared`).

Each batch is a dict of int32 arrays of shape ``(b, t)`` with ``b = global_batch_size //
process_count`` and ``t = data.seq_len``:

* ``inputs``: ``[bos] + ids`` of each document, packed back to back,
* ``targets``: ``ids + [eos]``, so within a segment ``targets[i] == inputs[i + 1]``,
* ``segment_ids``: 1, 2, ... per document piece in the row, 0 on padding,
* ``positions``: position within the document piece, restarting at 0 per segment.

Raw sources run documents -> shard by process -> shuffle/repeat -> tokenize -> pack ->
(mix) -> batch in Grain. Documents longer than a row continue in the next row (as a new
segment at position 0) unless ``data.long_documents`` says otherwise. With a
``data.mixture`` each component is packed on its own and rows are interleaved in the
exact proportions of the weights, so the weights are shares of rows (= tokens). The order
is a function of ``(seed, epoch, position)`` and of the process and worker counts; the
iterator's state is a small JSON-serialisable dict per process:
``it.set_state(json.loads(json.dumps(it.get_state())))`` on a fresh iterator continues
exactly where ``it`` was, across epoch boundaries too.

A prepared ``data.source`` (``tools/prepare_data.py``) is read by
:class:`lmjax.data.prepared.PreparedIterator` instead, whose order and state do not depend
on the number of processes or devices.

Example::

  tok = get_tokenizer(cfg.data, cfg.model.vocab_size)
  it = make_train_iterator(cfg, tok)
  batch = next(it)  # {"inputs": (16, 128) int32, ...}
  state = it.get_state()  # store with the checkpoint
  it.metrics()  # {"data_skipped": 0.0, ...}
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import grain
import ml_collections
import numpy as np

from lmjax.data import finetune, prepared
from lmjax.data.packing import BATCH_KEYS, DataIterator, Encode, counts_in_state, mix_iter, pack, prefetch
from lmjax.data.readers import Document
from lmjax.data.sources import DataError, SkipLog, cached_records, sources_of, split_documents
from lmjax.data.tokenizer import Tokenizer

__all__ = ["BATCH_KEYS", "make_eval_dataset", "make_eval_iterator", "make_iterator",
           "make_train_dataset", "make_train_iterator"]

# The held-out documents depend on the data alone, not on cfg.seed, so that runs with
# different seeds are evaluated on the same documents.
SPLIT_SEED = 0


def _shuffle_seed(seed: int, component: int = 0) -> int:
  """A 32-bit shuffle seed derived from cfg.seed (and the mixture component).

  Grain shuffles epoch ``e`` with ``seed + e``; hashing keeps epoch 1 of seed 0 from
  being epoch 0 of seed 1.
  """
  name = f"lmjax-data-shuffle-{seed}" + (f"-{component}" if component else "")
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


def _per_process_batch(cfg: ml_collections.ConfigDict, process_count: int) -> int:
  gbs = cfg.data.global_batch_size
  if process_count <= 0 or gbs % process_count:
    raise DataError(f"data.global_batch_size={gbs} must be divisible by the process count "
                    f"({process_count}).")
  return gbs // process_count


def _components(cfg: ml_collections.ConfigDict) -> list[tuple[str, float, list[Document], list[Document], SkipLog]]:
  """(source, weight, train docs, eval docs, skips) per source of the config."""
  d = cfg.data
  out = []
  for source, weight in sources_of(d):
    docs, skips = cached_records(source, text_field=d.text_field, txt_split=d.txt_split,
                                 bad_records=d.bad_records)
    train, evals = split_documents(docs, d.eval_fraction, SPLIT_SEED)
    out.append((source, weight, train, evals, skips))
  return out


def _raw_only(cfg: ml_collections.ConfigDict, what: str) -> None:
  if prepared.uses_prepared(cfg.data):
    raise DataError(f"{what} builds the raw-text Grain pipeline; data.source is a prepared "
                    "dataset: use make_train_iterator / make_eval_iterator.")


def make_train_dataset(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The raw-text training pipeline of this process as a Grain dataset (module docstring)."""
  _raw_only(cfg, "make_train_dataset")
  d = cfg.data
  batch_size = _per_process_batch(cfg, process_count)
  if d.num_epochs == 0 or d.num_epochs < -1:
    raise DataError(f"data.num_epochs must be positive or -1 (forever), got {d.num_epochs}.")
  encode = Encode(tokenizer, d.seq_len, d.long_documents)
  rows, weights = [], []
  for i, (source, weight, train_docs, _, _) in enumerate(_components(cfg)):
    ds = grain.MapDataset.source(train_docs)[process_index::process_count]
    if len(ds) == 0:
      raise DataError(f"data.source={source!r}: {len(train_docs)} training documents leave none "
                      f"for process {process_index} of {process_count}; add documents.")
    if d.shuffle:
      ds = ds.shuffle(seed=_shuffle_seed(cfg.seed, i))  # reshuffled every epoch by index // len
    ds = ds.repeat(None if d.num_epochs == -1 else d.num_epochs).map(encode)
    # Reader threads measured no faster (the packer is sequential); data.prefetch and
    # data.worker_count add concurrency at the end of the pipeline instead.
    ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    rows.append(pack(ids, d.seq_len))
    weights.append(weight)
  ds = mix_iter(rows, weights).batch(batch_size, drop_remainder=True)
  return prefetch(ds, d.prefetch, d.worker_count)


def make_eval_dataset(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                      process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The held-out documents of this process (every component's, in order), once; the last
  batch padded with all-zero rows."""
  _raw_only(cfg, "make_eval_dataset")
  batch_size = _per_process_batch(cfg, process_count)
  docs = [doc for _, _, _, evals, _ in _components(cfg) for doc in evals]
  ds = grain.MapDataset.source(docs)[process_index::process_count]
  ds = ds.map(Encode(tokenizer, cfg.data.seq_len, cfg.data.long_documents))
  rows = pack(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)),
              cfg.data.seq_len)
  pad = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size, pad_value=0)
  ds = rows.batch(batch_size, drop_remainder=False, batch_fn=pad)
  return prefetch(ds, cfg.data.prefetch, workers=0)  # eval is small: spawning workers costs more


class RawIterator(DataIterator):
  """A Grain iterator over raw documents; its state is per process."""

  def __init__(self, iterator: grain.DatasetIterator, skips: list[SkipLog]):
    self._it = iterator
    self._skips = skips

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._it)

  def get_state(self) -> dict[str, Any]:
    return self._it.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    try:
      self._it.set_state(state)
    except (KeyError, IndexError, TypeError, ValueError) as e:
      raise DataError(f"the checkpoint's data position does not fit this raw-text pipeline ({e!r}); "
                      "data.source, data.mixture, data.worker_count or the process count "
                      "changed since it was saved.") from e

  def close(self) -> None:
    self._it.close()

  def counts(self) -> dict[str, int]:
    """Bad records skipped while loading (the whole source) plus, from the pipeline state,
    documents this process dropped or truncated as too long."""
    out: dict[str, int] = {}
    for skips in self._skips:
      for reason, n in skips.counts.items():
        out[reason] = out.get(reason, 0) + n
    for reason, n in counts_in_state(self._it.get_state()).items():
      out[reason] = out.get(reason, 0) + n
    return out


def make_train_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                        process_index: int = 0, process_count: int = 1) -> DataIterator:
  """An endless (num_epochs=-1) or finite iterator of training batches for this process.

  Raw sources: each process reads the documents ``process_index::process_count`` of the
  training split and yields ``global_batch_size // process_count`` rows per batch.
  Prepared sources: each process reads its contiguous slice of every global batch.
  """
  if prepared.uses_prepared(cfg.data):
    return prepared.make_train_iterator(cfg, process_index, process_count)
  ds = make_train_dataset(cfg, tokenizer, process_index=process_index, process_count=process_count)
  return RawIterator(iter(ds), [skips for *_, skips in _components(cfg)])


def make_eval_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                       process_index: int = 0, process_count: int = 1) -> Any:
  """A finite iterator over the held-out documents (empty if there are none).

  Raw sources: processes may get different numbers of eval batches; a multi-process
  evaluation should take a fixed number of batches (train.eval_batches) and treat an
  exhausted iterator as all-padding batches. Prepared sources give every process the
  same number of batches.
  """
  if prepared.uses_prepared(cfg.data):
    return prepared.make_eval_iterator(cfg, process_index, process_count)
  return iter(make_eval_dataset(cfg, tokenizer, process_index=process_index,
                                process_count=process_count))


SPLITS = ("train", "eval")


def make_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *, split: str = "train",
                  process_index: int = 0, process_count: int = 1) -> Any:
  """The one entry point: batches of ``split`` ("train": endless or ``data.num_epochs``;
  "eval": the held-out part, finite) for this process, from whatever ``cfg.data`` names:
  raw documents, a prepared dataset, or prompt/response pairs (``data.format``)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  proc = dict(process_index=process_index, process_count=process_count)
  if finetune.is_finetune(cfg.data):
    return finetune.make_iterator(cfg, tokenizer, split=split, **proc)
  if split == "train":
    return make_train_iterator(cfg, tokenizer, **proc)
  return make_eval_iterator(cfg, tokenizer, **proc)
