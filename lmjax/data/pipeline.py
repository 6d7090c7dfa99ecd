"""The Grain input pipeline: documents -> shard -> shuffle/repeat -> tokenize -> pack -> batch.

Each batch is a dict of int32 arrays of shape ``(b, t)`` with ``b = global_batch_size //
process_count`` and ``t = data.seq_len``:

* ``inputs``: ``[bos] + ids`` of each document, packed back to back,
* ``targets``: ``ids + [eos]``, so within a segment ``targets[i] == inputs[i + 1]``,
* ``segment_ids``: 1, 2, ... per document piece in the row, 0 on padding,
* ``positions``: position within the document piece, restarting at 0 per segment.

Documents longer than a row continue in the next row (as a new segment starting at
position 0). Padding holds 0 everywhere. The data order is a function of
``(seed, epoch, position)`` only, and the iterator's state is a small JSON-serialisable
dict: ``it.set_state(json.loads(json.dumps(it.get_state())))`` on a fresh iterator
continues exactly where ``it`` was, across epoch boundaries too.

Example::

  tok = get_tokenizer(cfg.data, cfg.model.vocab_size)
  it = make_train_iterator(cfg, tok)
  batch = next(it)  # {"inputs": (16, 128) int32, ...}
  state = it.get_state()  # store with the checkpoint
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from absl import flags
import grain
import ml_collections
import numpy as np

from lmjax.data.sources import DataError, load_documents, split_documents
from lmjax.data.tokenizer import Tokenizer

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")
# The held-out documents depend on the data alone, not on cfg.seed, so that runs with
# different seeds are evaluated on the same documents.
SPLIT_SEED = 0


def _shuffle_seed(seed: int) -> int:
  """A 32-bit shuffle seed derived from cfg.seed.

  Grain shuffles epoch ``e`` with ``seed + e``; hashing keeps epoch 1 of seed 0 from
  being epoch 0 of seed 1.
  """
  digest = hashlib.sha256(f"lmjax-data-shuffle-{seed}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


class _Tokenize:
  """Document text -> {"inputs": [bos] + ids, "targets": ids + [eos]}; None if no tokens."""

  def __init__(self, tokenizer: Tokenizer):
    self._tok = tokenizer

  def __call__(self, text: str) -> dict[str, np.ndarray] | None:
    ids = self._tok.encode(text)
    if not ids:
      return None  # skipped by to_iter_dataset
    inputs = np.empty(len(ids) + 1, np.int32)
    targets = np.empty(len(ids) + 1, np.int32)
    inputs[0] = self._tok.bos_id
    inputs[1:] = ids
    targets[:-1] = ids
    targets[-1] = self._tok.eos_id
    return {"inputs": inputs, "targets": targets}


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The packer's keys -> lmjax's four keys (inputs and targets share segments)."""
  return {
      "inputs": packed["inputs"],
      "targets": packed["targets"],
      "segment_ids": packed["inputs_segment_ids"],
      "positions": packed["inputs_positions"],
  }


def _tuple_slices(state: Any) -> Any:
  """Restores the tuples a JSON round trip turned into lists in the packer's state."""
  if isinstance(state, dict):
    return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _tuple_slices(v))
            for k, v in state.items()}
  if isinstance(state, list):
    return [_tuple_slices(v) for v in state]
  return state


class _JsonSafeIterDataset(grain.IterDataset):
  """Passes elements through; accepts states that went through JSON.

  ConcatThenSplitIterDataset keeps ``(start, stop)`` tuples in its state and compares
  them against the tuple ``(-1, -1)``; after JSON they are lists, the comparison fails
  and a restored packer silently emits empty pieces. Placed right after the packer.
  """

  def __iter__(self) -> grain.DatasetIterator:
    return _JsonSafeIterator(self._parent.__iter__())


class _JsonSafeIterator(grain.DatasetIterator):

  def __next__(self) -> Any:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(_tuple_slices(state))


