"""Chat: conversations rendered as transformers renders them, tokenized with special tokens
as their ids, the loss on assistant turns only, packed whole; a chat fine-tune and
``lmjax chat`` on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from lmjax import cli
from lmjax.config import default_config
from lmjax.data import DataError, make_iterator, train_tokenizer
from lmjax.data.chat import BUILTIN_TEMPLATES, ChatFormat
from lmjax.data.finetune import pack_examples

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<start_of_turn>", "<end_of_turn>", "<|user|>", "<|assistant|>", "<|system|>"]
CUSTOM = (  # transformers' features: namespace, loop controls, tojson, trim_blocks, lstrip_blocks
    "{%- set ns = namespace(n=0) -%}\n"
    "{% for message in messages %}\n"
    "  {% if message['role'] == 'system' %}[SYS {{ message['content'] | tojson }}]\n{% continue %}{% endif %}\n"
    "  {% set ns.n = ns.n + 1 %}\n"
    "{{ message['role'] | upper }} {{ ns.n }}: {{ message['content'] }}{{ eos_token if message['role'] == 'assistant' }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}ASSISTANT {{ ns.n + 1 }}:{% endif %}")


def conversation(a: int, b: int, system: bool = True) -> list[dict]:
  head = [{"role": "system", "content": "Answer with the sum."}] if system else []
  return head + [
      {"role": "user", "content": f"What is {a} plus {b}?"},
      {"role": "assistant", "content": f"It is {a + b}."},
      {"role": "user", "content": f"And {a} plus {a}?"},
      {"role": "assistant", "content": f" That is {2 * a}. "},
  ]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  """A sentencepiece tokenizer with every built-in template's special tokens."""
  texts = [m["content"] for i in range(40) for m in conversation(i, i + 3)]
  texts += ["system", "user", "assistant", "model", "Hello there, how can I help you today?"] * 5
  path = tmp_path_factory.mktemp("tok") / "chat.model"
  return train_tokenizer(texts, 400, str(path), special_tokens=SPECIALS)


class HFTokenizer:
  """lmjax's tokenizer interface over a ``tokenizers`` byte-level BPE (with the chat template
  an imported Hugging Face tokenizer carries)."""

  def __init__(self, chat_template=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    self.tok = Tokenizer(models.BPE())
    self.tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    self.tok.decoder = decoders.ByteLevel()
    self.special_tokens = ["<s>", "</s>"] + SPECIALS
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=self.special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [m["content"] for i in range(40) for m in conversation(i, 2 * i)] + ["system user assistant"]
    self.tok.train_from_iterator(texts * 3, trainer)
    self.bos_token, self.eos_token, self.chat_template, self.path = "<s>", "</s>", chat_template, "hf"
    self.bos_id, self.eos_id, self.pad_id = self.token_id("<s>"), self.token_id("</s>"), 0

  def token_id(self, piece):
    return self.tok.token_to_id(piece)

  def encode(self, text):
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids):
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

  def decode_continuation(self, prompt, ids):
    return self.decode(list(prompt) + list(ids))[len(self.decode(prompt)):]

  def transformers(self, template):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=self.tok, bos_token="<s>", eos_token="</s>",
                                   chat_template=template)


@pytest.mark.parametrize("name", [*BUILTIN_TEMPLATES, "custom"])
def test_templates_render_as_transformers_renders_them(name, tok, tmp_path):
  hf = HFTokenizer()
  source = CUSTOM if name == "custom" else BUILTIN_TEMPLATES[name]
  setting = name
  if name == "custom":
    (tmp_path / "t.jinja").write_text(CUSTOM)
    setting = str(tmp_path / "t.jinja")
  reference = hf.transformers(source)
  system = name != "gemma"  # gemma's template refuses system messages
  for messages in (conversation(3, 4, system), conversation(12, 5, system)[:3]):
    for generation_prompt in (False, True):
      want = reference.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=generation_prompt)
      assert ChatFormat(hf, setting).render(messages, generation_prompt) == want
      # The same text with the sentencepiece tokenizer (its bos/eos pieces are <s> and </s>).
      assert ChatFormat(tok, setting).render(messages, generation_prompt) == want
  # The tokenizer's own template when data.chat_template is "".
  assert ChatFormat(HFTokenizer(source), "").render(messages) == reference.apply_chat_template(
      messages, tokenize=False)
  if name == "gemma":
    with pytest.raises(DataError, match="chat template gemma: System role not supported"):
      ChatFormat(tok, "gemma").render(conversation(1, 2))


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_special_tokens_become_their_ids_as_transformers_tokenizes(name):
  hf = HFTokenizer()
  messages = conversation(7, 8)
  ids, _ = ChatFormat(hf, name).encode(messages)
  want = hf.transformers(BUILTIN_TEMPLATES[name]).apply_chat_template(messages, tokenize=True)["input_ids"]
  assert ids == list(want)
  assert hf.token_id(SPECIALS[1 if name == "chatml" else 4]) in ids


