"""Tiny Llama-style model on the embedded default corpus, for CPU.

  lmjax train --config configs/tiny.py --workdir /tmp/lmjax-tiny

About 0.5M parameters (2 layers, width 128, 4 heads / 2 KV heads, SwiGLU 384, tied
embeddings, vocab 1024), 1000 steps of 16 x 128 tokens. On a 2-core CPU it takes about two
to two and a half minutes at 16-23k tokens/s; the loss falls from 6.9 (uniform over the
vocabulary) to 3.13, eval loss 3.38 (2026-12-02: 142 s wall).

``runlocal`` (``--config configs/tiny.py:runlocal``) is the same model for 200 steps
(``common.py``), a quick check that training works:

  lmjax train --config configs/tiny.py:runlocal --workdir /tmp/tiny-local

Measured on this repository's 2-core CPU while other jobs shared it (load average 6-10,
4-6k tokens/s against ~22k idle, unshared on 2026-12-02, tiny's and llama_8b's runlocal took 37 s and 36 s): 101 and 139 s
wall in two runs; the loss falls from 6.9 to 4.99 at step 200, eval loss 4.89.
"""

import runpy
from pathlib import Path

from lmjax.config import default_config
from lmjax.config_file import parse_arg

common = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config(arg: str | None = None):
  args = parse_arg(arg, runlocal=False)
  c = default_config()
  c.train.steps = 1000
  c.train.log_every = 10
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  return common["runlocal"](c) if args.runlocal else c
