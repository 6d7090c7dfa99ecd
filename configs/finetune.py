"""Fine-tune a trained or imported run: its model (and tokenizer), its parameters, a fresh optimizer.

  python tools/convert_hf.py import /models/Mistral-7B-v0.1 runs/mistral7b
  lmjax train --config configs/finetune.py:runs/mistral7b --workdir runs/mistral7b-ft \
      --config.data.source=pairs.jsonl --config.data.format=prompt_response

The argument is the run directory to start from (an lmjax run or a Hugging Face import):
its saved config gives the model and data.tokenizer, ``train.init_from`` its newest usable
checkpoint's parameters (restored onto this run's mesh, as float32 master weights). The optimizer starts fresh with a
fine-tuning schedule: peak learning rate 2e-5 after 100 warmup steps, cosine decay over
2000 steps to a tenth, no weight decay, gradient clipping at 1.
Override anything with --config.KEY=VALUE; the model's shape fields must stay.
"""

from lmjax.load import run_config


def get_config(arg: str | None = None):
  if not arg:
    raise ValueError("configs/finetune.py needs the run to start from: "
                     "--config configs/finetune.py:RUN_DIR")
  c = run_config(arg)
  c.model.param_dtype = "float32"  # master weights, whatever the checkpoint stores
  c.train.init_from = arg
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
  return c