def test_sentencepiece_reads_bos_eos_and_specials_as_single_ids(tok):
  fmt = ChatFormat(tok, "llama3")
  ids, _ = fmt.encode(conversation(1, 2))
  text = fmt.render(conversation(1, 2))
  assert text.startswith("<s><|start_header_id|>system")
  assert ids[:2] == [tok.bos_id, tok.token_id("<|start_header_id|>")]
  assert ids.count(tok.token_id("<|eot_id|>")) == 5 and ids.count(tok.bos_id) == 1
  zephyr, _ = ChatFormat(tok, "zephyr").encode(conversation(1, 2))
  assert zephyr.count(tok.eos_id) == 5  # "</s>" in the text is the eos id, not "<", "/", ...
  assert tok.decode(ids).replace("<s>", "") == tok.decode(tok.encode(text.replace("<s>", "")))


@pytest.mark.parametrize("name", list(BUILTIN_TEMPLATES))
def test_only_assistant_text_and_end_of_turn_are_weighted(name, tok):
  fmt = ChatFormat(tok, name)
  messages = conversation(3, 9, system=name != "gemma")
  ids, weights = fmt.encode(messages)
  assert len(ids) == len(weights)
  runs, k = [], 0
  while k < len(weights):  # (start, end) of each stretch of weighted tokens
    if weights[k]:
      end = k
      while end < len(weights) and weights[end]:
        end += 1
      runs.append((k, end))
      k = end
    else:
      k += 1
  end_of_turn = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "zephyr": "</s>",
                 "gemma": "<end_of_turn>"}[name]
  eot_id = tok.eos_id if name == "zephyr" else tok.token_id(end_of_turn)
  assert fmt.end_of_turn() == (end_of_turn, sorted({tok.eos_id, eot_id}))
  contents = [m["content"] for m in messages if m["role"] == "assistant"]
  if name in ("llama3", "gemma"):  # these templates trim the content
    contents = [c.strip() for c in contents]
  assert len(runs) == len(contents)
  for (start, end), content in zip(runs, contents):
    assert ids[end - 1] == eot_id  # the end-of-turn token is learned: the model learns to stop
    assert tok.decode_continuation(ids[:start], ids[start:end - 1]) == content
  # The prompt lmjax chat continues is exactly the tokens before the last reply.
  prompt, _ = fmt.encode(messages[:-1], add_generation_prompt=True)
  assert prompt == ids[:runs[-1][0]]


def _write(path, lines):
  path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
  return str(path)


def _cfg(source, tok, seq_len=64, **data):
  c = default_config()
  c.data.source, c.data.format, c.data.chat_template = source, "chat", "chatml"
  c.data.tokenizer, c.data.seq_len, c.data.global_batch_size = tok.path, seq_len, 4
  c.data.eval_fraction = 0.0
  c.data.update(data)
  return c


def test_packing_keeps_conversations_whole(tok, tmp_path):
  convs = [conversation(i, 7 * i, system=i % 2 == 0) for i in range(30)]
  convs = [m[:len(m) - 2 * (i % 3 == 0)] for i, m in enumerate(convs)]
  source = _write(tmp_path / "c.jsonl", [{"messages": m} for m in convs])
  fmt = ChatFormat(tok, "chatml")
  encoded = [fmt.encode(m)[0] for m in convs]
  seq_len = max(map(len, encoded)) + 3
  it = make_iterator(_cfg(source, tok, seq_len, shuffle=False), tok)
  rows = it.rows
  segments = []
  for r in range(len(rows["inputs"])):
    seg = rows["segment_ids"][r]
    for s in range(1, seg.max() + 1):
      where = seg == s
      assert rows["positions"][r][where].tolist() == list(range(where.sum()))
      segments.append(rows["inputs"][r][where].tolist() + [rows["targets"][r][where][-1]])
  assert sorted(segments) == sorted(encoded)  # every conversation once, in one piece
  assert len(rows["inputs"]) < len(convs)  # several per row

  # A conversation longer than a row: cut (truncate, and split means the same), skipped, refused.
  long_len = len(encoded[1]) - 5
  for policy in ("truncate", "split"):
    it = make_iterator(_cfg(source, tok, long_len, long_documents=policy), tok)
    assert it.counts()["truncated"] == sum(len(e) - 1 > long_len for e in encoded)
    assert (it.rows["segment_ids"] > 0).sum(axis=1).max() <= long_len
  it = make_iterator(_cfg(source, tok, long_len, long_documents="skip"), tok)
  assert it.metrics()["data_skipped/long_document"] == sum(len(e) - 1 > long_len for e in encoded)
  with pytest.raises(DataError, match=r"c.jsonl:\d+: the conversation is \d+ tokens, longer than"):
    make_iterator(_cfg(source, tok, long_len, long_documents="fail"), tok)
  with pytest.raises(ValueError, match="does not fit"):
    pack_examples([([1] * 5, [1] * 5, [1.0] * 5)], 4)


