"""Small Mixtral-shaped mixture-of-experts model on the embedded default corpus, for CPU.

  lmjax train --config configs/mixtral.py --workdir /tmp/lmjax-mixtral

Mixtral-8x7B's architecture at the tiny model's width: every layer's MLP is 8 SwiGLU experts
of which a softmax router picks 2 per token (their weights renormalised to sum 1), dropless;
2 layers of width 128, 4 query heads / 1 KV head of 32 (Mixtral's 4:1 grouping), experts
of 448 (3.5 x the width, as 14336 / 4096), RMSNorm, RoPE theta 1e6, untied embeddings,
vocab 1024; load-balancing loss 0.01 and router z-loss 0.001 (lmjax's defaults). 3.10M
parameters, 1.03M of them active per token (each token skips 6 of the 8 experts). 300
steps of 16 x 128 tokens. ``configs/mixtral_8x7b.py:runlocal`` is this model.

Arguments, comma-separated after the file name: ``window=N`` gives attention a sliding
window of N tokens (Mistral-7B's was 4096; Mixtral-8x7B attends to everything, the default
``window=0``), e.g. ``configs/mixtral.py:window=64``; ``runlocal`` is the same model for 200
steps (``common.py``), a check that training works:

  lmjax train --config configs/mixtral.py:runlocal --workdir /tmp/mixtral-local

The experts' load is in metrics.jsonl: ``moe/layer{i}/expert{j}`` (expert j's share of
layer i's assignments), ``moe/layer{i}/max_load`` and ``min_load`` (the busiest and idlest
expert's share x 8; 1 when balanced), besides ``moe_aux_loss``, ``router_z_loss`` and
``dropped_fraction``.

On a CPU the dropless experts are slow: their grouped matmul (``jax.lax.ragged_dot``) runs
about 9x slower than a batched matmul of the same FLOPs on XLA's CPU backend. Capacity
dispatch uses batched matmuls: ``--config.model.capacity_factor=2`` (an expert takes at
most twice its even share of a sequence's assignments; the rest are dropped and counted)
is about 4x faster there.

Measured on this repository's 2-core CPU while other jobs shared it (load average 6-10,
2026-12-02): the full run took 14 min wall at 774 tokens/s (first step, compiling: 22 s);
the loss falls from 6.96 to 3.56 at step 300, eval loss 3.60, and at the end the busiest
expert had 1.38 and 1.50 times its even share (layers 0 and 1), the idlest 0.73 and 0.75.
``runlocal``: 17 min at 437 tokens/s (busier CPU), loss 3.98 at step 200, eval loss 3.87;
with ``capacity_factor=2``: 4 min 19 s at 1866 tokens/s, loss 4.20, eval loss 4.09, 0.1% of
the assignments dropped at step 200 (2% at step 160).
"""

import runpy
from pathlib import Path

from lmjax.config import default_config
from lmjax.config_file import parse_arg

common = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config(arg: str | None = None):
  args = parse_arg(arg, window=0, runlocal=False)
  c = default_config()
  m = c.model
  m.num_kv_heads = 1
  m.mlp_dim = 448
  m.num_experts = 8
  m.experts_per_token = 2
  m.router = "softmax"
  m.capacity_factor = 0.0
  m.rope_theta = 1e6
  m.norm_eps = 1e-5
  m.tie_embeddings = False
  m.sliding_window = args.window
  c.train.steps = 300
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  return common["runlocal"](c) if args.runlocal else c
