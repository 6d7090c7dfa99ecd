"""Inspect an lmjax run's checkpoints without building the model or touching devices.

  python tools/inspect_checkpoint.py RUN_DIR            # steps, integrity, data position
  python tools/inspect_checkpoint.py RUN_DIR --step 300 # + every array: shape, dtype, sharding
  python tools/inspect_checkpoint.py RUN_DIR --config   # + the config the step was saved with

RUN_DIR is a ``--workdir`` (or its ``checkpoints/`` directory).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import os

import jax
import orbax.checkpoint as ocp

from lmjax import storage
from lmjax.checkpoint import MANIFEST, Checkpointer, CheckpointError
from lmjax.config import error_line


def _checkpoints_dir(path):
  return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _integrity(ckpt: Checkpointer, step: int) -> str:
  try:
    return "verified" if ckpt.verify(step) else f"no {MANIFEST} yet (unverified)"
  except CheckpointError as e:
    return f"CORRUPT: {e}"


def describe(run_dir: str | os.PathLike, step: int | None = None, show_config: bool = False) -> str:
  """A human-readable report of the checkpoints in ``run_dir``."""
  # Absolute: Orbax reads no array metadata through a relative path (it lists nothing).
  storage.check(run_dir)
  directory = _checkpoints_dir(storage.absolute(run_dir))
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: no such directory; give a run's --workdir")
  ckpt = Checkpointer(directory, read_only=True)
  steps = ckpt.all_steps()
  lines = [f"{directory}: {len(steps)} checkpoint(s)"]
  leftovers = sorted(p.name for p in directory.glob("*orbax-checkpoint-tmp*"))
  if not steps and not leftovers:
    raise CheckpointError(f"{directory}: holds no checkpoint; give a run's --workdir")
  if leftovers:
    lines.append(f"  incomplete (interrupted) saves, ignored: {', '.join(leftovers)}")
  for s in steps:
    size = sum(n for n, _ in storage.files(directory / str(s)).values())
    data = sorted((directory / str(s) / "data").glob("*.json"))
    position = data[0].read_text().strip().replace("\n", " ") if data else "none"
    try:
      meta = ckpt.meta(s)
    except CheckpointError:
      meta = {}
    origin = f"parameters only, imported from {meta.get('source')}" if meta.get("params_only") else (
        f"data position ({len(data)} file(s)): {position[:200]}")
    lines.append(f"  step {s}: {size / 2**20:.2f} MiB, {_integrity(ckpt, s)}; {origin}")
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"no checkpoint for step {step} in {directory}; steps: {steps}")
    meta = ocp.StandardCheckpointer().metadata(directory / str(step) / "state")
    tree = getattr(meta, "item_metadata", meta)
    if not jax.tree_util.tree_leaves(tree):
      raise CheckpointError(f"step {step} in {directory}: Orbax found no array metadata in "
                       f"{directory / str(step) / 'state'}; the checkpoint may be incomplete.")
    total = 0
    lines.append(f"\nstep {step} arrays (shape, dtype, sharding):")
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      spec = getattr(getattr(leaf, "sharding", None), "partition_spec", None)
      total += math.prod(leaf.shape) * leaf.dtype.itemsize
      lines.append(f"  {jax.tree_util.keystr(path)}: {tuple(leaf.shape)} {leaf.dtype} "
                   f"spec={tuple(spec) if spec is not None else 'replicated'}")
    lines.append(f"  total {total / 2**20:.2f} MiB")
    if show_config:
      lines.append("\nconfig:\n" + json.dumps(ckpt.saved_config(step), indent=2))
  elif show_config and steps:
    lines.append(f"\nconfig of step {steps[-1]}:\n" + json.dumps(ckpt.saved_config(steps[-1]), indent=2))
  ckpt.manager.close()
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("run_dir")
  parser.add_argument("--step", type=int, default=None, help="list this step's arrays")
  parser.add_argument("--config", action="store_true", help="print the saved config")
  args = parser.parse_args(argv)
  try:
    print(describe(args.run_dir, args.step, args.config))
  except CheckpointError as e:
    print(error_line(e), file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
