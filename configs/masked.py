"""The tiny model trained as a masked language model (BERT's objective) on the default corpus.

  lmjax train --config configs/masked.py --workdir /tmp/lmjax-masked
  lmjax eval --workdir /tmp/lmjax-masked     # masked loss and masked-token accuracy

``configs/tiny.py``'s model (2 layers, width 128, 4 heads / 2 KV heads, vocab 1024) with
bidirectional attention (``model.causal=False``): each token sees its whole document, both
ways. Each step hides 15% of every document's tokens (80% become the mask id, the
tokenizer's unknown token, 10% a random token, 10% stay) and the loss is the cross-entropy of
the original tokens there. 1000 steps of 16 x 128 tokens, as tiny; a masked model does not
generate text (``lmjax generate`` refuses it).

``runlocal`` (``--config configs/masked.py:runlocal``) is the same model for 200 steps:

  lmjax train --config configs/masked.py:runlocal --workdir /tmp/masked-local

Measured on this repository's 2-core CPU while other jobs shared it (2026-12-02, load average
5-8, one device): runlocal took 165 s wall (3,456 tokens/s); the masked loss falls from 6.8 to
5.26 at step 200, held-out masked loss 5.22 with masked-token accuracy 0.141 (the most frequent
token alone scores about 0.07). The full 1000 steps were not measured; expect about 5x that.
"""

import runpy
from pathlib import Path

from lmjax.config import default_config
from lmjax.config_file import parse_arg

common = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config(arg: str | None = None):
  args = parse_arg(arg, runlocal=False)
  c = default_config()
  c.model.causal = False  # bidirectional attention within each document
  c.train.objective = "masked"
  c.train.mask_fraction = 0.15
  c.train.mask_token = ""  # the tokenizer's unknown token (byte fallback never produces it)
  c.train.steps = 1000
  c.train.log_every = 10
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  return common["runlocal"](c) if args.runlocal else c
