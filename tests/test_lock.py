"""One run per workdir: a second run is refused at once naming the first, a dead run's lock
is taken over, and a refused start leaves the run directory byte for byte as it was."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmjax import workdir_lock
from lmjax.checkpoint import Checkpointer, IncompatibleCheckpoint
from lmjax.config import default_config
from lmjax.metrics import read_metrics
from lmjax.trainer import train
from lmjax.workdir_lock import LOCK_FILE, STALE_AFTER, WorkdirInUse, acquire

ROOT = Path(__file__).resolve().parents[1]


def _write_lock(workdir: Path, **fields) -> Path:
  holder = {"host": socket.gethostname(), "pid": 1, "proc_start": None,
            "started": "2026-01-01 00:00:00 UTC", "argv": ["lmjax", "train"], "token": "old"}
  holder.update(fields)
  path = workdir / LOCK_FILE
  path.write_text(json.dumps(holder))
  return path


def _holder(workdir: Path) -> dict:
  return json.loads((workdir / LOCK_FILE).read_text())


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
  with acquire(tmp_path):
    holder = _holder(tmp_path)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    with pytest.raises(WorkdirInUse) as e:
      acquire(tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert f"{tmp_path} is in use by pid {os.getpid()} on host {socket.gethostname()} since " \
           f"{holder['started']}" in message
    assert f"delete {tmp_path / LOCK_FILE}" in message
  assert os.listdir(tmp_path) == []  # released, nothing left behind
  with acquire(tmp_path):
    pass


def test_the_lock_of_a_dead_process_is_taken_over(tmp_path):
  dead = subprocess.Popen(["true"])
  dead.wait()
  _write_lock(tmp_path, pid=dead.pid)
  warnings = []
  with acquire(tmp_path, warn=warnings.append):
    assert _holder(tmp_path)["pid"] == os.getpid()
    assert os.listdir(tmp_path) == [LOCK_FILE]  # no stale copy, no temporary file
  assert len(warnings) == 1 and f"pid {dead.pid} is no longer running" in warnings[0]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_a_live_pid_of_another_process_is_taken_over(tmp_path):
  ours = workdir_lock._process_start(os.getpid())
  _write_lock(tmp_path, pid=os.getpid(), proc_start=ours - 1)  # the pid was reused since
  warnings = []
  with acquire(tmp_path, warn=warnings.append):
    assert _holder(tmp_path)["proc_start"] == ours
  assert "is now another process" in warnings[0]
  _write_lock(tmp_path, pid=os.getpid(), proc_start=ours)  # the same process: held
  with pytest.raises(WorkdirInUse):
    acquire(tmp_path)


def test_another_hosts_lock_holds_until_it_is_not_refreshed(tmp_path):
  path = _write_lock(tmp_path, host="elsewhere", pid=os.getpid())
  with pytest.raises(WorkdirInUse, match=f"in use by pid {os.getpid()} on host elsewhere"):
    acquire(tmp_path)
  old = time.time() - STALE_AFTER - 60
  os.utime(path, (old, old))
  warnings = []
  with acquire(tmp_path, warn=warnings.append):
    assert _holder(tmp_path)["host"] == socket.gethostname()
  assert "from pid" in warnings[0] and "not refreshed for 11 min" in warnings[0]


@pytest.mark.parametrize("content", [b"", b'{"host": "h', b"null", b"\xff\xfe garbage",
                                     b'{"host": "%s", "pid": 0}' % socket.gethostname().encode(),
                                     b'{"host": "%s", "pid": 99999999999}' % socket.gethostname().encode(),
                                     b'{"host": "%s", "pid": true}' % socket.gethostname().encode()])
def test_an_unreadable_lock_holds_briefly_then_is_taken_over(tmp_path, content):
  """A lock cut short by a crash mid-write (or edited by hand) is no run's for ever: it
  holds while it may still be being written, then a start takes it over."""
  path = tmp_path / LOCK_FILE
  path.write_bytes(content)
  with pytest.raises(WorkdirInUse, match="in use by a run whose lock is unreadable"):
    acquire(tmp_path)
  old = time.time() - workdir_lock.UNREADABLE_AFTER - 5
  os.utime(path, (old, old))
  warnings = []
  with acquire(tmp_path, warn=warnings.append):
    assert _holder(tmp_path)["pid"] == os.getpid()
  assert "unreadable" in warnings[0] and not path.exists()


def test_a_lock_that_cannot_be_read_or_written_is_one_line(tmp_path, monkeypatch):
  (tmp_path / LOCK_FILE).mkdir()
  with pytest.raises(WorkdirInUse, match=r"lock.json: cannot read this run lock \(Is a directory\)"):
    acquire(tmp_path)
  def read_only(self, *args, **kwargs):
    raise PermissionError(13, "Permission denied", str(self))
  monkeypatch.setattr(Path, "write_text", read_only)  # root ignores a chmod'ed directory
  with pytest.raises(workdir_lock.ConfigError, match=r"cannot write the run's lock there \(Permission denied\)"):
    acquire(tmp_path / "ro")


def test_the_holder_refreshes_and_releases_only_its_own_lock(tmp_path):
  lock = acquire(tmp_path)
  path = tmp_path / LOCK_FILE
  os.utime(path, (0, 0))
  lock.refresh()
  assert time.time() - path.stat().st_mtime < 60
  _write_lock(tmp_path, host="elsewhere", token="another run's")  # taken over meanwhile
  lock.release()
  assert _holder(tmp_path)["token"] == "another run's"


def test_a_lock_written_during_a_take_over_is_put_back(tmp_path):
  # Two starters judged the same lock stale; the first replaced it, then the second's rename
  # moved the first's new lock: it must be put back, not removed.
  path = _write_lock(tmp_path, token="new")
  workdir_lock._take_away(path, judged=json.dumps({"token": "stale"}))
  assert _holder(tmp_path)["token"] == "new"
  assert os.listdir(tmp_path) == [LOCK_FILE]


# -- the trainer ---------------------------------------------------------------------------


def _cfg(steps: int = 2, num_layers: int = 1):
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim, c.model.head_dim = num_layers, 32, 64, 8
  c.model.max_seq_len = c.data.seq_len = 32
  c.data.global_batch_size = 8
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.progress_bar = steps, 1, 0, False
  return c


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
  return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
          for p in sorted(directory.rglob("*")) if p.is_file()}


def test_training_refuses_a_held_workdir_before_anything_else(tmp_path):
  with acquire(tmp_path):
    with pytest.raises(WorkdirInUse, match="is in use by pid"):
      train(_cfg(), tmp_path)
    assert os.listdir(tmp_path) == [LOCK_FILE]


def test_a_refused_resume_leaves_the_run_as_it_was(tmp_path):
  # A run's directory, its checkpoint cut down to what the start-up checks read (the real
  # thing, through the CLI: the slow test below).
  cfg = _cfg()
  Checkpointer(tmp_path / "checkpoints", cfg).save_params(2, {"w": np.zeros(3)}, cfg)
  (tmp_path / "config.json").write_text(cfg.to_json(indent=2))
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 6.0}) + "\n")
  before = _snapshot(tmp_path)
  with pytest.raises(IncompatibleCheckpoint, match="model.num_layers: checkpoint 1, config 2"):
    train(_cfg(num_layers=2), tmp_path)
  assert _snapshot(tmp_path) == before  # config.json still the run's, every byte and mtime
  with acquire(tmp_path):  # and the lock was released
    pass


# -- real processes ------------------------------------------------------------------------

OVERRIDES = [
    "--config.model.num_layers=1", "--config.model.embed_dim=32", "--config.model.mlp_dim=64",
    "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.head_dim=8",
    "--config.model.max_seq_len=32", "--config.data.seq_len=32",
    "--config.data.global_batch_size=8", "--config.train.log_every=1",
    "--config.train.eval_every=0", "--config.train.checkpoint_every=10",
    "--config.train.progress_bar=False",
]


def _start(workdir: Path, steps: int, *extra: str) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device: the quickest compile
  return subprocess.Popen(
      [sys.executable, "-m", "lmjax.cli", "train", "--config", "configs/tiny.py",
       "--workdir", str(workdir), *OVERRIDES, f"--config.train.steps={steps}", *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _steps(workdir: Path) -> list[int]:
  return [r["step"] for r in read_metrics(workdir)]


@pytest.mark.slow
def test_two_runs_on_one_workdir_one_is_refused_and_nothing_is_lost(tmp_path):
  runs = [_start(tmp_path, 30), _start(tmp_path, 30)]
  outputs = [p.communicate(timeout=600) for p in runs]
  codes = sorted(p.returncode for p in runs)
  assert codes == [0, 2], [err[-2000:] for _, err in outputs]
  winner, loser = (0, 1) if runs[0].returncode == 0 else (1, 0)
  out, err = outputs[loser]
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and out == "", err
  assert f"is in use by pid {runs[winner].pid} on host {socket.gethostname()} since" in lines[0]
  assert f"delete {tmp_path / LOCK_FILE}" in lines[0]
  assert "done: step 30" in outputs[winner][0]
  assert _steps(tmp_path) == list(range(1, 31))  # the winner's run, each step once
  assert Checkpointer(tmp_path / "checkpoints", _cfg()).all_steps() == [10, 20, 30]
  assert not (tmp_path / LOCK_FILE).exists()

  # Starting another model there is refused in one line, and the run stays as it was.
  before = _snapshot(tmp_path)
  p = _start(tmp_path, 30, "--config.model.num_layers=2")
  out, err = p.communicate(timeout=600)
  lines = [line for line in err.splitlines() if line.strip()]
  assert p.returncode == 2 and len(lines) == 1, err[-2000:]
  assert lines[0].startswith("error: ") and "model.num_layers: checkpoint 1, config 2" in lines[0]
  assert _snapshot(tmp_path) == before


@pytest.mark.slow
def test_a_killed_runs_lock_is_taken_over_by_the_rerun(tmp_path):
  p = _start(tmp_path, 20)
  try:
    while not (tmp_path / "metrics.jsonl").exists() or not _steps(tmp_path):
      assert p.poll() is None, p.stderr.read()[-2000:]
      time.sleep(0.01)
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert _holder(tmp_path)["pid"] == p.pid  # left behind
  rerun = _start(tmp_path, 20)
  out, err = rerun.communicate(timeout=600)
  assert rerun.returncode == 0, err[-2000:]
  assert f"took over {tmp_path / LOCK_FILE} from pid {p.pid}" in out
  assert f"pid {p.pid} is no longer running" in out
  assert _steps(tmp_path) == list(range(1, 21)) and not (tmp_path / LOCK_FILE).exists()
