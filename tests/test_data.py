"""Tests of lmjax.data: sources, tokenizers and the Grain pipeline (CPU, seconds)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from lmjax.config import default_config
from lmjax.data import (
    BATCH_KEYS,
    DataError,
    Tokenizer,
    default_documents,
    get_tokenizer,
    load_documents,
    make_eval_iterator,
    make_train_iterator,
    split_documents,
    train_tokenizer,
)
from lmjax.data import tokenizer as tokenizer_module

VOCAB = 1024

# A tiny source: an epoch is a few rows, so epoch boundaries come within a few batches.
TINY_DOCS = [
    "The cat sat on the mat.",
    "A dog ran in the park.",
    "Birds sing at dawn.",
    "def f(x):\n    return x + 1",
    "Rain falls on the roof and the roof is wet.",
    "Numbers: 1, 22, 333.",
    "Short.",
    "Water is wet, fire is hot, and ice is cold.",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
  """One tokenizer for the module, trained on the default corpus."""
  path = tmp_path_factory.mktemp("tok") / "default.model"
  return train_tokenizer(default_documents(), VOCAB, str(path))


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp("tiny") / "tiny.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in TINY_DOCS))
  return str(path)


def _cfg(source: str = "default", **data):
  cfg = default_config()
  cfg.data.source = source
  cfg.data.seq_len = 32
  cfg.data.global_batch_size = 4
  cfg.data.prefetch = 0
  for key, value in data.items():
    cfg.data[key] = value
  return cfg


def _take(it, n: int) -> list[dict[str, np.ndarray]]:
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def _stream(batches) -> list[int]:
  """The non-padding input tokens of all rows, in order."""
  out = []
  for batch in batches:
    for row, seg in zip(batch["inputs"], batch["segment_ids"]):
      out.extend(row[seg > 0].tolist())
  return out


def _docs_in(stream: list[int], tok: Tokenizer) -> list[str]:
  """Documents read back from a token stream ([bos] + ids of each, back to back)."""
  docs, current = [], None
  for t in stream:
    if t == tok.bos_id:
      if current is not None:
        docs.append(tok.decode(current))
      current = []
    else:
      current.append(t)
  if current is not None:
    docs.append(tok.decode(current))
  return docs


# --- sources -------------------------------------------------------------------------


def test_default_corpus_is_real_text():
  docs = default_documents()
  assert len(docs) >= 50
  assert sum(map(len, docs)) > 200_000
  assert all(d and d == d.strip() for d in docs)
  assert docs == default_documents()
  assert load_documents("default") == docs


def test_load_txt_jsonl_dir_and_glob(tmp_path):
  (tmp_path / "b.txt").write_text("second file\n")
  (tmp_path / "a.txt").write_text("  first file  ")
  (tmp_path / "c.jsonl").write_text('{"text": "one", "id": 1}\n\n{"text": "two\\nlines"}\n')
  (tmp_path / "notes.md").write_text("ignored in a directory")
  assert load_documents(str(tmp_path / "a.txt")) == ["first file"]
  assert load_documents(str(tmp_path / "c.jsonl")) == ["one", "two\nlines"]
  assert load_documents(str(tmp_path)) == ["first file", "second file", "one", "two\nlines"]
  assert load_documents(str(tmp_path / "*.txt")) == ["first file", "second file"]
  (tmp_path / "d.jsonl").write_text('{"body": "custom field"}\n')
  assert load_documents(str(tmp_path / "d.jsonl"), text_field="body") == ["custom field"]


@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", b"", r"empty\.txt: the file is empty"),
    ("blank.jsonl", b"\n\n", r"blank\.jsonl: the file is empty"),
    ("bad.txt", b"ok\nabc\xff\xfe", r"bad\.txt:2: invalid UTF-8 at byte offset 6"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": oops}\n', r"bad\.jsonl:2: not valid JSON"),
    ("nofield.jsonl", b'{"text": "a"}\n{"body": "b"}\n', r"nofield\.jsonl:2: no field 'text'"),
    ("notstr.jsonl", b'{"text": 5}\n', r"notstr\.jsonl:1: field 'text' must be a string"),
    ("list.jsonl", b'["text"]\n', r"list\.jsonl:1: expected a JSON object"),
    ("data.csv", b"a,b\n", r"data\.csv: unknown extension"),
])
def test_load_errors_name_the_file_and_line(tmp_path, name, content, match):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(DataError, match=match):
    load_documents(str(tmp_path / name))


def test_load_errors_for_missing_sources(tmp_path):
  with pytest.raises(DataError, match="no such file or directory"):
    load_documents(str(tmp_path / "missing.txt"))
  with pytest.raises(DataError, match="glob matches no files"):
    load_documents(str(tmp_path / "*.jsonl"))
  with pytest.raises(DataError, match="holds no .txt or .jsonl files"):
    load_documents(str(tmp_path))
  assert issubclass(DataError, ValueError)


def test_split_is_deterministic_and_disjoint():
  docs = [f"doc {i}" for i in range(100)]
  train, evals = split_documents(docs, 0.1, seed=3)
  assert (train, evals) == split_documents(docs, 0.1, seed=3)
  assert len(evals) == 10 and len(train) == 90
  assert set(train).isdisjoint(evals) and set(train) | set(evals) == set(docs)
  assert train == [d for d in docs if d in set(train)]  # input order kept
  assert split_documents(docs, 0.1, seed=4)[1] != evals
  assert split_documents(docs, 0.0, seed=3) == (docs, [])
  assert len(split_documents(docs[:2], 0.01, seed=0)[1]) == 1  # at least one
  assert split_documents(docs[:1], 0.5, seed=0) == (docs[:1], [])  # never all


# --- tokenizer -----------------------------------------------------------------------


def test_tokenizer_ids_and_round_trip(tok):
  assert tok.vocab_size == VOCAB
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
  text = "def f(x):\n    return x  +  1\n\n\tÄé 日本 — “quotes”"
  ids = tok.encode(text)
  assert ids and all(4 <= i < VOCAB for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(np.asarray(ids, np.int32)) == text
  assert tok.encode("") == []
  clone = pickle.loads(pickle.dumps(tok))  # what Grain worker processes receive
  assert clone.encode(text) == ids and clone.path == tok.path


def test_tokenizer_training_is_deterministic(tmp_path, tok):
  again = train_tokenizer(default_documents(), VOCAB, str(tmp_path / "again.model"))
  with open(tok.path, "rb") as a, open(again.path, "rb") as b:
    assert a.read() == b.read()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # atomic write left nothing


def test_tokenizer_load_errors(tmp_path, tok):
  assert Tokenizer.load(tok.path).encode("hello world") == tok.encode("hello world")
  with pytest.raises(DataError, match="no such file"):
    Tokenizer.load(str(tmp_path / "missing.model"))
  (tmp_path / "corrupt.model").write_bytes(b"not a sentencepiece model")
  with pytest.raises(DataError, match="corrupt.model: not a valid sentencepiece model"):
    Tokenizer.load(str(tmp_path / "corrupt.model"))
  with pytest.raises(DataError, match="Vocabulary size too high"):
    train_tokenizer(TINY_DOCS, VOCAB, str(tmp_path / "too_big.model"))


def test_get_tokenizer_caches_by_content(tmp_path, monkeypatch, tiny_source, tok):
  cfg = _cfg(tiny_source, tokenizer_cache=str(tmp_path / "cache"))
  first = get_tokenizer(cfg.data, 320)
  assert first.vocab_size == 320 and first.path.startswith(str(tmp_path / "cache"))
  mtime = os.stat(first.path).st_mtime_ns

  def no_training(*args, **kwargs):
    raise AssertionError("get_tokenizer retrained instead of using the cache")

  monkeypatch.setattr(tokenizer_module, "train_tokenizer", no_training)
  second = get_tokenizer(cfg.data, 320)
  assert second.path == first.path and os.stat(second.path).st_mtime_ns == mtime
  assert second.encode("The cat sat.") == first.encode("The cat sat.")
  monkeypatch.undo()
  assert get_tokenizer(cfg.data, 340).path != first.path  # the vocab size is in the key

  monkeypatch.setenv("LMJAX_CACHE", str(tmp_path / "env_cache"))
  cfg.data.tokenizer_cache = ""
  assert get_tokenizer(cfg.data, 320).path.startswith(str(tmp_path / "env_cache"))

  cfg.data.tokenizer = tok.path  # an explicit tokenizer is loaded as it is, not trained
  assert get_tokenizer(cfg.data, VOCAB).path == tok.path
  assert get_tokenizer(cfg.data, 512).vocab_size == VOCAB


# --- pipeline ------------------------------------------------------------------------


def _check_rows(batch, tok: Tokenizer) -> None:
  """Packing invariants of every row of a batch."""
  for inp, tgt, seg, pos in zip(*(batch[k] for k in BATCH_KEYS)):
    pad = seg == 0
    assert not (inp[pad].any() or tgt[pad].any() or pos[pad].any())
    n = int((~pad).sum())
    assert not pad[:n].any()  # padding only at the end
    assert np.all(np.diff(seg[:n]) >= 0) and (n == 0 or seg[0] == 1)
    for i in range(n):
      new_segment = i == 0 or seg[i] != seg[i - 1]
      assert pos[i] == (0 if new_segment else pos[i - 1] + 1)
      if i + 1 < n and seg[i + 1] == seg[i]:
        assert tgt[i] == inp[i + 1]
      if inp[i] == tok.bos_id:
        assert pos[i] == 0  # documents start at position 0


def test_train_batches_shapes_and_packing(tok):
  it = make_train_iterator(_cfg(seq_len=64, global_batch_size=8), tok)
  batches = _take(it, 6)
  it.close()
  for batch in batches:
    assert sorted(batch) == sorted(BATCH_KEYS)
    for key in BATCH_KEYS:
      assert batch[key].shape == (8, 64) and batch[key].dtype == np.int32, key
    _check_rows(batch, tok)
  assert (batches[0]["segment_ids"] > 0).mean() > 0.99  # concat-then-split barely pads


def test_every_document_once_per_epoch_in_a_new_order(tok, tiny_source):
  cfg = _cfg(tiny_source, eval_fraction=0.0, num_epochs=2, global_batch_size=1, seq_len=16)
  batches = list(make_train_iterator(cfg, tok))  # finite: two epochs
  for batch in batches:
    _check_rows(batch, tok)
  docs = _docs_in(_stream(batches), tok)
  assert len(docs) == 2 * len(TINY_DOCS)
  epoch0, epoch1 = docs[:len(TINY_DOCS)], docs[len(TINY_DOCS):]
  assert sorted(epoch0) == sorted(epoch1) == sorted(TINY_DOCS)
  assert epoch0 != epoch1 and epoch0 != TINY_DOCS


def test_seed_determines_the_order(tok):
  def first(seed: int):
    cfg = _cfg()
    cfg.seed = seed
    it = make_train_iterator(cfg, tok)
    out = _take(it, 3)
    it.close()
    return out

  _assert_batches_equal(first(0), first(0))
  with pytest.raises(AssertionError):
    _assert_batches_equal(first(0), first(1))


def test_process_shards_are_disjoint(tok, tiny_source):
  cfg = _cfg(tiny_source, eval_fraction=0.0, num_epochs=1, global_batch_size=2, seq_len=16)
  shards = []
  for index in range(2):
    batches = list(make_train_iterator(cfg, tok, process_index=index, process_count=2))
    assert all(b["inputs"].shape == (1, 16) for b in batches)  # half the rows each
    shards.append(_docs_in(_stream(batches), tok))
  assert set(shards[0]).isdisjoint(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(TINY_DOCS)
  with pytest.raises(DataError, match="divisible by the process count"):
    make_train_iterator(_cfg(global_batch_size=3), tok, process_count=2)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_continues_exactly_across_epochs(tok, tiny_source, prefetch):
  cfg = _cfg(tiny_source, eval_fraction=0.0, global_batch_size=2, seq_len=16, prefetch=prefetch)
  epoch_tokens = sum(len(tok.encode(d)) + 1 for d in TINY_DOCS)
  rows_per_epoch = epoch_tokens / 16
  total = 12
  assert total * 2 > 2 * rows_per_epoch  # the run spans more than two epochs
  it = make_train_iterator(cfg, tok)
  reference = _take(it, total)
  it.close()
  for k in range(total - 2):  # every resume point: the start, remainders, epoch boundaries
    it = make_train_iterator(cfg, tok)
    _assert_batches_equal(_take(it, k), reference[:k])
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    resumed = make_train_iterator(cfg, tok)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 3), reference[k:k + 3])
    resumed.close()


def test_resume_with_worker_processes(tok, tiny_source):
  cfg = _cfg(tiny_source, eval_fraction=0.0, global_batch_size=2, seq_len=16, worker_count=2)
  it = make_train_iterator(cfg, tok)
  head = _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  tail = _take(it, 4)
  it.close()
  for batch in head + tail:
    _check_rows(batch, tok)
  resumed = make_train_iterator(cfg, tok)
  resumed.set_state(state)
  _assert_batches_equal(_take(resumed, 4), tail)
  resumed.close()


def test_eval_is_finite_deterministic_and_padded(tok, tiny_source):
  cfg = _cfg(tiny_source, eval_fraction=0.4, global_batch_size=3, seq_len=16)
  _, eval_docs = split_documents(TINY_DOCS, 0.4, seed=0)
  batches = list(make_eval_iterator(cfg, tok))
  _assert_batches_equal(batches, list(make_eval_iterator(cfg, tok)))
  assert batches and all(b["inputs"].shape == (3, 16) for b in batches)
  for batch in batches:
    _check_rows(batch, tok)
  assert _docs_in(_stream(batches), tok) == eval_docs  # held-out docs, in order, once
  rows = np.concatenate([b["segment_ids"] for b in batches])
  used = int((rows.sum(axis=1) > 0).sum())
  assert used < len(rows) and not rows[used:].any()  # the last batch ends in padding rows
  train_docs = _docs_in(_stream(list(make_train_iterator(_cfg(
      tiny_source, eval_fraction=0.4, num_epochs=1, global_batch_size=1, seq_len=16), tok))), tok)
  assert set(train_docs).isdisjoint(eval_docs)
  assert list(make_eval_iterator(_cfg(tiny_source, eval_fraction=0.0), tok)) == []


def test_empty_documents_are_skipped(tmp_path, tok):
  path = tmp_path / "gaps.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one", "", "two", "", "three"]))
  cfg = _cfg(str(path), eval_fraction=0.0, num_epochs=1, shuffle=False, global_batch_size=1)
  assert _docs_in(_stream(make_train_iterator(cfg, tok)), tok) == ["one", "two", "three"]
