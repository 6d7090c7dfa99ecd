"""Ablation: the next-token (causal) objective against the masked-language-model (BERT)
objective, same tiny model, same data, same steps.

  lmjax sweep experiments/causal_vs_masked/sweep.py --workdir runs/causal_vs_masked
  lmjax runs runs/causal_vs_masked --plot runs/causal_vs_masked/curves.png

The tiny model (2 layers, width 128, 4 query heads / 2 KV heads, vocab 1024, tied
embeddings) trained twice on the default corpus: once causal (``train.objective="causal"``,
each token predicts the next from the tokens before it) and once masked
(``train.objective="masked"``, ``model.causal=False``: bidirectional attention, 15% of the
tokens hidden, the loss on those). 300 steps of 16 x 128 tokens each, one seed. The notebook
``causal_vs_masked.ipynb`` runs them, plots both losses, and measures next-token accuracy
against masked-token accuracy. ``get_config("smoke")`` and ``sweep("smoke")`` shrink it to 4
steps of 8 x 64 tokens (what the tests run).
"""

from lmjax import sweep as sw
from lmjax.config import default_config
from lmjax.config_file import parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, smoke=False)
  c = default_config()
  c.train.steps = 300
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.eval_batches = 4
  c.train.checkpoint_every = 0  # the last step is always saved
  c.optim.warmup_steps = 20
  c.train.mask_fraction = 0.15  # the masked runs': BERT's 15%, split 80/10/10
  if args.smoke:
    c.data.global_batch_size = 8
    c.data.seq_len = c.model.max_seq_len = 64
    c.train.steps = 4
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.eval_batches = 1
    c.optim.warmup_steps = 2
  return c


def sweep(arg: str | None = None):
  del arg  # the same two runs at every size
  return sw.zipped(sw.grid({"train.objective": ["causal", "masked"]}),
                   sw.grid({"model.causal": [True, False]}))
