"""Every kind of tokenizer lmjax reads -- sentencepiece, Hugging Face tokenizer.json, tiktoken
ranks files -- against the libraries themselves (``transformers.AutoTokenizer``,
``tiktoken.Encoding``), and through training, prepared data, evaluation and HF import/export.
Every tokenizer is built here from a tiny corpus; nothing is downloaded."""

from __future__ import annotations

import base64
import json
import math
import pickle
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import tiktoken
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

import lmjax
from lmjax import data as data_lib
from lmjax.data import DataError, Tokenizer, train_bpe_tokenizer, train_tokenizer
from lmjax.data.tokenizer_bpe import LLAMA3_PATTERN, byte_to_unicode, llama3_special_tokens
from lmjax.evaluate import document_batches, perplexity, target_bytes

transformers = pytest.importorskip("transformers")

SPECIAL = ["<|im_start|>", "<|im_end|>"]
# Text that byte-level tokenizers must get exactly right.
CORPUS = [
    "",
    "Hello, world! The quick brown fox.",
    "日本語のテキストと中文字符，还有한국어.",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧 ✓",
    "combining: e\u0301 a\u0308 n\u0303 \u0915\u093f",
    "   leading spaces and   runs      of them   ",
    "tabs\t\tand\ttabs\t",
    "new\nlines\n\n\nand\r\nCRLF\n",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\tpass\n",
    "special <|im_start|>user\nhi 日本<|im_im|><|im_end|> inside",
    "numbers 1234567 3.14159 -0.5e10",
    " ",
    "\n",
]
CHAT_TEMPLATE = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}")


def _training_docs() -> list[str]:
  return data_lib.default_documents()[:40] + [c * 3 for c in CORPUS if c]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  """A byte-level BPE tokenizer.json trained by lmjax, with two special tokens."""
  path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
  return train_bpe_tokenizer(_training_docs(), 700, str(path), special_tokens=SPECIAL)


def _auto(directory):
  return transformers.AutoTokenizer.from_pretrained(str(directory))


