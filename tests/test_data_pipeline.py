"""Tests of the raw-text Grain pipeline: packing, epochs, shards, resume, mixtures, policies."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lmjax.data import BATCH_KEYS, DataError, make_iterator, split_documents
from tests.test_data import (  # noqa: F401 - fixtures
    FORMATS,
    TINY_DOCS,
    assert_batches_equal,
    check_rows,
    data_cfg,
    docs_in,
    stream,
    take,
    tiny_source,
    tok,
    write_corpus,
)


def test_train_batches_shapes_and_packing(tok):
  it = make_iterator(data_cfg(seq_len=64, global_batch_size=8), tok, split="train")
  batches = take(it, 6)
  it.close()
  for batch in batches:
    assert sorted(batch) == sorted(BATCH_KEYS)
    for key in BATCH_KEYS:
      assert batch[key].shape == (8, 64) and batch[key].dtype == np.int32, key
    check_rows(batch, tok)
  assert (batches[0]["segment_ids"] > 0).mean() > 0.99  # concat-then-split barely pads
  assert it.metrics() == {"data_skipped": 0.0}


def test_every_document_once_per_epoch_in_a_new_order(tok, tiny_source):
  cfg = data_cfg(tiny_source, eval_fraction=0.0, num_epochs=2, global_batch_size=1, seq_len=16)
  batches = list(make_iterator(cfg, tok, split="train"))  # finite: two epochs
  for batch in batches:
    check_rows(batch, tok)
  docs = docs_in(stream(batches), tok)
  assert len(docs) == 2 * len(TINY_DOCS)
  epoch0, epoch1 = docs[:len(TINY_DOCS)], docs[len(TINY_DOCS):]
  assert sorted(epoch0) == sorted(epoch1) == sorted(TINY_DOCS)
  assert epoch0 != epoch1 and epoch0 != TINY_DOCS


def test_seed_determines_the_order(tok):
  def first(seed: int):
    cfg = data_cfg()
    cfg.seed = seed
    it = make_iterator(cfg, tok, split="train")
    out = take(it, 3)
    it.close()
    return out

  assert_batches_equal(first(0), first(0))
  with pytest.raises(AssertionError):
    assert_batches_equal(first(0), first(1))


def test_process_shards_are_disjoint(tok, tiny_source):
  cfg = data_cfg(tiny_source, eval_fraction=0.0, num_epochs=1, global_batch_size=2, seq_len=16)
  shards = []
  for index in range(2):
    batches = list(make_iterator(cfg, tok, split="train", process_index=index, process_count=2))
    assert all(b["inputs"].shape == (1, 16) for b in batches)  # half the rows each
    shards.append(docs_in(stream(batches), tok))
  assert set(shards[0]).isdisjoint(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(TINY_DOCS)
  with pytest.raises(DataError, match="divisible by the process count"):
    make_iterator(data_cfg(global_batch_size=3), tok, split="train", process_count=2)


def _check_resume(cfg, tok, total: int, points) -> None:
  """Restoring a JSON round trip of the state after k batches gives batches k, k+1, k+2."""
  it = make_iterator(cfg, tok, split="train")
  reference = take(it, total)
  it.close()
  for k in points:
    it = make_iterator(cfg, tok, split="train")
    assert_batches_equal(take(it, k), reference[:k])
    state = json.loads(json.dumps(it.get_state()))
    it.close()
    resumed = make_iterator(cfg, tok, split="train")
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), reference[k:k + 3])
    resumed.close()


@pytest.mark.parametrize("prefetch", [0, 2])
def test_resume_continues_exactly_across_epochs(tok, tiny_source, prefetch):
  cfg = data_cfg(tiny_source, eval_fraction=0.0, global_batch_size=2, seq_len=16, prefetch=prefetch)
  rows_per_epoch = sum(len(tok.encode(d)) + 1 for d in TINY_DOCS) / 16
  total = 12
  assert total * 2 > 2 * rows_per_epoch  # the run spans more than two epochs
  _check_resume(cfg, tok, total, range(total - 2))  # the start, remainders, epoch boundaries


@pytest.mark.parametrize("fmt", FORMATS)
def test_resume_for_every_source_format(tmp_path, tok, fmt):
  source = write_corpus(tmp_path, TINY_DOCS, fmt)
  cfg = data_cfg(source, eval_fraction=0.0, global_batch_size=2, seq_len=16, txt_split="blank_line",
                 num_epochs=3)
  batches = list(make_iterator(cfg, tok, split="train"))
  docs = docs_in(stream(batches), tok)
  assert sorted(docs[:len(TINY_DOCS)]) == sorted(TINY_DOCS)  # the first epoch, whole
  assert sorted(docs[len(TINY_DOCS):2 * len(TINY_DOCS)]) == sorted(TINY_DOCS)
  per_epoch = len(batches) // 3
  _check_resume(cfg, tok, len(batches), [1, per_epoch, per_epoch + 1, 2 * per_epoch])


@pytest.mark.slow
def test_workers_resume_and_report_counts(tmp_path, tok):
  docs = TINY_DOCS + ["long " * 40]  # one document longer than a row, dropped and counted
  source = write_corpus(tmp_path, docs, "jsonl")
  cfg = data_cfg(source, eval_fraction=0.0, global_batch_size=2, seq_len=16, worker_count=2,
                 long_documents="skip")
  it = make_iterator(cfg, tok, split="train")
  head = take(it, 5)
  state = json.loads(json.dumps(it.get_state()))
  tail = take(it, 8)
  counts = it.metrics()
  it.close()
  for batch in head + tail:
    check_rows(batch, tok)
  assert "long long" not in " ".join(docs_in(stream(head + tail), tok))
  # The workers' counts reach the main process through the iterator state.
  assert counts["data_skipped/long_document"] >= 1 and counts["data_skipped"] >= 1
  resumed = make_iterator(cfg, tok, split="train")
  resumed.set_state(state)
  assert_batches_equal(take(resumed, 8), tail)
  resumed.close()


def test_eval_is_finite_deterministic_and_padded(tok, tiny_source):
  cfg = data_cfg(tiny_source, eval_fraction=0.4, global_batch_size=3, seq_len=16)
  _, eval_docs = split_documents(TINY_DOCS, 0.4, seed=0)
  batches = list(make_iterator(cfg, tok, split="eval"))
  assert_batches_equal(batches, list(make_iterator(cfg, tok, split="eval")))
  assert batches and all(b["inputs"].shape == (3, 16) for b in batches)
  for batch in batches:
    check_rows(batch, tok)
  assert docs_in(stream(batches), tok) == eval_docs  # held-out docs, in order, once
  rows = np.concatenate([b["segment_ids"] for b in batches])
  used = int((rows.sum(axis=1) > 0).sum())
  assert used < len(rows) and not rows[used:].any()  # the last batch ends in padding rows
  train_cfg = data_cfg(tiny_source, eval_fraction=0.4, num_epochs=1, global_batch_size=1, seq_len=16)
  train_docs = docs_in(stream(list(make_iterator(train_cfg, tok, split="train"))), tok)
  assert set(train_docs).isdisjoint(eval_docs)
  assert list(make_iterator(data_cfg(tiny_source, eval_fraction=0.0), tok, split="eval")) == []


def test_bad_records_are_skipped_and_reported_in_metrics(tmp_path, tok):
  path = tmp_path / "gaps.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one", "", "two", "  ", "three"])
                  + "not json\n")
  cfg = data_cfg(str(path), eval_fraction=0.0, num_epochs=1, shuffle=False, global_batch_size=1)
  it = make_iterator(cfg, tok, split="train")
  assert docs_in(stream(it), tok) == ["one", "two", "three"]
  assert it.metrics() == {"data_skipped": 3.0, "data_skipped/empty_document": 2.0,
                          "data_skipped/invalid_json": 1.0}
  cfg.data.bad_records = "fail"
  with pytest.raises(DataError, match=r"gaps\.jsonl:2: the document is empty"):
    make_iterator(cfg, tok, split="train")


@pytest.mark.parametrize("policy", ["split", "truncate", "skip", "fail"])
def test_long_document_policies(tmp_path, tok, policy):
  long_doc = " ".join(f"w{i}" for i in range(40))
  n = len(tok.encode(long_doc))
  assert n + 1 > 16
  # Counts live in the pipeline state, which lags by the documents of the row being
  # packed; the fillers move the packer past the long document.
  fillers = [f"filler {i}." for i in range(6)]
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["short", long_doc] + fillers))
  cfg = data_cfg(str(path), eval_fraction=0.0, num_epochs=1, shuffle=False, global_batch_size=1,
                 seq_len=16, long_documents=policy)
  it = make_iterator(cfg, tok, split="train")
  if policy == "fail":
    with pytest.raises(DataError, match=rf"docs\.jsonl:2: {n} tokens, longer than data.seq_len=16"):
      list(it)
    return
  batches = list(it)
  for batch in batches:
    check_rows(batch, tok)
  docs = docs_in(stream(batches), tok)
  metrics = it.metrics()
  if policy == "split":  # whole, over several rows: positions restart in each row
    assert docs == ["short", long_doc] + fillers and metrics == {"data_skipped": 0.0}
  elif policy == "truncate":  # its first 16 positions: [bos] + 15 tokens, no eos
    assert docs == ["short", tok.decode(tok.encode(long_doc)[:15])] + fillers
    assert metrics == {"data_skipped": 0.0, "data_truncated": 1.0}
  else:
    assert docs == ["short"] + fillers
    assert metrics == {"data_skipped": 1.0, "data_skipped/long_document": 1.0}


def _component_of(batch, tok) -> list[str]:
  """For each row: "A" or "B" by the words its documents hold (rows never mix components)."""
  out = []
  for row, seg in zip(batch["inputs"], batch["segment_ids"]):
    text = tok.decode(row[seg > 0])
    kinds = {k for k, c in (("A", "x"), ("B", "q")) if c in text}
    assert len(kinds) == 1, text
    out.append(kinds.pop())
  return out


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("mix")
  # Every piece of an A document holds an "x", of a B document a "q".
  a = write_corpus(root / "a", [" ".join(["xenon"] * (i + 2)) for i in range(12)], "jsonl")
  b = write_corpus(root / "b", [" ".join(["quartz"] * (i + 3)) for i in range(5)], "parquet")
  return a, b


def test_mixture_proportions_are_exact_and_deterministic(tok, two_sources):
  a, b = two_sources
  cfg = data_cfg(eval_fraction=0.0, global_batch_size=10, seq_len=8, mixture=((a, 0.7), (b, 0.3)))
  it = make_iterator(cfg, tok, split="train")
  batches = take(it, 12)  # many epochs of b (the smaller source) and of a
  it.close()
  for batch in batches:
    check_rows(batch, tok)
    assert _component_of(batch, tok).count("A") == 7  # 7 of every 10 rows, every batch
  again = make_iterator(cfg, tok, split="train")
  assert_batches_equal(take(again, 12), batches)
  again.close()
  cfg.seed = 1
  other = make_iterator(cfg, tok, split="train")
  with pytest.raises(AssertionError):
    assert_batches_equal(take(other, 12), batches)
  other.close()
  cfg.seed = 0
  cfg.data.global_batch_size = 4
  _check_resume(cfg, tok, 24, [1, 5, 11, 17])  # across epochs of both components

  cfg.data.mixture = ((a, 1), (b, 3))
  it = make_iterator(cfg, tok, split="train")
  rows = [c for batch in take(it, 10) for c in _component_of(batch, tok)]
  it.close()
  assert rows.count("B") == 30


def test_mixture_eval_covers_every_component(tok, two_sources):
  a, b = two_sources
  cfg = data_cfg(eval_fraction=0.2, global_batch_size=2, seq_len=8, mixture=((a, 0.5), (b, 0.5)))
  docs = docs_in(stream(list(make_iterator(cfg, tok, split="eval"))), tok)
  assert any("xenon" in d for d in docs) and any("quartz" in d for d in docs)


def test_a_script_may_exit_with_its_iterator_open(tmp_path):
  """A prefetching iterator left open at exit is closed first (its thread used to abort
  the interpreter: "terminate called without an active exception", status 134)."""
  script = ("from lmjax import config, data\n"
            "cfg = config.default_config()\n"
            f"cfg.data.tokenizer_cache = {str(tmp_path)!r}\n"
            "tok = data.get_tokenizer(cfg.data, cfg.model.vocab_size)\n"
            "it = data.make_iterator(cfg, tok, split='train')\n"
            "print(next(it)['inputs'].shape, it.get_state() is not None)\n")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0 and "terminate" not in out.stderr, out.stderr[-2000:]
  assert "Exception ignored" not in out.stderr, out.stderr[-2000:]
  assert out.stdout.strip() == "(16, 128) True"
