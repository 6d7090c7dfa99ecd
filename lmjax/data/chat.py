"""Chat data: multi-turn conversations from JSONL, rendered with a chat template, the loss
on the assistant turns only.

Each line of ``data.source`` holds ``{"messages": [{"role": ..., "content": ...}, ...]}``
(the field is ``data.messages_field``; roles are free: "system", "user", "assistant",
"tool", ...). A conversation is rendered to text by a Jinja chat template exactly as
Hugging Face's ``apply_chat_template`` renders it (its sandboxed environment, filters and
globals, ``bos_token`` / ``eos_token``, ``add_generation_prompt``). The template is
``data.chat_template``: a built-in name (:data:`BUILTIN_TEMPLATES`, copies of the models'
own templates) or a ``.jinja`` file; "" takes the tokenizer's own (an imported Hugging Face
tokenizer's ``chat_template``).

The rendered text is split at the tokenizer's special tokens and at its bos/eos text, which
become their single ids; the text between is encoded (a piece that does not start the
conversation is encoded as the continuation it is, without a sentencepiece model's leading
space). ``weights`` are 1 on the tokens of each assistant message and the template's
end-of-turn text after it (``<|im_end|>``, ``<|eot_id|>``, eos, ...; trailing whitespace
aside), 0 on everything else. Where the template marks assistant text with
``{% generation %}`` those spans are used; otherwise an assistant message ``i`` spans from
the end of ``render(messages[:i], add_generation_prompt=True)`` to the end of
``render(messages[:i + 1])``, which must both be beginnings of the whole rendering.

Conversations are packed whole (:func:`lmjax.data.finetune.pack_examples`); one longer than
``data.seq_len`` follows ``data.long_documents``: "truncate" keeps its beginning, "skip"
drops it (counted), "fail" raises; "split" truncates too (a conversation is never split
across rows). Malformed lines follow ``data.bad_records`` and are named ``file:line``.

Example::

  fmt = ChatFormat(tokenizer, "chatml")
  ids, weights = fmt.encode([{"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello!"}])
  prompt, _ = fmt.encode(history, add_generation_prompt=True)  # what lmjax chat continues
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import ml_collections
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmjax import storage
from lmjax.data.finetune import Example, pack_examples, rows_iterator
from lmjax.data.readers import DataError, open_file
from lmjax.data.sources import SPLIT_SEED, SkipLog, resolve_paths, split_documents

# The models' own templates, as their tokenizer_config.json files hold them.
BUILTIN_TEMPLATES = {
    # ChatML (teknium/OpenHermes-2.5-Mistral-7B; Qwen's turns without its default system).
    "chatml": (
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
        " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"),
    # meta-llama/Meta-Llama-3-8B-Instruct.
    "llama3": (
        "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
        "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
        " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
        "{{ content }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"),
    # HuggingFaceH4/zephyr-7b-beta (TinyLlama-Chat's too): turns end with eos.
    "zephyr": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
        "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
        "{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n"
        "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
        "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"),
    # google/gemma-7b-it: no system role, user and assistant ("model") alternate.
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != "
        "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/"
        "user/assistant/...') }}{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model'"
        " %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
        "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{'<start_of_turn>model\n'}}{% endif %}"),
}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_spans_var: contextvars.ContextVar = contextvars.ContextVar("lmjax_chat_spans", default=None)


class _Generation(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}``: renders its body and, while spans are being
  tracked, records where in the output it went (as transformers' AssistantTracker does)."""
  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_support"), [], [], body).set_lineno(lineno)

  def _support(self, caller) -> str:
    text = caller()
    tracking = _spans_var.get()
    if tracking is not None:
      blocks, spans = tracking
      start = len("".join(blocks))
      spans.append((start, start + len(text)))
    return text


