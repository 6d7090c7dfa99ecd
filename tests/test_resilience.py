"""Never lose a run: real processes killed with SIGKILL at chosen moments and stopped with
SIGTERM resume bit for bit; corrupt, truncated and mismatched checkpoints are reported and
the newest good one used, a training run moving the bad ones aside; NaN and loss-spike
policies."""

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from absl import logging as absl_logging

from lmjax import rundir
from lmjax.checkpoint import MANIFEST, Checkpointer, CheckpointError, IncompatibleCheckpoint
from lmjax.config import default_config
from lmjax.mesh import host_to_global
from lmjax.metrics import read_metrics
from lmjax.state import build, init_state
from lmjax.trainer import TrainingHalted, compile_train_step, train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24
OVERRIDES = [
    "--config.model.num_layers=2", "--config.model.embed_dim=64", "--config.model.mlp_dim=128",
    "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
    "--config.model.max_seq_len=64", "--config.data.seq_len=64", "--config.data.global_batch_size=8",
    "--config.optim.warmup_steps=4", "--config.optim.decay_steps=40",
    f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=0",
    "--config.train.checkpoint_every=3", "--config.train.keep_checkpoints=2",
    "--config.train.progress_bar=False",
]


def _start(workdir: Path) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "-m", "lmjax.cli", "train", "--config", "configs/tiny.py",
       "--workdir", str(workdir), *OVERRIDES],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(workdir: Path) -> str:
  p = _start(workdir)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err[-3000:]
  return out


def _losses(workdir: Path) -> dict[int, float]:
  records = read_metrics(workdir)
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)), "each step recorded once"
  return {r["step"]: r["loss"] for r in records}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[int, float]:
  workdir = tmp_path_factory.mktemp("uninterrupted")
  _finish(workdir)
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


def _kill_when(workdir: Path, moment, timeout: float = 120) -> str:
  """Starts training, SIGKILLs it as soon as ``moment(workdir)`` returns a description."""
  p = _start(workdir)
  deadline = time.monotonic() + timeout
  try:
    while time.monotonic() < deadline:
      what = moment(workdir)
      if what:
        p.send_signal(signal.SIGKILL)
        p.wait()
        return what
      if p.poll() is not None:
        pytest.fail(f"training finished before the kill point: {p.stderr.read()[-2000:]}")
      time.sleep(0.002)
  finally:
    if p.poll() is None:
      p.kill()
      p.wait()
  pytest.fail("kill point never reached")


def _during_step(workdir):
  steps = [r["step"] for r in read_metrics(workdir)]
  return f"after step {steps[-1]} was logged" if steps and steps[-1] >= 7 else None


def _during_save(workdir):
  d = workdir / "checkpoints"
  tmp = list(d.glob("*.orbax-checkpoint-tmp*")) if d.exists() else []
  steps = [int(p.name.split(".")[0]) for p in tmp if p.name.split(".")[0].isdigit()]
  return f"while step {steps[0]} was being written" if steps and steps[0] >= 6 else None


def _after_commit(workdir):
  d = workdir / "checkpoints"
  for p in (d.iterdir() if d.exists() else []):
    if p.name.isdigit() and int(p.name) >= 9 and not (p / MANIFEST).exists():
      return f"after step {p.name} was committed, before its manifest"
  return None


@pytest.mark.slow
@pytest.mark.parametrize("moment", [_during_step, _during_save, _after_commit])
def test_sigkill_at_any_moment_resumes_bit_exact(tmp_path, uninterrupted, moment):
  what = _kill_when(tmp_path, moment)
  checkpoints = tmp_path / "checkpoints"
  listed = Checkpointer(checkpoints, default_config()).all_steps()
  assert all((checkpoints / str(s)).is_dir() for s in listed), what  # only complete ones
  _finish(tmp_path)
  assert _losses(tmp_path) == uninterrupted, what  # every step, to the last bit
  assert not list(checkpoints.glob("*tmp*")), "incomplete saves are cleaned up"
  assert all((checkpoints / str(s) / MANIFEST).exists() for s in
             Checkpointer(checkpoints, default_config()).all_steps())


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, uninterrupted):
  p = _start(tmp_path)
  while not [r for r in read_metrics(tmp_path) if r["step"] >= 5]:
    assert p.poll() is None, p.stderr.read()[-2000:]
    time.sleep(0.01)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 0, err[-2000:]
  assert "Rerun the same command to resume" in out + err
  assert not (tmp_path / "lock.json").exists()  # the workdir is free again
  stopped = max(Checkpointer(tmp_path / "checkpoints", default_config()).all_steps())
  assert 5 <= stopped < STEPS and max(_losses(tmp_path)) == stopped  # saved where it stopped
  assert f"stopped: step {stopped}," in out and "done:" not in out
  _finish(tmp_path)
  assert _losses(tmp_path) == uninterrupted


