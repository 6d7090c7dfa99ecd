"""Readers for each file format: they yield :class:`Document` records and report bad ones.

One reader per format, each a generator over one file:

* ``.txt`` (``.txt.gz``): the whole file is one document, or (``txt_split="blank_line"``)
  each block of lines between blank lines is one;
* ``.jsonl`` / ``.json`` (and ``.gz``): one JSON object per line, the text in ``text_field``;
* ``.parquet``: the string column ``text_field``, one document per row (read with pyarrow,
  one record batch at a time);
* ``.arrayrecord`` / ``.array_record``: one document per record, either UTF-8 text, a JSON
  object with ``text_field``, or a serialised ``tf.train.Example`` with a bytes feature
  ``text_field`` (what TFDS and MaxText write). The first record decides for the file.

A record that cannot be used is passed to ``skips.bad(reason, where, message)``, which
either counts it or raises :class:`DataError` (``data.bad_records``). Nothing else is
raised for bad content; the message always names the file and the line, row or record.
:class:`DataError` is defined here, at the bottom of the data package, so that every data
module raises the same error without importing a module above it.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import re
from collections.abc import Iterator
from typing import IO, NamedTuple, Protocol

from lmjax import storage
from lmjax.config import TXT_SPLITS  # noqa: F401 - a config choice, defined once

TEXT_EXTENSIONS = (".txt", ".txt.gz")
JSON_EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
PARQUET_EXTENSIONS = (".parquet",)
ARRAY_RECORD_EXTENSIONS = (".arrayrecord", ".array_record")
EXTENSIONS = TEXT_EXTENSIONS + JSON_EXTENSIONS + PARQUET_EXTENSIONS + ARRAY_RECORD_EXTENSIONS

_BLANK_LINES = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")  # one or more blank lines
_READ_CHUNK = 1024  # ArrayRecord records / Parquet rows read at a time


class DataError(ValueError):
  """A data source, tokenizer or pipeline setting is unusable; the message says where."""


class Document(NamedTuple):
  """One document and where it came from (``index`` counts ``unit``s from 1)."""
  text: str
  path: str
  index: int = 0
  unit: str = "file"  # "file" | "line" | "row" | "record"

  @property
  def where(self) -> str:
    return where(self.path, self.index, self.unit)


def where(path: str, index: int = 0, unit: str = "file") -> str:
  """``path``, ``path:12`` (line), ``path row 12`` or ``path record 12``."""
  if unit == "file":
    return path
  if unit == "line":
    return f"{path}:{index}"
  return f"{path} {unit} {index}"


class Skips(Protocol):
  def bad(self, reason: str, where: str, message: str) -> None: ...


def _usable(text: str, path: str, index: int, unit: str, skips: Skips) -> Document | None:
  """A Document, or None after reporting an empty text or one with lone surrogates."""
  if not text.strip():
    skips.bad("empty_document", where(path, index, unit), "the document is empty")
    return None
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:  # e.g. a JSON "\ud800" escape: not encodable text
    skips.bad("invalid_utf8", where(path, index, unit),
              f"the text holds an unpaired surrogate at character {e.start}")
    return None
  return Document(text, path, index, unit)


def _decode(data: bytes, path: str, first_line: int, unit: str, skips: Skips,
            index: int | None = None) -> str | None:
  """``data`` as UTF-8 (a BOM dropped), or None after reporting where the bad byte is."""
  try:
    return data.decode("utf-8").removeprefix("\ufeff")
  except UnicodeDecodeError as e:
    if unit in ("line", "file"):
      line = first_line + data.count(b"\n", 0, e.start)
      skips.bad("invalid_utf8", f"{path}:{line}",
                f"invalid UTF-8 at byte {e.start} of the {'file' if unit == 'file' else 'record'} "
                f"({e.reason}); re-encode it as UTF-8")
    else:
      skips.bad("invalid_utf8", where(path, index or 0, unit),
                f"invalid UTF-8 at byte {e.start} ({e.reason})")
    return None


@contextlib.contextmanager
def open_file(path: str) -> Iterator[IO[bytes]]:
  """``path`` (a local path or a URL) opened for reading bytes; gunzipped if it ends in .gz."""
  with storage.path(path).open("rb") as raw:
    if not path.endswith(".gz"):
      yield raw
      return
    with gzip.GzipFile(fileobj=raw, mode="rb") as f:
      yield f


def read_txt(path: str, txt_split: str, skips: Skips) -> Iterator[Document]:
  """A ``.txt`` file as one document, or one per blank-line-separated block."""
  with open_file(path) as f:
    data = f.read()
  if not data.strip():
    skips.bad("empty_file", path, "the file is empty")
    return
  if txt_split == "file":
    text = _decode(data, path, 1, "file", skips)
    if text is not None:
      doc = _usable(text.strip(), path, 0, "file", skips)
      if doc is not None:
        yield doc
    return
  start, line = 0, 1
  for match in [*_BLANK_LINES.finditer(data), None]:
    end = len(data) if match is None else match.start()
    block = data[start:end]
    if block.strip():
      first = line + block[:len(block) - len(block.lstrip())].count(b"\n")  # leading newlines
      text = _decode(block, path, first, "line", skips)
      if text is not None:
        doc = _usable(text.strip(), path, first, "line", skips)
        if doc is not None:
          yield doc
    if match is not None:
      line += data.count(b"\n", start, match.end())
      start = match.end()


def read_jsonl(path: str, text_field: str, skips: Skips) -> Iterator[Document]:
  """One document per JSON line, read line by line (the file is never held whole)."""
  records = 0
  with open_file(path) as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue  # blank lines (e.g. a trailing newline) are not records
      records += 1
      line = _decode(raw, path, lineno, "line", skips)
      if line is None:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        skips.bad("invalid_json", f"{path}:{lineno}", f"not valid JSON ({e.msg} at column {e.colno})")
        continue
      text = _field(record, text_field, path, lineno, "line", skips)
      if text is not None:
        doc = _usable(text, path, lineno, "line", skips)
        if doc is not None:
          yield doc
  if not records:
    skips.bad("empty_file", path, "the file is empty (no JSON lines)")


def _field(record: object, text_field: str, path: str, index: int, unit: str,
           skips: Skips) -> str | None:
  """``record[text_field]`` if record is a JSON object holding a string there."""
  if not isinstance(record, dict):
    skips.bad("invalid_json", where(path, index, unit),
              f"expected a JSON object, got {type(record).__name__}")
    return None
  if text_field not in record:
    fields = ", ".join(sorted(map(str, record))) or "none"
    skips.bad("missing_field", where(path, index, unit),
              f"no field {text_field!r} (fields: {fields}); set data.text_field to the field "
              "holding the text")
    return None
  text = record[text_field]
  if not isinstance(text, str):
    skips.bad("invalid_field", where(path, index, unit),
              f"field {text_field!r} must be a string, got {type(text).__name__}")
    return None
  return text


def read_parquet(path: str, text_field: str, skips: Skips) -> Iterator[Document]:
  """One document per row of the string column ``text_field``; needs the ``parquet`` extra.
  A URL is read through a file object of :mod:`lmjax.storage` (ranged reads, no copy)."""
  try:
    import pyarrow as pa  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise DataError(f"{path}: reading Parquet files needs pyarrow, which is not installed: "
                    'pip install "lmjax[parquet]" (or pip install -e ".[parquet]" in a '
                    "checkout).") from None

  with contextlib.ExitStack() as stack:
    try:
      source = stack.enter_context(storage.path(path).open("rb")) if storage.is_url(path) else path
      pf = pq.ParquetFile(source)
    except (pa.ArrowException, OSError) as e:
      skips.bad("unreadable", path, f"not a readable Parquet file ({e})")
      return
    names = pf.schema_arrow.names
    if text_field not in names:
      skips.bad("missing_field", path, f"no column {text_field!r} (columns: {', '.join(names)}); "
                                       "set data.text_field to the column holding the text")
      return
    kind = pf.schema_arrow.field(text_field).type
    is_bytes = pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or is_bytes):
      skips.bad("invalid_field", path, f"column {text_field!r} must hold strings, it holds {kind}")
      return
    if pf.metadata.num_rows == 0:
      skips.bad("empty_file", path, "the file has no rows")
      return
    row = 0
    try:
      for batch in pf.iter_batches(batch_size=_READ_CHUNK, columns=[text_field]):
        for value in batch.column(0).to_pylist():
          row += 1
          if value is None:
            skips.bad("invalid_field", where(path, row, "row"), f"column {text_field!r} is null")
            continue
          if is_bytes:
            value = _decode(value, path, 0, "row", skips, index=row)
            if value is None:
              continue
          doc = _usable(value, path, row, "row", skips)
          if doc is not None:
            yield doc
    except (pa.ArrowException, OSError) as e:
      skips.bad("unreadable", where(path, row + 1, "row"), f"the file is damaged ({e})")


def read_array_record(path: str, text_field: str, skips: Skips) -> Iterator[Document]:
  """One document per record: UTF-8 text, a JSON object or a ``tf.train.Example``. A URL
  is read from a local copy in the cache (:func:`lmjax.storage.local_file`): ArrayRecord
  reads only local files."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=import-outside-toplevel

  try:
    reader = ArrayRecordReader(storage.local_file(path))
    problem = "" if reader.ok() else "its index cannot be read"
  except (RuntimeError, OSError, ValueError) as e:
    problem = str(e)
  if problem:
    skips.bad("unreadable", path, f"not a readable ArrayRecord file ({problem})")
    return
  n = reader.num_records()
  if n == 0:
    skips.bad("empty_file", path, "the file has no records")
    return
  kind = None
  try:
    for start in range(0, n, _READ_CHUNK):
      try:
        chunk = reader.read(list(range(start, min(n, start + _READ_CHUNK))))
      except (RuntimeError, OSError, ValueError) as e:
        skips.bad("unreadable", where(path, start + 1, "record"), f"the file is damaged ({e})")
        return
      for i, data in enumerate(chunk, start + 1):
        if kind is None:
          kind = _record_kind(data, text_field)
        text = _record_text(data, kind, text_field, path, i, skips)
        if text is not None:
          doc = _usable(text, path, i, "record", skips)
          if doc is not None:
            yield doc
  finally:
    reader.close()