class _Namespace(jinja2.utils.Namespace):
  """``namespace()`` that refuses underscore attributes (as transformers' templates get)."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"a chat template cannot store {name!r} on a namespace")


class _Dict:
  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
  """The template in transformers' chat-template environment."""
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[_Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals.update(raise_exception=_raise_exception, dict=_Dict(), namespace=_Namespace,
                     strftime_now=lambda fmt: datetime.now().strftime(fmt))
  return env.from_string(source)


def template_source(setting: str, tokenizer: Any = None) -> tuple[str, str]:
  """(Jinja text, name) of ``data.chat_template``: a built-in name, a ``.jinja`` file, or ""
  for the tokenizer's own template; DataError (one line) when there is none."""
  if setting in BUILTIN_TEMPLATES:
    return BUILTIN_TEMPLATES[setting], setting
  names = ", ".join(BUILTIN_TEMPLATES)
  if setting:
    try:
      return storage.path(setting).read_text(), setting
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError) as e:
      raise DataError(f"data.chat_template={setting!r}: neither a built-in template ({names}) nor a "
                      f"readable .jinja file ({type(e).__name__}).") from None
  own = getattr(tokenizer, "chat_template", None)
  if not own:
    where = getattr(tokenizer, "path", "") or "of this run"
    raise DataError(f"the tokenizer {where} has no chat template; set data.chat_template to a "
                    f"built-in ({names}) or a .jinja file (lmjax chat: --template).")
  return own, "the tokenizer's"


def _token_text(tokenizer: Any, which: str) -> str | None:
  """The text of the tokenizer's bos or eos token ("<s>", "<|begin_of_text|>", ...)."""
  text = getattr(tokenizer, f"{which}_token", None)
  if text:
    return text
  processor = getattr(tokenizer, "processor", None)  # sentencepiece: the control piece
  try:
    return processor.id_to_piece(getattr(tokenizer, f"{which}_id"))
  except (AttributeError, TypeError, IndexError, ValueError):
    return None


def _plain(messages: list[dict]) -> list[dict]:
  """Copies of the messages without None values (as transformers normalises them)."""
  return [{k: v for k, v in m.items() if v is not None} for m in messages]


