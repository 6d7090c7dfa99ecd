"""The README's prepared-data commands run as written in a fresh directory (subprocesses),
and tools/inspect_checkpoint.py on the run they train, given a relative path."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lmjax.data import default_documents

REPO = Path(__file__).resolve().parents[1]
# What the README leaves to the reader, and what a CPU test must shrink: its corpus is small
# (a 1024-piece vocabulary, not 32000) and the model and run tiny (two steps).
VOCAB = "1024"
SHRINK = ["--config.model.num_layers=1", "--config.model.embed_dim=32", "--config.model.num_heads=2",
          "--config.model.num_kv_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
          "--config.model.compute_dtype=float32", "--config.model.remat=none",
          "--config.data.global_batch_size=2", "--config.data.worker_count=0",
          "--config.train.steps=2", "--config.train.log_every=1", "--config.train.eval_every=0",
          "--config.train.checkpoint_every=2", "--config.train.progress_bar=false",
          "--config.optim.warmup_steps=1"]


def readme_commands() -> list[str]:
  """The README's tokenizer command and its prepared-data commands, one line each."""
  readme = (REPO / "README.md").read_text()
  tokenizer = re.search(r"`(python tools/train_tokenizer\.py [^`]*)`", readme).group(1)
  block = re.search(r"```bash\n(python tools/prepare_data\.py .*?)```", readme, re.S).group(1)
  lines = block.replace("\\\n", " ").splitlines()
  return [" ".join(c.split()) for c in [tokenizer, *lines]]


def _env() -> dict[str, str]:
  """One CPU device (as the CLI would have) and this checkout's lmjax."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  return env


def _run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
  proc = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
  return proc


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory) -> tuple[Path, list[subprocess.CompletedProcess]]:
  """A fresh directory with the checkout's tools/ and configs/ in it, where the README's
  commands ran with /data standing for a small JSONL corpus: (directory, processes)."""
  root = tmp_path_factory.mktemp("fresh")
  for name in ("tools", "configs"):
    (root / name).symlink_to(REPO / name)
  data = root / "data"
  data.mkdir()
  docs = default_documents()
  for k in range(2):
    (data / f"part{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[k::2]))
  procs = []
  for command in readme_commands():
    argv = shlex.split(command.replace("/data/", f"{data}/").replace("32000", VOCAB))
    if argv[0] == "python":
      argv[0] = sys.executable
    elif argv[0] == "lmjax":
      argv[:1] = [sys.executable, "-m", "lmjax.cli"]
      argv += SHRINK
    procs.append(_run(argv, root))
  return root, procs


@pytest.mark.slow
def test_readme_prepared_data_commands_work_as_written(readme_run):
  root, procs = readme_run
  assert [p.args[1] for p in procs[:2]] == ["tools/train_tokenizer.py", "tools/prepare_data.py"]
  assert len(procs) == 3 and procs[2].args[1:4] == ["-m", "lmjax.cli", "train"]
  assert (root / "tok.model").is_file()
  assert "tokenizer   1024 pieces" in procs[1].stdout
  # 79 documents: 0.005 holds none out, and the tool says so.
  assert "warning: the eval split is empty: --eval_fraction 0.005" in procs[1].stderr
  assert "done: step 2" in procs[2].stdout + procs[2].stderr
  assert (root / "runs" / "g" / "checkpoints" / "2").is_dir()


@pytest.mark.slow
def test_inspect_checkpoint_lists_the_arrays_of_a_relative_run_dir(readme_run):
  root, _ = readme_run
  proc = _run([sys.executable, "tools/inspect_checkpoint.py", "runs/g", "--step", "2"], root)
  assert "1 checkpoint(s)" in proc.stdout and "step 2 arrays" in proc.stdout
  assert "['params']['embed']['table']: (1024, 32) float32 spec=" in proc.stdout, proc.stdout
  assert "total 0.00 MiB" not in proc.stdout
