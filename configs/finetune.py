"""Fine-tune a trained or imported run: its model (and tokenizer), its parameters, a fresh optimizer.

  python tools/convert_hf.py import /models/Mistral-7B-v0.1 runs/mistral7b
  lmjax train --config configs/finetune.py:runs/mistral7b --workdir runs/mistral7b-ft \
      --config.data.source=pairs.jsonl --config.data.format=prompt_response

The argument is the run directory to start from (an lmjax run or a Hugging Face import),
``RUN_DIR`` or ``run=RUN_DIR``, then optional flags: ``configs/finetune.py:runs/tiny,runlocal``.
Its saved config gives the model and data.tokenizer, ``train.init_from`` its newest usable
checkpoint's parameters (restored onto this run's mesh, as float32 master weights). The
optimizer starts fresh with a fine-tuning schedule: peak learning rate 2e-5 after 100 warmup
steps, cosine decay over 2000 steps to a tenth, no weight decay, gradient clipping at 1.
Override anything with --config.KEY=VALUE; the model's shape fields must stay. Runtime and
loss depend on the run and the data; nothing is measured for the full schedule here.

``runlocal`` keeps the run's model and data and fine-tunes it on a CPU (so the model must be
small enough for one): 100 steps of 16 x 128 tokens (or the run's shorter rows) in float32
with XLA attention, peak learning rate 1e-3 after 10 warmup steps, all devices on FSDP. On a
run of ``configs/tiny.py:runlocal``:

  lmjax train --config configs/tiny.py:runlocal --workdir /tmp/tiny-local
  lmjax train --config configs/finetune.py:/tmp/tiny-local,runlocal --workdir /tmp/tiny-ft

Measured on this repository's 2-core CPU while other jobs shared it (load average about 8,
a quarter of the idle speed): 72 s wall for the fine-tune; the loss went from the run's 4.99
(eval 4.89) to 4.66 at step 100, eval loss 4.73.
"""

from lmjax.config import ConfigError
from lmjax.config_file import parse_arg
from lmjax.rundir import run_config


def get_config(arg: str | None = None):
  args = parse_arg(arg, run="", runlocal=False)
  if not args.run:
    raise ConfigError("configs/finetune.py needs the run to start from: "
                      "--config configs/finetune.py:RUN_DIR (or RUN_DIR,runlocal).")
  c = run_config(args.run)
  c.model.param_dtype = "float32"  # master weights, whatever the checkpoint stores
  c.train.init_from = args.run
  c.train.init_step = -1
  c.train.steps = 2000
  c.train.log_every = 10
  c.train.eval_every = 200
  c.train.checkpoint_every = 500
  c.optim.learning_rate = 2e-5
  c.optim.warmup_steps = 100
  c.optim.decay_steps = -1
  c.optim.end_lr_fraction = 0.1
  c.optim.weight_decay = 0.0
  c.optim.grad_clip_norm = 1.0
  if args.runlocal:  # the run's model as it is; data, steps and layout for a CPU
    c.model.update(compute_dtype="float32", remat="none", attention="xla")
    c.data.update(seq_len=min(128, c.model.max_seq_len), global_batch_size=16, worker_count=0)
    c.optim.update(learning_rate=1e-3, warmup_steps=10, grad_accum_steps=1)
    c.train.update(steps=100, eval_every=50, checkpoint_every=0)
    c.mesh.update(data=1, stage=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1)
  return c
