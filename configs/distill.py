"""Distillation: train a smaller student from scratch on a trained run's logits.

  lmjax train --config configs/distill.py:runs/tiny --workdir runs/tiny-student

The argument is the teacher's run directory, ``RUN_DIR`` or ``run=RUN_DIR``, then optional
flags: ``configs/distill.py:runs/tiny,runlocal``. The student takes the teacher's config (its
data, tokenizer and vocabulary, which the two must share) with half its layers (at least
one) and trains from scratch on the next-token objective mixed with the teacher's tempered
distribution: loss = 0.5 x cross-entropy + 0.5 x 2^2 x KL(teacher_2 || student_2)
(``train.distill_weight`` 0.5, ``train.distill_temperature`` 2). The teacher is frozen and
read again whenever the run starts or resumes. ``distill_kl``, ``ce`` and ``loss`` (the mix)
are logged; the eval reports the cross-entropy (``eval_loss``) and ``eval_distill_kl``.

``runlocal``: 200 steps of 16 x 128 tokens (or the teacher's shorter rows) on a CPU, float32,
XLA attention, all devices on FSDP.
"""

from lmjax.config import ConfigError
from lmjax.config_file import parse_arg
from lmjax.rundir import run_config


def get_config(arg: str | None = None):
  args = parse_arg(arg, run="", runlocal=False)
  if not args.run:
    raise ConfigError("configs/distill.py needs the teacher's run: --config configs/distill.py:RUN_DIR "
                      "(or RUN_DIR,runlocal).")
  c = run_config(args.run)
  c.model.num_layers = max(1, c.model.num_layers // 2)
  c.model.param_dtype = "float32"
  c.train.update(objective="causal", teacher=args.run, teacher_step=-1, distill_weight=0.5,
                 distill_temperature=2.0, init_from="", reference="")
  if args.runlocal:
    c.model.update(compute_dtype="float32", remat="none", attention="xla")
    c.data.update(seq_len=min(128, c.model.max_seq_len), global_batch_size=16, worker_count=0)
    c.optim.update(grad_accum_steps=1)
    c.train.update(steps=200, log_every=10, eval_every=100, checkpoint_every=0)
    c.mesh.update(data=1, stage=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1)
  return c
