"""The on-disk format of a prepared dataset, shared by its writer and its reader.

``tools/prepare_data.py`` (:func:`lmjax.data.prepare`, in :mod:`lmjax.data.prepared_writer`)
writes a directory that :mod:`lmjax.data.prepared_reader` reads back::

  lmjax_data.json           metadata: format, seq_len, dtypes, tokenizer hash, splits, counts
  tokenizer.model           the tokenizer the rows were encoded with: a sentencepiece model,
                            or tokenizer.json (+ tokenizer_config.json), or tokenizer.tiktoken
                            (+ tokenizer.tiktoken.json); lmjax_data.json names it
  train-00000.arrayrecord   one record per packed row of seq_len positions, ...
  eval-00000.arrayrecord    the held-out documents, packed the same way

A record holds ``inputs`` and ``targets`` (uint16, or uint32 for vocabularies over 65536)
and ``segment_ids`` (uint16, or uint32 for rows over 65535 positions) back to back;
``positions`` are recomputed from the segment ids (:class:`RowDecoder`).

Example::

  dtypes = row_dtypes(tok.vocab_size, 128)         # ("uint16", "uint16")
  decode = RowDecoder(128, *dtypes)
  batch = decode([encode_row(row, *dtypes) for row in rows])  # (n, 128) int32 arrays
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from lmjax import storage
from lmjax.data.packing import positions_from_segments
from lmjax.data.readers import DataError
from lmjax.data.sources import PREPARED_METADATA
from lmjax.data.tokenizer_base import TOKENIZER_FILES

FORMAT = "lmjax-packed-rows"
VERSION = 1
TOKENIZER_FILE = "tokenizer.model"  # a sentencepiece tokenizer's; others: TOKENIZER_FILES
__all__ = ["FORMAT", "TOKENIZER_FILE", "TOKENIZER_FILES", "VERSION", "RowDecoder", "encode_row",
           "read_metadata", "row_dtypes", "shard_name", "write_metadata"]


def shard_name(split: str, index: int) -> str:
  """File name of shard ``index`` of ``split`` (listed in the metadata's ``files``)."""
  return f"{split}-{index:05d}.arrayrecord"


def read_metadata(directory: str) -> dict[str, Any]:
  """The metadata of a prepared directory (a local path or a URL); DataError if it is not
  one lmjax can read."""
  path = storage.join(directory, PREPARED_METADATA)
  try:
    meta = json.loads(storage.path(path).read_bytes())
  except (OSError, ValueError) as e:  # missing, unreadable, not JSON or not UTF-8
    storage.check(path)  # a URL's bucket that is missing or refused, named as such
    raise DataError(f"{path}: not a readable prepared-dataset description ({e}).") from None
  if meta.get("format") != FORMAT or meta.get("version") != VERSION:
    raise DataError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this "
                    f"lmjax reads {FORMAT!r} version {VERSION}. Prepare the data again.")
  return meta


def write_metadata(directory: str, meta: dict[str, Any]) -> None:
  """Writes ``meta`` (which :func:`read_metadata` checks for ``format`` and ``version``)."""
  storage.write_text(storage.join(directory, PREPARED_METADATA), json.dumps(meta, indent=2))


def row_dtypes(vocab_size: int, seq_len: int) -> tuple[str, str]:
  """(token dtype, segment dtype): the smallest unsigned ints that hold the ids."""
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
                      f"the files do not match {PREPARED_METADATA}.")
    raw = raw.reshape(n, self.row_bytes)
    a, b = t * self._tok.itemsize, 2 * t * self._tok.itemsize
    seg = np.ascontiguousarray(raw[:, b:]).view(self._seg).astype(np.int32)
    return {
        "inputs": np.ascontiguousarray(raw[:, :a]).view(self._tok).astype(np.int32),
        "targets": np.ascontiguousarray(raw[:, a:b]).view(self._tok).astype(np.int32),
        "segment_ids": seg,
        "positions": positions_from_segments(seg),
    }
