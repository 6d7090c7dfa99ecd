"""Llama-3.2-1B-shaped model (16 layers, width 2048, 32 heads / 8 KV heads, SwiGLU 8192,
tied embeddings, vocab 128256) for GPUs and TPUs; FSDP over all devices by default.

  lmjax train --config configs/llama_1b.py --config.data.source='/data/*.jsonl' \
      --config.data.tokenizer=/data/tok.model --config.model.vocab_size=<tokenizer vocab> \
      --workdir /runs/llama1b

bf16 compute, fp32 master weights, sequence 2048, global batch 512 (1M tokens/step).
"""

from lmjax.config import default_config


def get_config(arg: str | None = None):
  c = default_config()
  m = c.model
  m.vocab_size = 128256
  m.num_layers = 16
  m.embed_dim = 2048
  m.num_heads = 32
  m.num_kv_heads = 8
  m.head_dim = 64
  m.mlp_dim = 8192
  m.max_seq_len = 2048
  m.rope_theta = 500000.0
  m.tie_embeddings = True
  m.compute_dtype = "bfloat16"
  m.remat = "dots_no_batch"
  c.data.seq_len = 2048
  c.data.global_batch_size = 512
  c.data.worker_count = 8
  c.optim.learning_rate = 3e-4
  c.optim.warmup_steps = 2000
  c.optim.weight_decay = 0.1
  c.train.steps = 50_000
  c.train.log_every = 20
  c.train.eval_every = 1000
  c.train.checkpoint_every = 1000
  c.mesh.fsdp = -1
  return c
