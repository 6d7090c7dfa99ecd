"""Prepared datasets: tokenized and packed once, read back in a topology-independent order.

``tools/prepare_data.py`` (:func:`prepare`) writes a directory::

  lmjax_data.json           metadata: format, seq_len, dtypes, tokenizer hash, splits, counts
  tokenizer.model           the sentencepiece model the rows were encoded with
  train-00000.arrayrecord   one record per packed row of seq_len positions, ...
  eval-00000.arrayrecord    the held-out documents, packed the same way

A record holds ``inputs`` and ``targets`` (uint16, or uint32 for vocabularies over 65536)
and ``segment_ids`` (uint16, or uint32 for rows over 65535 positions) back to back;
``positions`` are recomputed from the segment ids. The rows are exactly those the
raw-text pipeline packs (same concat-then-split, same ``data.long_documents`` policy).

**Order.** Training reads one stream of rows: each component's rows permuted per epoch by
Grain's index shuffle (seed from ``cfg.seed`` and the component index, reseeded every
epoch), repeated, and for a mixture interleaved in exact proportions. Global batch ``k``
after a resume at row ``r`` is rows ``[r + k*B, r + (k+1)*B)`` of the stream, ``B =
data.global_batch_size``; process ``i`` of ``P`` reads the contiguous slice ``[i*B/P,
(i+1)*B/P)`` of it. The iterator's state is the row offset ``r`` alone, so a run resumed
with another process count, device count or mesh continues with exactly the next global
batches (and one resumed with another global batch size continues at the next row).

Example::

  it = make_train_iterator(cfg, process_index=0, process_count=2)
  batch = next(it)         # rows [0, B/2) of global batch 0
  it.get_state()           # {"rows": B, ...}: the same on every process
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np

from lmjax.data.packing import (
    BATCH_KEYS,
    DataIterator,
    Encode,
    ExactMix,
    RowPacker,
    Skipped,
    integer_proportions,
    positions_from_segments,
    prefetch,
)
from lmjax.data.readers import Document
from lmjax.data.sources import PREPARED_METADATA, DataError, SkipLog, iter_documents, sources_of
from lmjax.data.tokenizer import Tokenizer

log = logging.getLogger("lmjax.data")

FORMAT = "lmjax-packed-rows"
VERSION = 1
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "eval")
_ENDLESS_ROWS = 1 << 48  # rows of an endless (num_epochs=-1) stream
_READ_THREADS = 2  # threads reading rows per process (ArrayRecord reads release the GIL)


def is_prepared(source: str) -> bool:
  """Whether ``source`` is a directory written by :func:`prepare`."""
  return os.path.isfile(os.path.join(os.path.expanduser(source), PREPARED_METADATA))


def uses_prepared(data_cfg: ml_collections.ConfigDict) -> bool:
  """Whether ``data.source`` (or every ``data.mixture`` component) is prepared."""
  flags = [is_prepared(source) for source, _ in sources_of(data_cfg)]
  if any(flags) and not all(flags):
    raise DataError("data.mixture mixes prepared datasets with raw sources; prepare every "
                    "component with tools/prepare_data.py, or none.")
  return all(flags)


def read_metadata(directory: str) -> dict[str, Any]:
  """The metadata of a prepared directory; DataError if it is not one lmjax can read."""
  path = os.path.join(os.path.expanduser(directory), PREPARED_METADATA)
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise DataError(f"{path}: not a readable prepared-dataset description ({e}).") from None
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise DataError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this "
                    f"lmjax reads {FORMAT!r} version {VERSION}. Prepare the data again.")
  return meta


# --- writing -----------------------------------------------------------------------------


def _dtypes(vocab_size: int, seq_len: int) -> tuple[str, str]:
  return ("uint16" if vocab_size <= 1 << 16 else "uint32",
          "uint16" if seq_len < 1 << 16 else "uint32")


def encode_row(row: dict[str, np.ndarray], token_dtype: str, segment_dtype: str) -> bytes:
  """One packed row as the bytes of its record."""
  return (row["inputs"].astype(token_dtype).tobytes() + row["targets"].astype(token_dtype).tobytes()
          + row["segment_ids"].astype(segment_dtype).tobytes())


class RowDecoder:
  """Records (bytes) -> a batch dict of ``(n, seq_len)`` int32 arrays."""

  def __init__(self, seq_len: int, token_dtype: str, segment_dtype: str):
    self.seq_len = seq_len
    self._tok = np.dtype(token_dtype)
    self._seg = np.dtype(segment_dtype)
    self.row_bytes = seq_len * (2 * self._tok.itemsize + self._seg.itemsize)

  def __call__(self, records: Sequence[bytes]) -> dict[str, np.ndarray]:
    t, n = self.seq_len, len(records)
    raw = np.frombuffer(b"".join(records), np.uint8)
    if raw.size != n * self.row_bytes:
      raise DataError(f"prepared rows of {raw.size // max(n, 1)} bytes, expected {self.row_bytes}: "
                      "the files do not match lmjax_data.json.")
    raw = raw.reshape(n, self.row_bytes)
    a, b = t * self._tok.itemsize, 2 * t * self._tok.itemsize
    seg = np.ascontiguousarray(raw[:, b:]).view(self._seg).astype(np.int32)
    return {
        "inputs": np.ascontiguousarray(raw[:, :a]).view(self._tok).astype(np.int32),
        "targets": np.ascontiguousarray(raw[:, a:b]).view(self._tok).astype(np.int32),
        "segment_ids": seg,
        "positions": positions_from_segments(seg),
    }


class _SplitWriter:
  """Rows of one split -> numbered ArrayRecord shards, with counts and a content hash."""

  def __init__(self, directory: str, split: str, seq_len: int, dtypes: tuple[str, str],
               shard_rows: int):
    self._dir, self._split, self._dtypes, self._shard_rows = directory, split, dtypes, shard_rows
    self._packer = RowPacker(seq_len)
    self._writer = None
    self._in_shard = 0
    self._hash = hashlib.sha256()
    self.stats = {"files": [], "rows": 0, "documents": 0, "tokens": 0, "padding": 0, "truncated": 0}

  def add(self, sequence: dict[str, np.ndarray]) -> None:
    self.stats["documents"] += 1
    self.stats["truncated"] += int(sequence.pop("truncated", False))
    for row in self._packer.add(sequence):
      self._write(row)

  def _write(self, row: dict[str, np.ndarray]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
    if self._writer is None or self._in_shard == self._shard_rows:
      self._close_shard()
      name = f"{self._split}-{len(self.stats['files']):05d}.arrayrecord"
      self.stats["files"].append(name)
      # group_size:1 makes every row one chunk: random access reads one row, not a group.
      self._writer = ArrayRecordWriter(os.path.join(self._dir, name), "group_size:1")
    data = encode_row(row, *self._dtypes)
    self._writer.write(data)
    self._hash.update(data)
    self._in_shard += 1
    real = int((row["segment_ids"] > 0).sum())
    self.stats["rows"] += 1
    self.stats["tokens"] += real
    self.stats["padding"] += len(row["segment_ids"]) - real

  def _close_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
    self._writer, self._in_shard = None, 0

  def finish(self) -> dict[str, Any]:
    row = self._packer.flush()
    if row is not None:
      self._write(row)
    self._close_shard()
    self.stats["sha256"] = self._hash.hexdigest()
    return self.stats


def _held_out(text: str, eval_fraction: float, seed: int) -> bool:
  """Whether a document is held out: its content hash, so duplicates land on one side."""
  if eval_fraction <= 0:
    return False
  digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=seed.to_bytes(8, "little"))
  return int.from_bytes(digest.digest(), "little") < eval_fraction * 2.0**64


def _chunks(docs: Iterable[Document], size: int) -> Iterator[list[Document]]:
  chunk = []
  for doc in docs:
    chunk.append(doc)
    if len(chunk) == size:
      yield chunk
      chunk = []
  if chunk:
    yield chunk


def prepare(sources: Sequence[str], output: str, tokenizer: Tokenizer, *, seq_len: int,
            text_field: str = "text", txt_split: str = "file", eval_fraction: float = 0.0,
            split_seed: int = 0, long_documents: str = "split", bad_records: str = "skip",
            shard_mb: float = 256.0, encode_threads: int = 0, overwrite: bool = False,
            progress: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
  """Tokenizes and packs the documents of ``sources`` into a prepared directory ``output``.

  Documents are read in order (sources in the given order, files sorted), encoded in
  chunks with sentencepiece's threads, routed to ``eval`` when a keyed hash of their text
  falls below ``eval_fraction``, and packed per split into rows of ``seq_len``. The
  directory is written under a temporary name and renamed when complete.
  ``progress(documents, bytes, tokens)`` is called after every chunk. Returns the
  metadata (also written to ``lmjax_data.json``).
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
  if seq_len <= 0:
    raise DataError(f"seq_len must be positive, got {seq_len}.")
  output = os.path.abspath(os.path.expanduser(output))
  if os.path.exists(output):
    if not overwrite:
      raise DataError(f"{output} exists; choose another output or pass --overwrite.")
    if os.listdir(output) and not is_prepared(output):
      raise DataError(f"{output} exists and is not a prepared dataset; not overwriting it.")
  tmp = output + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    meta = _write(sources, tmp, tokenizer, seq_len=seq_len, text_field=text_field,
                  txt_split=txt_split, eval_fraction=eval_fraction, split_seed=split_seed,
                  long_documents=long_documents, bad_records=bad_records, shard_mb=shard_mb,
                  encode_threads=encode_threads, progress=progress)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(output):
    shutil.rmtree(output)
  os.replace(tmp, output)
  return meta


