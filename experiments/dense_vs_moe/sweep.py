"""Ablation: a dense MLP against a mixture of experts with the same active parameters, at
the tiny size, everything else equal.

  lmjax sweep experiments/dense_vs_moe/sweep.py --workdir runs/dense_vs_moe
  lmjax runs runs/dense_vs_moe --plot runs/dense_vs_moe/curves.png

The tiny model (2 layers, width 128, 4 query heads / 2 KV heads, tied embeddings) with a
dense SwiGLU MLP of 384 (``num_experts=0``) against the same model whose MLPs are 8 SwiGLU
experts of 192 with top-2 softmax routing, dropless (``num_experts=8``). A token goes
through 2 x 192 = 384 hidden units either way, so the parameters and FLOPs per token are
the same (the router adds 128 x 8 per layer) while the MoE holds 4x the MLP parameters.
Two runs of 300 steps of 16 x 128 tokens, one seed each (``SEEDS``); the notebook
``dense_vs_moe.ipynb`` runs them, plots the loss curves and the experts' load, and
tabulates them. ``get_config("smoke")`` and ``sweep("smoke")`` shrink it to one seed of 4
steps (what the tests run).
"""

from lmjax import sweep as sw
from lmjax.config import default_config
from lmjax.config_file import parse_arg

DENSE_MLP = 384  # the tiny model's
EXPERTS, TOP_K = 8, 2
SEEDS = 1  # runs per model; the seed moves the loss more than the model does here (see the notebook)


def get_config(arg: str | None = None):
  args = parse_arg(arg, smoke=False)
  c = default_config()
  m = c.model
  m.mlp_dim = DENSE_MLP  # the dense runs' MLP
  m.experts_per_token = TOP_K  # the MoE runs': k experts of mlp_dim / k each
  m.expert_mlp_dim = DENSE_MLP // TOP_K
  m.router, m.capacity_factor = "softmax", 0.0  # Mixtral's routing, no token dropped
  c.train.steps = 300
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.eval_batches = 4
  c.train.checkpoint_every = 0  # the last step is always saved
  c.optim.warmup_steps = 20
  if args.smoke:
    c.data.global_batch_size = 8
    c.data.seq_len = m.max_seq_len = 64
    c.train.steps = 4
    c.train.log_every = 1
    c.train.eval_every = 2
    c.train.eval_batches = 1
    c.optim.warmup_steps = 2
  return c


def sweep(arg: str | None = None):
  # num_experts 0 = dense. Seeds change the initialisation and the data order; the held-out
  # documents stay the same.
  seeds = sw.seeds(1 if arg == "smoke" else SEEDS)
  return sw.product(sw.grid({"model.num_experts": [0, EXPERTS]}), seeds)