# -- checkpoints on disk, in process -------------------------------------------------------


def _cfg(**mesh):
  c = default_config()
  m = c.model
  m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = 64, 4, 32, 8, 4
  m.head_dim, m.mlp_dim, m.max_seq_len = 8, 64, 16
  c.data.seq_len, c.data.global_batch_size = 16, 8
  c.train.keep_checkpoints = 5
  c.mesh.fsdp = 1
  for k, v in mesh.items():
    c.mesh[k] = v
  return c


class _Iterator:
  """A stand-in data iterator: the checkpoint's data item takes any object with a
  JSON-serialisable get_state/set_state."""

  def __init__(self, position=0):
    self.position = position

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict):
    self.position = state["position"]


def _save_steps(directory, cfg, steps=(1, 2, 3)):
  setup = build(cfg, jax.devices())
  state = init_state(setup)
  ckpt = Checkpointer(directory, cfg)
  for s in steps:
    ckpt.save(s, state, _Iterator(s * 10), cfg)
  ckpt.close()
  return jax.device_get(state)


@pytest.mark.slow
def test_restore_onto_other_meshes_gives_the_same_parameters(tmp_path):
  cfg = _cfg(fsdp=8)
  saved = _save_steps(tmp_path, cfg, steps=(1,))
  for mesh, n in [(dict(data=2, tensor=4), 8), (dict(), 1), (dict(stage=2, fsdp=2, tensor=2), 8)]:
    target = _cfg(**mesh)
    setup = build(target, jax.devices()[:n])
    it = _Iterator()
    state = Checkpointer(tmp_path, target).restore(1, setup.abstract_state, it)
    assert it.position == 10
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(setup.abstract_state)):
      assert got.sharding == want.sharding  # placed straight onto the new layout
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), saved)


def _restore_latest(directory, cfg, warnings):
  setup = build(cfg, jax.devices())
  return Checkpointer(directory, cfg).restore_latest(cfg, setup.abstract_state, _Iterator,
                                                    warn=warnings.append)


def _largest_file(step_dir: Path) -> Path:
  return max((p for p in step_dir.rglob("*") if p.is_file() and p.name != MANIFEST),
             key=lambda p: p.stat().st_size)


