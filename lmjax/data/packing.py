"""Pieces shared by the raw-text pipeline and ``tools/prepare_data.py``.

* :class:`Encode`: a document -> ``{"inputs": [bos] + ids, "targets": ids + [eos]}``, with
  the ``data.long_documents`` policy for documents that do not fit one row;
* :func:`pack`: Grain's concat-then-split packing into rows of ``seq_len`` with
  ``segment_ids`` (1, 2, ... per document piece, 0 on padding) and ``positions``
  (restarting at 0 per piece); a document that does not fit the rest of a row continues
  in the next row as a new piece;
* :class:`ExactMix` / :func:`mix_iter`: interleaving components in exact integer
  proportions (70/30 gives 7 rows of A for every 3 of B, in a fixed pattern);
* counting what was skipped or truncated inside the pipeline, in the iterator state;
* :class:`DataIterator`, the interface ``lmjax.train`` reads and checkpoints, and
  :func:`per_process_batch`, the rows of a global batch that one process reads.
"""

from __future__ import annotations

import atexit
import fractions
import math
import sys
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

from absl import flags
import grain
import numpy as np

from lmjax.config import LONG_DOCUMENT_POLICIES
from lmjax.data.readers import DataError, Document

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions")
COUNTS_KEY = "lmjax_counts"  # where pipeline counts live in an iterator's state


class Skipped(NamedTuple):
  """Stands in for a document the pipeline dropped; counted, never packed."""
  reason: str


class Encode:
  """Document -> ``{"inputs", "targets"}`` int32 arrays (or :class:`Skipped`).

  A document of ``n`` tokens becomes ``n + 1`` positions. If that exceeds ``seq_len`` the
  ``long_documents`` policy decides: "split" keeps it whole (packing continues it in the
  next rows), "truncate" keeps its first ``seq_len`` positions (no eos), "skip" drops it
  and "fail" raises DataError naming the record.
  """

  def __init__(self, tokenizer: Any, seq_len: int, long_documents: str = "split"):
    if long_documents not in LONG_DOCUMENT_POLICIES:
      raise DataError(f"data.long_documents must be one of {LONG_DOCUMENT_POLICIES}, "
                      f"got {long_documents!r}.")
    self._tok = tokenizer
    self._seq_len = seq_len
    self._policy = long_documents

  def __call__(self, doc: Document | str) -> dict[str, np.ndarray] | Skipped:
    text = doc.text if isinstance(doc, Document) else doc
    return self.from_ids(self._tok.encode(text), doc)

  def from_ids(self, ids: Sequence[int], doc: Document | str = "") -> dict[str, np.ndarray] | Skipped:
    """The same for already-encoded ``ids``."""
    if not len(ids):
      return Skipped("empty_document")
    seq = np.empty(len(ids) + 2, np.int32)
    seq[0], seq[1:-1], seq[-1] = self._tok.bos_id, ids, self._tok.eos_id
    out = {"inputs": seq[:-1], "targets": seq[1:]}
    if len(ids) + 1 > self._seq_len and self._policy != "split":
      where = doc.where if isinstance(doc, Document) else "a document"
      if self._policy == "fail":
        raise DataError(f"{where}: {len(ids)} tokens, longer than data.seq_len={self._seq_len} "
                        "(data.long_documents='fail'; 'split' continues it in the next rows, "
                        "'truncate' keeps the start, 'skip' drops it).")
      if self._policy == "skip":
        return Skipped("long_document")
      out = {"inputs": seq[:self._seq_len], "targets": seq[1:self._seq_len + 1], "truncated": True}
    return out


class DataIterator:
  """What ``lmjax.train`` reads batches from and checkpoints.

  ``next(it)`` is a dict of ``(b, t)`` int32 arrays (:data:`BATCH_KEYS`); ``get_state()``
  is a JSON-serialisable dict and ``set_state`` moves a fresh iterator there.
  ``topology_independent`` says whether that state is one global value that any process
  of any process count may restore (prepared data) or this process's own (raw text).
  """

  topology_independent = False

  def __new__(cls, *args, **kwargs):
    self = super().__new__(cls)
    _OPEN.add(self)  # closed at exit if still open (see _close_open_iterators)
    return self

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def get_state(self) -> dict[str, Any]:
    raise NotImplementedError

  def set_state(self, state: dict[str, Any]) -> None:
    raise NotImplementedError

  def close(self) -> None:
    pass

  def counts(self) -> dict[str, int]:
    """Records skipped so far by reason (see ``sources.REASONS``), and "truncated"."""
    return {}

  def metrics(self) -> dict[str, float]:
    """``data_skipped`` (total), ``data_skipped/<reason>`` and ``data_truncated``."""
    counts = dict(self.counts())
    truncated = counts.pop("truncated", 0)
    out = {"data_skipped": float(sum(counts.values()))}
    out.update({f"data_skipped/{reason}": float(n) for reason, n in sorted(counts.items()) if n})
    if truncated:
      out["data_truncated"] = float(truncated)
    return out


