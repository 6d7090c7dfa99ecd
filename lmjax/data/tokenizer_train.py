"""Training a byte-level BPE ``tokenizer.json`` (Hugging Face ``tokenizers``), beside
sentencepiece's :func:`lmjax.data.train_tokenizer`.

The tokenizer splits text with Llama 3's pattern and spells every byte, so no text is ever
unknown and ``decode(encode(text)) == text``. Its ids begin with lmjax's four
(``<|pad|>`` 0, ``<|unk|>`` 1, ``<|begin_of_text|>`` 2 bos, ``<|end_of_text|>`` 3 eos), then
the given special tokens, the 256 bytes and the merges. It is written with a
``tokenizer_config.json`` beside it naming those roles, so ``transformers.AutoTokenizer``
loads the directory. The same documents and arguments give the same file bytes.

Example::

  tok = train_bpe_tokenizer(load_documents("default"), 1024, "/tmp/bpe/tokenizer.json",
                            special_tokens=["<|im_start|>", "<|im_end|>"])
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence

import tokenizers
import tokenizers.decoders
import tokenizers.models
import tokenizers.pre_tokenizers
import tokenizers.trainers

from lmjax import storage
from lmjax.data.readers import DataError
from lmjax.data.tokenizer import log
from lmjax.data.tokenizer_base import HF_CONFIG
from lmjax.data.tokenizer_bpe import LLAMA3_PATTERN, HFTokenizer

__all__ = ["BPE_ROLES", "train_bpe_tokenizer"]

# lmjax's four roles, ids 0-3 as in its sentencepiece tokenizers.
BPE_ROLES = {"pad": "<|pad|>", "unk": "<|unk|>", "bos": "<|begin_of_text|>", "eos": "<|end_of_text|>"}


def train_bpe_tokenizer(documents: Iterable[str], vocab_size: int, path: str,
                        special_tokens: Sequence[str] = ()) -> HFTokenizer:
  """Trains a byte-level BPE tokenizer with ``vocab_size`` ids on ``documents`` and writes it
  to ``path`` (a ``tokenizer.json`` path, or a directory to write one into; local or a URL),
  with a ``tokenizer_config.json`` beside it.

  ``special_tokens`` (e.g. ``["<|im_start|>", "<|im_end|>"]``) get ids right after lmjax's
  four and are always one token in text. A corpus too small for ``vocab_size`` gives fewer
  ids (logged); the returned tokenizer's ``vocab_size`` is the one to train with.
  """
  if not path.endswith(".json"):
    path = storage.join(path, "tokenizer.json")
  storage.check(storage.path(path).parent, write=True)  # a URL: writable before training
  special = list(special_tokens)
  for token in special:
    if not isinstance(token, str) or not token or token != token.strip():
      raise DataError(f"special token {token!r}: must be a non-empty string without surrounding "
                      "whitespace.")
  specials = list(BPE_ROLES.values()) + special
  if len(set(specials)) != len(specials):
    raise DataError(f"special tokens {special} hold duplicates (or one of lmjax's "
                    f"{list(BPE_ROLES.values())}).")
  least = len(specials) + 256
  if vocab_size <= least:
    raise DataError(f"a byte-level BPE tokenizer with {len(specials)} special tokens needs "
                    f"vocab_size above {least} (they and the 256 bytes); got {vocab_size}.")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=BPE_ROLES["unk"], ignore_merges=True))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
      tokenizers.pre_tokenizers.Split(tokenizers.Regex(LLAMA3_PATTERN), behavior="isolated"),
      tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, show_progress=False, min_frequency=2,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  counted = _Counted(documents)
  tok.train_from_iterator(counted, trainer)
  if not counted.chars:
    raise DataError("training a bpe tokenizer: the documents hold no text; give documents with text.")
  if tok.get_vocab_size() < vocab_size:
    log.warning("bpe tokenizer training: the documents support %d ids, not vocab_size=%d; "
                "train with model.vocab_size=%d, or add documents", tok.get_vocab_size(),
                vocab_size, tok.get_vocab_size())
  data = tok.to_str(pretty=True).encode("utf-8")
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 40, **{f"{k}_token": v for k, v in BPE_ROLES.items()}}
  if special:
    config["additional_special_tokens"] = special
  config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
  storage.write_bytes(path, data)
  storage.write_bytes(storage.join(os.path.dirname(path), HF_CONFIG), config_bytes)
  return HFTokenizer({HFTokenizer.file_name: data, HF_CONFIG: config_bytes}, path)


class _Counted:
  """The documents, counting their characters as training reads them."""

  def __init__(self, documents: Iterable[str]):
    self._documents, self.chars = documents, 0

  def __iter__(self) -> Iterator[str]:
    for doc in self._documents:
      if doc.strip():
        self.chars += len(doc)
        yield doc
