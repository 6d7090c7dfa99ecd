"""Trains an lmjax sentencepiece tokenizer on a data source and reports how well it fits.

  python tools/train_tokenizer.py --source default --vocab_size 1024 --output /tmp/tok.model
  python tools/train_tokenizer.py --source 'data/*.jsonl' --text_field body \\
      --vocab_size 32000 --model_type unigram --output tok32k.model

Point ``data.tokenizer`` at the output and set ``model.vocab_size`` to the printed size.
Coverage is the fraction of characters encoded by vocabulary pieces rather than by
byte fallback; tokens/char is the compression (lower means shorter sequences).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lmjax.data import DataError, Tokenizer, load_documents, train_tokenizer  # noqa: E402
from lmjax.data.tokenizer import MODEL_TYPES  # noqa: E402


def fit_stats(tok: Tokenizer, documents: list[str]) -> tuple[float, float]:
  """(coverage, tokens per character) of ``tok`` on ``documents``."""
  sp = tok.processor
  chars = tokens = fallback_chars = 0
  for doc in documents:
    pieces = sp.encode(doc, out_type="proto").pieces
    chars += len(doc)
    tokens += len(pieces)
    # A character spelled in bytes shows its surface on the last of its byte pieces.
    fallback_chars += sum(len(p.surface) for p in pieces if sp.is_byte(p.id) or sp.is_unknown(p.id))
  if not chars:
    return 0.0, 0.0
  return 1.0 - fallback_chars / chars, tokens / chars


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--source", default="default",
                      help='"default", a .txt/.jsonl file, a directory or a glob')
  parser.add_argument("--text_field", default="text", help="JSONL field holding the text")
  parser.add_argument("--vocab_size", type=int, default=1024)
  parser.add_argument("--model_type", choices=MODEL_TYPES, default="bpe")
  parser.add_argument("--output", required=True, help="path of the .model file to write")
  args = parser.parse_args(argv)

  try:
    docs = load_documents(args.source, args.text_field)
    start = time.perf_counter()
    tok = train_tokenizer(docs, args.vocab_size, args.output, args.model_type)
    seconds = time.perf_counter() - start
  except DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  coverage, tokens_per_char = fit_stats(tok, docs)
  print(f"wrote {args.output} ({args.model_type}) in {seconds:.2f}s from {len(docs)} documents, "
        f"{sum(map(len, docs)):,} characters")
  print(f"vocab size:      {tok.vocab_size}")
  print(f"coverage:        {coverage:.4%} of characters by vocabulary pieces (rest: byte fallback)")
  print(f"tokens per char: {tokens_per_char:.4f} ({1 / max(tokens_per_char, 1e-12):.2f} chars per token)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