def _per_process_batch(cfg: ml_collections.ConfigDict, process_count: int) -> int:
  gbs = cfg.data.global_batch_size
  if process_count <= 0 or gbs % process_count:
    raise DataError(f"data.global_batch_size={gbs} must be divisible by the process count "
                    f"({process_count}).")
  return gbs // process_count


def _documents(cfg: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  docs = load_documents(cfg.data.source, cfg.data.text_field)
  return split_documents(docs, cfg.data.eval_fraction, SPLIT_SEED)


def _pack_and_batch(ds: grain.MapDataset, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                    *, train: bool) -> grain.IterDataset:
  """Tokenize, pack to rows of ``seq_len`` and batch; the steps train and eval share."""
  ds = ds.map(_Tokenize(tokenizer))
  # Reader threads measured no faster (the Python packer dominates); data.prefetch and
  # data.worker_count add concurrency at the end of the pipeline instead.
  ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  ids = grain.experimental.ConcatThenSplitIterDataset(
      ids, length_struct={"inputs": seq_len, "targets": seq_len})
  rows = _JsonSafeIterDataset(ids).map(_to_row)
  if train:
    return rows.batch(batch_size, drop_remainder=True)
  # The last eval batch is filled with all-zero rows (segment_ids 0 = padding).
  pad = functools.partial(grain.experimental.batch_and_pad, batch_size=batch_size, pad_value=0)
  return rows.batch(batch_size, drop_remainder=False, batch_fn=pad)


def _prefetch(ds: grain.IterDataset, cfg: ml_collections.ConfigDict,
              workers: int) -> grain.IterDataset:
  if workers > 0:
    # Grain's worker start-up reads absl flags; outside an absl app (notebooks, tests)
    # nothing has parsed them, so take the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, cfg.data.prefetch)))
  if cfg.data.prefetch > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=cfg.data.prefetch)
  return ds


def make_train_dataset(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The training pipeline of this process as a Grain dataset (see the module docstring)."""
  d = cfg.data
  batch_size = _per_process_batch(cfg, process_count)
  if d.num_epochs == 0 or d.num_epochs < -1:
    raise DataError(f"data.num_epochs must be positive or -1 (forever), got {d.num_epochs}.")
  train_docs, _ = _documents(cfg)
  ds = grain.MapDataset.source(train_docs)[process_index::process_count]
  if len(ds) == 0:
    raise DataError(f"data.source={d.source!r}: {len(train_docs)} training documents leave none "
                    f"for process {process_index} of {process_count}; add documents.")
  if d.shuffle:
    ds = ds.shuffle(seed=_shuffle_seed(cfg.seed))  # reshuffled every epoch by index // len
  ds = ds.repeat(None if d.num_epochs == -1 else d.num_epochs)
  ds = _pack_and_batch(ds, tokenizer, d.seq_len, batch_size, train=True)
  return _prefetch(ds, cfg, d.worker_count)


def make_eval_dataset(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                      process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The held-out documents of this process, one epoch in order, the last batch padded."""
  batch_size = _per_process_batch(cfg, process_count)
  _, eval_docs = _documents(cfg)
  ds = grain.MapDataset.source(eval_docs)[process_index::process_count]
  ds = _pack_and_batch(ds, tokenizer, cfg.data.seq_len, batch_size, train=False)
  return _prefetch(ds, cfg, workers=0)  # eval is small: spawning workers costs more


def make_train_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                        process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """An endless (num_epochs=-1) or finite iterator of training batches for this process.

  Each process reads the documents ``process_index::process_count`` of the training
  split and yields ``global_batch_size // process_count`` rows per batch.
  """
  return iter(make_train_dataset(cfg, tokenizer, process_index=process_index,
                                 process_count=process_count))


def make_eval_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                       process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """A finite iterator over the held-out documents (empty if eval_fraction is 0).

  Processes may get different numbers of eval batches; a multi-process evaluation
  should take a fixed number of batches (train.eval_batches) and treat an exhausted
  iterator as all-padding batches.
  """
  return iter(make_eval_dataset(cfg, tokenizer, process_index=process_index,
                                process_count=process_count))
