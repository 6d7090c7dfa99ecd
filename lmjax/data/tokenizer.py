"""lmjax's sentencepiece tokenizers: the kind, deterministic training, and a cache keyed by content.

lmjax's token ids are fixed: 0 pad, 1 unk, 2 bos, 3 eos. Trained tokenizers use
byte fallback (no text is ever unknown) and identity normalisation, so
``decode(encode(text)) == text`` for any text, newlines and indentation included.
Which tokenizer a config uses is decided by :func:`lmjax.data.get_tokenizer`; any kind of
tokenizer file loads with :meth:`Tokenizer.load` (:mod:`lmjax.data.tokenizer_base`; Hugging
Face ``tokenizer.json`` and tiktoken files in :mod:`lmjax.data.tokenizer_bpe`). A ``.model``
file is a local path or a ``gs://`` / ``s3://`` URL (read and written through
:mod:`lmjax.storage`); the cache of trained tokenizers is a local directory.

Example::

  tok = train_tokenizer(load_documents("default"), 1024, "/tmp/tok.model",
                        special_tokens=["<|user|>"])
  tok.decode(tok.encode("x = 1\\n")) == "x = 1\\n"
  tok = cached_tokenizer(load_documents("default"), 1024, cache_dir())  # trained once
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from lmjax import storage
from lmjax.data.readers import DataError
from lmjax.data.tokenizer_base import HF_CONFIG, Tokenizer, chat_template_of, read_json

__all__ = ["MODEL_TYPES", "SentencePieceTokenizer", "Tokenizer", "cache_dir", "cached_tokenizer",
           "train_tokenizer"]

log = logging.getLogger("lmjax.data")  # the logger lmjax.data.sources warns through

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
MODEL_TYPES = ("bpe", "unigram")

# Trainer options shared by every lmjax tokenizer; they are part of the cache key.
_TRAINER_OPTIONS: dict[str, Any] = dict(
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    byte_fallback=True,  # unseen characters become UTF-8 byte pieces, never <unk>
    normalization_rule_name="identity",  # keep the text exactly (no NFKC)
    remove_extra_whitespaces=False,  # keep indentation and runs of spaces
    allow_whitespace_only_pieces=True,  # let "▁▁▁▁" (indentation) become one piece
    split_digits=True,
    user_defined_symbols=["\n"],  # newline is one piece (training sees single lines)
    character_coverage=0.9995,
    max_sentence_length=1 << 16,  # bytes per training line; longer lines are split to fit
    input_sentence_size=1_000_000,  # lines sampled (deterministically) from large corpora
    shuffle_input_sentence=True,
    num_threads=1,  # single-threaded training is bit-for-bit reproducible
    minloglevel=2,  # only errors on stderr
)
_TRAINER_SEED = 0
_CACHE_VERSION = 2  # bump when the training recipe changes in a way options don't show


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model with lmjax's conventions: ids without bos/eos, pad id 0. A
  ``tokenizer_config.json`` beside it (a Hugging Face checkpoint's) gives its chat template."""

  kind = "sentencepiece"
  file_name = "tokenizer.model"

  def __init__(self, files: dict[str, bytes], path: str = ""):
    super().__init__(files, path)
    self._sp = _processor_from_proto(files[self.file_name], path)
    self._template = chat_template_of(read_json(files, HF_CONFIG, path))

  @classmethod
  def sidecars(cls, name: str) -> dict[str, str]:
    return {HF_CONFIG: HF_CONFIG}

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    """The id padding holds; padding is told apart by ``segment_ids == 0``."""
    return PAD_ID

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def unk_id(self) -> int | None:
    return self._sp.unk_id() if self._sp.unk_id() >= 0 else None

  def id_to_token(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  @property
  def chat_template(self) -> str | None:
    return self._template

  @property
  def sha256(self) -> str:
    """Hex digest of the serialised model: the tokenizer's identity."""
    return hashlib.sha256(self._sp.serialized_model_proto()).hexdigest()

  @property
  def special_tokens(self) -> list[str]:
    """The user-defined pieces other than newline (see ``train_tokenizer``)."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=import-outside-toplevel
    user = pb.ModelProto.SentencePiece.USER_DEFINED
    return [p.piece for p in self._proto().pieces if p.type == user and p.piece != "\n"]

  def _proto(self):
    from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=import-outside-toplevel
    model = pb.ModelProto()
    model.ParseFromString(self._sp.serialized_model_proto())
    return model

  def token_id(self, piece: str) -> int:
    i = self._sp.piece_to_id(piece)
    if i == self._sp.unk_id() and piece != self._sp.id_to_piece(i):
      raise self._no_piece(piece)
    return i

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    """The wrapped sentencepiece processor (pieces, scores, sampling)."""
    return self._sp

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=num_threads or -1)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ``ids`` (any int iterable, numpy arrays included); control ids decode to ""."""
    return self._sp.decode([int(i) for i in ids])

  def decode_continuation(self, prompt: Iterable[int], ids: Iterable[int]) -> str:
    """Text of ``ids`` as it reads after ``prompt``: ``decode(prompt + ids)`` less the
    prompt's text. (``decode(ids)`` alone drops the space of a leading "▁" piece.)"""
    prompt, ids = [int(i) for i in prompt], [int(i) for i in ids]
    head, whole = self.decode(prompt), self.decode(prompt + ids)
    if whole.startswith(head):
      return whole[len(head):]
    # The prompt reads differently alone (e.g. it ends inside a character spelled in bytes):
    # the new pieces alone, the "▁" that decoding drops from the first one put back.
    first = next((i for i in ids if not self._sp.is_control(i)), None)
    lead = first is not None and self._sp.id_to_piece(first).startswith("\u2581")
    return " " * lead + self.decode(ids)

  def _piece_bytes(self, i: int) -> bytes:
    sp = self._sp
    if sp.is_control(i) or sp.is_unknown(i):
      return b""
    if sp.is_byte(i):
      return bytes([int(sp.id_to_piece(i)[3:5], 16)])
    return sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")

  def token_bytes(self) -> np.ndarray:
    """(vocab_size,) int64: UTF-8 bytes of text each piece stands for (0 for control and
    unknown pieces, 1 for a byte piece; "▁" is a space)."""
    if getattr(self, "_token_bytes", None) is None:
      self._token_bytes = np.array([len(self._piece_bytes(i)) for i in range(self.vocab_size)],
                                   np.int64)
    return self._token_bytes

  def leading_space(self) -> np.ndarray | None:
    if not self._proto().normalizer_spec.add_dummy_prefix:
      return None
    return np.array([self._sp.id_to_piece(i).startswith("\u2581") for i in range(self.vocab_size)])


def _processor_from_proto(proto: bytes, path: str) -> spm.SentencePieceProcessor:
  sp = spm.SentencePieceProcessor()
  try:
    sp.load_from_serialized_proto(proto)
  except (RuntimeError, OSError, TypeError) as e:
    raise DataError(f"tokenizer {path}: not a valid sentencepiece model ({e}).") from None
  if sp.vocab_size() <= 0:
    raise DataError(f"tokenizer {path}: not a valid sentencepiece model (empty vocabulary).")
  return sp


def _split_line(line: str, limit: int) -> list[str]:
  """``line`` cut into pieces of at most ``limit`` UTF-8 bytes: before a space or tab
  where the piece has one, else at a character boundary."""
  data = line.encode("utf-8", "surrogatepass")
  pieces = []
  while len(data) > limit:
    cut = max(data.rfind(b" ", 1, limit + 1), data.rfind(b"\t", 1, limit + 1))
    if cut <= 0:  # no whitespace: the last character boundary (not a UTF-8 continuation byte)
      cut = limit
      while data[cut] & 0xC0 == 0x80:
        cut -= 1
    pieces.append(data[:cut].decode("utf-8", "surrogatepass"))
    data = data[cut:]
  pieces.append(data.decode("utf-8", "surrogatepass"))
  return pieces


class _TrainingLines:
  """The non-blank lines of ``documents`` that sentencepiece trains on, each at most
  max_sentence_length bytes (sentencepiece drops longer "sentences"): longer lines are
  split, and counted in ``split``."""

  def __init__(self, documents: Iterable[str], limit: int = _TRAINER_OPTIONS["max_sentence_length"]):
    self._documents, self._limit = documents, limit
    self.lines = self.split = 0

  def __iter__(self) -> Iterator[str]:
    for doc in self._documents:
      for line in doc.splitlines():
        if not line.strip():
          continue
        # At most 4 bytes per character: most lines need no encoding to be known short.
        pieces = [line] if 4 * len(line) <= self._limit else _split_line(line, self._limit)
        self.split += len(pieces) > 1
        self.lines += len(pieces)
        yield from pieces


def train_tokenizer(documents: Iterable[str], vocab_size: int, model_path: str,
                    model_type: str = "bpe", special_tokens: Sequence[str] = ()) -> SentencePieceTokenizer:
  """Trains a sentencepiece model on ``documents`` and writes it atomically to ``model_path``
  (a local path or a URL).

  ``special_tokens`` (e.g. ``["<|im_start|>", "<|im_end|>"]``) become user-defined pieces:
  each gets its own id right after the four control ids and is always one token when it
  appears in text. Training is single-threaded with a fixed seed: the same documents and
  arguments give the same ``.model`` bytes. Training lines over 64 KiB of UTF-8 are split
  (sentencepiece would drop them), with one warning saying how many.
  """
  if model_type not in MODEL_TYPES:
    raise DataError(f"tokenizer model_type must be one of {MODEL_TYPES}, got {model_type!r}.")
  storage.check(storage.path(model_path).parent, write=True)  # a URL: writable before training
  special = list(special_tokens)
  for token in special:
    if not isinstance(token, str) or not token or token != token.strip() or token == "\n":
      raise DataError(f"special token {token!r}: must be a non-empty string without surrounding "
                      "whitespace (newline is already a piece).")
  if len(set(special)) != len(special):
    raise DataError(f"special tokens {special} hold duplicates.")
  options = dict(_TRAINER_OPTIONS, user_defined_symbols=_TRAINER_OPTIONS["user_defined_symbols"] + special)
  writer = io.BytesIO()
  lines = _TrainingLines(documents)
  spm.set_random_generator_seed(_TRAINER_SEED)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=writer,
        vocab_size=vocab_size, model_type=model_type, **options)
  except RuntimeError as e:
    if not lines.lines:
      raise DataError(f"training a {model_type} tokenizer: the documents hold no text (every "
                      "line is blank); give documents with text.") from None
    advice = (" A small corpus supports only a small vocabulary: lower model.vocab_size (the "
              "tools' --vocab_size) or add documents." if "too high" in str(e) else "")
    raise DataError(f"training a {model_type} tokenizer with vocab_size={vocab_size} failed: "
                    f"{str(e).rstrip('.')}.{advice}") from None
  if lines.split:
    log.warning("tokenizer training: %d line(s) longer than sentencepiece's max_sentence_length "
                "(%d bytes) were split into pieces, at whitespace where possible", lines.split,
                options["max_sentence_length"])
  proto = writer.getvalue()
  storage.write_bytes(model_path, proto)
  return SentencePieceTokenizer({SentencePieceTokenizer.file_name: proto}, model_path)


