"""Byte-level BPE tokenizers: Hugging Face ``tokenizer.json`` files and tiktoken ranks files.

:class:`HFTokenizer` wraps a ``tokenizer.json`` (the ``tokenizers`` library, the encoding
``transformers.AutoTokenizer`` gives for the same directory). Its bos/eos/pad/unk tokens
come from the ``tokenizer_config.json`` (or ``special_tokens_map.json``) beside it, else
from the special tokens it is recognised by (``<|begin_of_text|>``, ``<s>``, ...; GPT-2's
``<|endoftext|>`` is both bos and eos); its chat template from ``tokenizer_config.json``.

:class:`TiktokenTokenizer` reads a tiktoken ranks file (one base64 token and its rank a
line: ``.tiktoken`` files, Llama 3's ``original/tokenizer.model``). The split pattern and
special tokens are Llama 3's (``<|begin_of_text|>``, ``<|end_of_text|>``, ...,
``<|eot_id|>``, then ``<|reserved_special_token_N|>`` up to 256 specials, numbered after the
ranks as Meta's ``tokenizer.py`` does) unless a JSON file named like the ranks file plus
``.json`` (``tokenizer.model.json``) says otherwise::

  {"pattern": "...", "special_tokens": ["<|endoftext|>"] or {"<|endoftext|>": 100257},
   "bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "...", "chat_template": "..."}

Every field is optional; listed special tokens are numbered from the first id after the
ranks. Both kinds encode special tokens that appear in text as their ids.
:mod:`lmjax.data.tokenizer_train` trains ``tokenizer.json`` files and writes Hugging Face
files for a tiktoken tokenizer.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Iterable, Sequence
from typing import Any

import tiktoken
import tokenizers
import tokenizers.decoders
import tokenizers.models
import tokenizers.pre_tokenizers

from lmjax.data.readers import DataError
from lmjax.data.tokenizer_base import (HF_CONFIG, HF_SPECIAL_MAP, Tokenizer, chat_template_of,
                                       read_json)

__all__ = ["HFTokenizer", "LLAMA3_PATTERN", "TiktokenTokenizer", "byte_to_unicode",
           "llama3_special_tokens"]

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                  r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RANK_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2}[ \t]+\d+\s*$")
# Recognised by name when no tokenizer_config.json says which token plays a role.
_ROLE_CANDIDATES = {
    "bos": ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "<|bos|>"),
    "eos": ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "<|eos|>"),
    "pad": ("<|pad|>", "<pad>", "[PAD]"),
    "unk": ("<|unk|>", "<unk>", "[UNK]"),
}


def llama3_special_tokens() -> list[str]:
  """Llama 3's 256 special tokens, in id order after the 128,000 ranks."""
  named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
           "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
  return named + [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(named))]


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
  """GPT-2's map of bytes to printable characters, in which byte-level vocabularies are written."""
  keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
  extra = iter(range(256, 512))
  return {b: chr(b if b in keep else next(extra)) for b in range(256)}


def _unicode_to_byte() -> dict[str, int]:
  return {c: b for b, c in byte_to_unicode().items()}


class _RoleIds(Tokenizer):
  """What a tokenizer with its special ids in ``self._roles`` (role -> id or None) and its
  chat template in ``self._template`` answers alike."""

  _roles: dict[str, int | None]
  _template: str | None

  @property
  def pad_id(self) -> int:
    """The pad token's id, else eos's (padding is told apart by ``segment_ids == 0``)."""
    return self._roles["pad"] if self._roles.get("pad") is not None else self._roles["eos"]

  @property
  def bos_id(self) -> int:
    return self._roles["bos"]

  @property
  def eos_id(self) -> int:
    return self._roles["eos"]

  @property
  def unk_id(self) -> int | None:
    return self._roles.get("unk")

  @property
  def chat_template(self) -> str | None:
    return self._template

  @property
  def special_tokens(self) -> list[str]:
    """Its special (added) tokens other than bos/eos/pad/unk, in id order."""
    roles = set(self._roles.values())
    return [t for t, i in sorted(self._specials().items(), key=lambda kv: kv[1]) if i not in roles]

  def _specials(self) -> dict[str, int]:
    """Every special token and its id."""
    raise NotImplementedError


