"""The tokenizer interface, and the loader that tells the kinds of tokenizer file apart.

:meth:`Tokenizer.load` reads a sentencepiece ``.model`` (:mod:`lmjax.data.tokenizer`), a
Hugging Face ``tokenizer.json`` with the ``tokenizer_config.json`` beside it, or a tiktoken
ranks file (one base64 token and its rank a line, as Llama 3's ``original/tokenizer.model``;
both in :mod:`lmjax.data.tokenizer_bpe`), telling them apart by content, not by name; a
directory stands for the ``tokenizer.json`` / ``tokenizer.model`` / ``tokenizer.tiktoken`` in
it. Every kind encodes text without bos/eos, decodes, and travels to Grain's worker
processes as the bytes of its files. The kinds register themselves when their modules are
imported (``lmjax.data`` imports them all).

Example::

  tok = Tokenizer.load("runs/llama3/tokenizer.json")    # or a .model, a tiktoken file
  ids = [tok.bos_id] + tok.encode("Hello") + [tok.eos_id]
  tok.decode_continuation(ids[:-1], more_ids)           # the text after the prompt
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from lmjax import storage
from lmjax.data.readers import DataError

HF_CONFIG = "tokenizer_config.json"  # beside a tokenizer.json: bos/eos/pad/unk, chat_template
HF_SPECIAL_MAP = "special_tokens_map.json"
# In a directory given as the tokenizer, the file that stands for it (first found).
DIRECTORY_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer.tiktoken")
# Every file a tokenizer may write into a directory (Tokenizer.save).
TOKENIZER_FILES = DIRECTORY_FILES + (HF_CONFIG, HF_SPECIAL_MAP, "tokenizer.tiktoken.json")


class Tokenizer:
  """What lmjax asks of a tokenizer, whatever its kind: ids without bos/eos.

  Built from ``files`` (file name -> bytes: the main file, ``file_name``, and the files read
  beside it); :meth:`load` picks the kind. Subclasses set ``kind`` and ``file_name`` and
  implement the abstract members; byte-level kinds set ``_byte_level`` and ``_piece_bytes``
  and get exact :meth:`decode_continuation` and :meth:`token_bytes` from here.
  """

  kind = ""  # "sentencepiece", "hf" or "tiktoken"
  file_name = ""  # the main file's name in a directory lmjax writes (prepared data, imports)
  _byte_level = False
  _kinds: dict[str, type[Tokenizer]] = {}

  def __init_subclass__(cls, **kwargs: Any):
    super().__init_subclass__(**kwargs)
    if cls.kind:
      Tokenizer._kinds[cls.kind] = cls

  def __init__(self, files: dict[str, bytes], path: str = ""):
    self._files, self._path = dict(files), path

  # -- loading ------------------------------------------------------------------------------

  @classmethod
  def load(cls, path: str) -> Tokenizer:
    """Reads the tokenizer at ``path`` (a file or a directory holding one; local or a URL),
    its kind told by content. DataError if it is missing, empty, corrupt or lacks bos/eos
    (StorageError if its bucket cannot be read)."""
    path = os.fspath(storage.path(path))
    if storage.path(path).is_dir():
      found = [storage.join(path, n) for n in DIRECTORY_FILES if storage.path(path).joinpath(n).is_file()]
      if not found:
        raise DataError(f"tokenizer {path}: a directory without {', '.join(DIRECTORY_FILES)}; name "
                        "the tokenizer file itself in data.tokenizer.")
      path = found[0]
    data = _read(path)
    if not data.strip():
      raise DataError(f"tokenizer {path}: the file is empty; give a sentencepiece .model, a Hugging "
                      "Face tokenizer.json or a tiktoken file.")
    name = os.path.basename(path)
    kinds = Tokenizer._kinds
    impl = next((kinds[k] for k in ("hf", "tiktoken") if k in kinds and kinds[k].detect(name, data)),
                kinds["sentencepiece"])  # a binary protobuf: sentencepiece's own check names it
    files = {impl.file_name: data}
    parent = storage.path(path).parent
    for key, sidecar in impl.sidecars(name).items():
      if (parent / sidecar).is_file():
        files[key] = _read(os.fspath(parent / sidecar))
    tok = impl(files, path)
    for role, token_id in (("bos", tok.bos_id), ("eos", tok.eos_id)):
      if token_id is None or token_id < 0:
        raise DataError(f"tokenizer {path}: has no {role} token; lmjax needs bos and eos ids "
                        f"(name them, e.g. {role}_token in {HF_CONFIG} beside a tokenizer.json).")
    return tok

  @classmethod
  def detect(cls, name: str, data: bytes) -> bool:
    """Whether the file ``name`` holding ``data`` is of this kind."""
    return False

  @classmethod
  def sidecars(cls, name: str) -> dict[str, str]:
    """Files read beside main file ``name``, if there: key in ``files`` -> file name."""
    return {}

  def files(self) -> dict[str, bytes]:
    """The files that make this tokenizer (name -> bytes), as :meth:`save` writes them."""
    return dict(self._files)

  def save(self, directory: str) -> str:
    """Writes :meth:`files` into ``directory`` (local or a URL); returns the main file's path."""
    for name, data in self.files().items():
      storage.write_bytes(storage.join(directory, name), data)
    return storage.join(directory, self.file_name)

  def hf_files(self) -> dict[str, bytes]:
    """The files a Hugging Face checkpoint directory gets for this tokenizer, so that
    ``transformers.AutoTokenizer.from_pretrained`` reads it."""
    return self.files()

  # -- identity -----------------------------------------------------------------------------

  @property
  def path(self) -> str:
    return self._path

  @property
  def sha256(self) -> str:
    """The tokenizer's identity: the hex digest of its file (with the files beside it that
    it read, each by name)."""
    if len(self._files) == 1:
      return hashlib.sha256(self._files[self.file_name]).hexdigest()
    h = hashlib.sha256()
    for name in sorted(self._files):
      h.update(name.encode() + b"\0" + len(self._files[name]).to_bytes(8, "little"))
      h.update(self._files[name])
    return h.hexdigest()

  def __getstate__(self) -> dict[str, Any]:
    # Grain workers are spawned processes; they receive the files' bytes, not a path.
    return {"path": self._path, "files": self._files}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["files"], state["path"])  # pylint: disable=unnecessary-dunder-call

  def __repr__(self) -> str:
    return f"{type(self).__name__}(path={self._path!r}, vocab_size={self.vocab_size})"

  # -- the vocabulary -----------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  @property
  def pad_id(self) -> int:
    """The id padding holds; padding is told apart by ``segment_ids == 0``."""
    raise NotImplementedError

  @property
  def bos_id(self) -> int:
    raise NotImplementedError

  @property
  def eos_id(self) -> int:
    raise NotImplementedError

  @property
  def unk_id(self) -> int | None:
    """The unknown token's id; None for a byte-level tokenizer without one."""
    return None

  @property
  def bos_token(self) -> str:
    """The text of the bos token (e.g. ``"<s>"``, ``"<|begin_of_text|>"``)."""
    return self.id_to_token(self.bos_id)

  @property
  def eos_token(self) -> str:
    return self.id_to_token(self.eos_id)

  def id_to_token(self, i: int) -> str:
    """The vocabulary entry of id ``i`` (a sentencepiece piece, a tokenizer.json token, a
    tiktoken token's text)."""
    raise NotImplementedError

  @property
  def special_tokens(self) -> list[str]:
    """Tokens that are always one id when they appear in text, other than bos/eos/pad/unk."""
    raise NotImplementedError

  @property
  def chat_template(self) -> str | None:
    """The Jinja chat template that came with the tokenizer (``tokenizer_config.json``), or None."""
    return None

  def token_id(self, piece: str) -> int:
    """The id of ``piece`` (e.g. a special token); DataError if it is not in the vocabulary."""
    raise NotImplementedError

  def _no_piece(self, piece: str) -> DataError:
    return DataError(f"tokenizer {self._path}: no piece {piece!r}.")

  # -- text ---------------------------------------------------------------------------------

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text``, without bos/eos (special tokens in it are one id each)."""
    raise NotImplementedError

  def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
    """:meth:`encode` of each text, on ``num_threads`` threads where the kind has them (0: all)."""
    return [self.encode(t) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of ``ids`` (any int iterable, numpy arrays included); bos/eos/pad decode to ""."""
    raise NotImplementedError

  def _control_ids(self) -> set[int]:
    return {self.bos_id, self.eos_id, self.pad_id}

  def _piece_bytes(self, i: int) -> bytes:
    """The bytes of text token ``i`` stands for (byte-level kinds: exactly)."""
    raise NotImplementedError

  def decode_continuation(self, prompt: Iterable[int], ids: Iterable[int]) -> str:
    """Text of ``ids`` as it reads after ``prompt``. A byte-level tokenizer decodes the bytes
    of ``ids`` after those of ``prompt``: a character whose bytes the prompt began is not
    lost; other kinds take ``decode(prompt + ids)`` less the prompt's text."""
    prompt, ids = [int(i) for i in prompt], [int(i) for i in ids]
    if self._byte_level:
      skip = self._control_ids()
      decoder = codecs.getincrementaldecoder("utf-8")("replace")
      decoder.decode(b"".join(self._piece_bytes(i) for i in prompt if i not in skip))
      return decoder.decode(b"".join(self._piece_bytes(i) for i in ids if i not in skip), final=True)
    head, whole = self.decode(prompt), self.decode(prompt + ids)
    if whole.startswith(head):
      return whole[len(head):]
    first = next((i for i in ids if i not in self._control_ids()), None)
    lead = first is not None and self._piece_bytes(first).startswith(b" ")
    return " " * lead + self.decode(ids)

  # -- bytes, for bits per byte -------------------------------------------------------------

  def token_bytes(self) -> np.ndarray:
    """(vocab_size,) int64: the UTF-8 bytes of text each token stands for (0 for bos, eos,
    pad and unk)."""
    if getattr(self, "_token_bytes", None) is None:
      out = np.zeros(self.vocab_size, np.int64)
      skip = self._control_ids() | {self.unk_id}
      for i in range(self.vocab_size):
        if i not in skip:
          out[i] = len(self._piece_bytes(i))
      self._token_bytes = out
    return self._token_bytes

  def leading_space(self) -> np.ndarray | None:
    """None when encoding adds nothing to a text; else (vocab_size,) bool of the tokens that
    begin with a space, which the tokenizer adds before a text (a sentencepiece dummy
    prefix): the first such token of a text covers one byte less."""
    if getattr(self, "_leading_space", False) is False:
      nbytes = self.token_bytes()
      self._leading_space = None
      if int(nbytes[self.encode("a")].sum()) > 1:
        self._leading_space = np.array([self._piece_bytes(i)[:1] == b" " if nbytes[i] else False
                                        for i in range(self.vocab_size)])
    return self._leading_space


