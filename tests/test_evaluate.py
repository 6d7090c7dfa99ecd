"""Loading a trained run, perplexity / bits per byte, and multiple-choice scoring, checked
against direct computations with the plain model."""

import functools
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import lmjax
from lmjax import data as data_lib
from lmjax.config import default_config
from lmjax.evaluate import choice_loglikelihoods, document_batches, multiple_choice, read_choices, target_bytes

pytestmark = pytest.mark.slow  # each test here trains or runs a whole program

ROOT = Path(__file__).resolve().parents[1]


def _cfg():
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 2, 64, 128
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 16
  c.model.max_seq_len = c.data.seq_len = 64
  c.data.global_batch_size = 8
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 2
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.progress_bar = 12, 4, 12, False
  c.train.checkpoint_every = 6
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("evalrun")
  lmjax.train(_cfg(), workdir)
  return lmjax.load(workdir)


def _direct_logprobs(run, inputs, targets, width=72):
  """Per-token log-probabilities of one row with the plain model (no sharding): right-padded
  to ``width`` (causal: the padding changes no earlier logit) so one program serves all."""
  tokens = np.zeros((1, width), np.int32)
  tokens[0, :len(inputs)] = inputs
  logits = _plain_logits(run.setup.graphdef, run.params, tokens)[:, :len(inputs)]
  return -np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, np.asarray(targets)[None]))[0]


@functools.partial(jax.jit, static_argnums=0)
def _plain_logits(graphdef, params, tokens):
  return nnx.merge(graphdef, params)(tokens)


def test_load_restores_the_final_checkpoint(run):
  assert run.step == 12 and run.cfg.train.steps == 12
  assert run.history[-1]["step"] == 12
  setup = lmjax.build(_cfg())
  from lmjax.checkpoint import Checkpointer
  want = Checkpointer(run.workdir / "checkpoints", _cfg()).restore(12, setup.abstract_state)["params"]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.params), jax.device_get(want))


def test_held_out_loss_matches_the_training_loop(run):
  # The same held-out batches as the loop's last eval: the same loss.
  out = run.evaluate(max_batches=run.cfg.train.eval_batches)
  np.testing.assert_allclose(out["loss"], run.history[-1]["eval_loss"], rtol=1e-5)
  assert out["perplexity"] == pytest.approx(math.exp(out["loss"]))


def test_perplexity_and_bits_per_byte_of_a_file(run, tmp_path):
  docs = ["The quick brown fox jumps over the lazy dog.", "Naïve café — déjà vu ✓",
          data_lib.default_documents()[3][:120]]
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  out = run.evaluate(str(path))
  loss_sum = tokens = 0.0
  assert all(len(run.tokenizer.encode(d)) < 63 for d in docs)  # one row each
  for doc in docs:
    ids = [run.tokenizer.bos_id] + run.tokenizer.encode(doc) + [run.tokenizer.eos_id]
    lp = _direct_logprobs(run, ids[:-1], ids[1:])
    loss_sum -= lp.sum()
    tokens += len(lp)
  text_bytes = sum(len(d.encode("utf-8")) for d in docs)
  assert out["tokens"] == tokens and out["bytes"] == text_bytes
  np.testing.assert_allclose(out["loss"], loss_sum / tokens, rtol=1e-5)
  np.testing.assert_allclose(out["bits_per_byte"], loss_sum / math.log(2) / text_bytes, rtol=1e-5)


def test_target_bytes_cover_the_text_exactly(run):
  docs = data_lib.default_documents()[:3] + ["héllo wörld — ünïcode ✓ 日本語"]
  batches = document_batches(docs, run.tokenizer, 64, 4)
  total = sum(float(np.sum(target_bytes(run.tokenizer, b) * b["weights"])) for b in batches)
  assert total == sum(len(d.encode("utf-8")) for d in docs)


def test_multiple_choice_scores_equal_direct_loglikelihoods(run, tmp_path):
  items = [
      {"context": "The Python language", "choices": [" is", " was not", " 123"], "label": 0},
      {"context": "A function returns", "choices": [" a value", " zebra"], "label": 1},
      {"context": "x" * 500, "choices": [" long context", " cut"], "label": 0},  # left-truncated
  ]
  scores = choice_loglikelihoods(run.setup, run.params, run.tokenizer, items)
  tok = run.tokenizer
  for item, s in zip(items, scores):
    for choice, got in zip(item["choices"], s):
      ids = ([tok.bos_id] + tok.encode(item["context"]) + tok.encode(choice))[-65:]
      lp = _direct_logprobs(run, ids[:-1], ids[1:])
      np.testing.assert_allclose(got, lp[-len(tok.encode(choice)):].sum(), rtol=1e-5)
  # Labels on the best choice for the first item and the worst for the others: 1/3.
  best = [int(np.argmax(s)) for s in scores]
  for i, item in enumerate(items):
    item["label"] = best[i] if i == 0 else int(np.argmin(scores[i]))
  path = tmp_path / "mc.jsonl"
  path.write_text("".join(json.dumps(i) + "\n" for i in items))
  out = multiple_choice(run.setup, run.params, run.tokenizer, read_choices(path))
  assert out["items"] == 3 and out["accuracy"] == pytest.approx(1 / 3)
  path.write_text('{"context": "x", "choices": ["a"], "label": 0}\n')
  with pytest.raises(ValueError, match=r"mc.jsonl:1: expected"):
    read_choices(path)


def test_eval_cli(run, tmp_path):
  mc = tmp_path / "mc.jsonl"
  mc.write_text(json.dumps({"context": "The", "choices": [" a", " b"], "label": 0}) + "\n")
  out = subprocess.run([sys.executable, "-m", "lmjax.cli", "eval", "--workdir", str(run.workdir),
                        "--eval_batches=2", f"--choices={mc}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((run.workdir / "eval.json").read_text())
  assert results["step"] == 12 and results["held_out"]["loss"] > 0
  assert results["choices"]["items"] == 1
  assert "bits_per_byte" in out.stdout


def test_eval_of_a_directory_that_is_no_run_is_one_line(tmp_path):
  out = subprocess.run([sys.executable, "-m", "lmjax.cli", "eval", "--workdir", str(tmp_path / "none")],
                       capture_output=True, text=True, cwd=ROOT, check=False)
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip() == f"error: {tmp_path / 'none'} holds no checkpoint and no config.json: not an lmjax run"
