"""Documents from ``data.source``, the bad-record policy, and the held-out split.

A source is ``"default"`` (the embedded corpus, see :mod:`lmjax.data.corpus`), a file, a
directory (every supported file directly in it) or a glob (``**`` recurses), each a local
path or a ``gs://`` / ``s3://`` URL (read through :mod:`lmjax.storage`). Supported
files are ``.txt``, ``.jsonl`` / ``.json`` (JSON lines; all three also gzipped),
``.parquet`` and ``.arrayrecord`` (see :mod:`lmjax.data.readers`). A directory written by
``tools/prepare_data.py`` is a *prepared* source (:func:`is_prepared`), read by
:mod:`lmjax.data.prepared_reader`.

Bad input — a missing path, an empty file or document, invalid UTF-8, a line that is not
JSON or lacks the text field — goes to a :class:`SkipLog`. With ``data.bad_records="skip"``
(the default) it is counted by reason, the first few of each reason are logged as
warnings naming the file and line/row/record, and the counts reach the training metrics;
with ``"fail"`` the first one raises :class:`DataError` with the same message. A source
with no usable document at all is always an error.

Example::

  skips = SkipLog("skip")
  docs = load_records("data/*.jsonl", text_field="body", skips=skips)
  skips.counts  # {"invalid_json": 2, "empty_document": 1}
"""

from __future__ import annotations

import collections
import functools
import glob
import logging
import os
import zlib
from collections.abc import Iterator, Sequence

import ml_collections
import numpy as np

from lmjax import storage
from lmjax.config import BAD_RECORD_POLICIES, TXT_SPLITS
from lmjax.data import readers
from lmjax.data.corpus import default_documents
from lmjax.data.readers import EXTENSIONS, DataError, Document

log = logging.getLogger("lmjax.data")

SPLITS = ("train", "eval")  # the training documents and the held-out ones
# The held-out documents depend on the data alone, not on cfg.seed, so that runs with
# different seeds are evaluated on the same documents.
SPLIT_SEED = 0
PREPARED_METADATA = "lmjax_data.json"  # marks a directory written by tools/prepare_data.py
# Why a record was skipped; keys of SkipLog.counts and of the data_skipped/* metrics.
REASONS = {
    "missing_path": "path or glob matches no file",
    "unreadable": "file could not be opened or is damaged",
    "unsupported_file": "file extension not supported",
    "empty_file": "file holds no records",
    "empty_document": "document text is empty or blank",
    "invalid_utf8": "bytes are not UTF-8",
    "invalid_json": "line is not a JSON object",
    "invalid_record": "record is not in the file's format",
    "missing_field": "record lacks data.text_field",
    "invalid_field": "data.text_field is not a string",
    "long_document": "document longer than data.seq_len (data.long_documents='skip')",
}
_EXAMPLES_PER_REASON = 3  # messages kept (and logged) per reason; the rest are only counted


class SkipLog:
  """Counts bad records by reason under a policy: ``"skip"`` counts, ``"fail"`` raises."""

  def __init__(self, policy: str = "skip", *, quiet: bool = False):
    if policy not in BAD_RECORD_POLICIES:
      raise DataError(f"data.bad_records must be one of {BAD_RECORD_POLICIES}, got {policy!r}.")
    self.policy = policy
    self.quiet = quiet  # count without logging
    self.counts: collections.Counter[str] = collections.Counter()
    self.examples: dict[str, list[str]] = collections.defaultdict(list)

  def bad(self, reason: str, where: str, message: str) -> None:
    """Records (or, under "fail", raises) one bad record at ``where``."""
    if self.policy == "fail":
      raise DataError(f"{where}: {message}. (data.bad_records='fail'; set it to 'skip' to skip "
                      "and count such records)")
    self.count(reason, where, message)

  def count(self, reason: str, where: str, message: str) -> None:
    """Counts one skipped record whatever the policy; logs the first few of each reason."""
    text = f"{where}: {message}."
    self.counts[reason] += 1
    if len(self.examples[reason]) < _EXAMPLES_PER_REASON:
      self.examples[reason].append(text)
      if not self.quiet:
        more = " (further ones are counted, not logged)" if len(self.examples[reason]) == _EXAMPLES_PER_REASON else ""
        log.warning("skipped %s: %s%s", reason, text, more)

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def merge(self, other: SkipLog) -> None:
    self.counts.update(other.counts)
    for reason, texts in other.examples.items():
      room = _EXAMPLES_PER_REASON - len(self.examples[reason])
      self.examples[reason].extend(texts[:max(0, room)])

  def summary(self) -> str:
    """Multi-line: one line per reason with its count and first example."""
    lines = []
    for reason, n in sorted(self.counts.items()):
      example = self.examples[reason][0] if self.examples.get(reason) else ""
      lines.append(f"  {reason}: {n}  (e.g. {example})")
    return "\n".join(lines)


