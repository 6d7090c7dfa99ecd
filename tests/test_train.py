"""End to end on the embedded corpus: the loss falls, files land in the workdir, and a run
stopped after N steps resumes at N with the parameters and batches of an uninterrupted run."""

import json

import jax
import numpy as np
import pytest

from lmjax import data as data_lib
from lmjax.checkpoint import Checkpointer
from lmjax.config import ConfigError, default_config
from lmjax.metrics import read_metrics
from lmjax.state import build
from lmjax.trainer import train


def _cfg(steps):
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 2, 64, 192
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 16
  c.model.max_seq_len = c.data.seq_len = 64
  c.data.global_batch_size = 8
  c.optim.learning_rate, c.optim.warmup_steps, c.optim.decay_steps = 1e-2, 5, 60
  c.train.steps = steps
  c.train.log_every = 1
  c.train.eval_every = 0
  c.train.checkpoint_every = 4
  c.train.progress_bar = False
  return c


@pytest.mark.slow
def test_training_lowers_the_loss_and_writes_metrics(tmp_path):
  cfg = _cfg(40)
  cfg.train.eval_every, cfg.train.log_every = 20, 5
  history = train(cfg, tmp_path)
  first, last = history[0], history[-1]
  assert first["step"] == 1 and last["step"] == 40
  assert first["loss"] > 6.0  # ~ln(1024) at initialisation
  assert last["loss"] < first["loss"] - 0.8, (first["loss"], last["loss"])  # uniform -> unigram+
  assert last["eval_loss"] < first["loss"] - 0.7
  assert np.isclose(last["eval_perplexity"], np.exp(last["eval_loss"]))
  assert last["tokens_per_sec"] > 0 and last["grad_norm"] > 0
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
  assert {"loss", "learning_rate", "grad_norm", "tokens_per_sec"} <= set(records[-1])
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert json.loads((tmp_path / "config.json").read_text())["train"]["steps"] == 40
  assert Checkpointer(tmp_path / "checkpoints", cfg).all_steps() == [32, 36, 40]  # keep 3
  # Nothing left to do: a rerun returns at once.
  assert train(cfg, tmp_path) == []


@pytest.mark.slow
def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
  full = train(_cfg(8), tmp_path / "full")
  first = train(_cfg(4), tmp_path / "split")  # "stopped" after 4 steps
  assert first[-1]["step"] == 4
  second = train(_cfg(8), tmp_path / "split")  # the same command again, longer
  assert [r["step"] for r in second] == [5, 6, 7, 8]
  losses = lambda h: [r["loss"] for r in h]
  # Same mesh, same program, same data: the resumed losses are bit-identical.
  assert losses(first) + losses(second) == losses(full)

  cfg = _cfg(8)
  setup = build(cfg)
  a = Checkpointer(tmp_path / "full" / "checkpoints", cfg)
  b = Checkpointer(tmp_path / "split" / "checkpoints", cfg)
  pa = jax.device_get(a.restore(8, setup.abstract_state)["params"])
  pb = jax.device_get(b.restore(8, setup.abstract_state)["params"])
  jax.tree.map(np.testing.assert_array_equal, pa, pb)

  # The data iterator restored at step 4 yields the batch the uninterrupted run saw at step 5.
  tok = data_lib.get_tokenizer(cfg.data, cfg.model.vocab_size)
  uninterrupted = data_lib.make_iterator(cfg, tok, split="train")
  for _ in range(4):
    next(uninterrupted)
  resumed = data_lib.make_iterator(cfg, tok, split="train")
  b.restore(4, setup.abstract_state, resumed)
  want, got = next(uninterrupted), next(resumed)
  for key in data_lib.BATCH_KEYS:
    np.testing.assert_array_equal(got[key], want[key])
  a.close(), b.close()


def test_vocab_size_must_match_the_tokenizer(tmp_path):
  docs = data_lib.default_documents()[:20]
  data_lib.train_tokenizer(docs, 512, str(tmp_path / "tok512.model"))
  cfg = _cfg(2)
  cfg.data.tokenizer = str(tmp_path / "tok512.model")
  with pytest.raises(ConfigError, match="config.model.vocab_size: 1024 differs from the tokenizer's "
                                        "vocabulary size 512"):
    train(cfg, tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()  # failed before anything was written


@pytest.mark.slow
def test_trains_on_user_jsonl_and_txt_files(tmp_path):
  docs = data_lib.default_documents()
  src = tmp_path / "corpus"
  src.mkdir()
  with open(src / "a.jsonl", "w") as f:
    for doc in docs[:40]:
      f.write(json.dumps({"body": doc, "id": 1}) + "\n")
  for i, doc in enumerate(docs[40:50]):
    (src / f"doc{i}.txt").write_text(doc)
  cfg = _cfg(6)
  cfg.data.source, cfg.data.text_field = str(src), "body"
  cfg.model.vocab_size = 512
  history = train(cfg, tmp_path / "run")
  assert history[-1]["step"] == 6 and np.isfinite(history[-1]["loss"])
  assert "tokenizer-bpe-512" in str(data_lib.get_tokenizer(cfg.data, 512).path)
