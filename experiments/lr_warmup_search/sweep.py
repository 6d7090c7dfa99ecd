"""Automated search: learning rate and warmup of the tiny model by successive halving.

  lmjax sweep experiments/lr_warmup_search/sweep.py --workdir runs/lr_warmup_search
  lmjax runs runs/lr_warmup_search --plot runs/lr_warmup_search/curves.png

Nine random configs (learning rate log-uniform in [3e-4, 3e-2], warmup 0, 10, 30 or 60
steps) train for 40 steps; the best third by eval loss continue to 120 steps by resuming
their workdirs, and the best of those to 360: 21 x 40 = 840 steps in all, two to three
minutes on a 2-core CPU. ``runs/lr_warmup_search/search.json`` records every rung's eval losses;
``results.md`` the runs. Every candidate's cosine schedule spans the final 360 steps, so a
continued run follows the schedule it started with.

Successive halving favours configs that start fast: a long warmup is judged early in its
ramp. That bias is the price of its budget; look at ``search.json`` before trusting a
narrow win.
"""

from lmjax import sweep as sw
from lmjax.config import default_config
from lmjax.config_file import parse_arg

SPACE = {"optim.learning_rate": sw.log_uniform(3e-4, 3e-2),
         "optim.warmup_steps": sw.choice(0, 10, 30, 60)}


def get_config(arg: str | None = None):
  parse_arg(arg)  # takes no argument: any is an error
  c = default_config()
  c.train.log_every = 10
  c.train.eval_every = 40  # every rung ends on a multiple of 40
  c.train.eval_batches = 4
  c.train.checkpoint_every = 0  # each rung's last step is saved
  return c


def search():
  return sw.SuccessiveHalving(space=SPACE, n=9, min_steps=40, eta=3, seed=0)