def is_prepared(source: str) -> bool:
  """Whether ``source`` is a directory written by ``tools/prepare_data.py``."""
  if source == "default" or storage.has_glob(source):
    return False
  return storage.path(source).joinpath(PREPARED_METADATA).is_file()


def resolve_paths(source: str, skips: SkipLog) -> list[str]:
  """The files a source names, sorted; a path or glob naming nothing goes to ``skips``
  (a URL's bucket that is missing or refused raises StorageError instead)."""
  url = storage.is_url(source)
  path = source if url else os.path.expanduser(source)
  if storage.has_glob(path):
    try:
      matches = storage.glob(path)
    except FileNotFoundError:  # gcsfs: the bucket is missing (named by the check below)
      matches = []
    except Exception as e:  # noqa: BLE001 - a store refusing the listing: one line
      if not url:
        raise
      raise storage.explain(source, e) from None
    if not matches:
      storage.check(source)  # a missing or refused bucket: StorageError naming it
      skips.bad("missing_path", source, "the glob matches no files")
    return matches
  where = storage.path(path)
  if where.is_dir():
    if is_prepared(path):
      raise DataError(f"{source}: a prepared dataset (tools/prepare_data.py) is not a source of "
                      "raw documents; use it as data.source for training.")
    files = [p for p in _files_in(path) if p.endswith(EXTENSIONS)]
    if not files:
      skips.bad("missing_path", source, f"the directory holds no {', '.join(EXTENSIONS)} files")
    return files
  if where.is_file():
    return [path]
  storage.check(source)  # a missing or refused bucket: StorageError naming it
  skips.bad("missing_path", source, "no such file or directory; give \"default\", a file, a "
                                    "directory or a glob")
  return []


def _files_in(directory: str) -> list[str]:
  """The files directly in ``directory``, sorted."""
  if storage.is_url(directory):
    return storage.glob(storage.join(glob.escape(directory), "*"))
  return sorted(os.path.join(directory, name) for name in os.listdir(directory)
                if os.path.isfile(os.path.join(directory, name)))


def iter_documents(source: str, *, text_field: str = "text", txt_split: str = "file",
                   skips: SkipLog | None = None) -> Iterator[Document]:
  """The documents of ``source`` one at a time, files in sorted order."""
  if txt_split not in TXT_SPLITS:
    raise DataError(f"data.txt_split must be one of {TXT_SPLITS}, got {txt_split!r}.")
  skips = SkipLog() if skips is None else skips
  if source == "default":
    for i, text in enumerate(default_documents(), 1):
      yield Document(text, "<default corpus>", i, "record")
    return
  for path in resolve_paths(source, skips):
    try:
      if path.endswith(readers.TEXT_EXTENSIONS):
        yield from readers.read_txt(path, txt_split, skips)
      elif path.endswith(readers.JSON_EXTENSIONS):
        yield from readers.read_jsonl(path, text_field, skips)
      elif path.endswith(readers.PARQUET_EXTENSIONS):
        yield from readers.read_parquet(path, text_field, skips)
      elif path.endswith(readers.ARRAY_RECORD_EXTENSIONS):
        yield from readers.read_array_record(path, text_field, skips)
      else:
        skips.bad("unsupported_file", path, f"unknown extension; data sources are "
                                            f"{', '.join(EXTENSIONS)} files")
    except (OSError, EOFError, zlib.error) as e:  # permissions, a file vanishing, a damaged .gz
      skips.bad("unreadable", path, f"could not be read ({e})")
    except Exception as e:  # noqa: BLE001 - an object store's own error: one line naming the URL
      if isinstance(e, ValueError) or not storage.is_url(path):
        raise
      raise storage.explain(path, e) from None


