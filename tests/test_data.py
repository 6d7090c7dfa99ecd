"""Tests of lmjax.data's sources, readers, bad-record policy and tokenizers (CPU, seconds).

The helpers at the top (tiny corpora in every format, batch comparisons, packing checks)
are shared with the other tests/test_data_*.py files.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle

import numpy as np
import pytest

from lmjax.config import default_config
from lmjax.data import (
    BATCH_KEYS,
    DataError,
    SkipLog,
    Tokenizer,
    default_documents,
    get_tokenizer,
    load_documents,
    load_records,
    split_documents,
    train_tokenizer,
)
from lmjax.data import sources as sources_module
from lmjax.data import tokenizer as tokenizer_module

VOCAB = 1024

# A tiny corpus: an epoch is a few rows, so epoch boundaries come within a few batches.
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
FORMATS = ("txt", "jsonl", "parquet", "arrayrecord")


# --- shared helpers ------------------------------------------------------------------------


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
    n >>= 7
    if not n:
      return bytes(out)


def _len_field(number: int, payload: bytes) -> bytes:
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def tf_example(**features: bytes | int) -> bytes:
  """A serialised tf.train.Example (bytes or int64 features), written by hand."""
  entries = b""
  for name, value in features.items():
    if isinstance(value, bytes):
      feature = _len_field(1, _len_field(1, value))  # bytes_list
    else:
      feature = _len_field(3, _len_field(1, _varint(value)))  # int64_list, packed
    entries += _len_field(1, _len_field(1, name.encode()) + _len_field(2, feature))
  return _len_field(1, entries)


def write_array_record(path, records: list[bytes]) -> str:
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(path), "group_size:1")
  for r in records:
    writer.write(r)
  writer.close()
  return str(path)


def write_corpus(directory, docs: list[str], fmt: str, field: str = "text") -> str:
  """``docs`` as a source of format ``fmt`` under ``directory``; returns data.source."""
  directory.mkdir(parents=True, exist_ok=True)
  if fmt == "txt":  # two files of blank-line-separated blocks (read with txt_split="blank_line")
    half = len(docs) // 2
    for i, part in enumerate((docs[:half], docs[half:])):
      (directory / f"part{i}.txt").write_text("\n\n\n".join(part) + "\n")
    return str(directory / "*.txt")
  if fmt == "jsonl":
    path = directory / "docs.jsonl"
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)
  if fmt == "parquet":
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = directory / "docs.parquet"
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=3)
    return str(path)
  if fmt == "arrayrecord":
    return write_array_record(directory / "docs.arrayrecord",
                              [tf_example(**{field: d.encode(), "id": i}) for i, d in enumerate(docs)])
  raise ValueError(fmt)


def data_cfg(source: str = "default", **data):
  """A small config: rows of 32, 4 rows per batch, no prefetch thread."""
  cfg = default_config()
  cfg.data.source = source
  cfg.data.seq_len = 32
  cfg.data.global_batch_size = 4
  cfg.data.prefetch = 0
  for key, value in data.items():
    cfg.data[key] = value
  return cfg


def take(it, n: int) -> list[dict[str, np.ndarray]]:
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b) -> None:
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def stream(batches) -> list[int]:
  """The non-padding input tokens of all rows, in order."""
  out = []
  for batch in batches:
    for row, seg in zip(batch["inputs"], batch["segment_ids"]):
      out.extend(row[seg > 0].tolist())
  return out


def docs_in(tokens: list[int], tok: Tokenizer) -> list[str]:
  """Documents read back from a token stream ([bos] + ids of each, back to back)."""
  docs, current = [], None
  for t in tokens:
    if t == tok.bos_id:
      if current is not None:
        docs.append(tok.decode(current))
      current = []
    else:
      current.append(t)
  if current is not None:
    docs.append(tok.decode(current))
  return docs


def check_rows(batch, tok: Tokenizer) -> None:
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


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
  """One tokenizer per module, trained on the default corpus."""
  path = tmp_path_factory.mktemp("tok") / "default.model"
  return train_tokenizer(default_documents(), VOCAB, str(path))


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory) -> str:
  return write_corpus(tmp_path_factory.mktemp("tiny"), TINY_DOCS, "jsonl")


# --- sources and readers -------------------------------------------------------------------


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
  with gzip.open(tmp_path / "e.json.gz", "wt") as f:  # Dolma-style gzipped JSON lines
    f.write('{"text": "zipped"}\n')
  assert load_documents(str(tmp_path / "e.json.gz")) == ["zipped"]


def test_txt_blank_line_blocks_with_line_numbers(tmp_path):
  path = tmp_path / "blocks.txt"
  path.write_bytes(b"\n\nfirst block\nstill first\n\n\n  \nsecond\r\n\r\nthird\n")
  records = load_records(str(path), txt_split="blank_line")
  assert [r.text for r in records] == ["first block\nstill first", "second", "third"]
  assert [r.where for r in records] == [f"{path}:3", f"{path}:8", f"{path}:10"]
  assert load_documents(str(path)) == ["first block\nstill first\n\n\n  \nsecond\r\n\r\nthird"]
  with pytest.raises(DataError, match="txt_split"):
    load_documents(str(path), txt_split="paragraph")


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_documents(tmp_path, fmt):
  source = write_corpus(tmp_path, TINY_DOCS, fmt, field="body")
  records = load_records(source, text_field="body", txt_split="blank_line")
  assert [r.text for r in records] == TINY_DOCS
  assert all(r.path in source or r.path.startswith(str(tmp_path)) for r in records)


def test_parquet_and_arrayrecord_variants(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": [b"bytes column", b"ok"]}), tmp_path / "b.parquet")
  assert load_documents(str(tmp_path / "b.parquet")) == ["bytes column", "ok"]
  write_array_record(tmp_path / "t.arrayrecord", [b"plain text record", "caf\u00e9".encode()])
  assert load_documents(str(tmp_path / "t.arrayrecord")) == ["plain text record", "caf\u00e9"]
  write_array_record(tmp_path / "j.arrayrecord", [json.dumps({"text": "json record"}).encode()])
  assert load_documents(str(tmp_path / "j.arrayrecord")) == ["json record"]
  write_array_record(tmp_path / "e.arrayrecord", [tf_example(text=b"example", n=3)])
  assert load_documents(str(tmp_path / "e.arrayrecord")) == ["example"]


# Each case: files written next to a good one; the reason counted under "skip" and the
# message (file and line/row/record) that "skip" logs and "fail" raises.
BAD_INPUTS = [
    ("empty.txt", b"", "empty_file", r"empty\.txt: the file is empty"),
    ("blank.jsonl", b"\n\n", "empty_file", r"blank\.jsonl: the file is empty"),
    ("bad.txt", b"ok\nabc\xff\xfe", "invalid_utf8", r"bad\.txt:2: invalid UTF-8 at byte 6"),
    ("badline.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', "invalid_utf8", r"badline\.jsonl:2: invalid UTF-8"),
    ("surrogate.jsonl", b'{"text": "a\\ud800"}\n', "invalid_utf8", r"surrogate\.jsonl:1: .*unpaired surrogate"),
    ("bad.jsonl", b'{"text": "a"}\n{"text": oops}\n', "invalid_json", r"bad\.jsonl:2: not valid JSON"),
    ("nofield.jsonl", b'{"text": "a"}\n{"body": "b"}\n', "missing_field", r"nofield\.jsonl:2: no field 'text'"),
    ("notstr.jsonl", b'{"text": 5}\n', "invalid_field", r"notstr\.jsonl:1: field 'text' must be a string"),
    ("list.jsonl", b'["text"]\n', "invalid_json", r"list\.jsonl:1: expected a JSON object"),
    ("emptydoc.jsonl", b'{"text": "a"}\n{"text": "  "}\n', "empty_document", r"emptydoc\.jsonl:2: the document is empty"),
    ("data.csv", b"a,b\n", "unsupported_file", r"data\.csv: unknown extension"),
    ("trunc.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 50)[:30], "unreadable", r"trunc\.jsonl\.gz: could not be read"),
    ("corrupt.jsonl.gz", (lambda z: z[:12] + bytes(16) + z[28:])(gzip.compress(b'{"text": "a b c"}\n' * 50)),
     "unreadable", r"corrupt\.jsonl\.gz: could not be read"),
    ("junk.parquet", b"not parquet", "unreadable", r"junk\.parquet: not a readable Parquet file"),
    ("junk.arrayrecord", b"not an array record", "unreadable", r"junk\.arrayrecord: not a readable ArrayRecord"),
]


@pytest.mark.parametrize("name, content, reason, match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_skipped_and_counted_or_fails_naming_the_record(tmp_path, name, content, reason, match):
  (tmp_path / "good.jsonl").write_text('{"text": "good document"}\n')
  (tmp_path / name).write_bytes(content)
  skips = SkipLog("skip")
  docs = load_documents(str(tmp_path / "*"), skips=skips)
  assert "good document" in docs
  assert skips.counts[reason] >= 1 and skips.total == sum(skips.counts.values())
  assert any(__import__("re").search(match, m) for m in skips.examples[reason]), skips.examples
  with pytest.raises(DataError, match=match):
    load_documents(str(tmp_path / "*"), bad_records="fail")


def test_parquet_bad_columns_and_rows(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": ["fine", None, ""]}), tmp_path / "nulls.parquet")
  pq.write_table(pa.table({"body": ["x"]}), tmp_path / "other.parquet")
  pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
  skips = SkipLog()
  assert load_documents(str(tmp_path / "*.parquet"), skips=skips) == ["fine"]
  assert dict(skips.counts) == {"invalid_field": 2, "empty_document": 1, "missing_field": 1}
  text = " ".join(m for ms in skips.examples.values() for m in ms)
  assert "nulls.parquet row 2: column 'text' is null" in text
  assert "nulls.parquet row 3: the document is empty" in text
  assert "other.parquet: no column 'text' (columns: body)" in text
  assert "ints.parquet: column 'text' must hold strings, it holds int64" in text


def test_arrayrecord_bad_records_name_the_record(tmp_path):
  write_array_record(tmp_path / "e.arrayrecord",
                     [tf_example(text=b"one"), tf_example(body=b"two"), tf_example(text=b"\xff")])
  skips = SkipLog()
  assert load_documents(str(tmp_path / "e.arrayrecord"), skips=skips) == ["one"]
  assert dict(skips.counts) == {"missing_field": 1, "invalid_utf8": 1}
  assert skips.examples["missing_field"][0].startswith(f"{tmp_path}/e.arrayrecord record 2:")
  assert skips.examples["invalid_utf8"][0].startswith(f"{tmp_path}/e.arrayrecord record 3:")


def test_missing_paths(tmp_path):
  with pytest.raises(DataError, match=r"(?s)no usable documents.*missing_path: 1.*no such file or directory"):
    load_documents(str(tmp_path / "missing.txt"))
  with pytest.raises(DataError, match="glob matches no files"):
    load_documents(str(tmp_path / "*.jsonl"))
  with pytest.raises(DataError, match="directory holds no .txt"):
    load_documents(str(tmp_path))
  with pytest.raises(DataError, match="missing.txt: no such file or directory.*bad_records='fail'"):
    load_documents(str(tmp_path / "missing.txt"), bad_records="fail")
  assert issubclass(DataError, ValueError)


def test_skip_log_keeps_a_few_examples_per_reason(caplog):
  skips = SkipLog()
  for i in range(10):
    skips.bad("invalid_json", f"f.jsonl:{i}", "not valid JSON")
  assert skips.counts["invalid_json"] == 10 and len(skips.examples["invalid_json"]) == 3
  assert len([r for r in caplog.records if "invalid_json" in r.getMessage()]) == 3
  assert "invalid_json: 10  (e.g. f.jsonl:0: not valid JSON.)" in skips.summary()


def test_loaded_sources_are_cached_until_a_file_changes(tmp_path, monkeypatch):
  path = tmp_path / "a.jsonl"
  path.write_text('{"text": "one"}\n')
  first, _ = sources_module.cached_records(str(path))
  assert sources_module.cached_records(str(path))[0] is first
  path.write_text('{"text": "one"}\n{"text": "two"}\n')
  os.utime(path, ns=(1, 1))  # a different mtime even on coarse clocks
  assert [d.text for d in sources_module.cached_records(str(path))[0]] == ["one", "two"]


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


# --- tokenizer -----------------------------------------------------------------------------


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
  assert clone.encode(text) == ids and clone.path == tok.path and clone.sha256 == tok.sha256


def test_tokenizer_training_is_deterministic(tmp_path, tok):
  again = train_tokenizer(default_documents(), VOCAB, str(tmp_path / "again.model"))
  with open(tok.path, "rb") as a, open(again.path, "rb") as b:
    assert a.read() == b.read()
  assert again.sha256 == tok.sha256
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # atomic write left nothing


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_special_tokens_are_single_pieces(tmp_path, model_type):
  special = ["<|im_start|>", "<|im_end|>", "<tool>"]
  tok = train_tokenizer(default_documents()[:30], 512, str(tmp_path / "s.model"), model_type,
                        special_tokens=special)
  assert tok.vocab_size == 512 and tok.special_tokens == special
  assert [tok.token_id(t) for t in special] == [5, 6, 7]  # after pad/unk/bos/eos and newline
  text = "<|im_start|>user\nhi 日本<tool><|im_end|>"
  ids = tok.encode(text)
  assert ids.count(5) == 1 and ids[-2:] == [7, 6]  # (a leading "▁" piece may come first)
  assert tok.decode(ids) == text  # byte fallback: nothing is unknown
  assert tok.processor.unk_id() not in ids
  with pytest.raises(DataError, match="no piece"):
    tok.token_id("<absent>")
  with pytest.raises(DataError, match="duplicates"):
    train_tokenizer(["a b"], 300, str(tmp_path / "d.model"), special_tokens=["<x>", "<x>"])


def test_a_corpus_of_lines_over_64_kib_trains_a_tokenizer(tmp_path, caplog):
  """sentencepiece drops training lines over max_sentence_length bytes: lines are split."""
  rng = np.random.default_rng(0)
  words = np.array(["alpha", "beta", "gamma", "délta", "ωmega", "数据", "code", "x=1;"])
  spaced = [" ".join(rng.choice(words, 14_000)) for _ in range(3)]  # ~90 KB, one line each
  # 30,000 characters but 90,000 bytes and no whitespace: cut at a character boundary.
  solid = "数据" * 15_000
  docs = spaced + [solid, "a short document\n" + spaced[0][:70_000]]
  assert all(len(d.encode()) > 1 << 16 for d in docs[:4]) and len(solid) < 1 << 16
  tok = train_tokenizer(docs, 340, str(tmp_path / "long.model"))  # 256 byte pieces + 84
  assert tok.vocab_size == 340
  for doc in docs:
    ids = tok.encode(doc)
    assert tok.decode(ids) == doc and len(ids) < len(doc.encode()) // 4  # words were learnt
  warned = [r.getMessage() for r in caplog.records if "max_sentence_length" in r.getMessage()]
  assert len(warned) == 1 and "5 line(s) longer than" in warned[0], warned
  pieces = tokenizer_module._split_line(spaced[0] + "\t" + solid, 1 << 16)
  assert "".join(pieces) == spaced[0] + "\t" + solid
  assert all(len(p.encode()) <= 1 << 16 for p in pieces)
  assert pieces[1].startswith(" ")  # cut before a space


def test_tokenizer_load_errors(tmp_path, tok):
  assert Tokenizer.load(tok.path).encode("hello world") == tok.encode("hello world")
  with pytest.raises(DataError, match="no such file"):
    Tokenizer.load(str(tmp_path / "missing.model"))
  (tmp_path / "corrupt.model").write_bytes(b"not a sentencepiece model")
  with pytest.raises(DataError, match="corrupt.model: not a valid sentencepiece model"):
    Tokenizer.load(str(tmp_path / "corrupt.model"))
  with pytest.raises(DataError, match="Vocabulary size too high.*lower model.vocab_size .the tools' --vocab_size."):
    train_tokenizer(TINY_DOCS, VOCAB, str(tmp_path / "too_big.model"))
  with pytest.raises(DataError, match="smaller than required_chars") as e:  # needs a larger one
    train_tokenizer(default_documents()[:40], 320, str(tmp_path / "too_small.model"))
  assert "lower model.vocab_size" not in str(e.value)


def test_get_tokenizer_caches_by_content(tmp_path, monkeypatch, tiny_source, tok):
  cfg = data_cfg(tiny_source, tokenizer_cache=str(tmp_path / "cache"))
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


def test_config_choices_match_the_data_modules():
  from lmjax import config
  from lmjax.data import packing, readers, sources
  assert config.TXT_SPLITS == readers.TXT_SPLITS
  assert config.BAD_RECORD_POLICIES == sources.BAD_RECORD_POLICIES
  assert config.LONG_DOCUMENT_POLICIES == packing.LONG_DOCUMENT_POLICIES


@pytest.mark.parametrize("key, value, needle", [
    ("txt_split", "lines", "config.data.txt_split: must be one of"),
    ("bad_records", "ignore", "config.data.bad_records: must be one of"),
    ("long_documents", "chop", "config.data.long_documents: must be one of"),
    ("mixture", (("a.jsonl", 0.7), ("b.jsonl", 0)), r"config.data.mixture\[1\]: must be \(source, weight > 0\)"),
    ("mixture", (("a.jsonl",),), r"config.data.mixture\[0\]"),
    ("num_epochs", 0, "config.data.num_epochs: must be positive or -1"),
    ("prefetch", -1, "config.data.prefetch: must be >= 0"),
])
def test_config_rejects_bad_data_fields(key, value, needle):
  from lmjax.config import ConfigError, validate
  cfg = default_config()
  cfg.data[key] = value
  with pytest.raises(ConfigError, match=needle):
    validate(cfg)
