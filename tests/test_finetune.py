"""Fine-tuning: start from a pre-trained run's parameters (on another mesh too), train on
prompt/response pairs with the loss on the responses only."""

import json

import jax
import numpy as np
import pytest

import lmjax
from lmjax import data as data_lib
from lmjax.config import ConfigError, default_config
from lmjax.data import finetune
from lmjax.mesh import host_to_global
from lmjax.state import build, token_losses

pytestmark = pytest.mark.slow  # each test here trains or runs a whole program


def _cfg(steps, **mesh):
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 2, 64, 128
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 16
  c.model.max_seq_len = c.data.seq_len = 64
  c.data.global_batch_size = 8
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 2
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.progress_bar = steps, 1, 0, False
  c.train.checkpoint_every = 0
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrained")
  lmjax.train(_cfg(10), workdir)
  return workdir


def test_first_finetuning_step_sees_the_pretrained_model(pretrained, tmp_path):
  # Fine-tune on the pre-training data, on another mesh, with a lower learning rate.
  cfg = _cfg(1, data=2, fsdp=4)
  cfg.train.init_from, cfg.optim.learning_rate = str(pretrained), 1e-4
  history = lmjax.train(cfg, tmp_path)
  # The pre-trained parameters' loss on the same first batch, computed directly.
  run = lmjax.load(pretrained)
  batch = next(data_lib.make_iterator(cfg, run.tokenizer, split="train"))
  setup = run.setup
  s, n = jax.jit(lambda p, b: token_losses(setup.graphdef, p, b))(
      run.params, host_to_global(batch, setup.mesh, setup.batch_sharding))
  np.testing.assert_allclose(history[0]["loss"], float(s / n), rtol=1e-5)
  assert history[0]["loss"] < 6.0  # not a fresh model (ln 1024 = 6.93)


def _pairs_file(path, n=24):
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({"q": f"What is {i} plus {i}?", "a": f" It is {2 * i}."}) + "\n")
  return str(path)


def test_responses_only_carry_the_loss(pretrained, tmp_path):
  tok = lmjax.load(pretrained).tokenizer
  rows = finetune.pack_pairs([("Say hi.", " Hi!"), ("Count:", " 1 2 3")], tok, 64)
  p1, r1 = [tok.bos_id] + tok.encode("Say hi."), tok.encode(" Hi!") + [tok.eos_id]
  w = rows["weights"][0]
  assert rows["segment_ids"][0, :len(p1) + len(r1) - 1].tolist() == [1] * (len(p1) + len(r1) - 1)
  assert w[:len(p1) - 1].sum() == 0 and w[len(p1) - 1:len(p1) - 1 + len(r1)].tolist() == [1.0] * len(r1)
  assert rows["targets"][0, len(p1) - 1:len(p1) - 1 + len(r1)].tolist() == r1  # weighted = response
  assert rows["segment_ids"].max() == 2  # both examples packed into one row

  cfg = _cfg(12)
  cfg.data.format, cfg.data.prompt_field, cfg.data.response_field = "prompt_response", "q", "a"
  cfg.data.source = _pairs_file(tmp_path / "pairs.jsonl")
  cfg.data.eval_fraction = 0.25
  cfg.train.init_from, cfg.train.eval_every = str(pretrained), 12
  history = lmjax.train(cfg, tmp_path / "ft")
  response_tokens = history[0]["tokens"]
  it = data_lib.make_iterator(cfg, tok, split="train")
  assert response_tokens == next(it)["weights"].sum()  # only response tokens counted
  assert history[-1]["loss"] < history[0]["loss"] - 1.0
  assert np.isfinite(history[-1]["eval_loss"])
  # The fine-tuned run loads back with the pre-trained run's tokenizer.
  assert lmjax.load(tmp_path / "ft").tokenizer.path == tok.path


def test_finetune_data_resumes_and_rejects_bad_lines(pretrained, tmp_path):
  cfg = _cfg(1)
  cfg.data.format, cfg.data.prompt_field, cfg.data.response_field = "prompt_response", "q", "a"
  cfg.data.source = _pairs_file(tmp_path / "pairs.jsonl", 40)
  cfg.data.seq_len = 16
  tok = lmjax.load(pretrained).tokenizer
  a = data_lib.make_iterator(cfg, tok, split="train")
  want = [next(a) for _ in range(6)]  # several epochs of a few rows
  b = data_lib.make_iterator(cfg, tok, split="train")
  for _ in range(2):
    next(b)
  c = data_lib.make_iterator(cfg, tok, split="train")
  c.set_state(json.loads(json.dumps(b.get_state())))
  for k in range(2, 6):
    np.testing.assert_array_equal(next(c)["inputs"], want[k]["inputs"])
  (tmp_path / "bad.jsonl").write_text('{"q": "x", "a": "y"}\n{"q": "x"}\n')
  cfg.data.source = str(tmp_path / "bad.jsonl")
  with pytest.raises(data_lib.DataError, match=r"bad.jsonl:2: expected a JSON object"):
    data_lib.make_iterator(cfg, tok, split="train")
  cfg.train.init_from = str(tmp_path / "nothing")
  (tmp_path / "nothing").mkdir()
  with pytest.raises(Exception, match="nothing"):
    lmjax.train(cfg, tmp_path / "run")