class HFTokenizer(_RoleIds):
  """A Hugging Face ``tokenizer.json``, with the ``tokenizer_config.json`` and
  ``special_tokens_map.json`` beside it."""

  kind = "hf"
  file_name = "tokenizer.json"

  def __init__(self, files: dict[str, bytes], path: str = ""):
    super().__init__(files, path)
    data = files[self.file_name]
    try:
      spec = json.loads(data)
      self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 - JSON, UTF-8 or the library's own complaint: one line
      raise DataError(f"tokenizer {path}: not a valid Hugging Face tokenizer.json "
                      f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); give the "
                      "tokenizer.json a checkpoint came with, or train one "
                      "(tools/train_tokenizer.py --kind bpe).") from None
    config = read_json(files, HF_CONFIG, path)
    special_map = read_json(files, HF_SPECIAL_MAP, path)
    self._template = chat_template_of(config)
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self._vocab_size = max(vocab.values(), default=-1) + 1
    self._added = {t.content: i for i, t in self._tok.get_added_tokens_decoder().items()}
    model_unk = (spec.get("model") or {}).get("unk_token")
    self._roles: dict[str, int | None] = {}
    for role in ("bos", "eos", "pad", "unk"):
      named = config.get(f"{role}_token") or special_map.get(f"{role}_token")
      if isinstance(named, dict):
        named = named.get("content")
      if named:
        if self._tok.token_to_id(named) is None:
          raise DataError(f"tokenizer {path}: {role}_token {named!r} (from {HF_CONFIG} or "
                          f"{HF_SPECIAL_MAP}) is not in its vocabulary; fix the file.")
        self._roles[role] = self._tok.token_to_id(named)
        continue
      candidates = _ROLE_CANDIDATES[role] + ((model_unk,) if role == "unk" and model_unk else ())
      self._roles[role] = next((self._tok.token_to_id(c) for c in candidates
                                if self._tok.token_to_id(c) is not None), None)
    if self._roles["eos"] is None:
      raise DataError(f"tokenizer {path}: no eos token (none named in a {HF_CONFIG} beside it, "
                      "none recognised among its special tokens); lmjax ends every document "
                      f"with one: add \"eos_token\" to {HF_CONFIG}.")
    if self._roles["bos"] is None:  # GPT-2 style: <|endoftext|> begins and ends documents
      self._roles["bos"] = self._roles["eos"]
    self._byte_level = _has_type(spec.get("decoder"), "ByteLevel")
    self._metaspace = not self._byte_level and (
        _has_type(spec.get("pre_tokenizer"), "Metaspace")
        or "\u2581" in json.dumps(spec.get("normalizer"), ensure_ascii=False))
    self._byte_fallback = bool((spec.get("model") or {}).get("byte_fallback"))

  @classmethod
  def detect(cls, name: str, data: bytes) -> bool:
    return name.endswith(".json") or data.lstrip()[:1] == b"{"

  @classmethod
  def sidecars(cls, name: str) -> dict[str, str]:
    return {HF_CONFIG: HF_CONFIG, HF_SPECIAL_MAP: HF_SPECIAL_MAP}

  @property
  def library_tokenizer(self) -> tokenizers.Tokenizer:
    """The wrapped ``tokenizers.Tokenizer``."""
    return self._tok

  @property
  def vocab_size(self) -> int:
    return self._vocab_size


  def id_to_token(self, i: int) -> str:
    return self._tok.id_to_token(i) or ""

  def _specials(self) -> dict[str, int]:
    return self._added

  def token_id(self, piece: str) -> int:
    i = self._tok.token_to_id(piece)
    if i is None:
      raise self._no_piece(piece)
    return i

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """On the library's own thread pool, whatever ``num_threads`` (``RAYON_NUM_THREADS`` sets it)."""
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    skip = self._control_ids()
    return self._tok.decode([int(i) for i in ids if int(i) not in skip], skip_special_tokens=False)

  @functools.cached_property
  def _id_bytes(self) -> list[bytes]:
    table = _unicode_to_byte()
    added = {i: t for t, i in self._added.items()}
    out = []
    for i in range(self._vocab_size):
      token = self._tok.id_to_token(i)
      if i in added or token is None:
        out.append((added.get(i) or "").encode("utf-8"))
      elif self._byte_level:
        out.append(bytes(table[c] for c in token) if all(c in table for c in token)
                   else token.encode("utf-8"))
      elif self._byte_fallback and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
        out.append(bytes([int(token[3:5], 16)]))
      else:
        out.append((token.replace("\u2581", " ") if self._metaspace else token).encode("utf-8"))
    return out

  def _piece_bytes(self, i: int) -> bytes:
    return self._id_bytes[i]

  def hf_files(self) -> dict[str, bytes]:
    """Its files; a ``tokenizer_config.json`` naming bos/eos/pad/unk is added if it had none."""
    files = self.files()
    if HF_CONFIG not in files:
      files[HF_CONFIG] = hf_config_file(self)
    return files


