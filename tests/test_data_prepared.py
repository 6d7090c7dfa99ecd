"""Tests of prepared datasets: tools/prepare_data.py, the row format, and the elastic order
(global batches a function of seed and step alone, whatever the process count)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from lmjax.data import (
    BATCH_KEYS,
    DataError,
    default_documents,
    get_tokenizer,
    is_prepared,
    load_documents,
    make_iterator,
    prepare,
    read_metadata,
)
from lmjax.data import prepared_reader
from tests.test_data import (  # noqa: F401 - fixtures
    TINY_DOCS,
    assert_batches_equal,
    check_rows,
    data_cfg,
    docs_in,
    stream,
    take,
    tok,
    write_corpus,
)
from tools import prepare_data

SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
  """Thirty short documents (a few rows each) as JSONL, one malformed line among them."""
  root = tmp_path_factory.mktemp("corpus")
  docs = [" ".join(default_documents()[i % 40].split()[:12 + i % 9]) for i in range(30)]
  path = root / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[:10]) + "{oops\n"
                  + "".join(json.dumps({"text": d}) + "\n" for d in docs[10:]))
  return str(path)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, corpus, tok) -> str:
  out = str(tmp_path_factory.mktemp("prep") / "ds")
  prepare([corpus], out, tok, seq_len=SEQ)
  return out


def _all_rows(directory: str, split: str = "train") -> dict[str, np.ndarray]:
  comp = prepared_reader._Component(directory, 1.0)
  import grain
  source = grain.sources.ArrayRecordDataSource(comp.files(split))
  return comp.decoder([source[i] for i in range(len(source))])


def _elastic_cfg(source, **data):
  return data_cfg(source, **{"seq_len": SEQ, "global_batch_size": 8, **data})


def _run(cfg, process_count: int, state: dict | None, n: int) -> tuple[list[dict], dict]:
  """``n`` global batches read by ``process_count`` processes (rows concatenated in process
  order) starting from ``state``, and the state they end at (checked equal on all)."""
  its = [make_iterator(cfg, None, split="train", process_index=i, process_count=process_count)
         for i in range(process_count)]
  for it in its:
    assert it.topology_independent
    if state is not None:
      it.set_state(json.loads(json.dumps(state)))
  batches = []
  for _ in range(n):
    parts = [next(it) for it in its]
    batches.append({k: np.concatenate([p[k] for p in parts]) for k in BATCH_KEYS})
  states = [it.get_state() for it in its]
  assert all(s == states[0] for s in states)  # one global position
  for it in its:
    it.close()
  return batches, states[0]


# --- preparing ------------------------------------------------------------------------------


@pytest.mark.parametrize("long_documents", ["split", "truncate"])
def test_prepared_rows_equal_the_raw_pipeline_rows(tmp_path, tok, corpus, long_documents):
  out = str(tmp_path / "ds")
  meta = prepare([corpus], out, tok, seq_len=SEQ, long_documents=long_documents)
  cfg = data_cfg(corpus, seq_len=SEQ, eval_fraction=0.0, shuffle=False, num_epochs=1,
                 global_batch_size=1, long_documents=long_documents)
  raw = list(make_iterator(cfg, tok, split="train"))
  rows = _all_rows(out)
  assert len(raw) == meta["splits"]["train"]["rows"] == len(rows["inputs"])
  for key in BATCH_KEYS:
    np.testing.assert_array_equal(np.concatenate([b[key] for b in raw]), rows[key], err_msg=key)
  check_rows(rows, tok)
  long = sum(len(tok.encode(d)) + 1 > SEQ for d in load_documents(corpus))
  assert long > 10 and meta["splits"]["train"]["truncated"] == (0 if long_documents == "split" else long)


def test_prepare_writes_a_described_directory(prepared, tok):
  assert is_prepared(prepared)
  meta = read_metadata(prepared)
  assert meta["seq_len"] == SEQ and meta["token_dtype"] == "uint16"
  assert meta["tokenizer"]["sha256"] == tok.sha256
  train = meta["splits"]["train"]
  assert train["documents"] == 30 and meta["splits"]["eval"]["documents"] == 0
  assert sorted(os.listdir(prepared)) == ["lmjax_data.json", "tokenizer.model", "train-00000.arrayrecord"]
  assert train["tokens"] + train["padding"] == train["rows"] * SEQ and train["padding"] < SEQ
  assert meta["skipped"] == {"invalid_json": 1}
  assert ":11: not valid JSON" in meta["skipped_examples"]["invalid_json"][0]
  assert get_tokenizer(data_cfg(prepared, seq_len=SEQ).data, 1).sha256 == tok.sha256
  with pytest.raises(DataError, match="exists; choose another output or pass --overwrite"):
    prepare([prepared], prepared, tok, seq_len=SEQ)
  with pytest.raises(DataError, match="a prepared dataset .* is not a source of raw documents"):
    prepare([prepared], prepared + "-again", tok, seq_len=SEQ)


def test_prepare_tool_prints_a_summary(tmp_path, tok, corpus, capsys):
  (tmp_path / "empty.txt").write_text("")
  out = tmp_path / "ds"
  shards = 5 * SEQ * (2 + 2 + 2) / 2**20  # five rows (uint16 inputs, targets, segments)
  argv = ["--source", corpus, "--source", str(tmp_path / "*.txt"), "--source", str(tmp_path / "nope"),
          "--tokenizer", tok.path, "--seq_len", str(SEQ), "--eval_fraction", "0.2",
          "--output", str(out), "--no_progress", "--shard_mb", str(shards * 1.0001)]
  assert prepare_data.main(argv) == 0
  text = capsys.readouterr().out
  meta = read_metadata(str(out))
  tr, ev = meta["splits"]["train"], meta["splits"]["eval"]
  assert f"documents   30 (train {tr['documents']}, eval {ev['documents']})" in text
  assert f"tokens      {tr['tokens'] + ev['tokens']:,}" in text
  assert "skipped     3 records:" in text
  for reason in ("invalid_json", "empty_file", "missing_path"):
    assert reason in text and meta["skipped"][reason] == 1
  assert "docs.jsonl:11: not valid JSON" in text and "empty.txt: the file is empty" in text
  assert len(tr["files"]) == -(-tr["rows"] // 5) > 1  # rows spread over 5-row shards
  assert f"--config.data.source={out} --config.data.seq_len={SEQ}" in text
  assert prepare_data.main(argv) == 2 and "pass --overwrite" in capsys.readouterr().err
  assert prepare_data.main(argv + ["--overwrite", "--bad_records", "fail"]) == 2
  assert "docs.jsonl:11: not valid JSON" in capsys.readouterr().err
  assert read_metadata(str(out)) == meta  # a failed run leaves the old dataset as it was
  assert not os.path.exists(str(out) + ".partial")


def test_prepare_tool_warns_when_the_eval_split_is_empty(tmp_path, tok, corpus, capsys):
  argv = ["--source", corpus, "--tokenizer", tok.path, "--seq_len", str(SEQ), "--no_progress"]
  assert prepare_data.main(argv + ["--eval_fraction", "0.001", "--output", str(tmp_path / "a")]) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert read_metadata(str(tmp_path / "a"))["splits"]["eval"]["documents"] == 0
  assert err == ["warning: the eval split is empty: --eval_fraction 0.001 held out none of the 30 "
                 "documents, so training reports no eval loss; raise --eval_fraction (e.g. "
                 "--eval_fraction 0.13 holds out about 4)."]
  assert prepare_data.main(argv + ["--eval_fraction", "0.13", "--output", str(tmp_path / "b")]) == 0
  assert read_metadata(str(tmp_path / "b"))["splits"]["eval"]["documents"] > 0
  assert "warning" not in capsys.readouterr().err


def test_held_out_split_is_by_content(tmp_path, tok):
  docs = [f"document number {i} about things." for i in range(60)] + ["a duplicated document."] * 8
  source = write_corpus(tmp_path, docs, "jsonl")
  meta = prepare([source], str(tmp_path / "ds"), tok, seq_len=SEQ, eval_fraction=0.25)
  ev = meta["splits"]["eval"]
  assert 5 <= ev["documents"] <= 30 and ev["documents"] + meta["splits"]["train"]["documents"] == 68
  train_docs = docs_in(stream([_all_rows(str(tmp_path / "ds"))]), tok)
  eval_docs = docs_in(stream([_all_rows(str(tmp_path / "ds"), "eval")]), tok)
  assert set(train_docs).isdisjoint(eval_docs)  # duplicates land on one side
  again = prepare([source], str(tmp_path / "ds2"), tok, seq_len=SEQ, eval_fraction=0.25)
  assert again["splits"]["eval"]["sha256"] == ev["sha256"]
  # The eval iterator: every eval row once, each process reading the same slice of each batch.
  cfg = _elastic_cfg(str(tmp_path / "ds"), global_batch_size=4)
  whole = list(make_iterator(cfg, None, split="eval"))
  assert docs_in(stream(whole), tok) == eval_docs
  parts = [list(make_iterator(cfg, None, split="eval", process_index=i, process_count=2))
           for i in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(whole)
  for w, a, b in zip(whole, *parts):
    for k in BATCH_KEYS:
      np.testing.assert_array_equal(w[k], np.concatenate([a[k], b[k]]))


# --- the elastic order ----------------------------------------------------------------------


def test_order_is_a_function_of_seed_and_step(prepared, tok):
  cfg = _elastic_cfg(prepared)
  rows = read_metadata(prepared)["splits"]["train"]["rows"]
  per_epoch = rows // 8
  reference, state = _run(cfg, 1, None, 3 * per_epoch)
  assert state["rows"] == 3 * per_epoch * 8
  for batch in reference:
    check_rows(batch, tok)
  # Each epoch is a new permutation of all rows.
  flat = np.concatenate([b["inputs"] for b in reference])
  all_rows = _all_rows(prepared)["inputs"]
  key = lambda a: sorted(map(bytes, a))
  epoch0, epoch1 = flat[:rows], flat[rows:2 * rows]
  assert len(flat) >= 2 * rows
  assert key(epoch0) == key(all_rows) == key(epoch1)
  assert not np.array_equal(epoch0[:8], epoch1[:8])
  # 2 or 4 processes from the start: the same global batches.
  for count in (2, 4):
    batches, end = _run(cfg, count, None, 3 * per_epoch)
    assert_batches_equal(batches, reference)
    assert end == state
  cfg.seed = 1
  with pytest.raises(AssertionError):
    assert_batches_equal(_run(cfg, 1, None, 2)[0], reference[:2])


def test_resume_on_another_process_count_continues_exactly(prepared):
  cfg = _elastic_cfg(prepared)
  per_epoch = read_metadata(prepared)["splits"]["train"]["rows"] // 8
  total = 3 * per_epoch + 2
  reference, _ = _run(cfg, 1, None, total)
  for k in (1, per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch):  # epoch boundaries too
    for count in (2, 4):
      head, state = _run(cfg, 1, None, k)
      tail, _ = _run(cfg, count, state, total - k)
      assert_batches_equal(head + tail, reference)
  # 1 -> 4 -> 2 -> 1 processes, in stages.
  a, s = _run(cfg, 1, None, 3)
  b, s = _run(cfg, 4, s, per_epoch)
  c, s = _run(cfg, 2, s, 4)
  d, s = _run(cfg, 1, s, total - 7 - per_epoch)
  assert_batches_equal(a + b + c + d, reference)
  assert s["rows"] == total * 8


def test_resume_with_another_global_batch_size_continues_at_the_next_row(prepared):
  cfg = _elastic_cfg(prepared)
  reference = np.concatenate([b["inputs"] for b in _run(cfg, 1, None, 12)[0]])
  _, state = _run(cfg, 2, None, 5)  # 40 rows
  cfg.data.global_batch_size = 4
  tail = np.concatenate([b["inputs"] for b in _run(cfg, 4, state, 14)[0]])
  np.testing.assert_array_equal(tail, reference[40:96])


def test_mixture_of_prepared_datasets(tmp_path, prepared, tok):
  other = [" ".join(["quartz"] * (i + 3)) for i in range(9)]
  b = str(tmp_path / "b")
  prepare([write_corpus(tmp_path / "src", other, "parquet")], b, tok, seq_len=SEQ)
  cfg = _elastic_cfg("default", mixture=((prepared, 0.75), (b, 0.25)))
  reference, _ = _run(cfg, 1, None, 12)
  for batch in reference:
    quartz = ["quartz" in tok.decode(r[s > 0]) for r, s in zip(batch["inputs"], batch["segment_ids"])]
    assert sum(quartz) == 2  # 2 of every 8 rows
  _, state = _run(cfg, 1, None, 5)
  assert_batches_equal(_run(cfg, 2, state, 7)[0], reference[5:])
  cfg.data.mixture = ((prepared, 0.5), (str(tmp_path / "src"), 0.5))
  with pytest.raises(DataError, match="mixes prepared datasets with raw sources"):
    make_iterator(cfg, tok, split="train")


@pytest.mark.slow
def test_workers_and_prefetch_keep_the_order(prepared):
  cfg = _elastic_cfg(prepared)
  reference, _ = _run(cfg, 1, None, 9)
  _, state = _run(cfg, 2, None, 4)
  cfg.data.worker_count, cfg.data.prefetch = 2, 3  # two worker processes, batches interleaved
  batches, end = _run(cfg, 1, state, 5)
  assert_batches_equal(batches, reference[4:])
  assert end["rows"] == 9 * 8


def test_finite_epochs_end_after_whole_global_batches(prepared):
  cfg = _elastic_cfg(prepared, num_epochs=2)
  rows = read_metadata(prepared)["splits"]["train"]["rows"]
  it = make_iterator(cfg, None, split="train")
  assert len(list(it)) == 2 * rows // 8
  it = make_iterator(cfg, None, split="train", process_index=1, process_count=2)
  it.set_state({"format": "lmjax-packed-rows", "rows": 2 * rows - 9, "dataset": "other"})
  assert len(list(it)) == 1  # the last partial global batch is dropped


def test_prepared_errors(prepared, tok, tmp_path):
  with pytest.raises(DataError, match=r"config.data.seq_len=32, but .* holds rows of 16"):
    make_iterator(data_cfg(prepared, seq_len=32), tok, split="train")
  from lmjax.data import train_tokenizer
  other = train_tokenizer(TINY_DOCS * 3, 320, str(tmp_path / "other.model"))
  cfg = data_cfg(prepared, seq_len=SEQ, tokenizer=other.path)
  with pytest.raises(DataError, match="is not the tokenizer .* was prepared with"):
    get_tokenizer(cfg.data, 320)
  it = make_iterator(data_cfg(prepared, seq_len=SEQ), tok, split="train")
  with pytest.raises(DataError, match="not written by a prepared-data iterator"):
    it.set_state({"next_index": 3})
  damaged = tmp_path / "damaged"
  shutil.copytree(prepared, damaged)
  shard = damaged / "train-00000.arrayrecord"
  data = shard.read_bytes()
  shard.write_bytes(data[:1000] + bytes(64) + data[1064:])  # damaged records near the start
  damaged_cfg = data_cfg(str(damaged), seq_len=SEQ, shuffle=False, num_epochs=1)
  it = make_iterator(damaged_cfg, tok, split="train")
  with pytest.raises(DataError, match=r"damaged/train-00000\.arrayrecord record \d+: cannot be read"):
    list(it)
  shard.write_bytes(data[:len(data) - 64])  # a truncated file: its index is gone
  with pytest.raises(DataError, match=r"damaged/train-00000\.arrayrecord: cannot be opened"):
    make_iterator(data_cfg(str(damaged), seq_len=SEQ), tok, split="train")
  meta = json.loads(open(os.path.join(prepared, "lmjax_data.json")).read())
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "lmjax_data.json").write_text(json.dumps({**meta, "version": 99}))
  with pytest.raises(DataError, match="version 99; this lmjax reads"):
    make_iterator(data_cfg(str(broken), seq_len=SEQ), tok, split="train")


def test_checkpointed_data_positions(tmp_path, prepared, tok):
  """The data item: one global.json for prepared data, per-process files for raw text,
  and clear errors when a checkpoint cannot be restored into this run's iterator."""
  from etils import epath

  from lmjax.checkpoint import DataHandler, DataRestore, DataSave
  handler = DataHandler()
  elastic = make_iterator(_elastic_cfg(prepared), None, split="train")
  take(elastic, 3)
  (tmp_path / "a").mkdir()
  handler.save(epath.Path(tmp_path / "a"), DataSave(elastic))
  assert os.listdir(tmp_path / "a") == ["global.json"]
  fresh = make_iterator(_elastic_cfg(prepared), None, split="train", process_index=1,
                        process_count=4)
  handler.restore(epath.Path(tmp_path / "a"), DataRestore(fresh))
  assert fresh.rows == 24

  raw = make_iterator(data_cfg(write_corpus(tmp_path / "raw", TINY_DOCS, "jsonl")), tok,
                      split="train")
  (tmp_path / "b").mkdir()
  handler.save(epath.Path(tmp_path / "b"), DataSave(raw))
  assert os.listdir(tmp_path / "b") == ["process_0-of-1.json"]
  with pytest.raises(DataError, match="saved by a prepared .* this run reads raw-text"):
    handler.restore(epath.Path(tmp_path / "a"), DataRestore(raw))
  os.rename(tmp_path / "b" / "process_0-of-1.json", tmp_path / "b" / "process_0-of-2.json")
  with pytest.raises(DataError, match="saved: process_0-of-2.json.*resume with the process count"):
    handler.restore(epath.Path(tmp_path / "b"), DataRestore(raw))
  raw.close()