class ChatFormat:
  """A chat template with the tokenizer it encodes conversations for."""

  def __init__(self, tokenizer: Any, template: str = ""):
    self.tokenizer = tokenizer
    self.source, self.name = template_source(template, tokenizer)
    self._template = _compile(self.source)
    self._tracked = bool(_GENERATION_TAG.search(self.source))
    self.bos_token, self.eos_token = _token_text(tokenizer, "bos"), _token_text(tokenizer, "eos")
    self.special_ids: dict[str, int] = {}
    for text in getattr(tokenizer, "special_tokens", None) or []:
      try:
        self.special_ids[text] = int(tokenizer.token_id(text))
      except Exception:  # noqa: BLE001 - not in the vocabulary: stays text
        pass
    for text, token_id in ((self.bos_token, tokenizer.bos_id), (self.eos_token, tokenizer.eos_id)):
      if text and token_id is not None and token_id >= 0:
        self.special_ids[text] = int(token_id)
    longest_first = sorted(self.special_ids, key=len, reverse=True)
    self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if longest_first else None
    self._anchor = self._find_anchor()

  # -- rendering --

  def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, as ``apply_chat_template(messages, tokenize=False)``."""
    return self._render(messages, add_generation_prompt)[0]

  def _render(self, messages, add_generation_prompt, track=False):
    kwargs = dict(messages=_plain(messages), tools=None, documents=None,
                  add_generation_prompt=add_generation_prompt)
    kwargs.update({k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if v})
    try:
      if not track:
        return self._template.render(**kwargs), []
      blocks, spans = [], []
      token = _spans_var.set((blocks, spans))
      try:
        for block in self._template.generate(**kwargs):
          blocks.append(block)
      finally:
        _spans_var.reset(token)
      return "".join(blocks), spans
    except jinja2.TemplateError as e:
      raise DataError(f"chat template {self.name}: {e}") from None

  def assistant_spans(self, messages: list[dict], add_generation_prompt: bool = False
                      ) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the (start, end) character spans of its assistant turns, each
    the message's text and the end-of-turn text after it (trailing whitespace aside)."""
    text, spans = self._render(messages, add_generation_prompt, track=self._tracked)
    if self._tracked:
      return text, [(a, b) for a, b in spans if b > a]
    for i, message in enumerate(messages):
      if message.get("role") != "assistant":
        continue
      head = self.render(messages[:i], add_generation_prompt=True)
      turn = self.render(messages[:i + 1])
      if not (turn.startswith(head) and text.startswith(turn)):
        raise DataError(f"chat template {self.name}: the rendering of the first {i} messages (with "
                        "the generation prompt) does not begin the rendering of the conversation, "
                        "so its assistant turns cannot be told apart; mark them with "
                        "{% generation %} in the template")
      end = len(turn.rstrip())
      if end > len(head):
        spans.append((len(head), end))
    return text, spans

  # -- tokenizing --

  def _find_anchor(self) -> tuple[str, list[int]] | None:
    """Text the tokenizer always encodes alone (a special token it knows, or a newline), put
    before a piece so that the piece encodes as a continuation (no sentencepiece space)."""
    for text in [t for t in self.special_ids if t not in (self.bos_token, self.eos_token)] + ["\n"]:
      ids = self.tokenizer.encode(text)
      probe = self.tokenizer.encode(text + "ab c")
      if ids and probe[:len(ids)] == ids and len(probe) > len(ids):
        try:
          if self.tokenizer.decode_continuation(ids, probe[len(ids):]) == "ab c":
            return text, ids
        except Exception:  # noqa: BLE001 - a tokenizer that cannot tell: no anchor
          pass
    return None

  def _encode_piece(self, text: str, first: bool) -> list[int]:
    if not text:
      return []
    if not first and self._anchor is not None:
      anchor, anchor_ids = self._anchor
      ids = self.tokenizer.encode(anchor + text)
      if ids[:len(anchor_ids)] == anchor_ids:
        return list(ids[len(anchor_ids):])
    return list(self.tokenizer.encode(text))

  def encode_text(self, text: str, cuts: list[int] = ()) -> tuple[list[int], list[int]]:
    """Token ids of rendered ``text`` (special tokens and bos/eos text as their ids), and
    the token index at which each character offset of ``cuts`` falls (pieces are cut there)."""
    bounds = sorted({0, len(text), *cuts})
    ids: list[int] = []
    at: dict[int, int] = {}
    for lo, hi in zip(bounds, bounds[1:]):
      at[lo] = len(ids)
      parts = self._split.split(text[lo:hi]) if self._split else [text[lo:hi]]
      offset = lo
      for k, part in enumerate(parts):
        if k % 2:  # a special token
          ids.append(self.special_ids[part])
        else:
          ids.extend(self._encode_piece(part, first=offset == 0))
        offset += len(part)
    at[len(text)] = len(ids)
    return ids, [at[c] for c in cuts]

  def encode(self, messages: list[dict], add_generation_prompt: bool = False
             ) -> tuple[list[int], list[float]]:
    """Token ids of the rendered conversation and each token's weight: 1 on assistant turns
    (and their end-of-turn tokens), 0 elsewhere."""
    text, spans = self.assistant_spans(messages, add_generation_prompt)
    ids, cut_at = self.encode_text(text, [c for span in spans for c in span])
    weights = [0.0] * len(ids)
    for k in range(0, len(cut_at), 2):
      weights[cut_at[k]:cut_at[k + 1]] = [1.0] * (cut_at[k + 1] - cut_at[k])
    return ids, weights

  def end_of_turn(self) -> tuple[str, list[int]]:
    """The text the template puts after an assistant message (stripped), and the ids that
    end a generated reply: eos and the first special token of that text."""
    stop = [int(self.tokenizer.eos_id)]
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    try:
      head, whole = self.render(probe[:1], True), self.render(probe)
    except DataError:
      return "", stop
    tail = whole[len(head) + 1:].strip() if whole.startswith(head + "y") else ""
    if self._split and tail:
      first = next((p for p in self._split.split(tail)[1::2]), None)
      if first is not None and self.special_ids[first] not in stop:
        stop.append(self.special_ids[first])
    return tail, stop


# -- reading and packing ------------------------------------------------------------------


def _check_messages(record: Any, field: str) -> tuple[str, str] | list[dict]:
  """The messages of a JSON record, or (reason, what is wrong)."""
  if not isinstance(record, dict):
    return "invalid_json", "not a JSON object"
  if field not in record:
    return "missing_field", f"no field {field!r}"
  messages = record[field]
  if not isinstance(messages, list) or not messages:
    return "invalid_field", f"field {field!r} is not a non-empty list of messages"
  for k, m in enumerate(messages):
    if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
      return "invalid_field", f"message {k} of {field!r} is not {{\"role\": str, \"content\": str}}"
  if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
    return "invalid_field", f"{field!r} holds no assistant message with text to learn"
  return messages


