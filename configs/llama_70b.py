"""Llama-3-70B-shaped model (80 layers, width 8192, 64 heads / 8 KV heads of 128, SwiGLU 28672,
untied embeddings, vocab 128256, RoPE theta 500000) for clusters of 8-GPU nodes.

Mesh preset: tensor=8 inside each node (NVLink; heads, MLP and vocabulary split 8 ways) and
FSDP over the nodes (mesh.fsdp=-1), so data*fsdp = devices / 8; 8 accumulated microbatches
make each device's microbatch one 8192-token row on 512 GPUs (up to 512 GPUs: the global
batch must divide into data*fsdp*8). `lmjax plan` on 512 H100s: 16 GiB per device, against
104 GiB without accumulation (the residual stream is not split over tensor).

  lmjax plan --config configs/llama_70b.py --devices 512 --accelerator h100   # memory first
  lmjax train --config configs/llama_70b.py --config.data.source='/data/*.jsonl' \
      --config.data.tokenizer=/data/tok.model --config.model.vocab_size=<tokenizer vocab> \
      --workdir /runs/llama70b

bf16 compute, fp32 master weights, full remat, sequence 8192, global batch 512 (4.2M
tokens/step), cuDNN flash attention (on TPUs add --config.model.attention=splash and
--config.mesh.tensor=4 or so); the family's settings are in ``llama.py``. 70.55B parameters.
Runtime and final loss of the full run: not measured for lmjax (they depend on the data).

``runlocal`` (``--config configs/llama_70b.py:runlocal``) is the same family shrunk for a CPU
(``common.py``: 2 layers, width 128, 8 heads of 16 / 1 KV head, SwiGLU 448, untied, no
tensor axis; 200 steps of 16 x 128 tokens of the default corpus):

  lmjax train --config configs/llama_70b.py:runlocal --workdir /tmp/llama70b-local

Measured on this repository's 2-core CPU while other jobs shared it (load average 6-10,
4-6k tokens/s against ~22k idle, unshared on 2026-12-02, tiny's and llama_8b's runlocal took 37 s and 36 s): 136 s
wall; the loss falls from 6.9 to 4.46 at step 200, eval loss 4.35.
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
  c.model.update(num_layers=80, embed_dim=8192, num_heads=64, mlp_dim=28672, remat="full")
  c.optim.learning_rate = 1.5e-4
  c.optim.grad_accum_steps = 8
  c.mesh.tensor = 8
  return common["runlocal"](c) if args.runlocal else c
