"""Tiny Llama-style model on the embedded default corpus, for CPU.

  lmjax train --config configs/tiny.py --workdir /tmp/lmjax-tiny

About 0.5M parameters (2 layers, width 128, 4 heads / 2 KV heads, SwiGLU 384, tied
embeddings, vocab 1024), 1000 steps of 16 x 128 tokens. On a 2-core CPU it takes under two
minutes at ~22k tokens/s; the loss falls from 6.9 (uniform over the vocabulary) to about 3.1-3.5.
"""

from lmjax.config import default_config


def get_config(arg: str | None = None):
  c = default_config()
  c.train.steps = 1000
  c.train.log_every = 10
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  if arg == "runlocal":  # a few seconds, for smoke tests
    c.train.steps = 20
    c.train.eval_every = 10
    c.train.checkpoint_every = 10
  return c
