"""Llama-3-8B-shaped model (32 layers, width 4096, 32 heads / 8 KV heads of 128, SwiGLU 14336,
untied embeddings, vocab 128256, RoPE theta 500000) for GPU clusters; FSDP over all devices.

  lmjax plan --config configs/llama_8b.py --devices 256 --accelerator h100   # memory first
  lmjax train --config configs/llama_8b.py --config.data.source='/data/*.jsonl' \
      --config.data.tokenizer=/data/tok.model --config.model.vocab_size=<tokenizer vocab> \
      --workdir /runs/llama8b

bf16 compute, fp32 master weights, sequence 8192, global batch 512 (4.2M tokens/step),
cuDNN flash attention (on TPUs add --config.model.attention=splash); the family's settings
are in ``llama.py``. 8.03B parameters. `lmjax plan` on 256 H100s: 50 GiB per device (65 GiB
with whole logits, ``model.loss_chunk=0``), about 2.4 s per step at 40% MFU. At that estimate the 100k steps take about 67
hours on 256 H100s; neither that nor the final loss (it depends on the data) is measured.

``runlocal`` (``--config configs/llama_8b.py:runlocal``) is the same family shrunk for a CPU
(``common.py``: 2 layers, width 128, 4 heads / 1 KV head, SwiGLU 448, untied; 200 steps of
16 x 128 tokens of the default corpus):

  lmjax train --config configs/llama_8b.py:runlocal --workdir /tmp/llama8b-local

Measured on this repository's 2-core CPU while other jobs shared it (load average 6-10,
4-6k tokens/s against ~22k idle, unshared on 2026-12-02, tiny's and llama_8b's runlocal took 37 s and 36 s): 105 s
wall; the loss falls from 6.9 to 4.39 at step 200, eval loss 4.28.
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
  c.model.update(num_layers=32, embed_dim=4096, num_heads=32, mlp_dim=14336)
  return common["runlocal"](c) if args.runlocal else c