def _write(sources: Sequence[str], directory: str, tokenizer: Tokenizer, *, seq_len: int,
           text_field: str, txt_split: str, eval_fraction: float, split_seed: int,
           long_documents: str, bad_records: str, shard_mb: float, encode_threads: int,
           progress: Callable[[int, int, int], None] | None) -> dict[str, Any]:
  dtypes = _dtypes(tokenizer.vocab_size, seq_len)
  row_bytes = RowDecoder(seq_len, *dtypes).row_bytes
  shard_rows = max(1, int(shard_mb * 2**20) // row_bytes)
  writers = {s: _SplitWriter(directory, s, seq_len, dtypes, shard_rows) for s in SPLITS}
  encode = Encode(tokenizer, seq_len, long_documents)
  skips = SkipLog(bad_records)
  input_bytes = 0

  def documents() -> Iterator[Document]:
    for source in sources:
      yield from iter_documents(source, text_field=text_field, txt_split=txt_split, skips=skips)

  for chunk in _chunks(documents(), 512):
    ids = tokenizer.processor.encode([d.text for d in chunk], num_threads=encode_threads or -1)
    chunk_bytes = chunk_tokens = 0
    for doc, doc_ids in zip(chunk, ids):
      chunk_bytes += len(doc.text.encode("utf-8"))
      sequence = encode.from_ids(doc_ids, doc)
      if isinstance(sequence, Skipped):
        skips.count(sequence.reason, doc.where,
                    f"{len(doc_ids)} tokens, longer than seq_len={seq_len}"
                    if sequence.reason == "long_document" else "no tokens")
        continue
      chunk_tokens += len(sequence["inputs"])
      writers["eval" if _held_out(doc.text, eval_fraction, split_seed) else "train"].add(sequence)
    input_bytes += chunk_bytes
    if progress is not None:
      progress(len(chunk), chunk_bytes, chunk_tokens)
  splits = {s: w.finish() for s, w in writers.items()}
  if splits["train"]["rows"] == 0:
    detail = f"; skipped:\n{skips.summary()}" if skips.total else ""
    raise DataError(f"{', '.join(sources)}: no usable documents for the train split{detail}")
  with open(os.path.join(directory, TOKENIZER_FILE), "wb") as f:
    f.write(tokenizer.processor.serialized_model_proto())
  meta = {
      "format": FORMAT, "version": VERSION, "seq_len": seq_len,
      "token_dtype": dtypes[0], "segment_dtype": dtypes[1],
      "tokenizer": {"file": TOKENIZER_FILE, "sha256": tokenizer.sha256,
                    "vocab_size": tokenizer.vocab_size, "source_path": tokenizer.path},
      "splits": splits,
      "sources": list(sources), "text_field": text_field, "txt_split": txt_split,
      "long_documents": long_documents, "bad_records": bad_records,
      "eval_fraction": eval_fraction, "split_seed": split_seed,
      "input_bytes": input_bytes,
      "skipped": dict(sorted(skips.counts.items())),
      "skipped_examples": {k: v for k, v in sorted(skips.examples.items()) if v},
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  with open(os.path.join(directory, PREPARED_METADATA), "w") as f:
    json.dump(meta, f, indent=2)
  return meta


# --- reading -----------------------------------------------------------------------------


class RowSource:
  """The records of some ArrayRecord shards as one random-access source (Grain's), whose
  read errors name the shard and record instead of only a byte offset."""

  def __init__(self, files: Sequence[str]):
    self._files = list(files)
    try:
      self._source = grain.sources.ArrayRecordDataSource(self._files)
    except Exception as e:  # noqa: BLE001 - name the shard that cannot be opened
      from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=import-outside-toplevel
      bad = next((f for f in self._files if not _opens(ArrayRecordReader, f)), self._files)
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
    for path in self._files:
      n = ArrayRecordReader(path).num_records()
      if index < start + n:
        return DataError(f"{path} record {index - start + 1}: cannot be read ({error}); the prepared "
                         "dataset is damaged: restore the file or prepare the data again.")
      start += n
    return DataError(f"row {index} of {self._files}: cannot be read ({error}).")

  def __repr__(self) -> str:
    return f"RowSource({len(self._files)} files)"


def _opens(reader_cls: Any, path: str) -> bool:
  try:
    return reader_cls(path).ok()
  except Exception:  # noqa: BLE001
    return False


class _Component:
  """One prepared directory as used by a config."""

  def __init__(self, directory: str, weight: float):
    self.directory = os.path.expanduser(directory)
    self.weight = weight
    self.meta = read_metadata(self.directory)
    self.decoder = RowDecoder(self.meta["seq_len"], self.meta["token_dtype"],
                              self.meta["segment_dtype"])

  def files(self, split: str) -> list[str]:
    return [os.path.join(self.directory, name) for name in self.meta["splits"][split]["files"]]

  def rows(self, split: str) -> int:
    return int(self.meta["splits"][split]["rows"])


def _components(cfg: ml_collections.ConfigDict) -> list[_Component]:
  comps = [_Component(source, weight) for source, weight in sources_of(cfg.data)]
  first = comps[0]
  for c in comps:
    if c.meta["seq_len"] != cfg.data.seq_len:
      raise DataError(f"config.data.seq_len={cfg.data.seq_len}, but {c.directory} holds rows of "
                      f"{c.meta['seq_len']}; set data.seq_len to {c.meta['seq_len']} or prepare "
                      "the data again with --seq_len.")
    if c.meta["tokenizer"]["sha256"] != first.meta["tokenizer"]["sha256"]:
      raise DataError(f"data.mixture: {c.directory} and {first.directory} were prepared with "
                      "different tokenizers.")
    if c.rows("train") == 0:
      raise DataError(f"{c.directory}: the train split holds no rows.")
  return comps


def dataset_tokenizer(data_cfg: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer stored with the prepared source(s); checks ``data.tokenizer`` against it."""
  source = sources_of(data_cfg)[0][0]
  meta = read_metadata(source)
  tok = Tokenizer.load(os.path.join(os.path.expanduser(source), meta["tokenizer"]["file"]))
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


def train_rows(cfg: ml_collections.ConfigDict) -> tuple[grain.MapDataset, RowDecoder, str]:
  """The global training stream (row index -> record bytes), its decoder and a fingerprint."""
  d = cfg.data
  comps = _components(cfg)
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
  return rows, comps[0].decoder, hashlib.sha256(ident.encode()).hexdigest()[:16]


class PreparedIterator(DataIterator):
  """This process's slice of each global batch of the prepared stream (module docstring)."""

  topology_independent = True

  def __init__(self, cfg: ml_collections.ConfigDict, process_index: int = 0,
               process_count: int = 1):
    gbs = cfg.data.global_batch_size
    if process_count <= 0 or gbs % process_count:
      raise DataError(f"data.global_batch_size={gbs} must be divisible by the process count "
                      f"({process_count}).")
    self._cfg = cfg
    self._rows, self._decoder, self._fingerprint = train_rows(cfg)
    self._comps = _components(cfg)
    self._global, self._local = gbs, gbs // process_count
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


def make_train_iterator(cfg: ml_collections.ConfigDict, process_index: int = 0,
                        process_count: int = 1) -> PreparedIterator:
  """The elastic training iterator over a prepared ``data.source`` / ``data.mixture``."""
  if cfg.data.num_epochs == 0 or cfg.data.num_epochs < -1:
    raise DataError(f"data.num_epochs must be positive or -1 (forever), got {cfg.data.num_epochs}.")
  return PreparedIterator(cfg, process_index, process_count)


def make_eval_iterator(cfg: ml_collections.ConfigDict, process_index: int = 0,
                       process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """The eval rows of every component, in order, once; the last global batch padded with
  all-zero rows. Process ``i`` reads the same contiguous slice of each global batch."""
  comps = _components(cfg)
  gbs = cfg.data.global_batch_size
  if process_count <= 0 or gbs % process_count:
    raise DataError(f"data.global_batch_size={gbs} must be divisible by the process count "
                    f"({process_count}).")
  local = gbs // process_count
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
