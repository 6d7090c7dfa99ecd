"""The after-pre-training features together, as a researcher chains them: a Llama-3-style
Hugging Face checkpoint (byte-level BPE ``tokenizer.json`` with its chat template) imported,
fine-tuned with LoRA on conversations in the tokenizer's own template, talked to, exported
back to ``transformers``; then DPO with LoRA from the same import."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import lmjax
from lmjax import hf, rundir
from lmjax.chat import Chat
from lmjax.data import Tokenizer, train_bpe_tokenizer
from lmjax.data.chat import BUILTIN_TEMPLATES, ChatFormat

SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _conversation(i: int) -> dict:
  return {"messages": [{"role": "system", "content": "Answer with the next number."},
                       {"role": "user", "content": f"What comes after {i}?"},
                       {"role": "assistant", "content": f"{i + 1} comes after {i}."}]}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
  """A Llama 3 layout on disk (random weights, a tokenizer.json trained here with Llama 3's
  special tokens and its chat template), imported into an lmjax run."""
  import torch
  import transformers
  root = tmp_path_factory.mktemp("after")
  docs = [f"What comes after {i}? {i + 1} comes after {i}. Answer with the next number."
          for i in range(200)] + lmjax.data.default_documents()[:40]
  hf_dir = root / "Llama-3-tiny"
  tok = train_bpe_tokenizer(docs, 400, str(hf_dir / "tokenizer.json"), special_tokens=SPECIALS)
  config = json.loads((hf_dir / "tokenizer_config.json").read_text())
  config["chat_template"] = BUILTIN_TEMPLATES["llama3"]
  (hf_dir / "tokenizer_config.json").write_text(json.dumps(config))
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, tie_word_embeddings=False))
  model.save_pretrained(hf_dir)
  run = root / "llama3-tiny"
  hf.import_checkpoint(hf_dir, run, say=lambda m: None)
  data = root / "chats.jsonl"
  data.write_text("".join(json.dumps(_conversation(i)) + "\n" for i in range(64)))
  return root, run, data


def _finetune_cfg(run, source, steps: int):
  cfg = rundir.run_config(run)
  cfg.model.max_seq_len = cfg.data.seq_len = 64
  cfg.model.lora_rank, cfg.model.lora_targets = 4, ("q", "k", "v", "o", "gate", "up", "down")
  cfg.data.source, cfg.data.global_batch_size, cfg.data.eval_fraction = str(source), 8, 0.1
  cfg.train.init_from = str(run)
  cfg.optim.learning_rate, cfg.optim.warmup_steps, cfg.optim.weight_decay = 1e-2, 2, 0.0
  cfg.train.steps, cfg.train.log_every, cfg.train.eval_every = steps, 1, steps
  cfg.train.checkpoint_every, cfg.train.progress_bar = 0, False
  return cfg


def _assert_base_frozen(run, workdir):
  """The LoRA run ``workdir``'s base weights are those of ``run``, bit for bit."""
  base = rundir.restore_params(run, lmjax.state.build(rundir.run_config(run), jax.devices()[:1]))[1]
  tuned = lmjax.load(workdir, merge=False, devices=jax.devices()[:1]).params
  for name in ("q", "k", "v", "o"):
    np.testing.assert_array_equal(np.asarray(tuned["blocks"]["attn"][name]),
                                  np.asarray(base["blocks"]["attn"][name]))
  np.testing.assert_array_equal(np.asarray(tuned["embed"]["table"]), np.asarray(base["embed"]["table"]))
  assert np.abs(np.asarray(tuned["blocks"]["attn"]["q_lora_b"])).max() > 0  # the adapters moved


@pytest.mark.slow
def test_llama3_import_lora_chat_finetune_chat_and_export(imported, tmp_path):
  import transformers
  root, run, source = imported
  cfg = _finetune_cfg(run, source, 30)
  cfg.data.format, cfg.data.chat_template = "chat", ""  # the imported tokenizer's template
  tok = rundir.run_tokenizer(cfg)
  assert tok.kind == "hf"
  assert tok.chat_template == BUILTIN_TEMPLATES["llama3"]

  # The rendered conversation tokenizes as transformers' chat template does.
  auto = transformers.AutoTokenizer.from_pretrained(root / "Llama-3-tiny")
  messages = _conversation(7)["messages"]
  ids, weights = ChatFormat(tok, "").encode(messages)
  want = auto.apply_chat_template(messages, tokenize=True, return_dict=False)
  assert list(ids) == list(want)
  eot = tok.token_id("<|eot_id|>")
  reply = [i for i, w in zip(ids, weights) if w]
  assert tok.decode(reply[:-1]) == "8 comes after 7." and reply[-1] == eot

  workdir = root / "chat-lora"
  history = lmjax.train(cfg, workdir, devices=jax.devices()[:1])
  # Adapters on a random width-32 model under a frozen random head learn slowly; they learn.
  assert history[-1]["loss"] < history[0]["loss"] - 0.2
  _assert_base_frozen(run, workdir)

  chat = Chat(lmjax.load(workdir, devices=jax.devices()[:1]), system="Answer with the next number.",
              temperature=0, max_new_tokens=12)
  assert eot in chat.format.end_of_turn()[1]  # replies stop there
  prompt = chat.format.encode(chat.messages + [{"role": "user", "content": "What comes after 12?"}],
                              add_generation_prompt=True)[0]
  assert prompt == auto.apply_chat_template(
      chat.messages + [{"role": "user", "content": "What comes after 12?"}],
      add_generation_prompt=True, tokenize=True, return_dict=False)
  answer = chat.send("What comes after 12?")
  assert isinstance(answer, str) and "<|eot_id|>" not in answer
  assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]

  out = tmp_path / "hf"
  hf.export_checkpoint(workdir, out, say=lambda m: None)
  exported = transformers.AutoTokenizer.from_pretrained(out)
  assert exported.apply_chat_template(messages, tokenize=True, return_dict=False) == want
  model = transformers.AutoModelForCausalLM.from_pretrained(out)  # LoRA merged: a plain Llama
  assert type(model).__name__ == "LlamaForCausalLM"


@pytest.mark.slow
def test_dpo_with_lora_from_an_import_trains_only_adapters(imported):
  root, run, _ = imported
  prefs = root / "prefs.jsonl"
  prefs.write_text("".join(json.dumps({"prompt": f"What comes after {i}?",
                                       "chosen": f" {i + 1} comes after {i}.",
                                       "rejected": f" {i + 5} or so."}) + "\n" for i in range(48)))
  cfg = _finetune_cfg(run, prefs, 12)
  cfg.data.format, cfg.train.objective, cfg.train.dpo_beta = "preference", "dpo", 0.5
  history = lmjax.train(cfg, root / "dpo-lora", devices=jax.devices()[:1])
  assert history[0]["loss"] == pytest.approx(np.log(2), abs=1e-3)  # the policy starts as the reference
  assert history[-1]["reward_margin"] > history[0]["reward_margin"] + 0.1
  assert history[-1]["loss"] < history[0]["loss"]
  _assert_base_frozen(run, root / "dpo-lora")
