"""The Llama-3 family's shared settings (not a config itself): llama_1b.py, llama_8b.py and
llama_70b.py start from :func:`base` and change only their shape and what differs.

:func:`base` is Llama-3-8B's recipe without its shape: vocabulary 128256, 8 KV heads of 128,
RoPE theta 500000, RMSNorm epsilon 1e-5, untied embeddings, bf16 compute over fp32 master
weights, cuDNN flash attention, sequence 8192, global batch 512 (4.2M tokens/step), AdamW at
3e-4 after 2000 warmup steps, 100k steps, FSDP over all devices.
"""

import ml_collections

from lmjax.config import default_config


def base() -> ml_collections.ConfigDict:
  """Llama-3-8B's settings; the caller sets num_layers, embed_dim, num_heads and mlp_dim."""
  c = default_config()
  m = c.model
  m.vocab_size = 128256
  m.num_kv_heads = 8
  m.head_dim = 128
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
