"""DPO: preference-tune a trained run against itself, frozen, as the reference.

  lmjax train --config configs/dpo.py:runs/sft --workdir runs/dpo \
      --config.data.source=prefs.jsonl

The argument is the run directory to start from (an lmjax run or a Hugging Face import),
``RUN_DIR`` or ``run=RUN_DIR``, then optional flags: ``configs/dpo.py:runs/sft,runlocal``. Its
saved config gives the model and the tokenizer; ``train.init_from`` its newest usable
checkpoint's parameters, which are also the frozen reference (``train.reference`` names
another run). The data are JSONL lines ``{"prompt": ..., "chosen": ..., "rejected": ...}``
(``data.format="preference"``), one pair per row of ``data.seq_len``. The optimizer starts
fresh: peak learning rate 5e-7 after 50 warmup steps, cosine decay over 1000 steps, no weight
decay, clipping at 1; beta 0.1. Nothing is measured for the full schedule here.

``runlocal`` keeps the run's model and fine-tunes it on a CPU: 60 steps of 16 pairs in rows of
128 tokens (or the run's shorter ones), float32, learning rate 1e-3 after 5 warmup steps, all
devices on FSDP, the held-out DPO metrics every 20 steps.
"""

from lmjax.config import ConfigError
from lmjax.config_file import parse_arg
from lmjax.rundir import run_config


def get_config(arg: str | None = None):
  args = parse_arg(arg, run="", runlocal=False)
  if not args.run:
    raise ConfigError("configs/dpo.py needs the run to start from (and to use as the reference): "
                      "--config configs/dpo.py:RUN_DIR (or RUN_DIR,runlocal).")
  c = run_config(args.run)
  c.model.param_dtype = "float32"  # master weights, whatever the checkpoint stores
  c.data.update(format="preference", prompt_field="prompt", chosen_field="chosen",
                rejected_field="rejected", eval_fraction=0.05, long_documents="truncate")
  c.train.update(objective="dpo", dpo_beta=0.1, reference="", init_from=args.run, init_step=-1,
                 teacher="", z_loss=0.0, steps=1000, log_every=10, eval_every=100,
                 checkpoint_every=250)
  c.optim.update(learning_rate=5e-7, warmup_steps=50, decay_steps=-1, end_lr_fraction=0.1,
                 weight_decay=0.0, grad_clip_norm=1.0)
  if args.runlocal:  # the run's model as it is; batch, steps and layout for a CPU
    c.model.update(compute_dtype="float32", remat="none", attention="xla")
    c.data.update(seq_len=min(128, c.model.max_seq_len), global_batch_size=16, worker_count=0)
    c.optim.update(learning_rate=1e-3, warmup_steps=5, grad_accum_steps=1)
    c.train.update(steps=60, eval_every=20, checkpoint_every=0)
    c.mesh.update(data=1, stage=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1)
  return c
