"""Tokenizes documents once into packed ArrayRecord rows that training reads directly.

  python tools/prepare_data.py --source 'data/*.jsonl' --tokenizer tok32k.model \\
      --seq_len 1024 --eval_fraction 0.005 --output data/owt-1024
  lmjax train --config configs/gpt2_small.py --config.data.source=data/owt-1024 \\
      --config.model.vocab_size=32000 --workdir runs/g

Sources are what ``data.source`` accepts (``.txt``, ``.jsonl``/``.json`` (also ``.gz``),
``.parquet``, ``.arrayrecord``; files, directories, globs; local or ``gs://`` / ``s3://``);
``--source`` may repeat. ``--output`` may be a bucket URL too: the directory is built in the
local cache and uploaded, its metadata file last.
``--tokenizer`` is any kind lmjax reads: a sentencepiece ``.model``, a Hugging Face
``tokenizer.json`` (its ``tokenizer_config.json`` beside it) or a tiktoken file; its file(s)
are copied into the output. Without ``--tokenizer`` a sentencepiece one is trained on the
sources with ``--vocab_size`` pieces (the documents are then held in memory once). The output directory holds the rows, the
tokenizer and ``lmjax_data.json``; set ``data.seq_len`` to the same ``--seq_len`` and
``model.vocab_size`` to the tokenizer's size (the last line printed says how).
Training from it needs no tokenizing, and its data order survives a change of process
count or mesh (see ``lmjax/data/prepared_reader.py``).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

from lmjax import storage
from lmjax.config import (BAD_RECORD_POLICIES, LONG_DOCUMENT_POLICIES, TXT_SPLITS, ConfigError,
                          error_line)
from lmjax.data import DataError, Tokenizer, load_documents, prepare, train_tokenizer
from lmjax.data.sources import REASONS


def _mib(n: float) -> str:
  return f"{n / 2**20:,.1f} MiB"


def summary(meta: dict, output: str, seconds: float) -> str:
  """The report printed after preparing: documents, tokens, rows, bytes, skips."""
  tr, ev = meta["splits"]["train"], meta["splits"]["eval"]
  files = storage.glob(storage.join(glob.escape(output), "*"))
  out_bytes = sum(storage.size_and_version(f)[0] for f in files)
  tokens = tr["tokens"] + ev["tokens"]
  lines = [
      f"wrote {output} in {seconds:.1f}s ({_mib(out_bytes)}; {len(tr['files'])} train and "
      f"{len(ev['files'])} eval shard(s))",
      f"  documents   {tr['documents'] + ev['documents']:,} (train {tr['documents']:,}, eval {ev['documents']:,})",
      f"  tokens      {tokens:,} (train {tr['tokens']:,}, eval {ev['tokens']:,}; bos/eos included)",
      f"  rows        {tr['rows']:,} train + {ev['rows']:,} eval of {meta['seq_len']} positions; "
      f"padding {tr['padding'] / max(1, tr['rows'] * meta['seq_len']):.2%}",
      f"  input       {_mib(meta['input_bytes'])} of UTF-8 text, "
      f"{tokens / max(seconds, 1e-9):,.0f} tokens/s",
      f"  tokenizer   {meta['tokenizer']['vocab_size']} pieces, sha256 {meta['tokenizer']['sha256'][:12]}",
  ]
  truncated = tr["truncated"] + ev["truncated"]
  if truncated:
    lines.append(f"  truncated   {truncated:,} documents longer than {meta['seq_len']} tokens")
  skipped = meta["skipped"]
  if skipped:
    lines.append(f"  skipped     {sum(skipped.values()):,} records:")
    for reason, n in skipped.items():
      example = meta["skipped_examples"].get(reason, [""])[0]
      lines.append(f"    {reason:15s} {n:>8,}  {REASONS.get(reason, '')}; e.g. {example}")
  else:
    lines.append("  skipped     nothing")
  return "\n".join(lines)


def empty_eval_warning(meta: dict) -> str | None:
  """One line when the eval split holds no documents, naming the option to change."""
  splits = meta["splits"]
  if splits["eval"]["documents"]:
    return None
  n = splits["train"]["documents"]
  suggest = min(0.5, float(f"{4 / max(n, 1):.2g}"))  # about 4 documents held out
  return (f"warning: the eval split is empty: --eval_fraction {meta['eval_fraction']:g} held out "
          f"none of the {n:,} documents, so training reports no eval loss; raise --eval_fraction "
          f"(e.g. --eval_fraction {suggest:g} holds out about {max(1, round(suggest * n))}).")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--source", action="append", required=True,
                      help='"default", a file, a directory or a glob; may repeat')
  parser.add_argument("--output", required=True, help="directory to write (must not exist)")
  parser.add_argument("--tokenizer", default="",
                      help="tokenizer to encode with: a sentencepiece .model, a tokenizer.json or a "
                           "tiktoken file")
  parser.add_argument("--vocab_size", type=int, default=0,
                      help="without --tokenizer: train one with this many pieces on the sources")
  parser.add_argument("--seq_len", type=int, default=128, help="positions per packed row")
  parser.add_argument("--text_field", default="text", help="JSONL/Parquet/ArrayRecord text field")
  parser.add_argument("--txt_split", choices=TXT_SPLITS, default="file")
  parser.add_argument("--eval_fraction", type=float, default=0.0,
                      help="share of documents held out (chosen by a hash of their text)")
  parser.add_argument("--split_seed", type=int, default=0, help="key of the held-out hash")
  parser.add_argument("--long_documents", choices=LONG_DOCUMENT_POLICIES, default="split")
  parser.add_argument("--bad_records", choices=BAD_RECORD_POLICIES, default="skip")
  parser.add_argument("--shard_mb", type=float, default=256.0, help="target size of each shard")
  parser.add_argument("--threads", type=int, default=0, help="encode threads (0: all cores)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")
  parser.add_argument("--no_progress", action="store_true", help="no progress bar")
  args = parser.parse_args(argv)

  from tqdm import tqdm

  try:
    if args.tokenizer:
      tok = Tokenizer.load(args.tokenizer)
    elif args.vocab_size > 0:
      docs = [doc for s in args.source for doc in load_documents(
          s, args.text_field, txt_split=args.txt_split, bad_records=args.bad_records)]
      path = os.fspath(storage.absolute(args.output)).rstrip("/") + ".tokenizer.model"
      tok = train_tokenizer(docs, args.vocab_size, path)
      del docs
      print(f"trained a {tok.vocab_size}-piece tokenizer: {path}")
    else:
      raise DataError("give --tokenizer PATH, or --vocab_size N to train one on the sources.")
    start = time.perf_counter()
    bar = tqdm(desc="prepare", unit="B", unit_scale=True, dynamic_ncols=True,
               disable=args.no_progress)
    totals = {"docs": 0, "tokens": 0}

    def progress(documents: int, nbytes: int, tokens: int) -> None:
      totals["docs"] += documents
      totals["tokens"] += tokens
      bar.update(nbytes)
      bar.set_postfix(docs=f"{totals['docs']:,}", tokens=f"{totals['tokens']:,}", refresh=False)

    try:
      meta = prepare(args.source, args.output, tok, seq_len=args.seq_len,
                     text_field=args.text_field, txt_split=args.txt_split,
                     eval_fraction=args.eval_fraction, split_seed=args.split_seed,
                     long_documents=args.long_documents, bad_records=args.bad_records,
                     shard_mb=args.shard_mb, encode_threads=args.threads,
                     overwrite=args.overwrite, progress=progress)
    finally:
      bar.close()
  except (DataError, ConfigError) as e:  # ConfigError: a bucket that cannot be used
    print(error_line(e), file=sys.stderr)
    return 2
  print(summary(meta, os.fspath(storage.absolute(args.output)), time.perf_counter() - start))
  warning = empty_eval_warning(meta)
  if warning:
    print(warning, file=sys.stderr)
  print(f"train with: --config.data.source={args.output} --config.data.seq_len={args.seq_len} "
        f"--config.model.vocab_size={tok.vocab_size}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
