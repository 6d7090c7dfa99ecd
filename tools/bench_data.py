"""Data-pipeline benchmark: tokens/s of the input pipeline alone, against what training eats.

  python tools/bench_data.py                 # all measurements, Markdown tables
  python tools/bench_data.py --seconds 2     # shorter timing windows
  python tools/bench_data.py --no_train      # skip measuring the training steps
  python tools/bench_data.py --encode_only   # only the tokenizers' encode speeds

Measures, on the embedded corpus repeated ``--copies`` times (vocabulary 1024):

* encode speed of a sentencepiece ``.model`` and of a byte-level BPE ``tokenizer.json``
  (both 1024 ids, trained on the corpus), one document at a time (what the raw pipeline
  does per document) and batched over threads (what ``tools/prepare_data.py`` does): the
  limit of the raw path;
* raw text -> packed batches (Grain: shuffle, tokenize, pack, batch) and prepared
  ArrayRecord rows -> batches, each with 0, 1 and 2 Grain worker processes, for the batch
  shapes of ``configs/tiny.py`` (16 x 128) and ``configs/gpt2_small.py`` (256 x 1024);
* the training step's consumption: ``configs/tiny.py`` and ``configs/gpt2_small.py:runlocal``
  on this machine, and ``configs/gpt2_small.py`` on one H100 estimated from its FLOPs.

Tokens/s counts every position of every batch (padding is under 0.1%). A window starts
after the workers are up, so start-up is reported apart. Each figure is the best of
``--repeats`` runs: on a shared machine the best run is the one least disturbed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax

from lmjax.config import default_config
from lmjax.data import default_documents, make_iterator, prepare, train_bpe_tokenizer, train_tokenizer

SHAPES = {"tiny (16 x 128)": (16, 128), "gpt2_small (256 x 1024)": (256, 1024)}
H100_BF16_PEAK = 989e12
ASSUMED_MFU = 0.4


def _rate(it, batch: int, seq: int, seconds: float, warmup: int) -> tuple[float, float]:
  """(tokens/s after ``warmup`` batches, seconds to the first batch)."""
  start = time.perf_counter()
  next(it)
  first = time.perf_counter() - start
  for _ in range(warmup - 1):
    next(it)
  n, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds or n < 2:
    next(it)
    n += 1
  return n * batch * seq / (time.perf_counter() - start), first


def bench_encode(tok, docs: list[str], repeats: int) -> list[tuple[str, float]]:
  """(what, tokens/s) of ``tok`` (any kind) on ``docs``."""

  def one_at_a_time() -> int:
    return sum(len(tok.encode(d)) for d in docs)

  out = []
  for name, fn in [("one document at a time (raw pipeline)", one_at_a_time)] + [
      (f"batched, {t} thread(s) (prepare_data)",
       lambda t=t: sum(map(len, tok.encode_batch(docs, num_threads=t))))
      for t in (1, 2)]:
    best = 0.0
    for _ in range(repeats):
      start = time.perf_counter()
      tokens = fn()
      best = max(best, tokens / (time.perf_counter() - start))
    out.append((name, best))
  return out


def bench_pipeline(sources: dict[int, str], tok, seconds: float, workers: list[int],
                   repeats: int) -> list[tuple]:
  """Rows (shape, workers, tokens/s, first-batch seconds); ``sources`` maps seq_len to source."""
  rows = []
  for name, (batch, seq) in SHAPES.items():
    for w in workers:
      cfg = default_config()
      cfg.data.source, cfg.data.seq_len, cfg.data.global_batch_size = sources[seq], seq, batch
      cfg.data.worker_count, cfg.data.eval_fraction = w, 0.0
      best, first = 0.0, 0.0
      for _ in range(repeats):
        it = make_iterator(cfg, tok, split="train")
        # Workers start one after another (each imports lmjax): time them once all are up.
        rate, start_s = _rate(it, batch, seq, seconds, warmup=1 + 4 * w)
        it.close()
        if rate > best:
          best, first = rate, start_s
      rows.append((name, w, best, first))
      print(f"  {name}, {w} workers: {best:,.0f} tokens/s (first batch {first:.2f}s)", flush=True)
  return rows


def bench_train(config: str, arg: str | None) -> float:
  import importlib.util

  from lmjax.trainer import train
  spec = importlib.util.spec_from_file_location("cfg", os.path.join("configs", config))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(arg)
  cfg.train.steps, cfg.train.log_every, cfg.train.eval_every = 120, 20, 0
  cfg.train.checkpoint_every, cfg.train.progress_bar = 0, False
  with tempfile.TemporaryDirectory() as workdir:
    history = train(cfg, workdir)
  return max(r["tokens_per_sec"] for r in history if "tokens_per_sec" in r)  # best 20-step window


def gpt2_small_h100_estimate() -> tuple[float, float, int]:
  """(tokens/s, FLOPs per token, parameters) of configs/gpt2_small.py on one H100 at the
  assumed MFU."""
  import importlib.util

  from flax import nnx

  from lmjax.metrics import flops_per_token
  from lmjax.model import Transformer, count_params
  spec = importlib.util.spec_from_file_location("gpt2_small", os.path.join("configs", "gpt2_small.py"))
  gpt2_small = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gpt2_small)
  cfg = gpt2_small.get_config()
  abstract = nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0)))
  params = count_params(nnx.split(abstract)[1].to_pure_dict())
  fpt = flops_per_token(cfg, params)
  return H100_BF16_PEAK * ASSUMED_MFU / fpt, fpt, params


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--seconds", type=float, default=4.0, help="timing window per measurement")
  parser.add_argument("--copies", type=int, default=20, help="copies of the embedded corpus")
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is kept")
  parser.add_argument("--no_train", action="store_true")
  parser.add_argument("--encode_only", action="store_true", help="only the encode speeds")
  args = parser.parse_args()
  workers = [int(w) for w in args.workers.split(",")]
  print(f"machine: {os.cpu_count()} cores; jax {jax.__version__} on {jax.devices()[0].platform}")

  tmp = tempfile.mkdtemp(prefix="lmjax-bench-data-")
  base = default_documents()
  tok = train_tokenizer(base, 1024, os.path.join(tmp, "tok.model"))
  # Copies differ in a leading number so that no two documents are identical.
  docs = [f"{i}. {d}" for i in range(args.copies) for d in base]
  source = os.path.join(tmp, "corpus.jsonl")
  with open(source, "w") as f:
    for d in docs:
      f.write(json.dumps({"text": d}) + "\n")
  mib = os.path.getsize(source) / 2**20
  print(f"corpus: {len(docs)} documents, {mib:.1f} MiB of JSON lines")

  bpe = train_bpe_tokenizer(base, 1024, os.path.join(tmp, "bpe", "tokenizer.json"))
  print("\n## encode")
  for kind, t in (("sentencepiece", tok), ("byte-level BPE tokenizer.json", bpe)):
    for name, rate in bench_encode(t, docs, args.repeats):
      print(f"| {kind} | {name} | {rate:,.0f} tokens/s |")
  if args.encode_only:
    return

  print("\n## prepare_data")
  prepared = {}
  for name, (batch, seq) in SHAPES.items():
    start = time.perf_counter()
    meta = prepare([source], os.path.join(tmp, f"prep{seq}"), tok, seq_len=seq)
    seconds = time.perf_counter() - start
    prepared[seq] = os.path.join(tmp, f"prep{seq}")
    tokens = meta["splits"]["train"]["tokens"]
    print(f"| seq_len {seq} | {tokens:,} tokens in {seconds:.2f}s | {tokens / seconds:,.0f} tokens/s |")

  print("\n## raw text -> batches")
  raw = bench_pipeline({seq: source for _, seq in SHAPES.values()}, tok, args.seconds, workers,
                       args.repeats)
  print("\n## prepared ArrayRecord -> batches")
  pre = bench_pipeline(prepared, tok, args.seconds, workers, args.repeats)

  print("\n| path | batch shape | workers | tokens/s | first batch (s) |\n| --- | --- | --- | --- | --- |")
  for label, rows in (("raw text", raw), ("prepared", pre)):
    for name, w, rate, first in rows:
      print(f"| {label} | {name} | {w} | {rate:,.0f} | {first:.2f} |")

  est, fpt, params = gpt2_small_h100_estimate()
  print(f"\ngpt2_small: {params / 1e6:.1f}M parameters, {fpt / 1e9:.2f} GFLOP/token; one H100 at "
        f"{ASSUMED_MFU:.0%} MFU of {H100_BF16_PEAK / 1e12:.0f} TFLOP/s: {est:,.0f} tokens/s")
  if not args.no_train:
    print("\n## training step consumption on this machine")
    for config, arg in (("tiny.py", None), ("gpt2_small.py", "runlocal")):
      rate = bench_train(config, arg)
      print(f"| configs/{config}{':' + arg if arg else ''} | {rate:,.0f} tokens/s |", flush=True)


if __name__ == "__main__":
  main()
