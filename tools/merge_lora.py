"""Merge a LoRA run's adapters into its weights: a plain run directory (``model.lora_rank=0``).

  python tools/merge_lora.py runs/tiny-lora runs/tiny-merged [--step 200]

Reads the run's newest usable checkpoint (or ``--step``), folds each adapter into its
projection (W + (alpha / r) A B, in float32, cast to ``model.param_dtype``;
:func:`lmjax.model.lora.merge_lora`) and writes ``OUT/config.json`` and a parameters-only
checkpoint at the same step, with ``data.tokenizer`` naming the run's tokenizer. Evaluate or
generate from OUT, fine-tune it (``--config.train.init_from=OUT``, with new adapters or
none), or export it (``tools/convert_hf.py export``; exporting the LoRA run itself merges
the same way). ``lmjax.load`` and ``lmjax generate`` merge on the fly and need no merged copy.
"""

from __future__ import annotations

import argparse
import sys


def merge_run(run: str, out: str, step: int | None = None, say=print):
  """Writes run ``run``'s merged parameters to the run directory ``out``; returns its config."""
  import jax

  import lmjax
  from lmjax import rundir, storage
  from lmjax.checkpoint import Checkpointer

  storage.check(out, write=True)
  out = storage.absolute(out)
  if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
    raise SystemExit(f"error: {out}/checkpoints already holds checkpoints; merge into a new directory.")
  if not rundir.run_config(run, step).model.lora_rank:
    say(f"note: {run} has no LoRA adapters (model.lora_rank=0); its weights are copied as they are.")
  loaded = lmjax.load(run, step, merge=True)
  cfg = loaded.cfg
  if loaded.tokenizer is not None and loaded.tokenizer.path:
    cfg.data.tokenizer = str(loaded.tokenizer.path)
  storage.write_text(out / "config.json", cfg.to_json(indent=2))
  ckpt = Checkpointer(out / "checkpoints", cfg)
  ckpt.save_params(loaded.step, loaded.params, cfg, source=f"{run} (LoRA merged)")
  ckpt.close()
  n = sum(x.size for x in jax.tree.leaves(loaded.params))
  say(f"merged {run} step {loaded.step} into {out / 'checkpoints' / str(loaded.step)} "
      f"({n:,} parameters, model.lora_rank=0)")
  return cfg


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run", help="the LoRA run directory")
  parser.add_argument("out", help="the merged run directory to write (new)")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest usable)")
  args = parser.parse_args(argv)
  merge_run(args.run, args.out, args.step)
  return 0


if __name__ == "__main__":
  sys.exit(main())