def _record_kind(data: bytes, text_field: str) -> str:
  """"example", "json" or "text", judged from a file's first record."""
  try:
    _example_feature(data, text_field)
    return "example"
  except ValueError:
    pass
  if data[:1] == b"{":
    try:
      if isinstance(json.loads(data), dict):
        return "json"
    except (json.JSONDecodeError, UnicodeDecodeError):
      pass
  return "text"


def _record_text(data: bytes, kind: str, text_field: str, path: str, index: int,
                 skips: Skips) -> str | None:
  if kind == "example":
    try:
      value = _example_feature(data, text_field)
    except ValueError as e:
      skips.bad("invalid_record", where(path, index, "record"), f"not a tf.train.Example ({e})")
      return None
    if value is None:
      skips.bad("missing_field", where(path, index, "record"),
                f"the tf.train.Example has no bytes feature {text_field!r}")
      return None
    return _decode(value, path, 0, "record", skips, index=index)
  text = _decode(data, path, 0, "record", skips, index=index)
  if text is None or kind == "text":
    return text
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    skips.bad("invalid_json", where(path, index, "record"), f"not valid JSON ({e.msg})")
    return None
  return _field(record, text_field, path, index, "record", skips)


# --- tf.train.Example without TensorFlow: just enough protobuf wire format -----------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    if pos >= len(buf) or shift > 63:
      raise ValueError("truncated varint")
    b = buf[pos]
    pos += 1
    value |= (b & 0x7F) << shift
    if b < 0x80:
      return value, pos
    shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
  """(field number, wire type, value) of a protobuf message; LEN values as bytes."""
  pos = 0
  while pos < len(buf):
    key, pos = _varint(buf, pos)
    number, wire = key >> 3, key & 7
    if number == 0:
      raise ValueError("field number 0")
    if wire == 0:
      value, pos = _varint(buf, pos)
    elif wire == 1:
      value, pos = 0, pos + 8
    elif wire == 2:
      size, pos = _varint(buf, pos)
      value, pos = buf[pos:pos + size], pos + size
    elif wire == 5:
      value, pos = 0, pos + 4
    else:
      raise ValueError(f"unsupported wire type {wire}")
    if pos > len(buf):
      raise ValueError("truncated message")
    yield number, wire, value


def _example_feature(data: bytes, name: str) -> bytes | None:
  """The first bytes value of feature ``name`` of a serialised Example, None if absent.

  Example{1: Features{1: map<string, Feature>}}; Feature{1: BytesList{1: repeated bytes}}.
  Raises ValueError if ``data`` is not an Example.
  """
  fields = list(_fields(data))
  if not fields or any(n != 1 or w != 2 for n, w, _ in fields):
    raise ValueError("no features")
  for _, _, features in fields:
    for n, w, entry in _fields(features):
      if n != 1 or w != 2:
        raise ValueError("malformed features")
      key = value = None
      for en, ew, ev in _fields(entry):
        if en == 1 and ew == 2:
          key = ev
        elif en == 2 and ew == 2:
          value = ev
      if key == name.encode() and value is not None:
        for fn, fw, flist in _fields(value):
          if fn == 1 and fw == 2:  # bytes_list
            for vn, vw, v in _fields(flist):
              if vn == 1 and vw == 2:
                return v
            return b""
        return None
  return None
