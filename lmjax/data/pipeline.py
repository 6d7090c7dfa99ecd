"""The one entry point of lmjax's data: :func:`make_iterator`, and :func:`get_tokenizer`.

``make_iterator(cfg, tokenizer, split=...)`` reads whatever ``cfg.data`` names: raw
documents (the Grain pipeline below), a prepared dataset (:mod:`lmjax.data.prepared_reader`)
or prompt/response pairs (:mod:`lmjax.data.finetune`). Each batch is a dict of int32
arrays of shape ``(b, t)`` with ``b = global_batch_size // process_count`` and ``t =
data.seq_len``:

* ``inputs``: ``[bos] + ids`` of each document, packed back to back,
* ``targets``: ``ids + [eos]``, so within a segment ``targets[i] == inputs[i + 1]``,
* ``segment_ids``: 1, 2, ... per document piece in the row, 0 on padding,
* ``positions``: position within the document piece, restarting at 0 per segment

(prompt/response batches add float32 ``weights``).

Raw sources run documents -> shard by process -> shuffle/repeat -> tokenize -> pack ->
(mix) -> batch in Grain. Documents longer than a row continue in the next row (as a new
segment at position 0) unless ``data.long_documents`` says otherwise. With a
``data.mixture`` each component is packed on its own and rows are interleaved in the
exact proportions of the weights, so the weights are shares of rows (= tokens). The order
is a function of ``(seed, epoch, position)`` and of the process and worker counts; the
iterator's state is a small JSON-serialisable dict per process:
``it.set_state(json.loads(json.dumps(it.get_state())))`` on a fresh iterator continues
exactly where ``it`` was, across epoch boundaries too. A prepared source's order and state
do not depend on the number of processes or devices.

Example::

  tok = get_tokenizer(cfg.data, cfg.model.vocab_size)
  it = make_iterator(cfg, tok, split="train")
  batch = next(it)  # {"inputs": (16, 128) int32, ...}
  state = it.get_state()  # store with the checkpoint
  it.metrics()  # {"data_skipped": 0.0, ...}
  evals = list(make_iterator(cfg, tok, split="eval"))  # the held-out part, once
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import grain
import ml_collections
import numpy as np

from lmjax.data import chat, finetune, preference, prepared_reader
from lmjax.data.packing import DataIterator, Encode, counts_in_state, mix_iter, pack, per_process_batch, prefetch
from lmjax.data.readers import DataError, Document
from lmjax.data.sources import (
    SPLIT_SEED,
    SPLITS,
    SkipLog,
    cached_records,
    sources_of,
    split_documents,
    uses_prepared,
)
from lmjax.data.tokenizer import Tokenizer, cache_dir, cached_tokenizer

__all__ = ["get_tokenizer", "make_iterator"]


def make_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None, *,
                  split: str = "train", process_index: int = 0, process_count: int = 1) -> Any:
  """Batches of ``split`` for this process, from whatever ``cfg.data`` names.

  ``split="train"``: an endless (``data.num_epochs=-1``) or finite :class:`DataIterator`.
  Raw sources: each process reads the documents ``process_index::process_count`` of the
  training split. Prepared sources and prompt/response pairs: each process reads its
  contiguous slice of every global batch, and the state is one for all processes.

  ``split="eval"``: the held-out part, once (empty if there is none); the last batch is
  padded with all-zero rows. With raw sources processes may get different numbers of eval
  batches, so a multi-process evaluation takes a fixed number (``train.eval_batches``)
  and treats an exhausted iterator as all-padding batches; prepared sources give every
  process the same number.

  ``tokenizer`` encodes raw text and pairs; a prepared dataset needs none (``None``).
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  d = cfg.data
  proc = dict(process_index=process_index, process_count=process_count)
  if finetune.is_finetune(d):
    return finetune.pairs_iterator(cfg, tokenizer, split=split, **proc)
  if d.format == "chat":
    return chat.chat_iterator(cfg, tokenizer, split=split, **proc)
  if preference.is_preference(d):
    return preference.preference_iterator(cfg, tokenizer, split=split, **proc)
  if split == "train" and (d.num_epochs == 0 or d.num_epochs < -1):
    raise DataError(f"data.num_epochs must be positive or -1 (forever), got {d.num_epochs}.")
  if uses_prepared(d):
    if split == "train":
      return prepared_reader.PreparedIterator(cfg, **proc)
    return prepared_reader.eval_iterator(cfg, **proc)
  if split == "train":
    ds = _train_dataset(cfg, tokenizer, **proc)
    return RawIterator(iter(ds), [skips for *_, skips in _components(cfg)])
  return iter(_eval_dataset(cfg, tokenizer, **proc))