def cache_dir(data_cfg: Any = None) -> str:
  """Where generated tokenizers live: data.tokenizer_cache, $LMJAX_CACHE or ~/.cache/lmjax
  (a local directory: a cache; a URL is refused)."""
  configured = getattr(data_cfg, "tokenizer_cache", "") if data_cfg is not None else ""
  if configured and storage.is_url(configured):
    raise DataError(f"config.data.tokenizer_cache={configured!r}: a cache is a local directory; "
                    "give a local path, or \"\" for $LMJAX_CACHE (store a tokenizer in a bucket "
                    "and name it with data.tokenizer).")
  return os.path.expanduser(configured) if configured else storage.cache_root()


def _cache_key(documents: Sequence[str], vocab_size: int, model_type: str) -> str:
  h = hashlib.sha256()
  settings = {"version": _CACHE_VERSION, "sentencepiece": spm.__version__, "seed": _TRAINER_SEED,
              "vocab_size": vocab_size, "model_type": model_type, "options": _TRAINER_OPTIONS}
  h.update(json.dumps(settings, sort_keys=True).encode())
  for doc in documents:
    data = doc.encode("utf-8", "surrogatepass")
    h.update(len(data).to_bytes(8, "little"))
    h.update(data)
  return h.hexdigest()[:16]


def cached_tokenizer(documents: Sequence[str], vocab_size: int, directory: str,
                     model_type: str = "bpe") -> Tokenizer:
  """A tokenizer with ``vocab_size`` pieces for ``documents``, trained once per content.

  The documents are hashed together with ``vocab_size`` and the training settings; a model
  under that key in ``directory`` is reused, else one is trained and stored there.
  """
  key = _cache_key(documents, vocab_size, model_type)
  path = os.path.join(directory, f"tokenizer-{model_type}-{vocab_size}-{key}.model")
  if os.path.isfile(path):
    try:
      return Tokenizer.load(path)
    except DataError:
      pass  # a damaged cache entry is retrained and replaced
  return train_tokenizer(documents, vocab_size, path, model_type)
