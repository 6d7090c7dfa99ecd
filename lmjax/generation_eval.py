"""Generation tasks: the model continues each source text, and the field's own scorers
compare what it wrote with the references: BLEU (sacrebleu), ROUGE-1/2/L (rouge-score) and
exact match.

  items = read_generation_items("task.jsonl")     # {"source": str, "reference": str | [str, ...]}
  out = evaluate_generation(run.setup, run.params, run.tokenizer, items, max_new_tokens=32,
                            stop=("\\n",))
  out["scores"]   # {"bleu": 31.2, "rouge1": 54.0, "rouge2": ..., "rougeL": ..., "exact_match": ...}
  out["outputs"]  # per item: source, references, output
  evaluate_run(lmjax.load("runs/tiny"), "task.jsonl")  # the same for a loaded run

Each source is encoded as ``[bos] + tokenizer.encode(source)`` (as :func:`lmjax.generate.generate`
does) and continued greedily (``temperature=0``, the default) by :func:`lmjax.generate.generate_ids`,
``batch_size`` sources at a time through the KV cache, until the tokenizer's eos or
``max_new_tokens``; the text is then cut before the first of the ``stop`` strings. A source
too long to leave room for ``max_new_tokens`` keeps bos and its last tokens.

Scores, all in percent (0-100):

- ``bleu``: ``sacrebleu.corpus_bleu(outputs, references)``, its default 13a tokenisation,
  every reference of an item counted (items may have different numbers of references);
- ``rouge1``, ``rouge2``, ``rougeL``: the mean over items of ``rouge_score``'s F-measure with
  Porter stemming (``RougeScorer(..., use_stemmer=True)``, as summarisation papers report it),
  the best reference of each item (``score_multi``); rougeL is the sentence-level LCS, not
  rougeLsum. rouge-score's tokeniser keeps only ASCII letters and digits: other scripts score 0;
- ``exact_match``: the share of items whose output equals one of its references after both
  are lower-cased, stripped and their runs of whitespace made one space (punctuation and
  articles are kept).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmjax.config import ConfigError
from lmjax.data import DataError
from lmjax.evaluate import read_text
from lmjax.generate import generate_ids

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
METRICS = ("bleu",) + ROUGE_TYPES + ("exact_match",)


def scorers() -> tuple[Any, Any]:
  """The ``sacrebleu`` module and a ``RougeScorer``, or a ConfigError naming the extra."""
  try:
    import sacrebleu
    from rouge_score import rouge_scorer
  except ImportError:
    raise ConfigError('generation scores need sacrebleu and rouge-score, which are not '
                      'installed: pip install "lmjax[eval]".') from None
  return sacrebleu, rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)


def read_generation_items(path: str | Path, source_field: str = "source",
                          reference_field: str = "reference",
                          limit: int | None = None) -> list[dict[str, Any]]:
  """Items ``{"source": str, "references": [str, ...]}`` from JSONL lines holding
  ``source_field`` (a string) and ``reference_field`` (a string or a list of strings), the
  first ``limit`` of them. A malformed line, a missing file or one without items raises
  DataError naming the file (and line)."""
  text = read_text(path, "generation JSONL")
  items = []
  for i, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    if limit is not None and len(items) >= limit:
      break
    try:
      record = json.loads(line)
      source, refs = record[source_field], record[reference_field]
      refs = [refs] if isinstance(refs, str) else refs
      assert isinstance(source, str) and isinstance(refs, list) and refs
      assert all(isinstance(r, str) for r in refs)
    except (ValueError, KeyError, TypeError, AssertionError):
      raise DataError(f"{path}:{i}: expected {{{source_field!r}: str, {reference_field!r}: str "
                      f"or [str, ...]}}, got {line[:200]!r}") from None
    items.append({"source": source, "references": refs})
  if not items:
    raise DataError(f"{path}: no generation items; give one JSON object per line")
  return items


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """``text`` up to the first occurrence of any of the ``stop`` strings."""
  cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
  return text[:cut]


def unescape(text: str) -> str:
  """A stop string as typed on a command line: ``\\n`` a newline, ``\\t`` a tab, ``\\\\`` a backslash."""
  return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t"}.get(m[1], "\\"), text)


def normalize(text: str) -> str:
  """Exact match's normalisation: lower case, stripped, each run of whitespace one space."""
  return re.sub(r"\s+", " ", text).strip().lower()


