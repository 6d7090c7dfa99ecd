"""Chat fine-tuning: a trained or imported run on multi-turn conversations, the loss on the
assistant turns only.

  lmjax train --config configs/chat.py:runs/llama3-8b,template=llama3 --workdir runs/llama3-chat \
      --config.data.source=conversations.jsonl
  lmjax chat --workdir runs/llama3-chat

The argument is the run directory to start from (an lmjax run or a Hugging Face import),
``RUN_DIR`` or ``run=RUN_DIR``, then optional items: ``template=NAME|FILE`` (a built-in:
chatml, llama3, zephyr, gemma, or a ``.jinja`` file; default "", the tokenizer's own
template, which an imported Hugging Face tokenizer carries) and ``runlocal``. Each line of
``data.source`` is ``{"messages": [{"role": "system"|"user"|"assistant"|..., "content": str},
...]}``. The run's tokenizer must know the template's special tokens (``<|im_start|>``,
``<|eot_id|>``, ...) for them to be single tokens; otherwise they are spelled in ordinary
tokens, which works but costs positions.

Everything else is configs/finetune.py's: the run's model and tokenizer, its newest usable
checkpoint's parameters as float32 master weights, a fresh optimizer peaking at 2e-5 after
100 warmup steps, cosine decay over 2000 steps, no weight decay, clipping at 1. Conversations
are packed whole into rows of ``data.seq_len``; a longer one is cut to its beginning
(``data.long_documents="truncate"``; "skip" drops it, "fail" refuses). A tenth of the
conversations is held out for the eval loss (on assistant tokens too).

``runlocal`` fine-tunes on a CPU as configs/finetune.py's ``runlocal`` does (100 steps of
16 x 128 tokens). Runtime and loss depend on the run and the conversations; nothing is
measured for the full schedule here.
"""

import runpy
from pathlib import Path

from lmjax.config import ConfigError
from lmjax.config_file import parse_arg

finetune = runpy.run_path(str(Path(__file__).parent / "finetune.py"))


def get_config(arg: str | None = None):
  args = parse_arg(arg, run="", template="", runlocal=False)
  if not args.run:
    raise ConfigError("configs/chat.py needs the run to start from: "
                      "--config configs/chat.py:RUN_DIR (or RUN_DIR,template=chatml,runlocal).")
  c = finetune["get_config"](f"run={args.run}" + (",runlocal" if args.runlocal else ""))
  c.data.format = "chat"
  c.data.chat_template = args.template
  c.data.long_documents = "truncate"
  c.data.eval_fraction = 0.1
  return c
