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
--config.mesh.tensor=4 or so). 70.55B parameters.
"""

from lmjax.config import default_config


def get_config(arg: str | None = None):
  c = default_config()
  m = c.model
  m.vocab_size = 128256
  m.num_layers = 80
  m.embed_dim = 8192
  m.num_heads = 64
  m.num_kv_heads = 8
  m.head_dim = 128
  m.mlp_dim = 28672
  m.max_seq_len = 8192
  m.rope_theta = 500000.0
  m.norm_eps = 1e-5
  m.tie_embeddings = False
  m.compute_dtype = "bfloat16"
  m.remat = "full"
  m.attention = "cudnn"
  c.data.seq_len = 8192
  c.data.global_batch_size = 512
  c.data.worker_count = 8
  c.optim.learning_rate = 1.5e-4
  c.optim.warmup_steps = 2000
  c.optim.weight_decay = 0.1
  c.optim.grad_accum_steps = 8
  c.train.steps = 100_000
  c.train.log_every = 20
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.mesh.fsdp = -1
  c.mesh.tensor = 8
  return c
