"""Writing a prepared dataset: documents tokenized and packed once into ArrayRecord rows.

:func:`prepare` (what ``tools/prepare_data.py`` runs) streams the documents of its
sources, encodes them in chunks (on the tokenizer's threads), routes each to ``train`` or
``eval`` by a keyed hash of its text, packs each split into rows of ``seq_len`` exactly as
the raw-text pipeline does (same concat-then-split, same ``data.long_documents`` policy)
and writes the directory described in :mod:`lmjax.data.prepared_format`. A ``gs://`` or
``s3://`` output is built in the local cache, then uploaded with its metadata file last, so
that a half-uploaded directory is never taken for a prepared one.

Example::

  meta = prepare(["data/*.jsonl"], "data/owt-1024", tok, seq_len=1024, eval_fraction=0.005)
  meta["splits"]["train"]["rows"]
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from lmjax import storage
from lmjax.data.packing import Encode, RowPacker, Skipped
from lmjax.data.prepared_format import (
    FORMAT,
    TOKENIZER_FILES,
    VERSION,
    RowDecoder,
    encode_row,
    row_dtypes,
    shard_name,
    write_metadata,
)
from lmjax.data.readers import DataError, Document
from lmjax.data.sources import PREPARED_METADATA, SPLITS, SkipLog, is_prepared, iter_documents
from lmjax.data.tokenizer import Tokenizer

_CHUNK_DOCUMENTS = 512  # documents encoded together by the tokenizer's threads
# What an upload cut short leaves (everything but the metadata): replaced like a prepared one.
_UPLOADED_FIRST = re.compile(
    rf"^((train|eval)-\d{{5}}\.arrayrecord|{'|'.join(map(re.escape, TOKENIZER_FILES))})$")


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
    if self._writer is None or self._in_shard == self._shard_rows:
      self._open_shard()
    data = encode_row(row, *self._dtypes)
    self._writer.write(data)
    self._hash.update(data)
    self._in_shard += 1
    real = int((row["segment_ids"] > 0).sum())
    self.stats["rows"] += 1
    self.stats["tokens"] += real
    self.stats["padding"] += len(row["segment_ids"]) - real

  def _open_shard(self) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
    self._close_shard()
    name = shard_name(self._split, len(self.stats["files"]))
    self.stats["files"].append(name)
    # group_size:1 makes every row one chunk: random access reads one row, not a group.
    self._writer = ArrayRecordWriter(os.path.join(self._dir, name), "group_size:1")

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
  chunks on the tokenizer's threads (any kind: sentencepiece, tokenizer.json, tiktoken),
  routed to ``eval`` when a keyed hash of their text falls below ``eval_fraction``, and
  packed per split into rows of ``seq_len``; the tokenizer's files go beside them. A local
  directory is written under a temporary name and renamed when complete; a URL's is built
  in the cache and uploaded, the metadata last.
  ``progress(documents, bytes, tokens)`` is called after every chunk. Returns the
  metadata (also written to ``lmjax_data.json``).
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}.")
  if seq_len <= 0:
    raise DataError(f"seq_len must be positive, got {seq_len}.")
  output = os.fspath(storage.absolute(output))
  _check_output(output, overwrite)
  if storage.is_url(output):
    staging = os.path.join(storage.cache_root(), "staging")
    os.makedirs(staging, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="prepare-", dir=staging)
  else:
    tmp = output + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  try:
    meta = _write(sources, tmp, tokenizer, seq_len=seq_len, text_field=text_field,
                  txt_split=txt_split, eval_fraction=eval_fraction, split_seed=split_seed,
                  long_documents=long_documents, bad_records=bad_records, shard_mb=shard_mb,
                  encode_threads=encode_threads, progress=progress)
    if storage.is_url(output):
      _upload(tmp, output)
    else:
      if os.path.exists(output):
        shutil.rmtree(output)
      os.replace(tmp, output)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return meta


def _check_output(output: str, overwrite: bool) -> None:
  """DataError unless ``output`` is new, or (``overwrite``) a prepared dataset, an empty
  directory or what an interrupted upload left; a URL must be writable."""
  storage.check(output, write=True)
  target = storage.path(output)
  if not target.exists():
    return
  if not overwrite:
    raise DataError(f"{output} exists; choose another output or pass --overwrite.")
  names = [p.name for p in target.iterdir()] if target.is_dir() else [""]
  if names and not is_prepared(output) and not all(_UPLOADED_FIRST.match(n) for n in names):
    raise DataError(f"{output} exists and is not a prepared dataset; not overwriting it.")


def _upload(staging: str, output: str) -> None:
  """Replaces the files under URL ``output`` with those of local directory ``staging``:
  the old metadata is deleted first and the new one uploaded last."""
  old = storage.glob(storage.join(glob.escape(output), "**"))
  for path in sorted(old, key=lambda p: not p.endswith("/" + PREPARED_METADATA)):
    storage.path(path).unlink()
  names = sorted(os.listdir(staging), key=lambda name: name == PREPARED_METADATA)
  for name in names:
    storage.copy_file(os.path.join(staging, name), storage.join(output, name))


def _write(sources: Sequence[str], directory: str, tokenizer: Tokenizer, *, seq_len: int,
           text_field: str, txt_split: str, eval_fraction: float, split_seed: int,
           long_documents: str, bad_records: str, shard_mb: float, encode_threads: int,
           progress: Callable[[int, int, int], None] | None) -> dict[str, Any]:
  dtypes = row_dtypes(tokenizer.vocab_size, seq_len)
  row_bytes = RowDecoder(seq_len, *dtypes).row_bytes
  shard_rows = max(1, int(shard_mb * 2**20) // row_bytes)
  writers = {s: _SplitWriter(directory, s, seq_len, dtypes, shard_rows) for s in SPLITS}
  encode = Encode(tokenizer, seq_len, long_documents)
  skips = SkipLog(bad_records)
  input_bytes = 0

  def documents() -> Iterator[Document]:
    for source in sources:
      yield from iter_documents(source, text_field=text_field, txt_split=txt_split, skips=skips)

  for chunk in _chunks(documents(), _CHUNK_DOCUMENTS):
    ids = tokenizer.encode_batch([d.text for d in chunk], num_threads=encode_threads)
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
  tokenizer.save(directory)  # its file(s): tokenizer.model, tokenizer.json (+ config), ...
  meta = {
      "format": FORMAT, "version": VERSION, "seq_len": seq_len,
      "token_dtype": dtypes[0], "segment_dtype": dtypes[1],
      "tokenizer": {"file": tokenizer.file_name, "kind": tokenizer.kind,
                    "sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                    "source_path": tokenizer.path},
      "splits": splits,
      "sources": list(sources), "text_field": text_field, "txt_split": txt_split,
      "long_documents": long_documents, "bad_records": bad_records,
      "eval_fraction": eval_fraction, "split_seed": split_seed,
      "input_bytes": input_bytes,
      "skipped": dict(sorted(skips.counts.items())),
      "skipped_examples": {k: v for k, v in sorted(skips.examples.items()) if v},
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  write_metadata(directory, meta)
  return meta
