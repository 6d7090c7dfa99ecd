"""README.md, followed in order on a fresh directory: every command and Python snippet runs
and succeeds, and every output it shows is what the command prints.

The only changes made to the README's text: training is shrunk to a few steps (and
gpt2_small, which needs a GPU, to a toy width), the 32000-piece tokenizer to 1024 pieces (the
test corpus is small), placeholders such as ``/data/`` and ``/models/`` point at files this
test makes (``gs://my-bucket`` is a bucket on the tests' GCS emulator), ``pip install`` and
``python -m pytest`` (the set-up itself) are not rerun, and
``[optional]`` arguments are given. A new code block needs no change here unless it shows
output (then :data:`OUTPUTS` says which command prints it). A block of a file format
(``yaml``) whose first line is a comment naming a path is written to that path.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
TRAIN_SHRINK = ["--config.train.steps=2", "--config.train.eval_batches=1", "--config.train.log_every=1",
                "--config.train.progress_bar=false"]
MODEL_SHRINK = {  # configs the README trains at full size
    "configs/gpt2_small.py": ["--config.model.num_layers=1", "--config.model.embed_dim=64",
                              "--config.model.num_heads=2", "--config.model.num_kv_heads=2",
                              "--config.model.head_dim=32", "--config.model.mlp_dim=128",
                              "--config.model.vocab_size=1024", "--config.model.remat=none",
                              "--config.data.global_batch_size=8", "--config.data.worker_count=0"],
}
TEXT = [("/data/", "data/"), ("/models/", "models/"), ("--vocab_size 32000", "--vocab_size 1024"),
        ("vocab_size=32000", "vocab_size=1024")]
# Output blocks: their first words -> the command (from the README) whose output they show,
# and how much of it must match.
OUTPUTS = {
    "error: config.model.num_kv_heads": (
        "lmjax validate --config configs/tiny.py --config.model.num_kv_heads=3", "all"),
    "model   8.03B parameters": ("lmjax plan --config configs/llama_8b.py --devices 256 "
                                "--accelerator h100 --memory 80GiB", 2),
    # Numbers differ with the (shrunk) steps and the machine: every number is a wildcard.
    "lmjax: summary: completed": (
        "lmjax train --config configs/tiny.py --workdir runs/tiny-summary", "shape"),
}
NUMBER = re.compile(r"\d[\d,.]*")


def _matches(shown: list[str], expected: list[str], lines: int | str) -> bool:
  """Whether ``expected`` (a README output block) is what ``shown`` holds: all of it, its
  first ``lines`` lines, or (``"shape"``) lines that differ only in their numbers and paths."""
  if lines == "shape":
    shape = lambda l: re.sub(r"(N[hms])+", "T", NUMBER.sub("N", l.split(" run directory ")[0])).rstrip()
    return all(any(shape(l) == shape(e) for l in shown) for e in expected)
  n = len(expected) if lines == "all" else lines
  return [l.rstrip() for l in shown[:n]] == [l.rstrip() for l in expected[:n]]


def blocks(text: str) -> list[tuple[str, str]]:
  """(language, body) of every fenced block of ``text``, in order."""
  return FENCE.findall(text)


def commands(body: str) -> list[list[str]]:
  """The argv of each command of a shell block: continuation lines joined, comments
  dropped, ``a && b`` split, ``[optional]`` brackets removed."""
  out = []
  for line in body.replace("\\\n", " ").splitlines():
    words = [w.strip("[]") for w in shlex.split(line, comments=True)]
    while words:
      cut = words.index("&&") if "&&" in words else len(words)
      out.append([w for w in words[:cut] if w])
      words = words[cut + 1:]
  return [c for c in out if c]


def shrink(argv: list[str]) -> list[str] | None:
  """``argv`` as this test runs it, or None for the set-up commands."""
  if argv[:2] == ["pip", "install"] or argv[:3] == ["python", "-m", "pytest"]:
    return None
  if argv[0] == "python":
    argv[0] = sys.executable
  if argv[:2] == ["lmjax", "train"] and "--config" in argv:
    config = argv[argv.index("--config") + 1]
    argv += MODEL_SHRINK.get(config, []) + TRAIN_SHRINK
  if argv[:2] == ["lmjax", "sweep"] and "--print_commands" not in argv:
    argv += TRAIN_SHRINK
  return argv


def _subst(text: str) -> str:
  for old, new in TEXT:
    text = text.replace(old, new)
  return text


def _python(body: str) -> str:
  """A Python block as run here: step counts shrunk, paths substituted; ``cfg`` (which the
  README's later snippets take from the first) defined for every block."""
  body = re.sub(r"\.steps = \d+", ".steps = 2", _subst(body))
  return "import lmjax\ncfg = lmjax.default_config()\ncfg.train.steps = 2\n" + body


def _fresh(tmp: Path) -> None:
  """A copy of the repository's files (what a clone holds) plus the README's placeholders."""
  for name in ("configs", "experiments", "tools"):
    shutil.copytree(ROOT / name, tmp / name, ignore=shutil.ignore_patterns("__pycache__", "runs"))
  from lmjax.data import default_documents, train_tokenizer
  docs = default_documents()
  (tmp / "data").mkdir()
  for i in range(2):
    (tmp / "data" / f"part-{i}.jsonl").write_text(
        "".join(json.dumps({"text": d}) + "\n" for d in docs[i::2]))
  pairs = [{"prompt": f"Q: what is {d.split()[0]}?", "response": " " + " ".join(d.split()[:20])}
           for d in docs[:40]]
  (tmp / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
  for name in ("docs.jsonl", "held_out.jsonl"):
    (tmp / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[-8:]))
  (tmp / "items.jsonl").write_text("".join(
      json.dumps({"context": d[:60], "choices": [d[60:90], docs[0][60:90]], "label": 0}) + "\n"
      for d in docs[1:5]))
  chats = [{"messages": [{"role": "system", "content": "Answer briefly."},
                         {"role": "user", "content": f"What is {d.split()[0]}?"},
                         {"role": "assistant", "content": " ".join(d.split()[:12])}]} for d in docs[:40]]
  (tmp / "conversations.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
  (tmp / "prefs.jsonl").write_text("".join(json.dumps(
      {"prompt": d[:40], "chosen": d[40:80], "rejected": docs[0][40:80]}) + "\n" for d in docs[1:40]))
  (tmp / "qa.jsonl").write_text("".join(json.dumps(
      {"source": d[:60], "reference": [d[60:90], d[60:75]]}) + "\n" for d in docs[1:9]))
  (tmp / "data" / "my_mc.jsonl").write_text("".join(json.dumps(
      {"question": d[:60], "choices": [d[60:90], docs[0][60:90]], "label": 0}) + "\n" for d in docs[1:9]))
  import torch
  import transformers
  hf = tmp / "models" / "Mistral-7B-v0.1"
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(transformers.MistralConfig(
      vocab_size=1024, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=256,
      sliding_window=64))
  model.save_pretrained(hf)
  train_tokenizer(docs, 1024, str(hf / "tokenizer.model"))


def _bucket(stores) -> None:
  """``gs://my-bucket`` on the test's GCS emulator, with a gzipped JSONL corpus in it."""
  import gzip
  from lmjax import storage
  from lmjax.data import default_documents
  bucket = stores.bucket("gs", name="my-bucket")
  docs = default_documents()
  for i in range(2):
    storage.write_bytes(f"{bucket}/corpus/part-{i}/docs.jsonl.gz", gzip.compress(
        "".join(json.dumps({"text": d}) + "\n" for d in docs[i::2]).encode()))


@pytest.mark.slow
def test_readme_followed_in_order_on_a_fresh_directory(tmp_path, stores):
  _fresh(tmp_path)
  _bucket(stores)
  env = {**os.environ, **stores.env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  printed: dict[str, str] = {}  # command -> stdout
  errors: dict[str, str] = {}  # command -> stderr

  def run(argv: list[str] | str, what: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", argv] if isinstance(argv, str) else argv
    if cmd[0] == "lmjax":
      cmd = [sys.executable, "-m", "lmjax.cli", *cmd[1:]]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"README {what} failed:\n{out.stderr[-3000:]}"
    return out

  seen_outputs = set()
  for lang, body in blocks((ROOT / "README.md").read_text()):
    if lang in ("bash", "sh", "shell"):
      for argv in commands(_subst(body)):
        argv = shrink(argv)
        if argv is not None:
          out = run(argv, shlex.join(argv))
          printed[shlex.join(argv)], errors[shlex.join(argv)] = out.stdout, out.stderr
    elif lang == "python":
      run(_python(body), f"snippet:\n{body}")
    elif lang == "yaml" and body.startswith("# "):  # a file the next commands read
      path = tmp_path / body.splitlines()[0][2:].strip()
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(_subst(body))
    else:
      key = next((k for k in OUTPUTS if body.startswith(k)), None)
      assert key is not None, f"README output block with no command in OUTPUTS:\n{body[:200]}"
      command, lines = OUTPUTS[key]
      argv = shrink(shlex.split(command))
      out = subprocess.run([sys.executable, "-m", "lmjax.cli", *argv[1:]],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
      shown = (out.stdout + out.stderr).strip().splitlines()
      assert _matches(shown, body.strip().splitlines(), lines), (command, shown[-20:])
      seen_outputs.add(key)
  assert seen_outputs == set(OUTPUTS)
  # What the commands printed: the tokenizer's size, prepare_data's warning that 0.005 of the
  # small corpus holds out no document.
  prepare = next(k for k in printed if "tools/prepare_data.py" in k)
  assert "tokenizer   1024 pieces" in printed[prepare]
  assert "warning: the eval split is empty: --eval_fraction 0.005" in errors[prepare]
  # tools/inspect_checkpoint.py lists a run's arrays given a relative path.
  out = run([sys.executable, "tools/inspect_checkpoint.py", "runs/tiny", "--step", "2"], "inspect")
  assert "step 2 arrays" in out.stdout and "['params']['embed']['table']: (1024, 128) float32" in out.stdout
  assert "total 0.00 MiB" not in out.stdout
