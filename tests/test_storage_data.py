"""Data sources, prepared datasets, tokenizers and Hugging Face checkpoints in buckets.

Every test runs against the real S3 server and GCS emulator of the ``stores`` fixture, once
per scheme, and compares what lmjax reads from a bucket with what it reads from the same
files on local disk (the independent reference). While they run, nothing may be written but
to the cache ($LMJAX_CACHE) and the test's own tmp_path: the working directory, $HOME and
the temporary directory are empty ones, checked after each test, and the checkout is
compared before and after the module.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
import uuid
from pathlib import Path

import jax
import numpy as np
import pytest

from lmjax import storage
from lmjax.config import ConfigError
from lmjax.data import (
    DataError,
    SkipLog,
    Tokenizer,
    default_documents,
    get_tokenizer,
    is_prepared,
    load_records,
    make_iterator,
    read_metadata,
    train_tokenizer,
)
from lmjax.data import finetune
from lmjax.data.sources import cached_records
from lmjax.evaluate import read_choices
from lmjax.storage import StorageError
from tests.test_data import (  # noqa: F401 - fixtures
    TINY_DOCS,
    assert_batches_equal,
    data_cfg,
    take,
    tok,
    write_array_record,
)
from tools import prepare_data
from tools import train_tokenizer as train_tokenizer_tool

ROOT = Path(__file__).resolve().parents[1]
SCHEMES = ["s3", "gs"]
KINDS = ["a.txt", "b.txt.gz", "c.jsonl", "d.jsonl.gz", "e.json", "f.parquet", "g.arrayrecord"]


def _checkout() -> set[str]:
  """The files of the checkout, less git's and Python's own."""
  out = set()
  for root, dirs, files in os.walk(ROOT):
    dirs[:] = [d for d in dirs if d not in (".git", "__pycache__", ".pytest_cache")]
    out.update(os.path.relpath(os.path.join(root, f), ROOT) for f in files)
  return out


@pytest.fixture(scope="module", autouse=True)
def checkout_unchanged():
  before = _checkout()
  yield
  assert _checkout() == before, f"files written into the checkout: {_checkout() ^ before}"


@pytest.fixture(autouse=True)
def only_cache_and_tmp_path(tmp_path, monkeypatch):
  """An empty working directory, $HOME and temporary directory, and a fresh cache; after
  the test the first three must still be empty."""
  stray = {name: tmp_path / f"stray-{name}" for name in ("cwd", "home", "tmp")}
  for d in stray.values():
    d.mkdir()
  monkeypatch.chdir(stray["cwd"])
  monkeypatch.setenv("HOME", str(stray["home"]))
  monkeypatch.setattr(tempfile, "tempdir", str(stray["tmp"]))
  monkeypatch.setenv("LMJAX_CACHE", str(tmp_path / "cache"))
  yield
  for name, d in stray.items():
    found = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    assert not found, f"written outside the cache and tmp_path ({name}): {found}"


def _jsonl(docs, field="text") -> str:
  return "".join(json.dumps({field: d}) + "\n" for d in docs)


def _upload(local: Path, url: str) -> str:
  """Every file under ``local`` written to the same place under ``url``; returns ``url``."""
  for p in sorted(local.rglob("*")):
    if p.is_file():
      storage.write_bytes(f"{url}/{p.relative_to(local).as_posix()}", p.read_bytes())
  return url


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
  """One small file of every supported kind, another a level down, and one of no kind."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  root = tmp_path_factory.mktemp("corpus")
  more = default_documents()
  (root / "a.txt").write_text(TINY_DOCS[0])
  (root / "b.txt.gz").write_bytes(gzip.compress(TINY_DOCS[1].encode()))
  (root / "c.jsonl").write_text(_jsonl(TINY_DOCS[2:4]))
  (root / "d.jsonl.gz").write_bytes(gzip.compress(_jsonl(TINY_DOCS[4:6]).encode()))
  (root / "e.json").write_text(_jsonl(TINY_DOCS[6:8]))
  pq.write_table(pa.table({"text": more[:4]}), root / "f.parquet", row_group_size=1)
  write_array_record(root / "g.arrayrecord", [d.encode() for d in more[4:7]])
  (root / "notes.md").write_text("no source")
  (root / "sub").mkdir()
  (root / "sub" / "h.jsonl").write_text(_jsonl(more[7:10]))
  return root


@pytest.fixture(scope="module", params=SCHEMES)
def remote(request, stores, corpus) -> str:
  """A bucket holding the corpus under ``docs/``: the URL of that prefix."""
  return _upload(corpus, f"{stores.bucket(request.param)}/docs")


@pytest.fixture(params=SCHEMES)
def bucket(request, stores) -> str:
  return stores.bucket(request.param)