def read_conversations(source: str, field: str, skips: SkipLog) -> list[tuple[str, list[dict]]]:
  """(``file:line``, messages) of every well-formed line of the JSONL files of ``source``;
  the others go to ``skips`` (raising under ``data.bad_records='fail'``)."""
  expected = f'expected a JSON object {{"{field}": [{{"role": str, "content": str}}, ...]}}'
  out = []
  for path in resolve_paths(source, skips):
    with open_file(path) as f:
      for i, raw in enumerate(f, 1):
        if not raw.strip():
          continue
        where = f"{path}:{i}"
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          skips.bad("invalid_utf8", where, f"invalid UTF-8 at byte {e.start} of the line ({e.reason})")
          continue
        try:
          record = json.loads(line)
        except ValueError:
          record = None
        checked = _check_messages(record, field) if record is not None else ("invalid_json", "not JSON")
        if isinstance(checked, tuple):
          skips.bad(checked[0], where, f"{checked[1]}; {expected}, got {line.strip()[:120]!r}")
          continue
        out.append((where, checked))
  if not out:
    raise DataError(f"data.source={source!r}: no conversations"
                    + (f" (skipped: {dict(skips.counts)})" if skips.total else ""))
  return out


def conversation_examples(conversations: list[tuple[str, list[dict]]], fmt: ChatFormat,
                          seq_len: int, long_documents: str, skips: SkipLog) -> list[Example]:
  """Training examples (inputs, targets, weights) of conversations, each at most ``seq_len``
  positions; too long ones per ``long_documents`` (module docstring); counts in ``skips``."""
  examples = []
  for where, messages in conversations:
    try:
      ids, weights = fmt.encode(messages)
    except DataError as e:  # the template refused it (raise_exception) or cannot span it
      skips.bad("invalid_record", where, str(e))
      continue
    if len(ids) - 1 > seq_len:
      if long_documents == "fail":
        raise DataError(f"{where}: the conversation is {len(ids)} tokens, longer than "
                        f"data.seq_len={seq_len} + 1 (data.long_documents='fail'; 'truncate' or "
                        "'split' keeps its beginning, 'skip' drops it).")
      if long_documents == "skip":
        skips.count("long_document", where, f"{len(ids)} tokens, longer than data.seq_len={seq_len}")
        continue
      skips.counts["truncated"] += 1
      ids, weights = ids[:seq_len + 1], weights[:seq_len + 1]
    if len(ids) < 2 or not any(weights[1:]):
      skips.count("empty_document", where, "no assistant token left to learn (after truncation)")
      continue
    examples.append((ids[:-1], ids[1:], weights[1:]))
  return examples


@functools.lru_cache(maxsize=4)
def _cached_rows(key: tuple, cfg_json: str, tokenizer: Any) -> tuple[dict, dict[str, int]]:
  """Packed rows and skip counts of one split; cached by source files, settings and tokenizer
  (the trainer asks for the eval split at every evaluation)."""
  d = ml_collections.ConfigDict(json.loads(cfg_json))
  split = key[0]
  skips = SkipLog(d.bad_records)
  fmt = ChatFormat(tokenizer, d.chat_template)
  conversations = read_conversations(d.source, d.messages_field, skips)
  train, evals = split_documents(conversations, d.eval_fraction, SPLIT_SEED)  # as raw documents
  examples = conversation_examples(evals if split == "eval" else train, fmt, d.seq_len,
                                   d.long_documents, skips)
  return pack_examples(examples, d.seq_len), dict(skips.counts)


def _files_key(source: str) -> tuple:
  """The files of ``source`` with their sizes and modification times (local files)."""
  out = []
  for path in resolve_paths(source, SkipLog("skip", quiet=True)):
    try:
      stat = storage.path(path).stat()
      out.append((path, stat.st_size, getattr(stat, "st_mtime", 0)))
    except (OSError, NotImplementedError, AttributeError):
      out.append((path, None, None))
  return tuple(out)


def chat_iterator(cfg: ml_collections.ConfigDict, tokenizer: Any, *, split: str = "train",
                  process_index: int = 0, process_count: int = 1):
  """The train split (all but ``data.eval_fraction`` of the conversations) or the eval split
  (once); :func:`lmjax.data.make_iterator` calls it when ``data.format="chat"``."""
  d = cfg.data
  if d.mixture:
    raise DataError("data.mixture mixes raw-text sources; chat conversations are read from "
                    "data.source (one file, directory or glob): set data.mixture=().")
  keys = ("source", "messages_field", "chat_template", "bad_records", "long_documents",
          "eval_fraction", "seq_len")
  cfg_json = json.dumps({k: d[k] for k in keys})
  key = (split, _files_key(d.source), cfg_json, getattr(tokenizer, "sha256", id(tokenizer)))
  rows, counts = _cached_rows(key, cfg_json, tokenizer)
  return rows_iterator(cfg, rows, split=split, process_index=process_index,
                       process_count=process_count, counts=counts)
