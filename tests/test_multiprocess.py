"""Several JAX processes on loopback (gloo collectives, fake CPU devices each): real training
steps, checkpoints and resume, equal to one process on the same global mesh; each process
reads its own rows; a dead process makes the others fail within a bounded time."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmjax import data as data_lib
from lmjax.config import default_config
from lmjax.metrics import read_metrics

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[1]
STEPS = 8


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def dataset(prepared_default) -> str:
  return prepared_default


def _args(dataset, workdir, steps):
  return ["--config", "configs/tiny.py", "--workdir", str(workdir),
          "--config.model.num_layers=2", "--config.model.embed_dim=64", "--config.model.mlp_dim=128",
          "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
          "--config.model.max_seq_len=64", "--config.data.seq_len=64",
          "--config.data.global_batch_size=16", f"--config.data.source={dataset}",
          "--config.mesh.data=2", "--config.mesh.fsdp=4",
          "--config.optim.warmup_steps=2", "--config.optim.decay_steps=20",
          f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.train.eval_every=0", "--config.train.checkpoint_every=4",
          "--config.train.progress_bar=False"]


def _launch(dataset, workdir, steps, processes, *, kill_process_at_step=None, timeout=300, extra=()):
  """Runs `lmjax train` as ``processes`` processes with 8/processes devices each."""
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
  dist = lambda i: ([] if processes == 1 else
                    [f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}",
                     f"--process_id={i}", "--heartbeat_timeout=10"])
  procs = [subprocess.Popen([sys.executable, "-m", "lmjax.cli", "train",
                             *_args(dataset, workdir, steps), *dist(i), *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(processes)]
  if kill_process_at_step is not None:
    while not [r for r in read_metrics(workdir) if r["step"] >= kill_process_at_step]:
      assert procs[0].poll() is None, procs[0].stderr.read()[-3000:]
      time.sleep(0.05)
    procs[-1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
  outs = [p.communicate(timeout=timeout) for p in procs]
  if kill_process_at_step is not None:
    return procs, outs, time.monotonic() - killed_at
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-4000:]
  return procs, outs


def _losses(workdir):
  return np.array([r["loss"] for r in sorted(read_metrics(workdir), key=lambda r: r["step"])])


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("single")
  _launch(dataset, workdir, STEPS, 1)
  losses = _losses(workdir)
  assert len(losses) == STEPS
  return losses


def test_two_processes_then_four_equal_one_process(dataset, single, tmp_path):
  # Steps 1-4 on 2 processes x 4 devices, as a hybrid mesh: data across the processes
  # (the "nodes"), fsdp inside each.
  _launch(dataset, tmp_path, STEPS // 2, 2, extra=["--config.mesh.dcn_data=2"])
  _launch(dataset, tmp_path, STEPS, 4)  # resumed on 4 processes x 2 devices: steps 5-8
  # The same global mesh (data=2, fsdp=4) and the same global batches (prepared data are
  # read by global row, whatever the process count). Collectives now run through gloo in
  # another order, so fp32 sums agree to rounding, not bit for bit.
  np.testing.assert_allclose(_losses(tmp_path), single, rtol=2e-5)
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]


def test_each_process_reads_its_own_rows(dataset):
  cfg = default_config()
  cfg.data.source, cfg.data.seq_len, cfg.data.global_batch_size = dataset, 64, 16
  whole = next(data_lib.make_iterator(cfg, None, split="train"))
  for processes in (2, 4):
    parts = [next(data_lib.make_iterator(cfg, None, split="train", process_index=i,
                                    process_count=processes))
             for i in range(processes)]
    for key in whole:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
  rows = {tuple(r) for r in whole["inputs"]}
  assert len(rows) == 16  # 16 different rows: no row read twice


def test_a_dead_process_fails_the_others_in_bounded_time(dataset, tmp_path):
  procs, outs, waited = _launch(dataset, tmp_path, 200, 2, kill_process_at_step=3)
  assert procs[0].returncode != 0
  assert waited < 60, waited  # heartbeat timeout 10 s, plus detection and shutdown
  assert "another task died" in outs[0][1] or "tasks are unhealthy" in outs[0][1], outs[0][1][-3000:]