def test_bad_lines_are_skipped_and_counted_or_refused_by_file_and_line(tok, tmp_path):
  good = {"messages": conversation(1, 2)}
  source = _write(tmp_path / "bad.jsonl", [
      good, "not json", {"msgs": []}, {"messages": [{"role": "user"}]},
      {"messages": [{"role": "user", "content": "hi"}]}, good])
  it = make_iterator(_cfg(source, tok), tok)
  assert it.metrics() == {"data_skipped": 4.0, "data_skipped/invalid_field": 2.0,
                          "data_skipped/invalid_json": 1.0, "data_skipped/missing_field": 1.0}
  assert sum(s.max() for s in it.rows["segment_ids"]) == 2  # both good conversations
  cfg = _cfg(source, tok, bad_records="fail")
  with pytest.raises(DataError, match=r"bad.jsonl:2: not JSON; expected a JSON object "
                                      r"\{\"messages\": \[\{\"role\": str, \"content\": str\}"):
    make_iterator(cfg, tok)
  # A template that refuses a conversation: per record too.
  clean = _write(tmp_path / "clean.jsonl", [good, good])
  with pytest.raises(DataError, match=r"clean.jsonl:1: chat template gemma: System role not supported"):
    make_iterator(_cfg(clean, tok, chat_template="gemma", bad_records="fail"), tok)
  with pytest.raises(DataError, match=r"no training examples \(skipped: \{'invalid_record': 2\}\)"):
    make_iterator(_cfg(clean, tok, chat_template="gemma"), tok)
  with pytest.raises(DataError, match=r"has no chat template; set data.chat_template to a built-in "
                                      r"\(chatml, llama3, zephyr, gemma\)"):
    make_iterator(_cfg(source, tok, chat_template=""), tok)
  with pytest.raises(DataError, match="data.chat_template='nope': neither a built-in"):
    make_iterator(_cfg(source, tok, chat_template="nope"), tok)


def test_iterator_resumes_and_holds_out_an_eval_split_read_once(tok, tmp_path):
  source = _write(tmp_path / "c.jsonl", [{"messages": conversation(i, i)} for i in range(40)])
  cfg = _cfg(source, tok, 48, eval_fraction=0.25)
  a = make_iterator(cfg, tok)
  want = [next(a) for _ in range(8)]  # more than an epoch
  b = make_iterator(cfg, tok)
  next(b), next(b)
  c = make_iterator(cfg, tok)
  c.set_state(json.loads(json.dumps(b.get_state())))
  for k in range(2, 8):
    got = next(c)
    for key in want[k]:
      np.testing.assert_array_equal(got[key], want[k][key])
  evals = list(make_iterator(cfg, tok, split="eval"))
  eval_rows = make_iterator(cfg, tok, split="eval").rows["inputs"]
  assert len(evals) == -(-len(eval_rows) // 4) and sum((e["segment_ids"] > 0).any(1).sum() for e in evals) == len(eval_rows)
  # Two processes read halves of the same global batches.
  halves = [make_iterator(cfg, tok, process_index=i, process_count=2) for i in range(2)]
  first = [next(h) for h in halves]
  np.testing.assert_array_equal(np.concatenate([f["inputs"] for f in first]), want[0]["inputs"])


# -- a fine-tune and lmjax chat (slow: they train and compile) -----------------------------


def _model_cfg(tok, steps):
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 2, 64, 128
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 16
  c.model.vocab_size = tok.vocab_size
  c.model.max_seq_len = c.data.seq_len = 96
  c.data.tokenizer, c.data.global_batch_size = tok.path, 8
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 2
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.progress_bar = steps, 1, 0, False
  c.train.checkpoint_every = 0
  return c


@pytest.fixture(scope="module")
def runs(tok, tmp_path_factory):
  """A tiny text run (no chat template), and a chat fine-tune of it."""
  from lmjax.trainer import train
  one = jax.devices()[:1]
  root = tmp_path_factory.mktemp("runs")
  text = _write(root / "text.jsonl", [{"text": f"{m['content']}"} for i in range(30)
                                      for m in conversation(i, i + 1)])
  cfg = _model_cfg(tok, 4)
  cfg.data.source = text
  train(cfg, root / "pretrained", devices=one)
  cfg = _model_cfg(tok, 40)
  cfg.data.source = _write(root / "chat.jsonl", [{"messages": conversation(i % 10, 3)}
                                                 for i in range(64)])
  cfg.data.format, cfg.data.chat_template, cfg.data.eval_fraction = "chat", "chatml", 0.1
  cfg.train.init_from, cfg.train.eval_every = str(root / "pretrained"), 40
  history = train(cfg, root / "chat", devices=one)
  return root / "pretrained", root / "chat", cfg, history


@pytest.mark.slow
def test_chat_finetune_learns_the_assistant_turns(runs, tok):
  _, _, cfg, history = runs
  batch = next(make_iterator(cfg, tok))
  assert history[0]["tokens"] == batch["weights"].sum()  # only assistant tokens carry the loss
  assert batch["weights"].sum() < (batch["segment_ids"] > 0).sum() / 2
  assert history[-1]["loss"] < history[0]["loss"] - 1.0
  assert np.isfinite(history[-1]["eval_loss"])


def _cli_env():
  return dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "").strip())


