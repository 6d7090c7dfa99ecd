"""Preference data for DPO (``data.format="preference"``): prompts with a chosen and a
rejected response, from JSONL.

Each line ``{"prompt": str, "chosen": str, "rejected": str}`` (field names from
``data.prompt_field``, ``data.chosen_field`` and ``data.rejected_field``; the prompt may be
empty, the responses not) becomes ONE row of ``data.seq_len`` holding two segments:
``[bos] + prompt + chosen + [eos]`` (segment 1) and ``[bos] + prompt + rejected + [eos]``
(segment 2), positions restarting at 0 in each, padding after. So data sharding and
gradient accumulation, which move whole rows, never split a pair. Besides the usual
``inputs``, ``targets``, ``segment_ids`` and ``positions`` a batch holds float32
``preference`` (+1 on the targets of the chosen response and its eos, -1 on the rejected
one's, 0 elsewhere) and ``weights`` = |preference|.

A pair longer than a row (``2 len(prompt) + len(chosen) + len(rejected) + 2 > seq_len``
tokens): ``data.long_documents="skip"`` drops it (counted as ``data_skipped/long_document``),
``"fail"`` raises naming its file and line, and ``"split"`` (the default) or ``"truncate"``
cut it (counted as ``data_truncated``): the responses lose their ends (and eos) first, but
each keeps at least a quarter of the row (or all of itself) before the prompt is cut; the
prompt keeps its tail, the tokens next to the responses, after its ``bos``.

``data.eval_fraction`` of the pairs are held out as prompt/response pairs are
(:func:`lmjax.data.sources.split_documents`); the eval split is read once, its last batch
padded with all-zero rows (no pair). Rows are shuffled per epoch by ``(seed, epoch)``; the
iterator (:class:`lmjax.data.finetune.FinetuneIterator`) resumes from ``{"rows"}``, the same
for every process and process count.
"""

from __future__ import annotations

import json

import ml_collections
import numpy as np

from lmjax.data.finetune import FinetuneIterator, jsonl_lines, rows_iterator
from lmjax.data.readers import DataError
from lmjax.data.sources import SPLIT_SEED, split_documents
from lmjax.data.tokenizer import Tokenizer

Pair = tuple[str, str, str, str]  # prompt, chosen, rejected, "file:line"
KEYS = ("inputs", "targets", "segment_ids", "positions")


def read_preferences(source: str, prompt_field: str, chosen_field: str,
                     rejected_field: str) -> list[Pair]:
  """(prompt, chosen, rejected, where) from JSONL files; a bad line raises naming file and line."""
  pairs = []
  fields = (prompt_field, chosen_field, rejected_field)
  for path, i, line in jsonl_lines(source):
    try:
      record = json.loads(line)
      prompt, chosen, rejected = (record[k] for k in fields)
      assert all(isinstance(x, str) for x in (prompt, chosen, rejected)) and chosen and rejected
    except (ValueError, KeyError, TypeError, AssertionError):
      raise DataError(f"{path}:{i}: expected a JSON object with string fields {prompt_field!r}, "
                      f"{chosen_field!r} and {rejected_field!r} (the last two non-empty), got "
                      f"{line[:200]!r}") from None
    pairs.append((prompt, chosen, rejected, f"{path}:{i}"))
  if not pairs:
    raise DataError(f"data.source={source!r}: no preference pairs")
  return pairs


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int],
             seq_len: int) -> tuple[list[int], list[int], list[int]]:
  """Cuts a pair (token ids without bos; the responses end with eos) to fit one row of
  ``seq_len``: 2 len(prompt) + len(chosen) + len(rejected) <= seq_len (module docstring)."""
  if 2 * len(prompt) + len(chosen) + len(rejected) <= seq_len:
    return prompt, chosen, rejected
  floor = seq_len // 4  # each response's share the prompt cannot take
  room = (seq_len - min(len(chosen), floor) - min(len(rejected), floor)) // 2
  if len(prompt) > room:
    prompt = prompt[len(prompt) - room:] if room > 0 else []
  budget = seq_len - 2 * len(prompt)
  nc = min(len(chosen), max(budget // 2, budget - len(rejected)))
  return prompt, chosen[:nc], rejected[:budget - nc]


def pack_preferences(pairs: list[Pair], tokenizer: Tokenizer, seq_len: int,
                     long_pairs: str = "split") -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """One row per pair: (rows, seq_len) arrays incl. ``preference`` and ``weights``, and the
  counts of pairs skipped (``long_document``) or cut (``truncated``) as ``long_pairs`` says."""
  if seq_len < 4:
    raise DataError(f"data.seq_len={seq_len}: a preference pair needs a row of at least 4 tokens.")
  rows, counts = [], {"long_document": 0, "truncated": 0}
  for prompt, chosen, rejected, where in pairs:
    p = tokenizer.encode(prompt)
    c, r = tokenizer.encode(chosen) + [tokenizer.eos_id], tokenizer.encode(rejected) + [tokenizer.eos_id]
    n = 2 * len(p) + len(c) + len(r)
    if n > seq_len:
      if long_pairs == "fail":
        raise DataError(f"{where}: the pair takes {n} tokens, more than data.seq_len={seq_len} "
                        "(data.long_documents='fail'; 'truncate' cuts the responses, then the "
                        "prompt's head; 'skip' drops the pair).")
      if long_pairs == "skip":
        counts["long_document"] += 1
        continue
      counts["truncated"] += 1
      p, c, r = fit_pair(p, c, r, seq_len)
    rows.append((p, c, r))
  out = {k: np.zeros((len(rows), seq_len), np.int32) for k in KEYS}
  out["preference"] = np.zeros((len(rows), seq_len), np.float32)
  for row, (p, c, r) in enumerate(rows):
    at = 0
    for segment, (response, sign) in enumerate(((c, 1.0), (r, -1.0)), 1):
      seq = [tokenizer.bos_id] + p + response  # inputs: all but the last; targets: all but bos
      n = len(seq) - 1
      out["inputs"][row, at:at + n], out["targets"][row, at:at + n] = seq[:-1], seq[1:]
      out["segment_ids"][row, at:at + n], out["positions"][row, at:at + n] = segment, np.arange(n)
      out["preference"][row, at + len(p):at + n] = sign
      at += n
  out["weights"] = np.abs(out["preference"])
  return out, {k: v for k, v in counts.items() if v}


def is_preference(data_cfg: ml_collections.ConfigDict) -> bool:
  """Whether ``data.source`` holds preference pairs (``data.format``)."""
  return data_cfg.format == "preference"


def preference_iterator(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, *, split: str = "train",
                        process_index: int = 0, process_count: int = 1) -> FinetuneIterator:
  """The train split (all but ``data.eval_fraction`` of the pairs: reshuffled every epoch, for
  ``data.num_epochs``) or the eval split (once); :func:`lmjax.data.make_iterator` calls it when
  ``data.format="preference"``."""
  d = cfg.data
  pairs = read_preferences(d.source, d.prompt_field, d.chosen_field, d.rejected_field)
  train, evals = split_documents(pairs, d.eval_fraction, SPLIT_SEED)
  rows, counts = pack_preferences(evals if split == "eval" else train, tokenizer, d.seq_len,
                                  d.long_documents)
  if split == "train" and not len(rows["inputs"]):
    raise DataError(f"data.source={d.source!r}: no training pair fits data.seq_len={d.seq_len} "
                    f"(data.long_documents={d.long_documents!r} skipped {counts.get('long_document', 0)}).")
  return rows_iterator(cfg, rows, split=split, process_index=process_index,
                       process_count=process_count, counts=counts)
