"""Ablation: multi-head (MHA), grouped-query (GQA) and multi-query (MQA) attention at the
tiny size, everything else equal.

  lmjax sweep experiments/gqa_vs_mha/sweep.py --workdir runs/gqa_vs_mha
  lmjax runs runs/gqa_vs_mha --plot runs/gqa_vs_mha/curves.png

The tiny model (4 query heads, width 128, 2 layers) with 4, 2 and 1 key/value heads, two
seeds each: six runs of 100 steps of 16 x 128 tokens, about a minute and a half on a 2-core
CPU. The notebook ``gqa_vs_mha.ipynb`` runs the same sweep from Python, plots the curves and
tabulates them. ``get_config("smoke")`` and ``sweep("smoke")`` shrink it to three runs of 4
steps (what the tests execute).
"""

from lmjax import sweep as sw
from lmjax.config import default_config
from lmjax.config_file import parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, smoke=False)
  c = default_config()
  c.model.num_heads = 4
  c.train.steps = 100
  c.train.log_every = 10
  c.train.eval_every = 25
  c.train.eval_batches = 4
  c.train.checkpoint_every = 0  # the last step is always saved
  c.optim.warmup_steps = 20
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
  # 4 KV heads = MHA, 2 = GQA (two query heads per KV head), 1 = MQA. Seeds change the
  # initialisation and the data order; the held-out documents stay the same.
  seeds = sw.seeds(1 if arg == "smoke" else 2)
  return sw.product(sw.grid({"model.num_kv_heads": [4, 2, 1]}), seeds)
