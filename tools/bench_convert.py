"""Hugging Face conversion throughput: a random Llama-shaped checkpoint in and out.

  python tools/bench_convert.py                 # Llama-3.2-1B shape (1.24B parameters)
  python tools/bench_convert.py --layers 4      # the same width, fewer layers
  python tools/bench_convert.py --quick         # 2 layers of width 512

``transformers`` builds the model from a local config (random weights, nothing downloaded)
and saves it in bfloat16 as 2 GB safetensors shards, as published checkpoints are; then
``lmjax.hf.import_checkpoint`` (safetensors -> float32 lmjax checkpoint) and
``lmjax.hf.export_checkpoint`` (-> bfloat16 safetensors) are timed, and the exported
weights are checked against the original bit for bit. Figures are printed as a Markdown
table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _size(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--layers", type=int, default=16)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--dir", default=os.environ.get("BENCH_DIR", tempfile.gettempdir()))
  args = parser.parse_args()

  import torch
  import transformers
  from safetensors.torch import load_file
  from lmjax import hf

  shape = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, num_hidden_layers=args.layers,
               tie_word_embeddings=True, rope_theta=5e5, max_position_embeddings=8192)
  if args.quick:
    shape.update(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
                 num_key_value_heads=4, num_hidden_layers=2)
  root = Path(tempfile.mkdtemp(prefix="lmjax-bench-convert-", dir=args.dir))
  try:
    torch.manual_seed(0)
    with torch.device("cpu"):
      model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).to(torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    model.save_pretrained(root / "hf", max_shard_size="2GB")
    saved = time.perf_counter() - t0
    del model
    t0 = time.perf_counter()
    hf.import_checkpoint(root / "hf", root / "run", say=lambda m: None)
    imported = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf.export_checkpoint(root / "run", root / "out", dtype="bfloat16", max_shard_size="2GB",
                         say=lambda m: None)
    exported = time.perf_counter() - t0
    same = True
    want = {}
    for f in sorted((root / "hf").glob("*.safetensors")):
      want.update(load_file(f))
    for f in sorted((root / "out").glob("*.safetensors")):
      for k, v in load_file(f).items():
        same &= torch.equal(v, want.pop(k))
    same &= not want
    hf_mb, run_mb = _size(root / "hf") / 2**20, _size(root / "run") / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(f"Llama-shaped model: {params / 1e9:.2f}B parameters, {shape['num_hidden_layers']} layers, "
          f"width {shape['hidden_size']}, vocab {shape['vocab_size']}; {os.cpu_count()} CPU cores.\n")
    print("| step | seconds | MiB/s | on disk (MiB) |")
    print("| --- | --- | --- | --- |")
    print(f"| transformers save_pretrained (bf16) | {saved:.1f} | {hf_mb / saved:.0f} | {hf_mb:.0f} |")
    print(f"| import: safetensors (bf16) -> lmjax checkpoint (fp32) | {imported:.1f} | "
          f"{run_mb / imported:.0f} written | {run_mb:.0f} |")
    print(f"| export: lmjax checkpoint -> safetensors (bf16) | {exported:.1f} | "
          f"{hf_mb / exported:.0f} written | {_size(root / 'out') / 2**20:.0f} |")
    print(f"\nExported tensors equal the original bit for bit: {same}. Peak RSS {rss:.0f} MiB.")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