def score_outputs(outputs: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
  """BLEU, ROUGE-1/2/L and exact match (percent) of ``outputs`` against each item's references."""
  sacrebleu, rouge = scorers()
  if len(outputs) != len(references) or not outputs:
    raise ValueError(f"score_outputs: {len(outputs)} outputs for {len(references)} items")
  most = max(map(len, references))
  streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(most)]
  out = {"bleu": float(sacrebleu.corpus_bleu(list(outputs), streams).score)}
  rouge_scores = [rouge.score_multi(list(refs), output) for output, refs in zip(outputs, references)]
  for kind in ROUGE_TYPES:
    out[kind] = 100.0 * float(np.mean([s[kind].fmeasure for s in rouge_scores]))
  matches = [normalize(o) in {normalize(r) for r in refs} for o, refs in zip(outputs, references)]
  out["exact_match"] = 100.0 * float(np.mean(matches))
  return out


def generate_texts(model: Any, params: Any, tokenizer: Any, sources: Sequence[str], *,
                   max_new_tokens: int = 64, stop: Sequence[str] = (), batch_size: int = 8,
                   temperature: float = 0.0, seed: int = 0,
                   max_seq_len: int | None = None) -> tuple[list[str], dict[str, float]]:
  """Generates for ``sources`` with ``model`` (a Setup, or any model of
  :func:`lmjax.generate.generate_ids` given ``max_seq_len``). Returns each source's
  continuation (cut at ``stop``) and the timing: ``seconds``, ``generated_tokens`` (eos
  included), ``examples_per_sec``, ``tokens_per_sec``. A last batch short of ``batch_size``
  is filled with copies of its first source (outputs dropped), so that batches of equal
  prompt length share one compiled program."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}")
  limit = max_seq_len if max_seq_len is not None else model.cfg.model.max_seq_len
  room = limit - max_new_tokens + 1  # prompt tokens that leave room for the new ones
  if room < 2:
    raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in "
                     f"model.max_seq_len={limit}; give fewer new tokens.")
  prompts = []
  for source in sources:
    ids = [tokenizer.bos_id] + tokenizer.encode(source)
    prompts.append(ids if len(ids) <= room else [tokenizer.bos_id] + ids[len(ids) - room + 1:])
  texts, tokens = [], 0
  start = time.perf_counter()
  for b in range(0, len(prompts), batch_size):
    batch = prompts[b:b + batch_size]
    real = len(batch)
    batch = batch + [batch[0]] * (batch_size - real)
    out = generate_ids(model, params, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                       stop_tokens=(tokenizer.eos_id,), seed=seed, pad_id=tokenizer.pad_id)
    for prompt, row, n in zip(batch[:real], out.tokens, out.lengths):
      row = row[:n]
      tokens += int(n)
      if n and row[-1] == tokenizer.eos_id:
        row = row[:-1]
      texts.append(cut_at_stop(tokenizer.decode_continuation(prompt, row), stop))
  seconds = time.perf_counter() - start
  timing = {"seconds": seconds, "generated_tokens": tokens,
            "examples_per_sec": len(prompts) / seconds, "tokens_per_sec": tokens / seconds}
  return texts, timing


def evaluate_generation(setup: Any, params: Any, tokenizer: Any, items: Sequence[dict[str, Any]],
                        *, max_new_tokens: int = 64, stop: Sequence[str] = (), batch_size: int = 8,
                        temperature: float = 0.0, seed: int = 0) -> dict[str, Any]:
  """``{"scores": {metric: percent, ..., "examples": n}, "timing": {...}, "outputs": [{"source",
  "references", "output"}, ...]}`` for ``items`` (:func:`read_generation_items`)."""
  scorers()  # before generating: a missing extra is named at once
  texts, timing = generate_texts(setup, params, tokenizer, [it["source"] for it in items],
                                 max_new_tokens=max_new_tokens, stop=stop, batch_size=batch_size,
                                 temperature=temperature, seed=seed)
  scores = score_outputs(texts, [it["references"] for it in items])
  scores["examples"] = len(items)
  outputs = [{"source": it["source"], "references": it["references"], "output": text}
             for it, text in zip(items, texts)]
  return {"scores": scores, "timing": timing, "outputs": outputs}


def evaluate_run(run: Any, path: str | Path, *, source_field: str = "source",
                 reference_field: str = "reference", limit: int | None = None,
                 **kwargs: Any) -> dict[str, Any]:
  """:func:`evaluate_generation` of a loaded run (``lmjax.load``) on the JSONL task at
  ``path``; keyword arguments as there."""
  scorers()
  items = read_generation_items(path, source_field, reference_field, limit)
  return evaluate_generation(run.setup, run.params, run.text_tokenizer(), items, **kwargs)


def format_table(scores: dict[str, float]) -> str:
  """A Markdown table of the scores: metric, value."""
  rows = ["| metric | value |", "| --- | --- |"]
  for name, value in scores.items():
    rows.append(f"| {name} | {value:.2f} |" if isinstance(value, float) else f"| {name} | {value} |")
  return "\n".join(rows)
