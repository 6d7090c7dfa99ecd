"""Chat with a trained run: multi-turn conversations in the run's chat template, replies
generated with the KV cache.

The template is the one the run was fine-tuned with (its ``data.chat_template``), else its
tokenizer's own; ``template=`` overrides it (a built-in name or a ``.jinja`` file). Each
reply continues ``render(history, add_generation_prompt=True)``, tokenized as training
tokenized conversations (:class:`lmjax.data.chat.ChatFormat`), and stops at eos or the
template's end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ...); only the reply's text is
returned.

In a notebook::

  run = lmjax.load("runs/chat")
  chat = Chat(run, system="Answer briefly.", temperature=0)
  chat.send("What is 2 + 3?")        # the reply; the history keeps both turns
  chat.reset()
  reply(run, [{"role": "user", "content": "Hi"}])  # one reply to given messages

``lmjax chat --workdir RUN`` reads one user message per line from stdin (a terminal or a
pipe) and prints each reply; ``/reset`` clears the history, ``/exit`` or end of input ends.
"""

from __future__ import annotations

from typing import Any, TextIO

from lmjax.data import DataError
from lmjax.data.chat import BUILTIN_TEMPLATES, ChatFormat
from lmjax.generate import generate_ids

__all__ = ["BUILTIN_TEMPLATES", "Chat", "ChatFormat", "chat_format", "reply", "run_terminal"]
COMMANDS_HELP = "/reset clears the conversation, /exit (or end of input) ends it"


def chat_format(run: Any, template: str | None = None) -> ChatFormat:
  """The run's chat format: ``template``, else the run's ``data.chat_template``, else its
  tokenizer's own; DataError (one line) when there is none."""
  setting = run.cfg.data.chat_template if template is None else template
  return ChatFormat(run.text_tokenizer(), setting)


def reply(run: Any, messages: list[dict], *, fmt: ChatFormat | None = None,
          max_new_tokens: int = 256, temperature: float = 0.7, top_k: int = 0,
          top_p: float = 1.0, seed: int = 0) -> str:
  """The assistant's reply to ``messages`` (a list of ``{"role", "content"}``), stripped.

  ``max_new_tokens`` is lowered to what ``model.max_seq_len`` leaves after the prompt; a
  conversation that leaves no room raises ValueError (start a new one). Sampling as
  :func:`lmjax.generate.generate_ids`; the same seed and messages give the same reply.
  """
  fmt = fmt or chat_format(run)
  tokenizer = fmt.tokenizer
  prompt, _ = fmt.encode(messages, add_generation_prompt=True)
  room = run.setup.cfg.model.max_seq_len - len(prompt) + 1
  if room < 1:
    raise ValueError(f"the conversation is {len(prompt)} tokens, as long as the model's "
                     f"max_seq_len ({run.setup.cfg.model.max_seq_len}) allows; start a new one "
                     "(/reset).")
  end_text, stop = fmt.end_of_turn()
  out = generate_ids(run.setup, run.params, [prompt], max_new_tokens=min(max_new_tokens, room),
                     temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop,
                     seed=seed, pad_id=tokenizer.pad_id)
  ids = [int(i) for i in out.tokens[0][:out.lengths[0]]]
  if ids and ids[-1] in stop:
    ids = ids[:-1]
  text = tokenizer.decode_continuation(prompt, ids)
  if end_text and end_text in text:  # an end of turn spelled in ordinary tokens
    text = text[:text.index(end_text)]
  return text.strip()


class Chat:
  """A conversation with a run: ``send`` a user message, get the reply; the history grows."""

  def __init__(self, run: Any, *, system: str | None = None, template: str | None = None,
               max_new_tokens: int = 256, temperature: float = 0.7, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0):
    if not run.cfg.model.causal:
      raise DataError("this run's model is bidirectional (model.causal=False, a masked LM): it "
                      "cannot generate replies left to right; chat with a causal run.")
    self.run = run
    self.format = chat_format(run, template)
    self.system = system
    self.settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p)
    self.seed = seed
    self.turns = 0  # replies so far: each draws with its own seed
    self.reset()

  def reset(self) -> None:
    """Forgets the conversation (the system message stays)."""
    self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []

  def send(self, text: str) -> str:
    """The reply to the user message ``text``; both join the history. A message the
    conversation has no room for raises ValueError and is not kept."""
    messages = self.messages + [{"role": "user", "content": text}]
    answer = reply(self.run, messages, fmt=self.format, seed=self.seed + self.turns, **self.settings)
    self.turns += 1
    self.messages = messages + [{"role": "assistant", "content": answer}]
    return answer


def run_terminal(chat: Chat, lines: TextIO, out: TextIO, err: TextIO, interactive: bool) -> None:
  """The ``lmjax chat`` loop: one user message per line of ``lines``, each reply printed to
  ``out`` (alone: prompts and notes go to ``err`` and only to a terminal)."""
  if interactive:
    err.write(f"# chatting with {chat.run.workdir} step {chat.run.step}, template "
              f"{chat.format.name}; {COMMANDS_HELP}\n")
  while True:
    if interactive:
      err.write("> ")
      err.flush()
    line = lines.readline()
    if not line:
      break
    text = line.rstrip("\r\n")
    if text.strip() == "/exit":
      break
    if text.strip() == "/reset":
      chat.reset()
      if interactive:
        err.write("# conversation cleared\n")
      continue
    if not text.strip():
      continue
    try:
      answer = chat.send(text)
    except (ValueError, DataError) as e:
      err.write(f"error: {e}\n")
      continue
    out.write(answer + "\n")
    out.flush()