def _read(path: str) -> bytes:
  try:
    return storage.path(path).read_bytes()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    storage.check(path)  # a URL's bucket that is missing or refused, named as such
    raise DataError(f"tokenizer {path}: no such file; set data.tokenizer to a sentencepiece "
                    ".model, a Hugging Face tokenizer.json or a tiktoken file, or to \"\" to "
                    "train one for data.source.") from None
  except Exception as e:  # noqa: BLE001 - a store's refusal or an unreadable file: one line
    if not storage.is_url(path):
      raise DataError(f"tokenizer {path}: cannot be read ({e}).") from None
    raise storage.explain(path, e) from None


def read_json(files: dict[str, bytes], name: str, path: str) -> dict[str, Any]:
  """``files[name]`` parsed as a JSON object ({} when absent); DataError naming the file
  beside ``path`` when it is not one."""
  if name not in files:
    return {}
  try:
    value = json.loads(files[name])
  except ValueError as e:
    value, why = None, str(e)
  else:
    why = "not a JSON object"
  if not isinstance(value, dict):
    where = storage.join(os.path.dirname(path), name) if path else name
    raise DataError(f"tokenizer {where}: not valid JSON ({why}); fix or remove it.")
  return value


def chat_template_of(config: dict[str, Any]) -> str | None:
  """A ``tokenizer_config.json``'s chat template: a string, or the "default" entry of a list
  of named templates (else the first)."""
  template = config.get("chat_template")
  if isinstance(template, list):
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default", next(iter(named.values()), None))
  return template if isinstance(template, str) and template else None