def get_tokenizer(data_cfg: ml_collections.ConfigDict, vocab_size: int,
                  model_type: str = "bpe") -> Tokenizer:
  """The tokenizer for a ``cfg.data``.

  * A prepared source (``tools/prepare_data.py``): the tokenizer stored with it; a
    ``data.tokenizer`` that differs from it is an error.
  * ``data.tokenizer`` set: that tokenizer (a sentencepiece ``.model``, a Hugging Face
    ``tokenizer.json`` or a tiktoken file, told apart by content), as it is (comparing its
    size with ``model.vocab_size`` is the caller's check; ``lmjax.train`` makes it).
  * Otherwise one with ``vocab_size`` pieces for the documents of ``data.source`` (or of
    every ``data.mixture`` component), trained once and kept in the cache directory
    (``data.tokenizer_cache``) under a hash of the documents and the settings.
  """
  if uses_prepared(data_cfg):
    return prepared_reader.dataset_tokenizer(data_cfg)
  if data_cfg.tokenizer:
    return Tokenizer.load(data_cfg.tokenizer)
  if data_cfg.format != "text":  # fine-tuning data: the pre-trained model's tokenizer
    raise DataError(f"data.format={data_cfg.format!r} needs the tokenizer of the model it "
                    "fine-tunes: set train.init_from to that run (its tokenizer is used) or "
                    "data.tokenizer to a tokenizer file.")
  docs = []
  for source, _ in sources_of(data_cfg):
    records, _ = cached_records(source, text_field=data_cfg.text_field,
                                txt_split=data_cfg.txt_split, bad_records=data_cfg.bad_records)
    docs.extend(d.text for d in records)
  return cached_tokenizer(docs, vocab_size, cache_dir(data_cfg), model_type)


# --- the raw-text Grain pipeline ----------------------------------------------------------


def _shuffle_seed(seed: int, component: int = 0) -> int:
  """A 32-bit shuffle seed derived from cfg.seed (and the mixture component).

  Grain shuffles epoch ``e`` with ``seed + e``; hashing keeps epoch 1 of seed 0 from
  being epoch 0 of seed 1.
  """
  name = f"lmjax-data-shuffle-{seed}" + (f"-{component}" if component else "")
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


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


def _train_dataset(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                   process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The raw-text training pipeline of this process as a Grain dataset (module docstring)."""
  d = cfg.data
  batch_size = per_process_batch(d.global_batch_size, process_count)
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


def _eval_dataset(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """The held-out documents of this process (every component's, in order), once; the last
  batch padded with all-zero rows."""
  batch_size = per_process_batch(cfg.data.global_batch_size, process_count)
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
    return self._it.get_state() if self._it is not None else self._final_state

  def set_state(self, state: dict[str, Any]) -> None:
    try:
      self._it.set_state(state)
    except (KeyError, IndexError, TypeError, ValueError) as e:
      raise DataError(f"the checkpoint's data position does not fit this raw-text pipeline ({e!r}); "
                      "data.source, data.mixture, data.worker_count or the process count "
                      "changed since it was saved.") from e

  def close(self) -> None:
    """Stops prefetching; the position and counts stay readable."""
    if self._it is not None:
      self._final_state = self._it.get_state()
      self._it.close()
    self._it = None  # dropped now, while Grain's modules are intact

  def counts(self) -> dict[str, int]:
    """Bad records skipped while loading (the whole source) plus, from the pipeline state,
    documents this process dropped or truncated as too long."""
    out: dict[str, int] = {}
    for skips in self._skips:
      for reason, n in skips.counts.items():
        out[reason] = out.get(reason, 0) + n
    for reason, n in counts_in_state(self.get_state()).items():
      out[reason] = out.get(reason, 0) + n
    return out
