"""Storage benchmark: checkpoint save and restore, and data reads, on local disk, an S3
server and a GCS emulator.

  python tools/bench_storage.py                  # 64 MiB checkpoints, 3 rounds, Markdown
  python tools/bench_storage.py --mib 256 --rounds 5

The S3 server (``moto``) and the GCS emulator (``gcp-storage-emulator``) are started on
loopback the way the tests start them (``tests/object_stores.py``); they keep objects in
memory in one Python process each, so their figures bound what lmjax's path layer and
TensorStore cost, not what a real bucket gives (a real bucket is faster per request and
reached over a network). The stores are measured in turn within each round (alternating),
and each figure is the median over rounds.

* checkpoint save: ``lmjax.checkpoint.Checkpointer.save`` and ``wait`` of a train state of
  ``--mib`` MiB (float32 arrays of a few sizes) with its manifest: MiB/s;
* checkpoint restore: ``Checkpointer.restore`` of that state onto one device: MiB/s;
* data read: the tokens/s of ``lmjax.data.make_iterator`` over a JSONL source held by the
  store (the embedded corpus repeated), batches of 16 x 128, and the raw MiB/s of reading
  the file through ``lmjax.storage``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from lmjax import storage
from lmjax.checkpoint import Checkpointer
from lmjax.config import default_config
from lmjax.data import default_documents, get_tokenizer, make_iterator


class _Position:
  topology_independent = True

  def get_state(self):
    return {"position": 0}

  def set_state(self, state):
    pass


def _state(mib: int) -> dict:
  """A train-state-like tree of ``mib`` MiB: a few large and many small float32 arrays."""
  n = mib * 2**20 // 4
  sizes = [n // 2, n // 4, n // 8] + [n // 8 // 32] * 32
  keys = jax.random.split(jax.random.key(0), len(sizes))
  return {"params": {f"w{i}": jax.random.normal(k, (s,)) for i, (k, s) in enumerate(zip(keys, sizes))},
          "step": jnp.int32(1)}


def bench_checkpoint(root: str, state: dict, mib: float, step: int) -> tuple[float, float]:
  cfg = default_config()
  cfg.train.async_checkpointing = False
  cfg.train.keep_checkpoints = 1
  directory = storage.join(root, "checkpoints")
  ckpt = Checkpointer(directory, cfg)
  start = time.perf_counter()
  ckpt.save(step, state, _Position(), cfg)
  ckpt.wait()
  save = time.perf_counter() - start
  ckpt.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
  reader = Checkpointer(directory, read_only=True)
  start = time.perf_counter()
  restored = reader.restore(step, abstract)
  jax.block_until_ready(restored)
  load = time.perf_counter() - start
  reader.manager.close()
  return mib / save, mib / load


def bench_data(source: str, tok, batches: int) -> tuple[float, float]:
  size, _ = storage.size_and_version(source)
  start = time.perf_counter()
  with storage.path(source).open("rb") as f:
    while f.read(1 << 22):
      pass
  raw = size / 2**20 / (time.perf_counter() - start)
  cfg = default_config()
  cfg.data.source, cfg.data.seq_len, cfg.data.global_batch_size = source, 128, 16
  cfg.data.eval_fraction = 0.0
  it = make_iterator(cfg, tok, split="train")
  next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  tokens = batches * 16 * 128 / (time.perf_counter() - start)
  return raw, tokens


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--mib", type=int, default=64, help="checkpoint size")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--copies", type=int, default=4, help="corpus copies in the JSONL source")
  p.add_argument("--batches", type=int, default=100, help="batches timed per data read")
  args = p.parse_args()

  import importlib.util
  here = os.path.dirname(os.path.abspath(__file__))
  spec = importlib.util.spec_from_file_location(
      "object_stores", os.path.join(here, os.pardir, "tests", "object_stores.py"))
  object_stores = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(object_stores)
  Stores = object_stores.Stores
  tmp = tempfile.mkdtemp(prefix="lmjax-bench-storage-")
  os.environ.setdefault("LMJAX_CACHE", os.path.join(tmp, "cache"))
  stores = Stores(tmp)
  os.environ.update(stores.env)
  try:
    roots = {"local disk": os.path.join(tmp, "local"), "S3 (moto)": stores.bucket("s3"),
             "GCS (emulator)": stores.bucket("gs")}
    docs = default_documents() * args.copies
    text = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    for root in roots.values():
      storage.write_bytes(storage.join(root, "data", "corpus.jsonl"), text)
    tok = get_tokenizer(default_config().data, 1024)
    state = _state(args.mib)
    mib = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    results = {name: [] for name in roots}
    for r in range(args.rounds):
      for name, root in roots.items():
        save, load = bench_checkpoint(storage.join(root, f"round{r}"), state, mib, r + 1)
        raw, tokens = bench_data(storage.join(root, "data", "corpus.jsonl"), tok, args.batches)
        results[name].append((save, load, raw, tokens))
        print(f"round {r}: {name}: save {save:.1f} MiB/s, restore {load:.1f} MiB/s, read "
              f"{raw:.1f} MiB/s, {tokens:,.0f} tokens/s", file=sys.stderr)
    print(f"\ncheckpoint {mib:.0f} MiB, JSONL {len(text) / 2**20:.1f} MiB, median of "
          f"{args.rounds} rounds\n")
    print("| store | save MiB/s | restore MiB/s | file read MiB/s | pipeline tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    for name, rows in results.items():
      cols = [statistics.median(c) for c in zip(*rows)]
      print(f"| {name} | {cols[0]:.1f} | {cols[1]:.1f} | {cols[2]:.1f} | {cols[3]:,.0f} |")
  finally:
    stores.close()


if __name__ == "__main__":
  main()