@pytest.mark.slow
def test_lmjax_chat_answers_piped_turns(runs):
  from lmjax import chat
  from lmjax.generate import load_run
  _, run_dir, _, _ = runs
  cmd = [sys.executable, "-m", "lmjax.cli", "chat", "--workdir", str(run_dir), "--temperature", "0",
         "--max_new_tokens", "8", "--system", "Answer with the sum."]
  stdin = "What is 4 plus 3?\n\n/reset\nWhat is 2 plus 3?\n/exit\nnever read\n"
  proc = subprocess.run(cmd, cwd=REPO, env=_cli_env(), input=stdin, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr
  replies = proc.stdout.splitlines()
  assert len(replies) == 2, proc.stdout
  assert proc.stderr.strip() == ""  # piped: no prompts, no notes
  # The same replies in process, from the notebook API.
  run = load_run(run_dir, devices=jax.devices()[:1])
  session = chat.Chat(run, system="Answer with the sum.", temperature=0, max_new_tokens=8)
  assert session.send("What is 4 plus 3?") == replies[0]
  assert [m["role"] for m in session.messages] == ["system", "user", "assistant"]
  session.reset()
  session.turns = 1  # the CLI's second reply drew with seed + 1 (greedy: the same anyway)
  assert session.send("What is 2 plus 3?") == replies[1]
  assert replies[0].startswith("It is")  # learned from the fine-tune


@pytest.mark.slow
def test_lmjax_chat_without_a_template_is_one_line(runs, capsys):
  pretrained, _, _, _ = runs
  with pytest.raises(SystemExit) as exit_info:
    cli.main(["chat", "--workdir", str(pretrained)])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2
  assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
  assert "has no chat template; set data.chat_template to a built-in (chatml, llama3" in err
  assert "--template" in err


def test_chat_config_takes_a_run_and_a_template(tmp_path):
  from lmjax.config import ConfigError, validate
  from lmjax.config_file import load
  (tmp_path / "config.json").write_text(default_config().to_json())
  cfg = load(f"{REPO / 'configs' / 'chat.py'}:{tmp_path},template=llama3,runlocal")
  validate(cfg, num_devices=1)
  assert (cfg.data.format, cfg.data.chat_template, cfg.train.init_from) == ("chat", "llama3", str(tmp_path))
  assert cfg.train.steps == 100 and cfg.data.long_documents == "truncate"
  assert load(f"{REPO / 'configs' / 'chat.py'}:{tmp_path}").data.chat_template == ""
  with pytest.raises(ConfigError, match="needs the run to start from"):
    load(str(REPO / "configs" / "chat.py"))


def test_fine_tuning_formats_without_a_tokenizer_name_the_keys_to_set(tmp_path):
  from lmjax.data import get_tokenizer
  for fmt in ("chat", "prompt_response", "preference"):
    cfg = default_config()
    cfg.data.format, cfg.data.source = fmt, str(_write(tmp_path / "c.jsonl", [{"messages": []}]))
    with pytest.raises(DataError, match=r"set train.init_from to that run .* or data.tokenizer"):
      get_tokenizer(cfg.data, cfg.model.vocab_size)


def test_a_bidirectional_run_is_refused_before_chatting():
  from types import SimpleNamespace

  from lmjax.chat import Chat
  cfg = default_config()
  cfg.model.causal = False
  with pytest.raises(DataError, match=r"model.causal=False.*cannot generate"):
    Chat(SimpleNamespace(cfg=cfg))
