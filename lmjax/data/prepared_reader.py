"""Reading a prepared dataset back, in an order that does not depend on the topology.

The directory (:mod:`lmjax.data.prepared_format`), a local path or a ``gs://`` / ``s3://``
URL, is read through Grain's ArrayRecord source; a URL's shards are read from local copies
in the cache (:func:`lmjax.storage.local_file`: ArrayRecord reads only local files).
:func:`lmjax.data.make_iterator` reads training batches through
:class:`PreparedIterator` and the held-out ones through :func:`eval_iterator` when
``data.source`` (or every ``data.mixture`` component) is a prepared dataset.

**Order.** Training reads one stream of rows: each component's rows permuted per epoch by
Grain's index shuffle (seed from ``cfg.seed`` and the component index, reseeded every
epoch), repeated, and for a mixture interleaved in exact proportions. Global batch ``k``
after a resume at row ``r`` is rows ``[r + k*B, r + (k+1)*B)`` of the stream, ``B =
data.global_batch_size``; process ``i`` of ``P`` reads the contiguous slice ``[i*B/P,
(i+1)*B/P)`` of it. The iterator's state is the row offset ``r`` alone, so a run resumed
with another process count, device count or mesh continues with exactly the next global
batches (and one resumed with another global batch size continues at the next row).

Example::

  it = make_iterator(cfg, tok, process_index=0, process_count=2)  # lmjax.data's entry point
  batch = next(it)         # rows [0, B/2) of global batch 0
  it.get_state()           # {"rows": B, ...}: the same on every process
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from lmjax import storage
from lmjax.data.packing import (
    BATCH_KEYS,
    DataIterator,
    ExactMix,
    integer_proportions,
    per_process_batch,
    prefetch,
)
from lmjax.data.prepared_format import FORMAT, RowDecoder, read_metadata
from lmjax.data.readers import DataError
from lmjax.data.sources import sources_of
from lmjax.data.tokenizer import Tokenizer

log = logging.getLogger("lmjax.data")

_ENDLESS_ROWS = 1 << 48  # rows of an endless (num_epochs=-1) stream
_READ_THREADS = 2  # threads reading rows per process (ArrayRecord reads release the GIL)


class RowSource:
  """The records of some ArrayRecord shards (local paths or URLs) as one random-access
  source (Grain's), whose read errors name the shard and record instead of only a byte
  offset."""

  def __init__(self, files: Sequence[str]):
    self._files = list(files)
    self._local = [_local_shard(f) for f in self._files]
    try:
      self._source = grain.sources.ArrayRecordDataSource(self._local)
    except Exception as e:  # noqa: BLE001 - name the shard that cannot be opened
      bad = next((f for f, p in zip(self._files, self._local) if not _opens(p)), self._files)
      raise DataError(f"{bad}: cannot be opened ({e}); the prepared dataset is damaged: restore "
                      "the file or prepare the data again.") from None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> bytes:
    try:
      return self._source[index]
    except Exception as e:  # noqa: BLE001 - any read failure is reported with its place
      raise self._error(index, e) from None

  def __getitems__(self, indices: Sequence[int]) -> Sequence[bytes]:
    try:
      return self._source.__getitems__(indices)
    except Exception:  # noqa: BLE001 - find the record that fails and name it
      return [self[i] for i in indices]

  def _error(self, index: int, error: Exception) -> DataError:
    from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=import-outside-toplevel
    start = 0
    for path, local in zip(self._files, self._local):
      n = ArrayRecordReader(local).num_records()
      if index < start + n:
        return DataError(f"{path} record {index - start + 1}: cannot be read ({error}); the prepared "
                         "dataset is damaged: restore the file or prepare the data again.")
      start += n
    return DataError(f"row {index} of {self._files}: cannot be read ({error}).")

  def __repr__(self) -> str:
    return f"RowSource({len(self._files)} files)"


def _local_shard(path: str) -> str:
  """A local file holding shard ``path``; DataError naming it if it cannot be read."""
  try:
    return storage.local_file(path)
  except OSError as e:
    storage.check(path)  # a URL's bucket that is missing or refused, named as such
    raise DataError(f"{path}: cannot be read ({e}); the prepared dataset is damaged: restore the "
                    "file or prepare the data again.") from None


def _opens(path: str) -> bool:
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=import-outside-toplevel
  try:
    return ArrayRecordReader(path).ok()
  except Exception:  # noqa: BLE001
    return False


class _Component:
  """One prepared directory as used by a config."""

  def __init__(self, directory: str, weight: float):
    self.directory = str(storage.path(directory))  # "~" expanded
    self.weight = weight
    self.meta = read_metadata(self.directory)
    self.decoder = RowDecoder(self.meta["seq_len"], self.meta["token_dtype"],
                              self.meta["segment_dtype"])

  def files(self, split: str) -> list[str]:
    return [storage.join(self.directory, name) for name in self.meta["splits"][split]["files"]]

  def rows(self, split: str) -> int:
    return int(self.meta["splits"][split]["rows"])


def problems(cfg: ml_collections.ConfigDict, fixes: dict[str, int] | None = None) -> list[str]:
  """One line per way the prepared source(s) of ``cfg`` do not fit it (row length against
  ``data.seq_len`` and ``model.max_seq_len``, mixed tokenizers, an empty train split); the
  override each known fix needs goes into ``fixes``."""
  fixes = {} if fixes is None else fixes
  out, first = [], None
  for source, weight in sources_of(cfg.data):
    try:
      c = _Component(source, weight)
    except DataError as e:
      out.append(str(e))
      continue
    first = first or c
    rows = c.meta["seq_len"]
    if rows != cfg.data.seq_len:
      out.append(f"config.data.seq_len={cfg.data.seq_len}, but the prepared dataset {c.directory} "
                 f"holds rows of {rows} tokens; set --config.data.seq_len={rows} (or prepare the "
                 "data again with --seq_len).")
      fixes["data.seq_len"] = rows
    if rows > cfg.model.max_seq_len:
      out.append(f"config.model.max_seq_len={cfg.model.max_seq_len} is shorter than the "
                 f"{rows}-token rows of {c.directory}; set --config.model.max_seq_len={rows}.")
      fixes["model.max_seq_len"] = rows
    if c.meta["tokenizer"]["sha256"] != first.meta["tokenizer"]["sha256"]:
      out.append(f"data.mixture: {c.directory} and {first.directory} were prepared with "
                 "different tokenizers.")
    if c.rows("train") == 0:
      out.append(f"{c.directory}: the train split holds no rows; prepare it from more documents.")
  return out


def _components(cfg: ml_collections.ConfigDict) -> list[_Component]:
  found = problems(cfg)
  if found:
    raise DataError(found[0])
  return [_Component(source, weight) for source, weight in sources_of(cfg.data)]


def dataset_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer stored with the prepared source(s); checks ``data.tokenizer`` against it."""
  source = sources_of(data_cfg)[0][0]
  meta = read_metadata(source)
  tok = Tokenizer.load(storage.join(source, meta["tokenizer"]["file"]))
  if data_cfg.tokenizer:
    given = Tokenizer.load(data_cfg.tokenizer)
    if given.sha256 != tok.sha256:
      raise DataError(f"config.data.tokenizer={data_cfg.tokenizer!r} is not the tokenizer {source} "
                      "was prepared with; set data.tokenizer=\"\" to use the dataset's own.")
  return tok


def _shuffle_seed(seed: int, component: int) -> int:
  """A 32-bit per-component shuffle seed (Grain adds the epoch to it)."""
  digest = hashlib.sha256(f"lmjax-prepared-shuffle-{seed}-{component}".encode()).digest()
  return int.from_bytes(digest[:4], "little")


def _train_rows(cfg: ml_collections.ConfigDict,
                comps: list[_Component]) -> tuple[grain.MapDataset, str]:
  """The global training stream (row index -> record bytes) and its fingerprint."""
  d = cfg.data
  parts = []
  for i, c in enumerate(comps):
    ds = grain.MapDataset.source(RowSource(c.files("train")))
    if d.shuffle:
      ds = ds.shuffle(seed=_shuffle_seed(cfg.seed, i))  # index // rows is the epoch
    parts.append(ds.repeat(None if d.num_epochs == -1 else d.num_epochs))
  if len(parts) == 1:
    rows = parts[0]
  else:
    proportions = integer_proportions([c.weight for c in comps])
    rows = grain.MapDataset.select_from_datasets(parts, ExactMix(proportions, [len(p) for p in parts]))
  ident = json.dumps({"components": [[c.meta["splits"]["train"]["sha256"], c.weight] for c in comps],
                      "seed": cfg.seed, "shuffle": d.shuffle, "num_epochs": d.num_epochs})
  return rows, hashlib.sha256(ident.encode()).hexdigest()[:16]


class PreparedIterator(DataIterator):
  """This process's slice of each global batch of the prepared stream (module docstring)."""

  topology_independent = True

  def __init__(self, cfg: ml_collections.ConfigDict, process_index: int = 0,
               process_count: int = 1):
    self._local = per_process_batch(cfg.data.global_batch_size, process_count)
    self._global = cfg.data.global_batch_size
    self._cfg = cfg
    self._comps = _components(cfg)
    self._decoder = self._comps[0].decoder
    self._rows, self._fingerprint = _train_rows(cfg, self._comps)
    self._index, self._count = process_index, process_count
    self._start = 0  # row offset of the next global batch when the iterator was (re)started
    self._served = 0  # batches returned since then
    self._it: Iterator | None = None

  def _open(self) -> Iterator:
    ds = self._rows
    # An endless stream is cut at 2**48 rows: Grain's length arithmetic overflows near 2**63.
    remaining = min(len(ds), _ENDLESS_ROWS) - self._start
    whole = max(0, remaining) // self._global  # the last partial global batch is dropped
    ds = ds[self._start:self._start + whole * self._global]
    ds = ds.batch(self._local, batch_fn=self._decoder)[self._index::self._count]
    it = ds.to_iter_dataset(grain.ReadOptions(
        num_threads=_READ_THREADS, prefetch_buffer_size=max(2 * _READ_THREADS, self._cfg.data.prefetch)))
    return iter(prefetch(it, self._cfg.data.prefetch, self._cfg.data.worker_count))

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self._open()
    batch = next(self._it)
    self._served += 1
    return batch

  @property
  def rows(self) -> int:
    """Row offset of the next global batch in the stream."""
    return self._start + self._served * self._global

  def get_state(self) -> dict[str, Any]:
    return {"format": FORMAT, "rows": self.rows, "global_batch_size": self._global,
            "dataset": self._fingerprint}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("format") != FORMAT or not isinstance(state.get("rows"), int):
      raise DataError(f"data state {state!r} was not written by a prepared-data iterator.")
    if state.get("dataset") != self._fingerprint:
      log.warning("the checkpoint's data position was saved for another dataset, mixture, seed "
                  "or epoch count; continuing at row %d of the new stream.", state["rows"])
    self.close()
    self._start, self._served = state["rows"], 0

  def close(self) -> None:
    if self._it is not None and hasattr(self._it, "close"):
      self._it.close()
    self._it = None

  def counts(self) -> dict[str, int]:
    """What preparing the training data skipped (and truncated), summed over components."""
    out: dict[str, int] = {}
    for c in self._comps:
      for reason, n in c.meta["skipped"].items():
        out[reason] = out.get(reason, 0) + n
      truncated = c.meta["splits"]["train"]["truncated"]
      if truncated:
        out["truncated"] = out.get("truncated", 0) + truncated
    return out


def eval_iterator(cfg: ml_collections.ConfigDict, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """The eval rows of every component, in order, once; the last global batch padded with
  all-zero rows. Process ``i`` reads the same contiguous slice of each global batch."""
  comps = _components(cfg)
  gbs = cfg.data.global_batch_size
  local = per_process_batch(gbs, process_count)
  files = [f for c in comps for f in c.files("eval") if c.rows("eval")]
  if not files:
    return iter(())
  source = RowSource(files)
  decoder = comps[0].decoder
  n = len(source)

  def batches() -> Iterator[dict[str, np.ndarray]]:
    for start in range(0, n, gbs):
      lo = min(n, start + process_index * local)
      hi = min(n, start + (process_index + 1) * local)
      batch = {k: np.zeros((local, decoder.seq_len), np.int32) for k in BATCH_KEYS}
      if hi > lo:
        rows = decoder([source[i] for i in range(lo, hi)])
        for k in BATCH_KEYS:
          batch[k][:hi - lo] = rows[k]
      yield batch

  return batches()
