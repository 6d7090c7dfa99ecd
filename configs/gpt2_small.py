"""GPT-2-small-sized Llama-style model (124M-class: 12 layers, width 768, 12 heads) for one GPU.

  lmjax train --config configs/gpt2_small.py --config.data.source='/data/*.jsonl' \
      --config.data.tokenizer=/data/tok32k.model --workdir /runs/gpt2s

bf16 compute, fp32 master weights, sequence 1024, global batch 256 (0.26M tokens/step),
100k steps. Final loss of the full run: not measured for lmjax (it depends on the data);
at the 0.5M tokens/s that `docs/benchmarks.md` estimates for one H100, 100k steps take about
15 hours (an estimate, not a measurement).

Arguments, comma-separated after the file name (``--config configs/gpt2_small.py:gpt2,runlocal``):
``gpt2`` uses GPT-2's own architecture instead of Llama's (LayerNorm with biases, GELU MLP of
width 3072, learned positions, biased projections), e.g. for a Llama-vs-GPT-2 ablation at the
same size; ``runlocal`` shrinks either for a CPU (``common.py``: 2 layers, width 128, 4 heads
of 32, MLP 344 or, with ``gpt2``, 512; 200 steps of 16 x 128 tokens of the default corpus):

  lmjax train --config configs/gpt2_small.py:runlocal --workdir /tmp/gpt2s-local

Measured on this repository's 2-core CPU while other jobs shared it (load average 6-10,
4-6k tokens/s against ~22k idle, unshared on 2026-12-02, tiny's and llama_8b's runlocal took 37 s and 36 s): ``runlocal`` 112 s
wall, loss 6.9 -> 5.11 at step 200, eval loss 5.02; ``gpt2,runlocal`` 109 s, loss 5.44, eval
loss 5.41.
"""

import runpy
from pathlib import Path

from lmjax.config import default_config
from lmjax.config_file import parse_arg

common = runpy.run_path(str(Path(__file__).with_name("common.py")))


def get_config(arg: str | None = None):
  args = parse_arg(arg, gpt2=False, runlocal=False)
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
  if args.gpt2:
    m.norm, m.mlp, m.position_embedding = "layernorm", "gelu", "learned"
    m.attention_bias = m.mlp_bias = True
    m.mlp_dim, m.norm_eps = 3072, 1e-5
  return common["runlocal"](c) if args.runlocal else c