def _files(directory: Path) -> dict[str, bytes]:
  return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_truncated_or_tampered_checkpoints_fall_back_to_the_previous_good_one(tmp_path):
  cfg = _cfg(fsdp=8)
  _save_steps(tmp_path, cfg)
  victim = _largest_file(tmp_path / "3")
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])  # truncated
  data = bytearray(_largest_file(tmp_path / "2").read_bytes())
  data[len(data) // 2] ^= 0xFF  # one flipped byte
  _largest_file(tmp_path / "2").write_bytes(bytes(data))
  damaged = {s: _files(tmp_path / s) for s in ("2", "3")}
  # Loading (read-only) uses the newest good one and moves nothing.
  warnings = []
  setup = build(cfg, jax.devices())
  ro = Checkpointer(tmp_path, read_only=True)
  assert ro.restore_latest(cfg, setup.abstract_state, warn=warnings.append)[0] == 1
  assert "step 3" in warnings[0] and "trying the previous one" in warnings[0]
  assert ro.all_steps() == [1, 2, 3] and not list(tmp_path.glob("*.unusable-*"))
  # Training moves the bad ones aside, so it can write those steps again; nothing is lost.
  warnings = []
  step, state, it = _restore_latest(tmp_path, cfg, warnings)
  assert step == 1 and it.position == 10
  assert "step 3" in warnings[0] and "truncated" in warnings[0] and victim.name in warnings[0]
  assert "step 2" in warnings[1] and "corrupted" in warnings[1]
  for s, w in zip(("3", "2"), warnings):
    (aside,) = tmp_path.glob(f"{s}.unusable-*")
    assert f"moved it aside to {aside} (kept for inspection)" in w
    assert _files(aside) == damaged[s]
  assert Checkpointer(tmp_path, cfg).all_steps() == [1]
  # Nothing usable at all: a clear error listing every step's problem; nothing is moved.
  _save_steps(tmp_path / "all_bad", cfg)
  for s in ("1", "2", "3"):
    _largest_file(tmp_path / "all_bad" / s).write_bytes(b"")
  with pytest.raises(CheckpointError, match=r"no usable checkpoint(.|\n)*step 3(.|\n)*step 2(.|\n)*step 1"):
    _restore_latest(tmp_path / "all_bad", cfg, [])
  assert Checkpointer(tmp_path / "all_bad", cfg).all_steps() == [1, 2, 3]
  assert not list((tmp_path / "all_bad").glob("*.unusable-*"))


@pytest.mark.parametrize("manifest", ['{"files": [1]}', '{"files": {"a": null}}', '{"files": {"a": [1]}}',
                                      '[]', '{"files": {"a": ["x", "y"]}}', ""])
def test_a_malformed_manifest_is_named(tmp_path, manifest):
  """A manifest that is JSON of the wrong shape makes its step unusable, naming the file."""
  (tmp_path / "5").mkdir()
  (tmp_path / "5" / MANIFEST).write_text(manifest)
  with pytest.raises(CheckpointError, match=f"{tmp_path / '5' / MANIFEST}: unreadable manifest"):
    Checkpointer(tmp_path, read_only=True).verify(5)


def _flip_a_byte(step_dir: Path) -> None:  # found by the manifest
  f = _largest_file(step_dir)
  data = bytearray(f.read_bytes())
  data[len(data) // 2] ^= 0xFF
  f.write_bytes(bytes(data))


def _delete_metadata(step_dir: Path) -> None:  # found by the manifest
  (step_dir / "_CHECKPOINT_METADATA").unlink()


def _truncate_before_the_manifest(step_dir: Path) -> None:  # found by Orbax's read
  f = _largest_file(step_dir)
  f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  (step_dir / MANIFEST).unlink()


ONE = jax.devices()[:1]  # in-process runs on one device: the quickest compile


def _params_at(workdir: Path, step: int):
  cfg = _run_cfg(step)
  state = Checkpointer(workdir / "checkpoints", read_only=True).restore(step, build(cfg, ONE).abstract_state)
  return jax.device_get(state["params"])


@pytest.fixture(scope="module")
def nine_steps(tmp_path_factory):
  """An uninterrupted run of 9 steps, checkpoints every 3: its losses and last parameters."""
  workdir = tmp_path_factory.mktemp("nine_steps")
  train(_run_cfg(9, checkpoint_every=3), workdir, ONE)
  return _losses(workdir), _params_at(workdir, 9)


@pytest.mark.slow
@pytest.mark.parametrize("damage", [_flip_a_byte, _delete_metadata, _truncate_before_the_manifest])
def test_an_unusable_newest_checkpoint_is_moved_aside_and_training_goes_on(tmp_path, capsys, nine_steps,
                                                                          damage):
  train(_run_cfg(6, checkpoint_every=3), tmp_path, ONE)
  checkpoints = tmp_path / "checkpoints"
  damage(checkpoints / "6")
  damaged = _files(checkpoints / "6")
  capsys.readouterr()
  # Resumes from step 3 and writes step 6 again (it used to stop there, on every rerun).
  history = train(_run_cfg(9, checkpoint_every=3), tmp_path, ONE)
  assert [r["step"] for r in history] == list(range(4, 10))
  (aside,) = checkpoints.glob("6.unusable-*")
  assert _files(aside) == damaged  # kept as it was, for inspection
  assert (f"checkpoint step 6 is unusable, using the previous one; moved it aside to {aside}"
          in capsys.readouterr().out)
  assert Checkpointer(checkpoints, _run_cfg(9)).all_steps() == [3, 6, 9]
  losses, params = nine_steps
  assert _losses(tmp_path) == losses  # as if never interrupted, to the last bit
  jax.tree.map(np.testing.assert_array_equal, _params_at(tmp_path, 9), params)


def test_loading_a_run_logs_no_read_only_notice(tmp_path, caplog):
  cfg = _cfg()
  Checkpointer(tmp_path / "checkpoints", cfg).save_params(1, {"w": np.zeros(3)}, cfg)
  caplog.set_level(logging.INFO)
  assert rundir.run_config(tmp_path).model.embed_dim == 32  # what lmjax.load, eval, generate do
  assert Checkpointer(tmp_path / "checkpoints", read_only=True).meta(1)["params_only"]
  absl_logging.warning("another warning")
  messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not [m for m in messages if "read only" in m or "read_only=True" in m], messages
  assert "another warning" in messages  # only Orbax's notices are silenced


@pytest.mark.slow
def test_checkpoint_of_another_model_or_format_is_refused_by_name(tmp_path):
  cfg = _cfg(fsdp=8)
  _save_steps(tmp_path, cfg, steps=(1,))
  other = _cfg(fsdp=8)
  other.model.embed_dim = 64
  with pytest.raises(IncompatibleCheckpoint, match="model.embed_dim: checkpoint 32, config 64"):
    _restore_latest(tmp_path, other, [])
  meta = next((tmp_path / "1" / "meta").glob("*"))
  meta.write_text(json.dumps({"format_version": 99, "step": 1}))
  (tmp_path / "1" / MANIFEST).unlink()  # as if written so by another version
  with pytest.raises(IncompatibleCheckpoint, match="format 99; this lmjax reads format 1"):
    _restore_latest(tmp_path, cfg, [])


@pytest.mark.slow
def test_keep_last_k_plus_every_mth(tmp_path):
  cfg = _cfg(fsdp=8)
  cfg.train.keep_checkpoints, cfg.train.keep_every = 2, 4
  _save_steps(tmp_path, cfg, steps=range(1, 11))
  assert Checkpointer(tmp_path, cfg).all_steps() == [4, 8, 9, 10]


# -- numerical faults ----------------------------------------------------------------------


def _run_cfg(steps, **train):
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim, c.model.head_dim = 1, 32, 64, 8
  c.model.max_seq_len = c.data.seq_len = 32
  c.data.global_batch_size = 8
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.progress_bar = steps, 1, 0, False
  c.train.checkpoint_every = 0
  for k, v in train.items():
    c.train[k] = v
  return c


@pytest.mark.slow
def test_nan_halts_naming_the_step(tmp_path):
  with pytest.raises(TrainingHalted, match=r"step 3: loss nan"):
    train(_run_cfg(5, debug_nan_at_step=3), tmp_path)


@pytest.mark.slow
def test_nan_skip_leaves_the_state_untouched_and_counts(tmp_path):
  history = train(_run_cfg(5, debug_nan_at_step=3, nan_policy="skip"), tmp_path / "skip")
  assert [int(r["skipped_steps"]) for r in history] == [0, 0, 1, 1, 1]
  assert np.isnan(history[2]["loss"]) and np.isfinite(history[3]["loss"])
  clean = train(_run_cfg(2), tmp_path / "clean")
  cfg = _run_cfg(5)
  setup = build(cfg)
  a = Checkpointer(tmp_path / "skip" / "checkpoints", cfg).restore(5, setup.abstract_state)
  assert int(a["skipped"]) == 1 and int(a["step"]) == 5
  # Step 3's update was dropped, so the parameter norm after step 3 is the one after step 2.
  assert history[2]["param_norm"] == history[1]["param_norm"] == clean[1]["param_norm"]


@pytest.mark.slow
def test_loss_spike_is_skipped():
  cfg = _run_cfg(1, skip_spikes=True, spike_window=4)
  setup = build(cfg)
  state = init_state(setup)
  state["loss_window"] = jax.device_put(np.full(4, 1.0, np.float32), state["loss_window"].sharding)
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(0, 64, (8, 32), dtype=np.int32) for k in ("inputs", "targets")}
  batch.update(segment_ids=np.ones((8, 32), np.int32), positions=np.tile(np.arange(32, dtype=np.int32), (8, 1)))
  params = jax.device_get(state["params"])
  step = compile_train_step(setup)
  new, metrics = step(state, host_to_global(batch, setup.mesh, setup.batch_sharding))
  assert bool(metrics["spike"]) and int(new["skipped"]) == 1  # loss ~7 vs a window of 1.0 +- 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(new["params"]), params)


@pytest.mark.slow
def test_inspect_checkpoint_tool(tmp_path):
  cfg = _cfg(fsdp=8)
  _save_steps(tmp_path / "checkpoints", cfg, steps=(1, 2))
  victim = _largest_file(tmp_path / "checkpoints" / "2")
  victim.write_bytes(victim.read_bytes()[:10])
  out = subprocess.run([sys.executable, "tools/inspect_checkpoint.py", str(tmp_path), "--step", "1",
                        "--config"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "2 checkpoint(s)" in out.stdout
  assert "step 1:" in out.stdout and "verified" in out.stdout and '"position": 10' in out.stdout
  assert "step 2:" in out.stdout and "CORRUPT" in out.stdout
  assert "['params']['blocks']['mlp']['gate']: (4, 32, 64) float32 spec=(None, 'fsdp', None)" in out.stdout
  assert '"embed_dim": 32' in out.stdout
