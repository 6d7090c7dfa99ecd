"""Mixtral-8x7B-shaped mixture of experts (32 layers, width 4096, 32 heads / 8 KV heads of
128, every MLP 8 SwiGLU experts of 14336 with top-2 softmax routing, untied embeddings, vocab
32000, RoPE theta 1e6, context 32768) for GPU clusters; experts split over the mesh.

  lmjax plan --config configs/mixtral_8x7b.py --devices 256 --accelerator h100   # memory first
  lmjax train --config configs/mixtral_8x7b.py --config.data.source='/data/*.jsonl' \
      --config.data.tokenizer=/data/tok.model --config.model.vocab_size=<tokenizer vocab> \
      --workdir /runs/mixtral8x7b

Mesh preset: expert=8 (each GPU of an 8-GPU node holds one expert of every layer; tokens
reach their experts by all-to-all inside the node) and FSDP over the nodes (mesh.fsdp=-1);
the batch splits over fsdp*expert, i.e. every device. Dropless routing, as Mixtral's.
Load-balancing loss 0.01, router z-loss 0.001 (lmjax's defaults; Mixtral's are not
published). The rest is the Llama-3 recipe of ``llama.py``: bf16 compute over fp32 master
weights, cuDNN flash attention (on TPUs add --config.model.attention=splash), sequence
8192, global batch 512 (4.2M tokens/step) in 2 accumulated microbatches, AdamW at 3e-4
after 2000 warmup steps, 100k steps. 46.70B parameters, 12.88B of them active per token
(each token skips 6 of the 8 experts).

`lmjax plan` on 256 H100s (fsdp 32 x expert 8): 56 GiB per device; without the
accumulation 105 GiB, which does not fit (dropless dispatch sizes its exchange buffers for
all of a device's assignments at each of the 8 expert devices). Capacity dispatch,
``--config.model.capacity_factor=1.25 --config.optim.grad_accum_steps=1``, plans at 34 GiB
with half the FSDP traffic, dropping what overflows an expert. The plan's step time from
the active parameters' FLOPs is 3.7 s at 40% MFU, but XLA counts 8.4x those FLOPs in the
compiled dropless step's matmuls (its grouped matmuls over the whole padded buffers; 1.6x
with capacity dispatch), so expect it slower until measured. With 2 microbatches the 512
rows fill at most 256 devices; beyond, raise data.global_batch_size. Runtime and final
loss of the full run: not measured for lmjax (they depend on the data).

``runlocal`` (``--config configs/mixtral_8x7b.py:runlocal``) is the same family shrunk for a
CPU (``common.py``: 2 layers, width 128, 4 heads / 1 KV head, 8 experts of 448, top-2,
untied, experts unsplit; 200 steps of 16 x 128 tokens of the default corpus), the same run
as ``configs/mixtral.py:runlocal`` (measured there: 17 minutes on a shared 2-core CPU, loss
3.98 at step 200, eval loss 3.87):

  lmjax train --config configs/mixtral_8x7b.py:runlocal --workdir /tmp/mixtral8x7b-local
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
  c.model.update(vocab_size=32000, num_layers=32, embed_dim=4096, num_heads=32, mlp_dim=14336,
                 max_seq_len=32768, rope_theta=1e6)
  c.model.update(num_experts=8, experts_per_token=2, router="softmax", capacity_factor=0.0)
  c.optim.grad_accum_steps = 2  # 56 GiB per device on 256 H100s, 105 GiB without (lmjax plan)
  c.mesh.expert = 8
  return common["runlocal"](c) if args.runlocal else c