_OPEN: weakref.WeakSet[DataIterator] = weakref.WeakSet()


@atexit.register
def _close_open_iterators() -> None:
  """Stops the prefetch threads of iterators a script left open: a thread still running
  native code when the interpreter exits aborts it ("terminate called without an active
  exception")."""
  for it in list(_OPEN):
    it.close()


def per_process_batch(global_batch_size: int, process_count: int) -> int:
  """Rows per process of each global batch; DataError unless the processes share it evenly."""
  if process_count <= 0 or global_batch_size % process_count:
    raise DataError(f"data.global_batch_size={global_batch_size} must be divisible by the "
                    f"process count ({process_count}).")
  return global_batch_size // process_count


class _CountIterDataset(grain.IterDataset):
  """Drops :class:`Skipped` elements and counts them (and truncations) in its state."""

  def __iter__(self) -> grain.DatasetIterator:
    return _CountIterator(self._parent.__iter__())


class _CountIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)
    self._counts: dict[str, int] = {}

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      element = next(self._parent)
      if isinstance(element, Skipped):
        self._counts[element.reason] = self._counts.get(element.reason, 0) + 1
        continue
      if element.pop("truncated", False):
        self._counts["truncated"] = self._counts.get("truncated", 0) + 1
      return element

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), COUNTS_KEY: dict(self._counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._counts = dict(state[COUNTS_KEY])


def counts_in_state(state: Any) -> dict[str, int]:
  """Sums every pipeline count found anywhere in an iterator state (workers included)."""
  total: dict[str, int] = {}

  def walk(node: Any) -> None:
    if isinstance(node, dict):
      for key, value in node.items():
        if key == COUNTS_KEY and isinstance(value, dict):
          for reason, n in value.items():
            total[reason] = total.get(reason, 0) + int(n)
        else:
          walk(value)
    elif isinstance(node, (list, tuple)):
      for value in node:
        walk(value)

  walk(state)
  return total


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


def pack(sequences: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Encoded documents (``Encode`` outputs, Skipped included) -> rows of :data:`BATCH_KEYS`."""
  counted = _CountIterDataset(sequences)
  packed = grain.experimental.ConcatThenSplitIterDataset(
      counted, length_struct={"inputs": seq_len, "targets": seq_len})
  return _JsonSafeIterDataset(packed).map(_to_row)


class RowPacker:
  """Push-style concat-then-split: the same rows as :func:`pack`, fed one document at a time.

  ``add`` returns the rows it completed; ``flush`` the last, padded row (or None).
  Used by ``tools/prepare_data.py``, which routes documents to several splits.
  """

  def __init__(self, seq_len: int):
    self._t = seq_len
    self._new_row()

  def _new_row(self) -> None:
    self._row = {k: np.zeros(self._t, np.int32) for k in ("inputs", "targets", "segment_ids")}
    self._fill = 0
    self._segments = 0

  def _emit(self) -> dict[str, np.ndarray]:
    row = self._row
    row["positions"] = positions_from_segments(row["segment_ids"])
    self._new_row()
    return row

  def add(self, sequence: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    inputs, targets = sequence["inputs"], sequence["targets"]
    rows, start, n = [], 0, len(inputs)
    while start < n:
      take = min(self._t - self._fill, n - start)
      end = self._fill + take
      self._segments += 1
      self._row["inputs"][self._fill:end] = inputs[start:start + take]
      self._row["targets"][self._fill:end] = targets[start:start + take]
      self._row["segment_ids"][self._fill:end] = self._segments
      self._fill, start = end, start + take
      if self._fill == self._t:
        rows.append(self._emit())
    return rows

  def flush(self) -> dict[str, np.ndarray] | None:
    return self._emit() if self._fill else None


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
  """Position within each segment, restarting at 0 where the id changes; 0 on padding."""
  seg = np.asarray(segment_ids)
  idx = np.arange(seg.shape[-1])
  start = np.ones(seg.shape, bool)
  start[..., 1:] = seg[..., 1:] != seg[..., :-1]
  first = np.maximum.accumulate(np.where(start, idx, 0), axis=-1)
  return ((idx - first) * (seg != 0)).astype(np.int32)


# --- mixtures -------------------------------------------------------------------------------


def integer_proportions(weights: Sequence[float]) -> tuple[int, ...]:
  """Smallest integers in the ratio of ``weights`` (each share rounded to 1/10000)."""
  total = sum(weights)
  shares = [fractions.Fraction(w / total).limit_denominator(10_000) for w in weights]
  if any(s <= 0 for s in shares):
    raise DataError(f"data.mixture weights {list(weights)}: each share must be at least 1/10000.")
  denom = math.lcm(*(s.denominator for s in shares))
  ints = [int(s * denom) for s in shares]
  g = math.gcd(*ints)
  return tuple(i // g for i in ints)


def select(k: int, proportions: tuple[int, ...]) -> tuple[int, int]:
  """(component, index within it) of element ``k`` of the interleaved stream.

  Component ``i`` supplies exactly ``proportions[i]`` of every ``sum(proportions)``
  consecutive elements, spread evenly (Grain's interleaving, with exact integers).
  """
  remaining = sum(proportions)
  k0, k1 = k, k + 1
  for i, p in enumerate(proportions):
    n0 = (k0 * (remaining - p)) // remaining
    n1 = (k1 * (remaining - p)) // remaining
    if k0 - n0 != k1 - n1:
      return i, k1 - n1 - 1
    remaining -= p
    k0, k1 = n0, n1
  raise AssertionError("unreachable")


class ExactMix(grain.transforms.DatasetSelectionMap):
  """Grain selection map for MapDataset mixtures in exact integer proportions."""

  def __init__(self, proportions: tuple[int, ...], lengths: Sequence[int]):
    self._proportions = proportions
    total = sum(proportions)
    self._length = min(sys.maxsize, *(n * total // p for n, p in zip(lengths, proportions)))

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> tuple[int, int]:
    if not 0 <= index < self._length:
      raise IndexError(index)
    return select(index, self._proportions)


class _MixIterDataset(grain.IterDataset):
  """Interleaves IterDatasets by :func:`select`; stops when the selected one is exhausted."""

  def __init__(self, parents: Sequence[grain.IterDataset], proportions: tuple[int, ...]):
    super().__init__(list(parents))
    self._proportions = proportions

  def __iter__(self) -> grain.DatasetIterator:
    return _MixIterator([p.__iter__() for p in self._parents], self._proportions)


class _MixIterator(grain.DatasetIterator):

  def __init__(self, parents: list[grain.DatasetIterator], proportions: tuple[int, ...]):
    super().__init__(parents)
    self._its = parents
    self._proportions = proportions
    self._k = 0

  def __next__(self) -> Any:
    component, _ = select(self._k, self._proportions)
    element = next(self._its[component])
    self._k += 1
    return element

  def get_state(self) -> dict[str, Any]:
    return {"next": self._k, "parents": [it.get_state() for it in self._its]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._k = state["next"]
    for it, s in zip(self._its, state["parents"]):
      it.set_state(s)


def mix_iter(datasets: Sequence[grain.IterDataset], weights: Sequence[float]) -> grain.IterDataset:
  """``datasets`` interleaved in the proportions of ``weights`` (one dataset: itself)."""
  if len(datasets) == 1:
    return datasets[0]
  return _MixIterDataset(datasets, integer_proportions(weights))


def prefetch(ds: grain.IterDataset, buffer: int, workers: int) -> grain.IterDataset:
  """``workers`` Grain worker processes (each ``buffer`` elements ahead), then a thread
  keeping ``buffer`` batches ready, so that loading overlaps the training step."""
  if workers > 0:
    # Grain's worker start-up reads absl flags; outside an absl app (notebooks, tests)
    # nothing has parsed them, so take the defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, buffer)))
  if buffer > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=buffer)
  return ds
