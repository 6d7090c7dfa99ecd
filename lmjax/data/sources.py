"""Reading documents from ``data.source`` and holding some of them out for evaluation.

A source is ``"default"`` (the embedded corpus, see :mod:`lmjax.data.corpus`), a file,
a directory (every ``.txt`` / ``.jsonl`` file directly in it) or a glob. A ``.txt`` file
is one document; a ``.jsonl`` file holds one document per line in the field
``data.text_field``. Anything unreadable raises :class:`DataError` naming the file and,
for JSONL, the line.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence

import numpy as np

EXTENSIONS = (".txt", ".jsonl")
_GLOB_CHARS = frozenset("*?[")


class DataError(ValueError):
  """A data source, tokenizer or pipeline setting is unusable; the message says where."""


def _resolve_paths(source: str) -> list[str]:
  """The files a source names, sorted."""
  path = os.path.expanduser(source)
  if _GLOB_CHARS & set(path):
    matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    if not matches:
      raise DataError(f"data.source={source!r}: the glob matches no files.")
    return matches
  if os.path.isdir(path):
    files = sorted(
        os.path.join(path, name) for name in os.listdir(path)
        if name.endswith(EXTENSIONS) and os.path.isfile(os.path.join(path, name)))
    if not files:
      raise DataError(f"data.source={source!r}: the directory holds no {' or '.join(EXTENSIONS)} files.")
    return files
  if os.path.isfile(path):
    return [path]
  raise DataError(f"data.source={source!r}: no such file or directory; give \"default\", a file, "
                  "a directory or a glob of .txt / .jsonl files.")


def _read_text(path: str) -> str:
  """The file decoded as UTF-8 (a leading BOM dropped); DataError on bad bytes."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise DataError(f"{path}:{line}: invalid UTF-8 at byte offset {e.start} ({e.reason}); "
                    "re-encode the file as UTF-8.") from None
  return text.removeprefix("\ufeff")


def _read_txt(path: str) -> list[str]:
  text = _read_text(path).strip()
  if not text:
    raise DataError(f"{path}: the file is empty; remove it or give it text.")
  return [text]


def _read_jsonl(path: str, text_field: str) -> list[str]:
  docs = []
  for lineno, line in enumerate(_read_text(path).splitlines(), 1):
    if not line.strip():
      continue  # blank lines (e.g. a trailing newline) are not records
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno}).") from None
    if not isinstance(record, dict):
      raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}.")
    if text_field not in record:
      fields = ", ".join(sorted(map(str, record))) or "none"
      raise DataError(f"{path}:{lineno}: no field {text_field!r} (fields: {fields}); "
                      "set data.text_field to the field holding the text.")
    text = record[text_field]
    if not isinstance(text, str):
      raise DataError(f"{path}:{lineno}: field {text_field!r} must be a string, "
                      f"got {type(text).__name__}.")
    docs.append(text)
  if not docs:
    raise DataError(f"{path}: the file is empty (no JSON lines); remove it or give it records.")
  return docs


def load_documents(source: str, text_field: str = "text") -> list[str]:
  """All documents of ``source`` in a deterministic order (files sorted, lines in order).

  Raises:
    DataError: a missing path, a glob matching nothing, an empty file, bytes that are
      not UTF-8, a JSONL line that is not a JSON object with a string ``text_field``,
      or a file that is neither ``.txt`` nor ``.jsonl``.
  """
  if source == "default":
    from lmjax.data.corpus import default_documents  # pylint: disable=import-outside-toplevel
    return default_documents()
  docs = []
  for path in _resolve_paths(source):
    if path.endswith(".txt"):
      docs.extend(_read_txt(path))
    elif path.endswith(".jsonl"):
      docs.extend(_read_jsonl(path, text_field))
    else:
      raise DataError(f"{path}: unknown extension; data sources are {' or '.join(EXTENSIONS)} files.")
  return docs


def split_documents(docs: Sequence[str], eval_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
  """Splits ``docs`` into (train, eval) by document; both keep the input order.

  ``round(len(docs) * eval_fraction)`` documents are held out, at least one when
  ``eval_fraction > 0`` and there are two or more documents, and never all of them.
  Which ones is a function of ``seed`` alone.
  """
  if not 0.0 <= eval_fraction < 1.0:
    raise DataError(f"data.eval_fraction must be in [0, 1), got {eval_fraction}.")
  n = len(docs)
  n_eval = 0
  if eval_fraction > 0 and n >= 2:
    n_eval = min(max(1, round(n * eval_fraction)), n - 1)
  held_out = set(np.random.default_rng(seed).permutation(n)[:n_eval].tolist())
  train = [doc for i, doc in enumerate(docs) if i not in held_out]
  evals = [doc for i, doc in enumerate(docs) if i in held_out]
  return train, evals
