"""Convert Hugging Face checkpoints (Llama / Mistral-family, Mixtral, GPT-2) to lmjax runs and back.

  python tools/convert_hf.py import /models/Llama-2-7b-hf runs/llama2-7b \
      [--set model.compute_dtype=bfloat16 --set data.seq_len=4096]
  python tools/convert_hf.py export runs/llama2-7b /models/llama2-7b-lmjax \
      [--step 1000] [--dtype bfloat16] [--max_shard_size 5GB]

``import`` reads ``config.json`` and the safetensors weights (one file or shards with an
index) and writes an lmjax run directory: ``config.json``, a parameters-only checkpoint
(step 0) that restores onto any mesh, and the checkpoint's tokenizer, which becomes
``data.tokenizer``: its ``tokenizer.json`` (with ``tokenizer_config.json`` -- bos/eos, chat
template -- and ``special_tokens_map.json``), else a sentencepiece ``tokenizer.model``, else
a tiktoken file (``tokenizer.model``, ``original/tokenizer.model`` as Llama 3 ships it).
Evaluate or generate from it (``lmjax eval --workdir
runs/llama2-7b``), or fine-tune with ``--config.train.init_from=runs/llama2-7b`` in a new
``--workdir``. Host memory peaks at about 3 copies of the parameters in ``model.param_dtype``
while Orbax writes them (float32: ~12 bytes per parameter, ~100 GB for 8B; ``--set
model.param_dtype=bfloat16`` halves it, and fine-tuning still starts in float32); a 1.24B
model imports in ~50 s on 2 cores (docs/benchmarks.md).

``export`` writes a run's parameters (newest usable checkpoint, or ``--step``) as
``config.json`` + safetensors and the run's tokenizer (``tokenizer.json`` +
``tokenizer_config.json``; a tiktoken tokenizer is converted to those; a sentencepiece run
writes its ``tokenizer.model``), which ``transformers.AutoModelForCausalLM.from_pretrained``
and ``AutoTokenizer.from_pretrained`` load. Nothing is downloaded.
Hugging Face directories and the import's run directory may be ``gs://`` or ``s3://`` URLs.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="Hugging Face directory -> lmjax run directory")
  imp.add_argument("hf_dir")
  imp.add_argument("workdir")
  imp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the converted config, e.g. model.compute_dtype=bfloat16")
  exp = sub.add_parser("export", help="lmjax run directory -> Hugging Face directory")
  exp.add_argument("workdir")
  exp.add_argument("hf_dir")
  exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest usable)")
  exp.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="tensor dtype (default: bfloat16 for bf16-compute runs, else float32)")
  exp.add_argument("--max_shard_size", default="5GB", help="split the weights into shards of at most this")
  args = parser.parse_args(argv)

  from lmjax import hf
  from lmjax.checkpoint import CheckpointError
  from lmjax.config import ConfigError, error_line  # DataError and ConversionError are ValueErrors too
  try:
    if args.command == "import":
      overrides = {}
      for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
          raise hf.ConversionError(f"--set {item}: use KEY=VALUE, e.g. model.compute_dtype=bfloat16")
        overrides[key] = value
      hf.import_checkpoint(args.hf_dir, args.workdir, overrides)
    else:
      hf.export_checkpoint(args.workdir, args.hf_dir, args.step, args.dtype, args.max_shard_size)
  except (ValueError, CheckpointError, FileNotFoundError, ConfigError) as e:
    sys.stderr.write(error_line(e) + "\n")
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
