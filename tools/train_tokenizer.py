"""Trains an lmjax tokenizer (sentencepiece, or a byte-level BPE tokenizer.json) on a data
source and reports how well it fits.

  python tools/train_tokenizer.py --source default --vocab_size 1024 --output /tmp/tok.model
  python tools/train_tokenizer.py --source 'data/*.jsonl' --text_field body \\
      --vocab_size 32000 --model_type unigram --special_tokens '<|im_start|>,<|im_end|>' \\
      --output tok32k.model
  python tools/train_tokenizer.py --kind bpe --source 'data/*.jsonl' --vocab_size 32000 \\
      --special_tokens '<|im_start|>,<|im_end|>' --output tok32k/tokenizer.json

Point ``data.tokenizer`` at the output (or pass it to ``tools/prepare_data.py``) and set
``model.vocab_size`` to the printed size. ``--source`` takes what ``data.source`` takes
and may repeat. ``--kind sentencepiece`` (the default) writes a ``.model``: special tokens
become user-defined pieces with ids right after the four control ids (0 pad, 1 unk, 2 bos,
3 eos; newline is 4); byte fallback is on. ``--kind bpe`` writes a byte-level BPE
``tokenizer.json`` (Llama 3's split pattern; ``--output`` a ``.json`` path or a directory)
and a ``tokenizer_config.json`` beside it, which ``transformers.AutoTokenizer`` loads: ids 0
``<|pad|>``, 1 ``<|unk|>``, 2 ``<|begin_of_text|>`` (bos), 3 ``<|end_of_text|>`` (eos), then
the special tokens, the 256 bytes and the merges. Either way special tokens are always one
token in text, no text is ever unknown, and the same input gives the same file bytes.
Coverage is the fraction of characters encoded by vocabulary pieces rather than by byte
fallback (a byte-level BPE spells every byte: 100%); tokens/char is the compression (lower
means shorter sequences).
"""

from __future__ import annotations

import argparse
import sys
import time

from lmjax.config import BAD_RECORD_POLICIES, TXT_SPLITS, ConfigError, error_line
from lmjax.data import (DataError, SkipLog, Tokenizer, load_documents, train_bpe_tokenizer,
                        train_tokenizer)
from lmjax.data.tokenizer import MODEL_TYPES

KINDS = ("sentencepiece", "bpe")


def fit_stats(tok: Tokenizer, documents: list[str]) -> tuple[float, float]:
  """(coverage, tokens per character) of ``tok`` on ``documents``; a tokenizer without byte
  fallback (byte-level BPE) covers every character."""
  if tok.kind != "sentencepiece":
    chars, tokens = sum(map(len, documents)), sum(map(len, tok.encode_batch(documents)))
    return (1.0, tokens / chars) if chars else (0.0, 0.0)
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
  parser.add_argument("--source", action="append",
                      help='"default", a file, a directory or a glob of .txt/.jsonl/.parquet/'
                           '.arrayrecord files; may repeat (default: "default")')
  parser.add_argument("--text_field", default="text", help="JSONL/Parquet/ArrayRecord text field")
  parser.add_argument("--txt_split", choices=TXT_SPLITS, default="file",
                      help="a .txt file is one document, or one per blank-line-separated block")
  parser.add_argument("--bad_records", choices=BAD_RECORD_POLICIES, default="skip")
  parser.add_argument("--vocab_size", type=int, default=1024)
  parser.add_argument("--kind", choices=KINDS, default="sentencepiece",
                      help="sentencepiece (a .model) or bpe (a byte-level BPE tokenizer.json)")
  parser.add_argument("--model_type", choices=MODEL_TYPES, default="bpe",
                      help="--kind sentencepiece: its model type")
  parser.add_argument("--special_tokens", default="",
                      help="comma-separated user-defined tokens, e.g. '<|im_start|>,<|im_end|>'")
  parser.add_argument("--output", required=True,
                      help="the .model file to write (--kind bpe: a tokenizer.json path or a directory)")
  args = parser.parse_args(argv)
  special = [t for t in args.special_tokens.split(",") if t]

  skips = SkipLog(args.bad_records)
  try:
    docs = [doc for source in (args.source or ["default"])
            for doc in load_documents(source, args.text_field, txt_split=args.txt_split, skips=skips)]
    start = time.perf_counter()
    if args.kind == "bpe":
      tok = train_bpe_tokenizer(docs, args.vocab_size, args.output, special_tokens=special)
    else:
      tok = train_tokenizer(docs, args.vocab_size, args.output, args.model_type, special_tokens=special)
    seconds = time.perf_counter() - start
  except (DataError, ConfigError) as e:  # ConfigError: a bucket that cannot be used
    print(error_line(e), file=sys.stderr)
    return 2
  coverage, tokens_per_char = fit_stats(tok, docs)
  what = "byte-level BPE" if args.kind == "bpe" else f"sentencepiece {args.model_type}"
  print(f"wrote {tok.path} ({what}) in {seconds:.2f}s from {len(docs)} documents, "
        f"{sum(map(len, docs)):,} characters")
  if skips.total:
    print(f"skipped {skips.total} records:\n{skips.summary()}")
  print(f"vocab size:      {tok.vocab_size}")
  if special:
    print("special tokens:  " + ", ".join(f"{t} = {tok.token_id(t)}" for t in special))
  print(f"coverage:        {coverage:.4%} of characters by vocabulary pieces (rest: byte fallback)")
  print(f"tokens per char: {tokens_per_char:.4f} ({1 / max(tokens_per_char, 1e-12):.2f} chars per token)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