def _gpt2_style(directory: Path, vocab_size: int = 400) -> Path:
  """GPT-2's layout: a byte-level BPE (GPT-2's own split) whose last id is <|endoftext|>, and
  a tokenizer_config.json that names no special tokens."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_training_docs(), trainer)
  tok.add_special_tokens(["<|endoftext|>"])
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
  return directory


def _llama3_style(directory: Path, vocab_size: int = 500) -> Path:
  """Llama 3's layout: Llama 3's split, byte-level BPE, <|begin_of_text|> ... <|eot_id|> after
  the merges, and a tokenizer_config.json with bos/eos and a chat template."""
  tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  specials = llama3_special_tokens()[:16]
  trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_training_docs(), trainer)
  tok.add_special_tokens(specials)
  bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))  # transformers adds it; lmjax not
  tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[bos])
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
      "eos_token": "<|eot_id|>", "chat_template": CHAT_TEMPLATE}))
  return directory


def _ranks_of(hf_tok: Tokenizer) -> dict[bytes, int]:
  """tiktoken ranks with the merges of a byte-level BPE tokenizer.json: the 256 bytes, then
  every merged token in the order it was learnt."""
  inverse = {c: b for b, c in byte_to_unicode().items()}
  vocab = hf_tok.library_tokenizer.get_vocab(with_added_tokens=False)
  merged = sorted((i, bytes(inverse[c] for c in t)) for t, i in vocab.items()
                  if t not in hf_tok._added and len(t) > 1)
  ranks = {bytes([b]): b for b in range(256)}
  for _, token in merged:
    ranks[token] = len(ranks)
  return ranks


def _write_ranks(path: Path, ranks: dict[bytes, int]) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
  return path


# --- tokenizer.json ------------------------------------------------------------------------


def test_trained_bpe_ids_equal_transformers(bpe):
  auto = _auto(Path(bpe.path).parent)
  for text in CORPUS + ["\n".join(CORPUS)]:
    ids = bpe.encode(text)
    assert ids == auto(text, add_special_tokens=False)["input_ids"], text
    assert bpe.decode(ids) == text  # byte-level: every text round-trips
  assert bpe.encode("") == []
  assert bpe.encode_batch(CORPUS) == [bpe.encode(t) for t in CORPUS]
  assert (bpe.pad_id, bpe.unk_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2, 3)
  assert (bpe.bos_token, bpe.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
  assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (2, 3, 0)
  assert bpe.special_tokens == SPECIAL and [bpe.token_id(t) for t in SPECIAL] == [4, 5]
  assert bpe.encode("<|im_start|>x<|im_end|>")[0] == 4  # one id inside text
  assert bpe.kind == "hf" and bpe.vocab_size == 700 and bpe.chat_template is None
  with pytest.raises(DataError, match="no piece"):
    bpe.token_id("<absent>")


def test_bpe_training_is_deterministic_and_pickles(bpe, tmp_path):
  again = train_bpe_tokenizer(_training_docs(), 700, str(tmp_path), special_tokens=SPECIAL)
  assert Path(again.path) == tmp_path / "tokenizer.json"
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert (tmp_path / name).read_bytes() == (Path(bpe.path).parent / name).read_bytes()
  assert again.sha256 == bpe.sha256 == Tokenizer.load(str(tmp_path)).sha256  # a directory loads too
  clone = pickle.loads(pickle.dumps(bpe))  # what Grain worker processes receive
  assert type(clone) is type(bpe) and clone.path == bpe.path and clone.sha256 == bpe.sha256
  assert clone.encode(CORPUS[2]) == bpe.encode(CORPUS[2])
  assert bpe.__getstate__()["files"]["tokenizer.json"] == Path(bpe.path).read_bytes()  # bytes travel
  with pytest.raises(DataError, match="needs vocab_size above 260"):
    train_bpe_tokenizer(["a b"], 260, str(tmp_path / "small"))
  with pytest.raises(DataError, match="duplicates"):
    train_bpe_tokenizer(["a b"], 400, str(tmp_path / "dup"), special_tokens=["<|end_of_text|>"])


def test_decode_continuation_keeps_characters_split_across_tokens(bpe):
  text = "日本語 😀 ok"
  ids = bpe.encode(text)
  assert len(ids) > len(text.split())  # some characters span several byte tokens
  split = 0
  for k in range(len(ids) + 1):
    tail = bpe.decode_continuation([bpe.bos_id] + ids[:k], ids[k:] + [bpe.eos_id])
    # Every character the prompt holds whole is the prompt's; the rest is the continuation's,
    # a character whose first bytes end the prompt included.
    head_bytes = int(bpe.token_bytes()[ids[:k]].sum())
    whole = text.encode()[:head_bytes].decode("utf-8", "ignore")
    assert tail == text[len(whole):], k
    split += len(whole.encode()) < head_bytes
    assert bpe.decode(ids[:k]) + tail == text or split
  assert split  # some prompts ended inside a character


def test_gpt2_style_tokenizer_has_endoftext_as_bos_and_eos(tmp_path):
  directory = _gpt2_style(tmp_path / "gpt2")
  tok = Tokenizer.load(str(directory / "tokenizer.json"))
  assert tok.bos_id == tok.eos_id == tok.pad_id == 399 == tok.vocab_size - 1
  assert tok.bos_token == tok.eos_token == "<|endoftext|>" and tok.unk_id is None
  lib = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
  for text in CORPUS:
    assert tok.encode(text) == lib.encode(text, add_special_tokens=False).ids
    assert tok.decode(tok.encode(text)) == text
  assert tok.decode(tok.encode("a<|endoftext|>b")) == "ab"  # bos/eos/pad decode to ""
  assert tok.token_bytes()[399] == 0 and tok.leading_space() is None
  # Without any tokenizer_config.json, an export names the roles for transformers.
  (directory / "tokenizer_config.json").unlink()
  out = tmp_path / "export"
  out.mkdir()
  for name, data in Tokenizer.load(str(directory)).hf_files().items():
    (out / name).write_bytes(data)
  auto = _auto(out)
  assert auto.bos_token == auto.eos_token == "<|endoftext|>" and auto.pad_token is None
  assert auto(CORPUS[3], add_special_tokens=False)["input_ids"] == tok.encode(CORPUS[3])


def test_llama3_style_tokenizer_reads_its_config(tmp_path):
  tok = Tokenizer.load(str(_llama3_style(tmp_path / "l3") / "tokenizer.json"))
  assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
  assert tok.eos_id == tok.token_id("<|eot_id|>") == tok.bos_id + 9
  assert tok.chat_template == CHAT_TEMPLATE
  assert "<|start_header_id|>" in tok.special_tokens and "<|eot_id|>" not in tok.special_tokens
  auto = _auto(tmp_path / "l3")
  text = "<|start_header_id|>user<|end_header_id|>\n\nhi 日本<|eot_id|>"
  assert tok.encode(text) == auto(text, add_special_tokens=False)["input_ids"]
  assert auto("hi")["input_ids"] == [tok.bos_id] + tok.encode("hi")  # lmjax adds bos itself
  # A list of named templates: the "default" one.
  config = json.loads((tmp_path / "l3" / "tokenizer_config.json").read_text())
  config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
  (tmp_path / "l3" / "tokenizer_config.json").write_text(json.dumps(config))
  assert Tokenizer.load(str(tmp_path / "l3")).chat_template == "D"


def test_bad_tokenizer_files_fail_in_one_line_naming_the_file(tmp_path, bpe):
  def fails(path, match):
    with pytest.raises(DataError, match=match) as info:
      Tokenizer.load(str(path))
    assert "\n" not in str(info.value) and str(path) in str(info.value)

  (tmp_path / "empty").mkdir()
  (tmp_path / "nothing").mkdir()
  fails(_touch(tmp_path / "empty" / "tokenizer.json", b""), "empty")
  fails(_touch(tmp_path / "t.tiktoken", b"\n\n"), "empty")
  fails(_touch(tmp_path / "cut.json", Path(bpe.path).read_bytes()[:5000]), "not a valid Hugging Face")
  fails(_touch(tmp_path / "bad.json", b'{"model": {"type": "Nope"}}'), "not a valid Hugging Face")
  fails(tmp_path / "absent.json", "no such file")
  fails(tmp_path / "nothing", "a directory without")
  # No eos: none named, none recognised.
  noeos = tmp_path / "noeos"
  noeos.mkdir()
  plain = tokenizers.Tokenizer(models.BPE())
  plain.pre_tokenizer = pre_tokenizers.ByteLevel()
  plain.train_from_iterator(["abc abd"], trainers.BpeTrainer(vocab_size=300, show_progress=False))
  plain.save(str(noeos / "tokenizer.json"))
  fails(noeos / "tokenizer.json", "no eos token.*eos_token")
  _touch(noeos / "tokenizer_config.json", b'{"eos_token": "<|nowhere|>"}')
  fails(noeos / "tokenizer.json", "not in its vocabulary")
  _touch(noeos / "tokenizer_config.json", b'{"eos_token": ')
  with pytest.raises(DataError, match="tokenizer_config.json: not valid JSON"):
    Tokenizer.load(str(noeos / "tokenizer.json"))
  # tiktoken: a line that is no base64 token and rank, found by content under any name.
  ranks = _write_ranks(tmp_path / "tok" / "tokenizer.model", {b"a": 0, b"b": 1})
  _touch(ranks, ranks.read_bytes() + b"YWI= two\n")
  fails(ranks, "line 3 is not a base64 token")
  _touch(tmp_path / "x.tiktoken", b"not base64!! 3\n")
  fails(tmp_path / "x.tiktoken", "line 1")
  fails(_touch(tmp_path / "junk.model", b"\x00\x01junk"), "not a valid sentencepiece model")


def _touch(path: Path, data: bytes) -> Path:
  path.write_bytes(data)
  return path


# --- tiktoken ------------------------------------------------------------------------------


def test_tiktoken_file_equals_tiktoken_and_has_llama3_special_tokens(bpe, tmp_path):
  ranks = _ranks_of(bpe)
  # Llama 3 ships its ranks as original/tokenizer.model: told apart from sentencepiece by content.
  path = _write_ranks(tmp_path / "original" / "tokenizer.model", ranks)
  tok = Tokenizer.load(str(path))
  n = len(ranks)
  specials = {t: n + i for i, t in enumerate(llama3_special_tokens())}
  want = tiktoken.Encoding("direct", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks,
                           special_tokens=specials)
  assert tok.kind == "tiktoken" and tok.vocab_size == n + 256 == want.n_vocab
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (n, n + 1, n + 1)
  assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
  assert [tok.token_id(t) for t in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")] == \
      [n + 6, n + 7, n + 9]
  assert tok.token_id("<|reserved_special_token_246|>") == n + 255
  text = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n日本 😀<|eot_id|>"
  for t in CORPUS + [text]:
    assert tok.encode(t) == want.encode(t, allowed_special="all"), t
  for t in CORPUS:
    assert tok.decode(tok.encode(t)) == t
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.encode(text) == tok.encode(text) and clone.sha256 == tok.sha256
  assert tok.token_bytes()[tok.encode("日本")].sum() == len("日本".encode())
  assert tok.decode_continuation(tok.encode("日")[:1], tok.encode("日") + tok.encode(" ok")) != ""


def test_tiktoken_settings_file_overrides_the_defaults(bpe, tmp_path):
  ranks = _ranks_of(bpe)
  path = _write_ranks(tmp_path / "gpt.tiktoken", ranks)
  settings = {"pattern": r"\s+|\S+", "special_tokens": ["<|endoftext|>", "<|fim|>"],
              "eos": "<|endoftext|>", "chat_template": "{{ messages }}"}
  (tmp_path / "gpt.tiktoken.json").write_text(json.dumps(settings))
  tok = Tokenizer.load(str(path))
  n = len(ranks)
  assert tok.bos_id == tok.eos_id == n and tok.vocab_size == n + 2
  assert tok.special_tokens == ["<|fim|>"] and tok.chat_template == "{{ messages }}"
  want = tiktoken.Encoding("direct", pat_str=r"\s+|\S+", mergeable_ranks=ranks,
                           special_tokens={"<|endoftext|>": n, "<|fim|>": n + 1})
  for t in CORPUS:
    assert tok.encode(t) == want.encode(t, allowed_special="all")
  (tmp_path / "gpt.tiktoken.json").write_text(json.dumps({"eos": "<|nope|>"}))
  with pytest.raises(DataError, match=r"gpt.tiktoken.json: eos '<\|nope\|>' is not one of"):
    Tokenizer.load(str(path))
  (tmp_path / "gpt.tiktoken.json").write_text(json.dumps({"bos": "x", "merges": []}))
  with pytest.raises(DataError, match="unknown field"):
    Tokenizer.load(str(path))


def test_tiktoken_writes_a_tokenizer_json_transformers_reads(bpe, tmp_path):
  tok = Tokenizer.load(str(_write_ranks(tmp_path / "t" / "tokenizer.model", _ranks_of(bpe))))
  out = tmp_path / "hf"
  out.mkdir()
  for name, data in tok.hf_files().items():
    (out / name).write_bytes(data)
  auto = _auto(out)
  again = Tokenizer.load(str(out))
  text = "<|begin_of_text|>hi<|eot_id|>"
  for t in CORPUS + [text]:
    assert auto(t, add_special_tokens=False)["input_ids"] == tok.encode(t) == again.encode(t), t
  assert (auto.bos_token, auto.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
  assert (again.bos_id, again.eos_id) == (tok.bos_id, tok.eos_id)


def test_every_kind_has_the_same_interface(bpe, tmp_path):
  sp = train_tokenizer(_training_docs(), 500, str(tmp_path / "sp.model"), special_tokens=SPECIAL)
  tt = Tokenizer.load(str(_write_ranks(tmp_path / "t.tiktoken", _ranks_of(bpe))))
  for tok in (sp, bpe, tt):
    assert isinstance(tok, Tokenizer) and tok.sha256 and tok.path
    assert tok.bos_token and tok.eos_token and tok.token_id(tok.eos_token) == tok.eos_id
    assert tok.decode(tok.encode(CORPUS[8])) == CORPUS[8]
    nbytes = tok.token_bytes()
    assert nbytes.shape == (tok.vocab_size,) and nbytes[tok.bos_id] == nbytes[tok.eos_id] == 0
    assert Tokenizer.load(tok.save(str(tmp_path / f"copy-{tok.kind}"))).sha256 == tok.sha256
  assert sp.bos_token == "<s>" and sp.special_tokens == SPECIAL and sp.leading_space() is not None
  assert bpe.leading_space() is None and tt.leading_space() is None


# --- training, prepared data, evaluation ---------------------------------------------------


def _tiny_cfg(tok, source):
  c = lmjax.default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 1, 32, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 2, 2, 16
  c.model.max_seq_len = c.data.seq_len = 32
  c.model.vocab_size = tok.vocab_size
  c.data.source, c.data.global_batch_size = source, 8
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.progress_bar = 3, 3, 3, False
  c.mesh.fsdp = 1
  return c


@pytest.mark.slow
def test_training_with_a_tokenizer_json_and_bits_per_byte(bpe, tmp_path):
  """A run trains on raw text with data.tokenizer=tokenizer.json, then on data prepared with
  it; its bits per byte are its nats over the UTF-8 bytes of the text."""
  cfg = _tiny_cfg(bpe, "default")
  cfg.data.tokenizer = bpe.path
  history = lmjax.train(cfg, tmp_path / "raw", devices=jax.devices()[:1])
  assert history[-1]["step"] == 3 and np.isfinite(history[-1]["loss"]) and "eval_loss" in history[-1]
  run = lmjax.load(tmp_path / "raw", devices=jax.devices()[:1])
  assert run.tokenizer.sha256 == bpe.sha256 and run.tokenizer.kind == "hf"

  docs = [c for c in CORPUS if c.strip()] + ["naïve café 😀 " * 6]
  batches = document_batches(docs, run.tokenizer, 32, 4)
  total_bytes = sum(len(d.encode("utf-8")) for d in docs)
  assert sum(float(np.sum(target_bytes(run.tokenizer, b) * b["weights"])) for b in batches) == total_bytes
  out = perplexity(run.setup, run.params, run.tokenizer, batches)
  nats = 0.0
  model = run.model()
  for b in batches:  # the model directly, row by row
    logp = jax.nn.log_softmax(np.asarray(model(b["inputs"]), np.float64), axis=-1)
    picked = np.take_along_axis(logp, b["targets"][..., None], axis=-1)[..., 0]
    nats -= float(np.sum(picked * b["weights"]))
  assert out["bytes"] == total_bytes
  np.testing.assert_allclose(out["loss"] * out["tokens"], nats, rtol=1e-4)
  np.testing.assert_allclose(out["bits_per_byte"], nats / math.log(2) / total_bytes, rtol=1e-4)
  assert 0.5 < out["bits_per_byte"] < 20

  # Prepared data carries the tokenizer's files; training reads the tokenizer from there.
  prepared = tmp_path / "prepared"
  meta = data_lib.prepare(["default"], str(prepared), bpe, seq_len=32, eval_fraction=0.1)
  assert meta["tokenizer"]["file"] == "tokenizer.json" and meta["tokenizer"]["kind"] == "hf"
  assert (prepared / "tokenizer_config.json").read_bytes() == \
      (Path(bpe.path).parent / "tokenizer_config.json").read_bytes()
  cfg = _tiny_cfg(bpe, str(prepared))
  assert data_lib.get_tokenizer(cfg.data, 1).sha256 == bpe.sha256 == meta["tokenizer"]["sha256"]
  history = lmjax.train(cfg, tmp_path / "prep", devices=jax.devices()[:1])
  assert history[-1]["step"] == 3 and np.isfinite(history[-1]["loss"])
  ids = next(data_lib.make_iterator(cfg, None, split="eval"))["inputs"][0]
  assert ids[0] == bpe.bos_id and bpe.decode(ids).strip()


def test_prepare_tool_and_train_tokenizer_tool_with_bpe(tmp_path, capsys):
  from tools import prepare_data, train_tokenizer as train_tool
  source = tmp_path / "docs.jsonl"
  source.write_text("".join(json.dumps({"text": d}) + "\n" for d in _training_docs()))
  assert train_tool.main(["--kind", "bpe", "--source", str(source), "--vocab_size", "600",
                          "--special_tokens", "<|im_start|>", "--output", str(tmp_path / "tok")]) == 0
  out = capsys.readouterr().out
  assert "byte-level BPE" in out and "vocab size:      600" in out and "<|im_start|> = 4" in out
  assert prepare_data.main(["--source", str(source), "--tokenizer", str(tmp_path / "tok" / "tokenizer.json"),
                            "--seq_len", "32", "--output", str(tmp_path / "prep"), "--no_progress"]) == 0
  assert {"tokenizer.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "prep").iterdir()}
  assert "--config.model.vocab_size=600" in capsys.readouterr().out


# --- Hugging Face import / export ----------------------------------------------------------


def _hf_llama(directory: Path, vocab_size: int) -> Path:
  import torch
  torch.manual_seed(0)
  config = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                    max_position_embeddings=64, tie_word_embeddings=True)
  transformers.LlamaForCausalLM(config).save_pretrained(directory)
  return directory


def _hf_gpt2(directory: Path, vocab_size: int) -> Path:
  import torch
  torch.manual_seed(0)
  config = transformers.GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=1, n_head=2,
                                   n_positions=64, bos_token_id=vocab_size - 1,
                                   eos_token_id=vocab_size - 1)
  transformers.GPT2LMHeadModel(config).save_pretrained(directory)
  return directory


def _round_trip(hf_dir: Path, tmp_path: Path, texts: list[str]):
  """Imports ``hf_dir``, checks the run's tokenizer, exports it; returns (run tokenizer,
  AutoTokenizer of the export)."""
  from lmjax import hf
  notes = []
  cfg = hf.import_checkpoint(hf_dir, tmp_path / "run", {"data.seq_len": "32"}, say=notes.append)
  assert any(n.startswith("tokenizer:") for n in notes) and not any("tokenizer" in n for n in notes
                                                                     if n.startswith("note")), notes
  run = lmjax.load(tmp_path / "run", devices=jax.devices()[:1])
  assert run.cfg.data.tokenizer == cfg.data.tokenizer
  assert Path(cfg.data.tokenizer).parent == (tmp_path / "run").absolute()
  hf.export_checkpoint(tmp_path / "run", tmp_path / "out", say=lambda m: None)
  auto = _auto(tmp_path / "out")
  for t in texts:
    assert auto(t, add_special_tokens=False)["input_ids"] == run.tokenizer.encode(t), t
  return run.tokenizer, auto


@pytest.mark.slow
def test_gpt2_and_llama3_imports_bring_their_tokenizers_and_exports_keep_them(tmp_path):
  gpt2 = _gpt2_style(_hf_gpt2(tmp_path / "gpt2", 400))
  tok, auto = _round_trip(gpt2, tmp_path / "g", CORPUS)
  assert tok.bos_token == tok.eos_token == "<|endoftext|>" == auto.eos_token
  assert sorted(p.name for p in (tmp_path / "g" / "run").glob("tokenizer*")) == \
      ["tokenizer.json", "tokenizer_config.json"]
  assert (tmp_path / "g" / "out" / "tokenizer.json").read_bytes() == (gpt2 / "tokenizer.json").read_bytes()

  llama = _llama3_style(_hf_llama(tmp_path / "llama3", 500))
  (llama / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|begin_of_text|>"}))
  text = "<|start_header_id|>user<|end_header_id|>\n\n日本 😀<|eot_id|>"
  tok, auto = _round_trip(llama, tmp_path / "l", CORPUS + [text])
  assert tok.chat_template == CHAT_TEMPLATE == auto.chat_template
  assert (tok.bos_token, tok.eos_token) == ("<|begin_of_text|>", "<|eot_id|>")
  for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    assert (tmp_path / "l" / "run" / name).read_bytes() == (llama / name).read_bytes()
    assert (tmp_path / "l" / "out" / name).read_bytes() == (llama / name).read_bytes()


@pytest.mark.slow
def test_llama3_tiktoken_original_imports_and_exports_as_tokenizer_json(bpe, tmp_path):
  ranks = _ranks_of(bpe)
  hf_dir = _hf_llama(tmp_path / "llama3", len(ranks) + 256)
  _write_ranks(hf_dir / "original" / "tokenizer.model", ranks)
  tok, auto = _round_trip(hf_dir, tmp_path / "t", CORPUS + ["<|begin_of_text|>a<|eot_id|>"])
  assert tok.kind == "tiktoken" and Path(tok.path).name == "tokenizer.tiktoken"
  assert (auto.bos_token, auto.eos_token) == ("<|begin_of_text|>", "<|end_of_text|>")
  assert json.loads((tmp_path / "t" / "out" / "config.json").read_text())["eos_token_id"] == tok.eos_id


def test_sentencepiece_export_keeps_todays_files(tmp_path):
  sp = train_tokenizer(_training_docs(), 500, str(tmp_path / "sp.model"))
  assert sp.hf_files() == {"tokenizer.model": (tmp_path / "sp.model").read_bytes()}
  shutil.copyfile(tmp_path / "sp.model", tmp_path / "tokenizer.model")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
  assert Tokenizer.load(str(tmp_path / "tokenizer.model")).chat_template == "{{ x }}"