def _records(source, **kw):
  return [(d.text, d.index, d.unit) for d in load_records(source, **kw)]


# --- raw sources --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_of_file_reads_as_the_local_file(remote, corpus, kind, tmp_path):
  want = _records(str(corpus / kind))
  assert len(want) >= 1
  docs = load_records(f"{remote}/{kind}")
  assert [(d.text, d.index, d.unit) for d in docs] == want
  assert all(d.path == f"{remote}/{kind}" for d in docs)  # documents name the URL
  if kind.endswith(".arrayrecord"):  # read from a copy in the cache
    copies = list((tmp_path / "cache" / "remote").rglob(kind))
    assert len(copies) == 1 and copies[0].read_bytes() == (corpus / kind).read_bytes()


def test_directories_and_globs_give_the_local_batches(remote, corpus, tok):
  # A directory: every supported file directly in it (not sub/, not notes.md).
  assert _records(remote) == _records(str(corpus))
  assert len(_records(remote)) == 2 + 2 + 2 + 2 + 4 + 3  # KINDS' documents
  # A glob; "**" recurses into sub/.
  assert _records(f"{remote}/**/*.jsonl") == _records(str(corpus / "**" / "*.jsonl"))
  assert len(_records(f"{remote}/**/*.jsonl")) == 2 + 3
  assert _records(f"{remote}/*.txt*", txt_split="blank_line") == _records(
      str(corpus / "*.txt*"), txt_split="blank_line")
  # The pipeline's batches, train and held out.
  for split in ("train", "eval"):
    got, want = (make_iterator(data_cfg(src, eval_fraction=0.2), tok, split=split)
                 for src in (remote, str(corpus)))
    n = 3 if split == "train" else None
    assert_batches_equal(take(got, n) if n else list(got), take(want, n) if n else list(want))


def test_a_changed_remote_file_is_read_again(bucket, tok):
  url = f"{bucket}/one.jsonl"
  storage.write_text(url, _jsonl(["first version"]))
  docs, _ = cached_records(url)
  assert [d.text for d in docs] == ["first version"]
  assert cached_records(url)[0] is docs  # unchanged: loaded once
  storage.write_text(url, _jsonl(["second version, longer"]))
  assert [d.text for d in cached_records(url)[0]] == ["second version, longer"]


