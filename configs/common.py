"""What the shipped configs share (not a config itself): the ``runlocal`` shrink.

A config file loads it by path, as configs are loaded:

  common = runpy.run_path(str(Path(__file__).with_name("common.py")))
  common["runlocal"](c)
"""

import ml_collections

RUNLOCAL_STEPS = 200  # 200 x 16 x 128 tokens: under a minute on two idle CPU cores


def runlocal(c: ml_collections.ConfigDict, steps: int = RUNLOCAL_STEPS) -> ml_collections.ConfigDict:
  """Shrinks ``c`` in place for a CPU run and returns it.

  The model becomes 2 layers of width 128 with 4 query heads of 32 (more, narrower ones when
  the config has more query heads per KV head), keeping the config's query-to-KV-head and
  MLP-to-width ratios (an expert's too) and its family's options (norm, MLP, positions,
  biases, tied embeddings, RoPE, the mixture of experts: experts, top-k, router); vocabulary
  1024 (the tokenizer generated for the default corpus), float32, no remat, XLA attention,
  all devices on FSDP (experts unsplit). Training becomes ``steps`` steps of 16 x 128 tokens
  at the tiny model's learning rate, eval at the middle and the end, one checkpoint at the
  end. (A MoE config whose first_dense_layers and moe_every do not fit 2 layers sets them
  after this.)
  """
  m, d, o, t = c.model, c.data, c.optim, c.train
  kv_ratio = m.num_heads // m.num_kv_heads
  mlp_ratio, expert_ratio = m.mlp_dim / m.embed_dim, m.expert_mlp_dim / m.embed_dim
  m.num_layers, m.embed_dim, m.num_heads = 2, 128, max(4, kv_ratio)
  m.head_dim, m.num_kv_heads = m.embed_dim // m.num_heads, m.num_heads // kv_ratio
  m.mlp_dim = 8 * round(m.embed_dim * mlp_ratio / 8)
  m.expert_mlp_dim = 8 * round(m.embed_dim * expert_ratio / 8)  # 0 (= mlp_dim) stays 0
  m.vocab_size, m.max_seq_len = 1024, 128
  m.param_dtype = m.compute_dtype = "float32"
  m.remat, m.attention = "none", "xla"
  d.seq_len, d.global_batch_size, d.worker_count = 128, 16, 0
  o.learning_rate, o.warmup_steps, o.grad_accum_steps = 3e-3, 20, 1
  t.steps, t.log_every, t.eval_every, t.eval_batches = steps, 10, steps // 2, 4
  t.checkpoint_every = 0  # the last step is always saved
  c.mesh.update(data=1, stage=1, fsdp=-1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1)
  return c
