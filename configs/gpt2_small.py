"""GPT-2-small-sized Llama-style model (124M-class: 12 layers, width 768, 12 heads) for one GPU.

  lmjax train --config configs/gpt2_small.py --config.data.source='/data/*.jsonl' \
      --config.data.tokenizer=/data/tok32k.model --workdir /runs/gpt2s

bf16 compute, fp32 master weights, sequence 1024, global batch 256 (0.26M tokens/step).
Arguments, comma-separated after the file name:
``runlocal`` (``--config configs/gpt2_small.py:runlocal``) shrinks it for a CPU;
``gpt2`` (``--config configs/gpt2_small.py:gpt2``) uses GPT-2's own architecture instead of
Llama's (LayerNorm with biases, GELU MLP of width 3072, learned positions, biased
projections), e.g. for a Llama-vs-GPT-2 ablation at the same size.
"""

from lmjax.config import default_config


def get_config(arg: str | None = None):
  args = set((arg or "").split(","))
  c = default_config()
  m = c.model
  m.vocab_size = 32768
  m.num_layers = 12
  m.embed_dim = 768
  m.num_heads = 12
  m.num_kv_heads = 12
  m.head_dim = 64
  m.mlp_dim = 2048
  m.max_seq_len = 1024
  m.compute_dtype = "bfloat16"
  m.remat = "dots_no_batch"
  c.data.seq_len = 1024
  c.data.global_batch_size = 256
  c.data.worker_count = 4
  c.optim.learning_rate = 6e-4
  c.optim.warmup_steps = 2000
  c.train.steps = 100_000
  c.train.log_every = 50
  c.train.eval_every = 2000
  c.train.checkpoint_every = 2000
  if "gpt2" in args:
    m.norm, m.mlp, m.position_embedding = "layernorm", "gelu", "learned"
    m.attention_bias = m.mlp_bias = True
    m.mlp_dim, m.norm_eps = 3072, 1e-5
  if "runlocal" in args:
    m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = 1024, 2, 64, 4, 4
    m.head_dim, m.mlp_dim, m.max_seq_len, m.compute_dtype = 16, 128, 128, "float32"
    c.data.seq_len, c.data.global_batch_size, c.data.worker_count = 128, 8, 0
    c.optim.warmup_steps, c.train.steps = 5, 20
  return c