def load_records(source: str, *, text_field: str = "text", txt_split: str = "file",
                 skips: SkipLog | None = None) -> list[Document]:
  """All documents of ``source`` with their origin; DataError if none is usable."""
  skips = SkipLog() if skips is None else skips
  docs = list(iter_documents(source, text_field=text_field, txt_split=txt_split, skips=skips))
  if not docs:
    detail = f"; skipped:\n{skips.summary()}" if skips.total else ""
    raise DataError(f"data.source={source!r}: no usable documents{detail}")
  return docs


def load_documents(source: str, text_field: str = "text", *, txt_split: str = "file",
                   bad_records: str = "skip", skips: SkipLog | None = None) -> list[str]:
  """The texts of all documents of ``source`` in a deterministic order.

  Raises:
    DataError: no usable document, or (``bad_records="fail"``) the first bad record.
  """
  skips = SkipLog(bad_records) if skips is None else skips
  return [d.text for d in load_records(source, text_field=text_field, txt_split=txt_split,
                                       skips=skips)]


def sources_of(data_cfg: ml_collections.ConfigDict) -> list[tuple[str, float]]:
  """``[(source, weight), ...]``: ``data.mixture`` if set, else ``[(data.source, 1.0)]``."""
  if len(data_cfg.mixture) == 0:
    return [(data_cfg.source, 1.0)]
  out = []
  for i, entry in enumerate(data_cfg.mixture):
    if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
            and isinstance(entry[1], (int, float)) and entry[1] > 0):
      raise DataError(f"data.mixture[{i}] must be (source, weight > 0), got {entry!r}.")
    out.append((entry[0], float(entry[1])))
  return out


def uses_prepared(data_cfg: ml_collections.ConfigDict) -> bool:
  """Whether ``data.source`` (or every ``data.mixture`` component) is prepared."""
  flags = [is_prepared(source) for source, _ in sources_of(data_cfg)]
  if any(flags) and not all(flags):
    raise DataError("data.mixture mixes prepared datasets with raw sources; prepare every "
                    "component with tools/prepare_data.py, or none.")
  return all(flags)


def cached_records(source: str, *, text_field: str = "text", txt_split: str = "file",
                   bad_records: str = "skip") -> tuple[list[Document], SkipLog]:
  """:func:`load_records` and its SkipLog, reused while the files are unchanged.

  Training loads a source for the tokenizer, the training split and every evaluation;
  the files are read (and their bad records logged) once. The key holds each file's
  path, size and version (modification time, or an object's generation or ETag).
  """
  probe = SkipLog(quiet=True)
  files = resolve_paths(source, probe) if source != "default" else []
  stats = tuple((p, *sv) for p, sv in zip(files, storage.sizes_and_versions(files)))
  return _records(source, text_field, txt_split, bad_records, stats)


@functools.lru_cache(maxsize=8)  # sources kept loaded (a mixture's components, the tokenizer's corpus)
def _records(source: str, text_field: str, txt_split: str, bad_records: str,
             stats: tuple[tuple[str, int, str], ...]) -> tuple[list[Document], SkipLog]:
  """The documents of ``source``; ``stats`` (the files' sizes and times) is only a key."""
  del stats
  skips = SkipLog(bad_records)
  docs = load_records(source, text_field=text_field, txt_split=txt_split, skips=skips)
  return docs, skips


def split_documents(docs: Sequence, eval_fraction: float, seed: int) -> tuple[list, list]:
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
  held_out = np.zeros(n, bool)
  held_out[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
  train = [doc for doc, h in zip(docs, held_out) if not h]
  evals = [doc for doc, h in zip(docs, held_out) if h]
  return train, evals
