"""Runs that live in buckets, against real servers on loopback (tests/object_stores.py): an
S3 server and a GCS emulator. A tiny run trains into ``s3://`` and ``gs://`` reading its data
and tokenizer from the same store, is SIGKILLed while a checkpoint is being written, resumes
bit for bit, and leaves nothing on local disk but caches; runs, eval and generate read it
back; two processes share an ``s3://`` workdir and a third resumes it alone; a missing
bucket, an unreachable endpoint and wrong credentials are one line each, before compiling."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmjax import cli, storage
from lmjax import data as data_lib
from lmjax.checkpoint import MANIFEST, Checkpointer
from lmjax.config import default_config
from lmjax.data.corpus import default_documents
from lmjax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
MODEL = ["--config.model.num_layers=2", "--config.model.embed_dim=64",
         "--config.model.mlp_dim=128", "--config.model.num_heads=4",
         "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
         "--config.model.max_seq_len=64", "--config.data.seq_len=64",
         "--config.optim.warmup_steps=2", "--config.optim.decay_steps=20",
         "--config.train.log_every=1", "--config.train.eval_every=0",
         "--config.train.progress_bar=False"]
STEPS = 9


def _env(stores, home: Path) -> dict:
  return {**os.environ, **stores.env, "HOME": str(home), "PYTHONPATH": str(ROOT),
          "JAX_PLATFORMS": "cpu"}


def _bucket_inputs(bucket: str) -> list[str]:
  """The data (two text files, one in a subdirectory) and the tokenizer, put in ``bucket``;
  the overrides that read them from there."""
  docs = default_documents()
  half = len(docs) // 2
  storage.write_text(f"{bucket}/data/a.txt", "\n\n".join(docs[:half]))
  storage.write_text(f"{bucket}/data/more/b.txt", "\n\n".join(docs[half:]))
  tok = data_lib.get_tokenizer(default_config().data, 1024)
  storage.write_bytes(f"{bucket}/tokenizer/bpe.model", Path(tok.path).read_bytes())
  return [f"--config.data.source={bucket}/data/**/*.txt",
          f"--config.data.tokenizer={bucket}/tokenizer/bpe.model"]


def _train_args(workdir: str, inputs: list[str]) -> list[str]:
  return [sys.executable, "-m", "lmjax.cli", "train", "--config", TINY, "--workdir", workdir,
          *MODEL, *inputs, "--config.data.global_batch_size=8", f"--config.train.steps={STEPS}",
          "--config.train.checkpoint_every=3", "--config.train.keep_checkpoints=2"]


def _run(args, env, cwd) -> str:
  p = subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return p.stdout


def _losses(workdir: str) -> dict[int, float]:
  records = read_metrics(workdir)
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)), "each step recorded once"
  return {r["step"]: r["loss"] for r in records}


def _saving_step(checkpoints: str) -> str | None:
  """A step directory being written: files under it, no ``commit_success.txt`` yet."""
  try:
    names = storage.files(checkpoints)
  except FileNotFoundError:
    return None
  steps = {n.split("/", 1)[0] for n in names if n.split("/", 1)[0].isdigit()}
  done = {n.split("/", 1)[0] for n in names if n.count("/") == 1 and
          n.endswith("/commit_success.txt")}
  writing = sorted(int(s) for s in steps - done if int(s) >= 3)
  return f"while step {writing[0]} was being written" if writing else None


def _local_files(root: Path) -> list[str]:
  return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def uninterrupted(stores, tmp_path_factory) -> dict[int, float]:
  """The losses of the run, uninterrupted, in an S3 bucket (the same data and tokenizer in a
  GCS bucket give the same losses, bit for bit)."""
  bucket = stores.bucket("s3")
  home = tmp_path_factory.mktemp("home")
  _run(_train_args(f"{bucket}/uninterrupted", _bucket_inputs(bucket)), _env(stores, home), home)
  losses = _losses(f"{bucket}/uninterrupted")
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_run_in_a_bucket_trains_resumes_after_sigkill_mid_save_and_is_read_back(
    stores, uninterrupted, tmp_path, scheme, capsys):
  bucket = stores.bucket(scheme)
  inputs = _bucket_inputs(bucket)
  home, cwd = tmp_path / "home", tmp_path / "cwd"
  home.mkdir()
  cwd.mkdir()
  env = _env(stores, home)
  expected = uninterrupted

  run = f"{bucket}/run"
  p = subprocess.Popen(_train_args(run, inputs), env=env, cwd=cwd, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  what, deadline = None, time.monotonic() + 300
  try:
    while what is None and time.monotonic() < deadline:
      what = _saving_step(f"{run}/checkpoints")
      if what is None:
        assert p.poll() is None, f"finished before a save was caught: {p.stderr.read()[-2000:]}"
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
  finally:
    p.kill()
    p.wait()
  assert what, "no save was caught in progress"
  listed = Checkpointer(f"{run}/checkpoints", read_only=True).all_steps()
  names = storage.files(f"{run}/checkpoints")
  assert all(f"{s}/commit_success.txt" in names for s in listed), what  # only whole ones

  out = _run(_train_args(run, inputs), env, cwd)
  assert _losses(run) == expected, what  # every step, to the last bit
  names = storage.files(f"{run}/checkpoints")
  steps = {n.split("/", 1)[0] for n in names}
  assert steps == {"6", "9"}, (what, steps)  # the unfinished save is gone, keep_checkpoints=2
  assert all(f"{s}/{MANIFEST}" in names and f"{s}/commit_success.txt" in names for s in steps)
  assert storage.path(f"{run}/tensorboard").is_dir() and storage.path(f"{run}/summary.json").exists()
  assert f"run directory {run}" in out
  # Nothing on local disk but caches: not in the working directory, not in $HOME.
  assert _local_files(cwd) == [] and _local_files(home) == [], (
      _local_files(cwd), _local_files(home))

  # The run is read back from the bucket: runs, eval, generate.
  capsys.readouterr()
  cli.main(["runs", bucket])
  table = capsys.readouterr().out
  assert "run " in table
  cli.main(["eval", "--workdir", run, "--eval_batches", "2",
            "--eval_source", f"{bucket}/data/a.txt"])
  results = json.loads(storage.path(f"{run}/eval.json").read_text())
  assert results["step"] == STEPS and results["source"]["loss"] > 0
  cli.main(["generate", "--workdir", run, "--prompt", "The", "--max_new_tokens", "4"])
  assert f"# {run} step {STEPS}" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_share_an_s3_workdir_and_one_resumes_it(stores, prepared_default,
                                                              tmp_path):
  from tests.object_stores import free_port
  bucket = stores.bucket("s3")
  data = f"{bucket}/prepared"
  storage.filesystem("s3").put(prepared_default, data, recursive=True)
  env = {**_env(stores, tmp_path), "XLA_FLAGS": ""}

  def launch(workdir: str, steps: int, processes: int) -> None:
    port = free_port()
    args = lambda i: [*_train_args(workdir, [f"--config.data.source={data}"])[:-3],
                      "--config.data.global_batch_size=16", f"--config.train.steps={steps}",
                      "--config.train.checkpoint_every=4", "--config.mesh.data=2",
                      "--config.mesh.fsdp=-1",
                      *([] if processes == 1 else
                        [f"--coordinator=127.0.0.1:{port}", f"--num_processes={processes}",
                         f"--process_id={i}", "--heartbeat_timeout=10"])]
    devices = {"XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}"}
    procs = [subprocess.Popen(args(i), env={**env, **devices}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    for p in procs:
      _, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-3000:]

  launch(f"{bucket}/alone", 8, 1)
  launch(f"{bucket}/shared", 4, 2)
  assert Checkpointer(f"{bucket}/shared/checkpoints", read_only=True).all_steps() == [4]
  launch(f"{bucket}/shared", 8, 1)  # resumed by one process on another mesh split
  # The same global mesh and batches (prepared data are read by global row); collectives
  # run through gloo in another order, so fp32 sums agree to rounding, not bit for bit.
  shared, alone = _losses(f"{bucket}/shared"), _losses(f"{bucket}/alone")
  assert sorted(shared) == sorted(alone) == list(range(1, 9))
  np.testing.assert_allclose([shared[s] for s in sorted(shared)],
                             [alone[s] for s in sorted(alone)], rtol=2e-5)


# -- one line, before anything compiles ------------------------------------------------------

@pytest.fixture
def refuse(monkeypatch, tmp_path, capsys):
  """Runs ``lmjax ARGS`` in-process (in an empty working directory) expecting exit status 2
  before training starts; returns the error line."""
  monkeypatch.chdir(tmp_path)

  def never(*args, **kwargs):
    raise AssertionError("train() was reached")

  monkeypatch.setattr(cli, "train", never)

  def run(*args: str) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
      cli.main(list(args))
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert os.listdir(tmp_path) == [], "nothing written locally"
    return err
  return run


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_missing_bucket_is_one_line(stores, refuse, scheme):
  url = f"{scheme}://no-such-bucket-lmjax/run"
  err = refuse("train", "--config", TINY, "--workdir", url)
  assert err.startswith(f"error: {url}: bucket no-such-bucket-lmjax does not exist"), err
  err = refuse("eval", "--workdir", url)
  assert "bucket no-such-bucket-lmjax does not exist" in err, err


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_an_unreachable_endpoint_is_one_line(stores, refuse, monkeypatch, scheme):
  from tests.object_stores import free_port
  dead = f"http://127.0.0.1:{free_port()}"
  monkeypatch.setenv("AWS_ENDPOINT_URL" if scheme == "s3" else "STORAGE_EMULATOR_HOST", dead)
  started = time.monotonic()
  err = refuse("train", "--config", TINY, "--workdir", f"{scheme}://bucket/run")
  assert f"cannot reach {dead}" in err, err
  assert time.monotonic() - started < 30


def test_wrong_s3_credentials_are_one_line(stores, refuse, monkeypatch):
  monkeypatch.setenv("AWS_ENDPOINT_URL", stores.strict_s3())
  err = refuse("train", "--config", TINY, "--workdir", "s3://bucket/run")
  assert "refused the credentials; set AWS_ACCESS_KEY_ID" in err, err


def test_an_unusable_google_credentials_file_is_one_line(stores, refuse, monkeypatch, tmp_path):
  key = tmp_path.parent / "key.json"
  key.write_text(json.dumps({"type": "service_account", "client_email": "x@example.com",
                             "private_key": "not a key", "token_uri": "https://example.com"}))
  monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(key))
  monkeypatch.delenv("STORAGE_EMULATOR_HOST")
  err = refuse("train", "--config", TINY, "--workdir", "gs://bucket/run")
  assert f"GOOGLE_APPLICATION_CREDENTIALS={key} cannot be used" in err, err


def test_a_data_source_in_a_missing_bucket_is_one_line(stores, refuse, tmp_path):
  err = refuse("train", "--config", TINY, "--workdir", str(tmp_path.parent / "run"),
               "--config.data.source=s3://no-such-bucket-lmjax/data/*.txt")
  assert "s3://no-such-bucket-lmjax/data/*.txt: bucket no-such-bucket-lmjax does not exist" in err


def test_another_scheme_is_refused_not_made_a_local_directory(refuse):
  err = refuse("train", "--config", TINY, "--workdir", "hdfs://cluster/run")
  assert "not hdfs://" in err, err
