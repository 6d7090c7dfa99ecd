"""Shared by tests/test_dpo.py and tests/test_distill.py: a tiny config, one tiny pre-trained
run (trained once per test process; the DPO reference, the policy's start and the teacher)
and a tiny preference set."""

import json
import random

import lmjax
from lmjax.config import default_config

_RUNS: dict[str, str] = {}


def tiny_cfg(steps: int, layers: int = 2, width: int = 32):
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = layers, width, 2 * width
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 2, 1, 16
  c.model.max_seq_len = c.data.seq_len = 32
  c.model.vocab_size = 512
  c.data.global_batch_size = 8
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 2
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.progress_bar = steps, 5, 0, False
  c.train.checkpoint_every = 0
  return c


def pretrained(tmp_path_factory) -> str:
  """A 2-layer, width-32 run of 20 steps on the default corpus (vocab 512)."""
  base = str(tmp_path_factory.getbasetemp())
  if base not in _RUNS:
    workdir = tmp_path_factory.mktemp("frozen-pretrained")
    lmjax.train(tiny_cfg(20), workdir)
    _RUNS[base] = str(workdir)
  return _RUNS[base]


WORDS = "the of and to in is for with as on by this that from are be or an it".split()


def preference_file(path, n: int = 48, seed: int = 0) -> str:
  """Pairs whose chosen response is always " yes it is", the rejected one random words."""
  rng = random.Random(seed)
  words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
  with open(path, "w") as f:
    for _ in range(n):
      f.write(json.dumps({"prompt": words(3), "chosen": " yes it is", "rejected": " " + words(3)}) + "\n")
  return str(path)