def hf_config_file(tok: Tokenizer, chat_template: str | None = None) -> bytes:
  """A ``tokenizer_config.json`` naming ``tok``'s bos/eos/pad/unk tokens (and chat template),
  for ``transformers.AutoTokenizer``."""
  config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                            "bos_token": tok.bos_token, "eos_token": tok.eos_token,
                            "clean_up_tokenization_spaces": False}
  for role, i in (("pad", tok.pad_id), ("unk", tok.unk_id)):
    if i is not None and i not in (tok.bos_id, tok.eos_id):
      config[f"{role}_token"] = tok.id_to_token(i)
  template = chat_template or tok.chat_template
  if template:
    config["chat_template"] = template
  return (json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _has_type(component: Any, name: str) -> bool:
  """Whether a tokenizer.json component (or one in its Sequence) is of type ``name``."""
  if not isinstance(component, dict):
    return False
  parts = component.get("decoders") or component.get("pretokenizers") or component.get("normalizers")
  return component.get("type") == name or any(_has_type(p, name) for p in parts or [])


class TiktokenTokenizer(_RoleIds):
  """A tiktoken ranks file, with Llama 3's pattern and special tokens unless the JSON file
  beside it (``<file>.json``) names others."""

  kind = "tiktoken"
  file_name = "tokenizer.tiktoken"
  _byte_level = True
  SETTINGS = file_name + ".json"

  def __init__(self, files: dict[str, bytes], path: str = ""):
    super().__init__(files, path)
    ranks = _parse_ranks(files[self.file_name], path)
    settings_path = f"{path}.json" if path else self.SETTINGS
    settings = read_json(files, self.SETTINGS, path)
    unknown = sorted(set(settings) - {"pattern", "special_tokens", "bos", "eos", "pad", "chat_template"})
    if unknown:
      raise DataError(f"tokenizer {settings_path}: unknown field(s) {unknown}; it may hold pattern, "
                      "special_tokens, bos, eos, pad and chat_template.")
    first = max(ranks.values()) + 1
    special = settings.get("special_tokens", llama3_special_tokens())
    if isinstance(special, list) and all(isinstance(t, str) for t in special):
      special = {t: first + n for n, t in enumerate(special)}
    if not isinstance(special, dict) or not all(isinstance(t, str) and isinstance(i, int)
                                                for t, i in special.items()):
      raise DataError(f"tokenizer {settings_path}: special_tokens must be a list of strings or an "
                      "object of string -> id.")
    self._special = special
    self._pattern = settings.get("pattern", LLAMA3_PATTERN)
    self._template = settings.get("chat_template") or None
    try:
      self._enc = tiktoken.Encoding(name=f"lmjax:{path}", pat_str=self._pattern,
                                    mergeable_ranks=ranks, special_tokens=special)
    except Exception as e:  # noqa: BLE001 - a bad pattern or clashing ids: one line
      raise DataError(f"tokenizer {path}: tiktoken refuses it ({e}); fix {settings_path}.") from None
    defaults = {} if "special_tokens" in settings else {"bos": "<|begin_of_text|>",
                                                          "eos": "<|end_of_text|>"}
    self._roles = {}
    for role in ("bos", "eos", "pad"):
      name = settings.get(role, defaults.get(role))
      if name is not None and name not in special:
        raise DataError(f"tokenizer {settings_path}: {role} {name!r} is not one of its special tokens.")
      self._roles[role] = special.get(name)
    if self._roles["eos"] is None:
      raise DataError(f"tokenizer {settings_path}: names no eos; lmjax ends every document with "
                      "one: add \"eos\" (one of its special_tokens).")
    if self._roles["bos"] is None:
      self._roles["bos"] = self._roles["eos"]

  @classmethod
  def detect(cls, name: str, data: bytes) -> bool:
    return name.endswith(".tiktoken") or bool(_RANK_LINE.match(data.split(b"\n", 1)[0]))

  @classmethod
  def sidecars(cls, name: str) -> dict[str, str]:
    return {cls.SETTINGS: f"{name}.json"}

  @property
  def encoding(self) -> tiktoken.Encoding:
    """The wrapped ``tiktoken.Encoding``."""
    return self._enc

  @property
  def pattern(self) -> str:
    return self._pattern

  @property
  def vocab_size(self) -> int:
    return self._enc.n_vocab


  def id_to_token(self, i: int) -> str:
    return self._piece_bytes(i).decode("utf-8", "replace")

  def _specials(self) -> dict[str, int]:
    return self._special

  def token_id(self, piece: str) -> int:
    if piece in self._special:
      return self._special[piece]
    try:
      return self._enc.encode_single_token(piece)
    except KeyError:
      raise self._no_piece(piece) from None

  def encode(self, text: str) -> list[int]:
    return self._enc.encode(text, allowed_special="all")

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    return self._enc.encode_batch(list(texts), num_threads=num_threads or 8, allowed_special="all")

  def decode(self, ids: Iterable[int]) -> str:
    skip = self._control_ids()
    return self._enc.decode_bytes([int(i) for i in ids if int(i) not in skip]).decode("utf-8", "replace")

  def _piece_bytes(self, i: int) -> bytes:
    try:
      return self._enc.decode_single_token_bytes(i)
    except KeyError:  # an id between the ranks and the special tokens
      return b""

  def ranks(self) -> dict[bytes, int]:
    """The mergeable ranks (token bytes -> id), as the file lists them."""
    return _parse_ranks(self._files[self.file_name], self._path)

  def hf_files(self) -> dict[str, bytes]:
    """A ``tokenizer.json`` (byte-level BPE with the merges the ranks imply, the same ids)
    and a ``tokenizer_config.json``: what ``transformers`` reads."""
    table = byte_to_unicode()
    text = lambda token: "".join(table[b] for b in token)
    ranks = self.ranks()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
      if len(token) > 1:
        parts = _bpe(ranks, token, rank)
        if len(parts) != 2:
          raise DataError(f"tokenizer {self._path}: token {token!r} (rank {rank}) is not a merge of "
                          "two tokens of lower rank; it has no tokenizer.json form.")
        merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(t): r for t, r in ranks.items()} | self._special
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
        tokenizers.pre_tokenizers.Split(tokenizers.Regex(self._pattern), behavior="isolated"),
        tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t, _ in sorted(self._special.items(), key=lambda kv: kv[1])])
    return {"tokenizer.json": tok.to_str().encode("utf-8"), "tokenizer_config.json": hf_config_file(self)}


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
  """``token``'s bytes merged as tiktoken merges them, with ranks below ``max_rank`` only."""
  parts = [bytes([b]) for b in token]
  while True:
    best = min(((ranks.get(a + b, max_rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))),
               default=(max_rank, -1))
    if best[0] >= max_rank:
      return parts
    i = best[1]
    parts[i:i + 2] = [parts[i] + parts[i + 1]]


def _parse_ranks(data: bytes, path: str) -> dict[bytes, int]:
  ranks: dict[bytes, int] = {}
  for n, line in enumerate(data.splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split()
    try:
      if len(parts) != 2:
        raise ValueError("not two fields")
      token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
    except ValueError:
      raise DataError(f"tokenizer {path}: line {n} is not a base64 token and its rank "
                      f"({line[:40]!r}); a tiktoken file holds one such pair a line.") from None
    ranks[token] = rank
  if not ranks:
    raise DataError(f"tokenizer {path}: no ranks; a tiktoken file holds one base64 token and its "
                    "rank a line.")
  return ranks
