"""Llama-3-8B-shaped model (32 layers, width 4096, 32 heads / 8 KV heads of 128, SwiGLU 14336,
untied embeddings, vocab 128256, RoPE theta 500000) for GPU clusters; FSDP over all devices.

  lmjax plan --config configs/llama_8b.py --devices 256 --accelerator h100   # memory first
  lmjax train --config configs/llama_8b.py --config.data.source='/data/*.jsonl' \
      --config.data.tokenizer=/data/tok.model --config.model.vocab_size=<tokenizer vocab> \
      --workdir /runs/llama8b

bf16 compute, fp32 master weights, sequence 8192, global batch 512 (4.2M tokens/step),
cuDNN flash attention (on TPUs add --config.model.attention=splash). 8.03B parameters.
`lmjax plan` on 256 H100s: 65 GiB per device (set XLA_PYTHON_CLIENT_MEM_FRACTION=0.9), about
2.4 s per step at 40% MFU; on 40 GB A100s it suggests --config.model.remat=full (27 GiB).
"""

from lmjax.config import default_config


def get_config(arg: str | None = None):
  c = default_config()
  m = c.model
  m.vocab_size = 128256
  m.num_layers = 32
  m.embed_dim = 4096
  m.num_heads = 32
  m.num_kv_heads = 8
  m.head_dim = 128
  m.mlp_dim = 14336
  m.max_seq_len = 8192
  m.rope_theta = 500000.0
  m.norm_eps = 1e-5
  m.tie_embeddings = False
  m.compute_dtype = "bfloat16"
  m.remat = "dots_no_batch"
  m.attention = "cudnn"
  c.data.seq_len = 8192
  c.data.global_batch_size = 512
  c.data.worker_count = 8
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.optim.weight_decay = 0.1
  c.train.steps = 100_000
  c.train.log_every = 20
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.mesh.fsdp = -1
  return c