def test_pairs_and_multiple_choice_items_from_a_bucket(bucket, tmp_path):
  pairs = [{"prompt": "2+2=", "response": "4"}, {"prompt": "Café?", "response": "Oui ✓"}]
  items = [{"context": "The sky is", "choices": [" blue", " green"], "label": 0}]
  (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  (tmp_path / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
  for name in ("pairs.jsonl", "items.jsonl"):
    storage.write_bytes(f"{bucket}/{name}", (tmp_path / name).read_bytes())
  assert finetune.read_pairs(f"{bucket}/pairs.jsonl", "prompt", "response") == \
      finetune.read_pairs(str(tmp_path / "pairs.jsonl"), "prompt", "response") == \
      [(p["prompt"], p["response"]) for p in pairs]
  assert read_choices(f"{bucket}/items.jsonl") == read_choices(tmp_path / "items.jsonl") == items


# --- errors -------------------------------------------------------------------------------


def _one_line(excinfo, *needles: str) -> str:
  text = str(excinfo.value)
  assert "\n" not in text, text
  for needle in needles:
    assert needle in text, text
  return text


def test_errors_name_the_url(bucket, tok, capsys):
  scheme = bucket.split("://")[0]
  missing = f"{scheme}://lmjax-missing-{uuid.uuid4().hex[:8]}"
  gone = f"bucket {missing.split('://')[1]} does not exist"
  for source in (f"{missing}/docs/*.jsonl", f"{missing}/docs/a.jsonl", f"{missing}/docs"):
    with pytest.raises(StorageError) as e:
      load_records(source)
    _one_line(e, source, gone)
  with pytest.raises(StorageError) as e:
    Tokenizer.load(f"{missing}/tok.model")
  _one_line(e, f"{missing}/tok.model", gone)
  assert prepare_data.main(["--source", "default", "--tokenizer", tok.path, "--output",
                            f"{missing}/ds", "--no_progress"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: {missing}/ds: {gone}")
  assert train_tokenizer_tool.main(["--vocab_size", "300", "--output", f"{missing}/t.model"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: {missing}: {gone}")

  # An existing bucket: a glob matching nothing, a missing file, invalid UTF-8.
  with pytest.raises(DataError) as e:
    load_records(f"{bucket}/none/*.jsonl", skips=SkipLog("fail"))
  _one_line(e, f"{bucket}/none/*.jsonl: the glob matches no files")
  with pytest.raises(DataError) as e:
    Tokenizer.load(f"{bucket}/tok.model")
  _one_line(e, f"tokenizer {bucket}/tok.model: no such file")
  storage.write_bytes(f"{bucket}/bad.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
  with pytest.raises(DataError) as e:
    load_records(f"{bucket}/bad.jsonl", skips=SkipLog("fail"))
  _one_line(e, f"{bucket}/bad.jsonl:2: invalid UTF-8")
  with pytest.raises(DataError) as e:
    finetune.read_pairs(f"{bucket}/bad.jsonl", "text", "text")
  _one_line(e, f"{bucket}/bad.jsonl:2: invalid UTF-8")
  with pytest.raises(DataError) as e:
    read_choices(f"{bucket}/bad.jsonl")
  _one_line(e, f"{bucket}/bad.jsonl: invalid UTF-8")
  assert not is_prepared(f"{bucket}/bad.jsonl") and not is_prepared(f"{missing}/ds")
  with pytest.raises(DataError) as e:
    get_tokenizer(data_cfg("default", tokenizer_cache=f"{bucket}/cache").data, 64)
  _one_line(e, "data.tokenizer_cache", "local directory")


# --- tokenizers ---------------------------------------------------------------------------


def test_a_tokenizer_from_a_url_encodes_as_the_local_file(bucket, tok, tmp_path):
  url = f"{bucket}/tokenizers/tok.model"
  storage.write_bytes(url, Path(tok.path).read_bytes())
  remote_tok = Tokenizer.load(url)
  assert remote_tok.path == url and remote_tok.sha256 == tok.sha256
  text = "def f(x):\n    return x + 1  # café ✓"
  assert remote_tok.encode(text) == tok.encode(text)
  configured = get_tokenizer(data_cfg("default", tokenizer=url).data, tok.vocab_size)
  assert configured.path == url and configured.sha256 == tok.sha256
  # Training writes the same model to a URL as to a local file.
  docs = TINY_DOCS * 4
  trained = train_tokenizer(docs, 320, f"{bucket}/trained/tok.model")
  assert trained.path == f"{bucket}/trained/tok.model"
  assert storage.path(trained.path).read_bytes() == \
      Path(train_tokenizer(docs, 320, str(tmp_path / "tok.model")).path).read_bytes()


# --- prepared datasets --------------------------------------------------------------------


def _prepare(source: str, output: str, tok, *extra: str) -> int:
  return prepare_data.main(["--source", source, "--tokenizer", tok.path, "--seq_len", "16",
                            "--eval_fraction", "0.25", "--shard_mb", "0.01", "--no_progress",
                            "--output", output, *extra])


def test_a_prepared_dataset_written_to_and_read_from_a_bucket(remote, corpus, tok, tmp_path,
                                                              monkeypatch, capsys):
  bucket = f"{remote.rsplit('/', 1)[0]}/{uuid.uuid4().hex[:8]}"  # the corpus's, a new prefix
  local, url = str(tmp_path / "ds"), f"{bucket}/prepared/ds"
  assert _prepare(str(corpus), local, tok) == 0
  uploads = []
  copy = storage.copy_file
  monkeypatch.setattr(storage, "copy_file", lambda s, d: (uploads.append(d), copy(s, d)))
  assert _prepare(remote, url, tok) == 0
  assert f"wrote {url} in" in capsys.readouterr().out
  assert uploads[-1] == f"{url}/lmjax_data.json" and len(uploads) > 4  # the metadata last
  assert not list((tmp_path / "cache" / "staging").iterdir())  # the local build is gone

  meta, want = read_metadata(url), read_metadata(local)
  assert len(want["splits"]["train"]["files"]) > 1 and want["splits"]["eval"]["rows"] > 0
  for key in ("created", "sources", "skipped_examples"):
    meta.pop(key), want.pop(key)
  assert meta == want
  splits = want["splits"]
  for name in splits["train"]["files"] + splits["eval"]["files"] + ["tokenizer.model"]:
    assert storage.path(f"{url}/{name}").read_bytes() == (tmp_path / "ds" / name).read_bytes()
  assert is_prepared(url) and not is_prepared(f"{bucket}/prepared")
  assert get_tokenizer(data_cfg(url).data, 1).path == f"{url}/tokenizer.model"
  for split in ("train", "eval"):
    got, ref = (make_iterator(data_cfg(src, seq_len=16), None, split=split) for src in (url, local))
    assert_batches_equal(take(got, 4) if split == "train" else list(got),
                         take(ref, 4) if split == "train" else list(ref))

  # The refusals of an existing output hold for URLs.
  assert _prepare(remote, url, tok) == 2
  assert "exists; choose another output or pass --overwrite" in capsys.readouterr().err
  storage.write_text(f"{bucket}/other/notes.txt", "mine")
  assert _prepare(f"{remote}/*.jsonl", f"{bucket}/other", tok, "--overwrite") == 2
  assert "is not a prepared dataset; not overwriting it" in capsys.readouterr().err
  assert storage.path(f"{bucket}/other/notes.txt").read_text() == "mine"
  # An upload cut short (no metadata) is no prepared dataset, and --overwrite replaces it.
  storage.path(f"{url}/lmjax_data.json").unlink()
  assert not is_prepared(url)
  assert _prepare(f"{remote}/c.jsonl", url, tok, "--overwrite") == 0
  assert read_metadata(url)["sources"] == [f"{remote}/c.jsonl"]
  names = {p.name for p in storage.path(url).iterdir()}
  assert names == {"lmjax_data.json", "tokenizer.model",
                   *read_metadata(url)["splits"]["train"]["files"],
                   *read_metadata(url)["splits"]["eval"]["files"]}  # no file of the old one left

  # A shard missing from the bucket is named.
  shard = read_metadata(url)["splits"]["train"]["files"][0]
  storage.path(f"{url}/{shard}").unlink()
  with pytest.raises(DataError, match=f"{url}/{shard}: cannot be read"):
    next(make_iterator(data_cfg(url, seq_len=16), None))


# --- Hugging Face checkpoints -------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, tok):
  """A tiny random Llama (transformers), with a sentencepiece tokenizer.model, imported
  into a local run directory."""
  from lmjax import hf
  from tests.test_hf import _hf_model
  root = tmp_path_factory.mktemp("hf")
  _hf_model("llama_tied_mha_linear_rope").save_pretrained(root / "hf")
  (root / "hf" / "tokenizer.model").write_bytes(Path(tok.path).read_bytes())
  hf.import_checkpoint(root / "hf", root / "run", say=lambda m: None)
  return root


def _params(workdir):
  import lmjax
  run = lmjax.load(workdir, devices=jax.devices()[:1])
  return jax.tree.map(np.asarray, jax.device_get(run.params)), run


def test_hf_export_to_a_bucket_and_import_back(hf_run, bucket, tmp_path):
  from lmjax import hf
  url = f"{bucket}/exported"
  quiet = lambda m: None
  hf.export_checkpoint(hf_run / "run", tmp_path / "local", max_shard_size="20KB", say=quiet)
  hf.export_checkpoint(hf_run / "run", url, max_shard_size="20KB", say=quiet)
  local_files = sorted(p.name for p in (tmp_path / "local").iterdir())
  assert "model.safetensors.index.json" in local_files and "tokenizer.model" in local_files
  assert sorted(p.name for p in storage.path(url).iterdir()) == local_files
  for name in local_files:  # byte for byte what a local export writes
    assert storage.path(f"{url}/{name}").read_bytes() == (tmp_path / "local" / name).read_bytes()

  cfg = hf.import_checkpoint(url, tmp_path / "back", say=quiet)
  assert cfg.data.tokenizer == str(tmp_path / "back" / "tokenizer.model")
  assert (tmp_path / "back" / "tokenizer.model").read_bytes() == \
      (hf_run / "run" / "tokenizer.model").read_bytes()
  want, original = _params(hf_run / "run")
  got, back = _params(tmp_path / "back")
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert back.tokenizer.sha256 == original.tokenizer.sha256


def test_hf_import_into_a_bucket_workdir(hf_run, bucket):
  from lmjax import hf
  url = f"{bucket}/runs/imported"
  cfg = hf.import_checkpoint(hf_run / "hf", url, say=lambda m: None)
  assert cfg.data.tokenizer == f"{url}/tokenizer.model"
  assert Tokenizer.load(cfg.data.tokenizer).sha256 == Tokenizer.load(
      str(hf_run / "hf" / "tokenizer.model")).sha256
  want = json.loads((hf_run / "run" / "config.json").read_text())
  want["data"]["tokenizer"] = f"{url}/tokenizer.model"
  assert json.loads(storage.path(f"{url}/config.json").read_text()) == want
  assert storage.path(f"{url}/checkpoints/0/state").is_dir()


def test_hf_import_into_a_bucket_workdir_loads_back(hf_run, bucket):
  from lmjax import hf
  url = f"{bucket}/runs/imported"
  hf.import_checkpoint(hf_run / "hf", url, say=lambda m: None)
  want, _ = _params(hf_run / "run")
  got, _ = _params(url)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_hf_import_refuses_a_missing_bucket(hf_run, bucket):
  from lmjax import hf
  missing = f"{bucket.split('://')[0]}://lmjax-missing-{uuid.uuid4().hex[:8]}"
  for args in ((f"{missing}/hf", hf_run / "x"), (hf_run / "hf", f"{missing}/run")):
    with pytest.raises(ConfigError) as e:
      hf.import_checkpoint(*args, say=lambda m: None)
    _one_line(e, missing, "does not exist")
