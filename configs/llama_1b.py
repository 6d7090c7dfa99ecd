"""Llama-3.2-1B-shaped model (16 layers, width 2048, 32 heads / 8 KV heads of 64, SwiGLU 8192,
tied embeddings, vocab 128256) for GPUs and TPUs; FSDP over all devices by default.

  lmjax train --config configs/llama_1b.py --config.data.source='/data/*.jsonl' \
      --config.data.tokenizer=/data/tok.model --config.model.vocab_size=<tokenizer vocab> \
      --workdir /runs/llama1b

bf16 compute, fp32 master weights, sequence 2048, global batch 512 (1M tokens/step), 50k
steps, XLA attention; the family's other settings are in ``llama.py``. 1.24B parameters.
Runtime and final loss of the full run: not measured for lmjax (they depend on the data).

``runlocal`` (``--config configs/llama_1b.py:runlocal``) is the same family shrunk for a CPU
(``common.py``: 2 layers, width 128, 4 heads / 1 KV head, SwiGLU 512, tied; 200 steps of
16 x 128 tokens of the default corpus):

  lmjax train --config configs/llama_1b.py:runlocal --workdir /tmp/llama1b-local

Measured on this repository's 2-core CPU while other jobs shared it (load average 6-10,
4-6k tokens/s against ~22k idle, unshared on 2026-12-02, tiny's and llama_8b's runlocal took 37 s and 36 s): 142 s
wall; the loss falls from 6.9 to 4.70 at step 200, eval loss 4.63.
"""

import runpy
from pathlib import Path

from lmjax.config_file import parse_arg

_here = Path(__file__).parent
llama = runpy.run_path(str(_here / "llama.py"))
common = runpy.run_path(str(_here / "common.py"))


def get_config(arg: str | None = None):
  args = parse_arg(arg, runlocal=False)
  c = llama["base"]()
  c.model.update(num_layers=16, embed_dim=2048, num_heads=32, head_dim=64, mlp_dim=8192,
                 max_seq_len=2048, tie_embeddings=True, attention="xla")
  c.model.norm_eps = 1e-6  # lmjax's default, as this config always had (Llama-3.2-1B uses 1e-5)
  c.data.seq_len = 2048
  c.train.steps = 50_000
  return common["runlocal"](c) if args.runlocal else c
