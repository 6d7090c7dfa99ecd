"""A store that fails while a run in a bucket saves: a real S3 server (moto) behind a proxy that
answers chosen requests with S3's retryable 503 SlowDown (tests/flaky_proxy.py).

Errors that pass are retried and the run goes on, bit for bit; errors that last stop the run
with one line (exit 2), the unfinished checkpoint is never taken for a whole one, and the same
command resumes from the newest whole checkpoint."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmjax import orbax_s3, storage
from lmjax.checkpoint import Checkpointer
from lmjax.config import ConfigError
from lmjax.metrics import read_metrics
from tests.flaky_proxy import FlakyProxy, key_endswith, writes_under

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6
OVERRIDES = [
    "--config.model.num_layers=2", "--config.model.embed_dim=64", "--config.model.mlp_dim=128",
    "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.head_dim=16",
    "--config.model.max_seq_len=64", "--config.data.seq_len=64", "--config.data.global_batch_size=8",
    "--config.optim.warmup_steps=4", "--config.optim.decay_steps=40",
    f"--config.train.steps={STEPS}", "--config.train.log_every=1", "--config.train.eval_every=0",
    "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=5",
    "--config.train.progress_bar=False",
]
# Retries short enough for a test to reach the end of them: TensorStore's (the arrays) and
# botocore's (every other file, through s3fs).
SHORT_RETRIES = {
    orbax_s3.RETRIES_VARIABLE: json.dumps(
        {"max_retries": 2, "initial_delay": "0.1s", "max_delay": "0.2s"}),
    "FSSPEC_S3": json.dumps({"config_kwargs": {"connect_timeout": 5, "read_timeout": 30,
                                               "retries": {"max_attempts": 2, "mode": "standard"}}}),
}
# What TensorStore's C++ logging prints on every S3 run without ~/.aws files (not lmjax's).
NATIVE_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")


def _writes_from_step(step: int, under: str = ""):
  """Uploads into checkpoint steps ``step`` and later (optionally only ``under`` them)."""
  def match(r) -> bool:
    m = re.search(r"(?:^|/)checkpoints/(\d+)/(.*)$", r.key)
    return (r.method in ("PUT", "POST") and m is not None and int(m.group(1)) >= step
            and m.group(2).startswith(under))
  return match


@pytest.fixture(scope="module")
def proxy(stores):
  with FlakyProxy(stores.env["AWS_ENDPOINT_URL"]) as p:
    yield p


@pytest.fixture
def flaky(proxy):
  proxy.heal()
  proxy.log.clear()
  yield proxy
  proxy.heal()


def _train(workdir: str, proxy: FlakyProxy, **env) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "lmjax.cli", "train", "--config", "configs/tiny.py",
       "--workdir", workdir, *OVERRIDES],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "AWS_ENDPOINT_URL": proxy.url, **env})


def _losses(workdir: str) -> dict[int, float]:
  records = read_metrics(workdir)
  steps = [r["step"] for r in records]
  assert len(steps) == len(set(steps)), "each step recorded once"
  return {r["step"]: r["loss"] for r in records}


def _whole_checkpoints(workdir: str) -> list[int]:
  """The listed steps, each checked against its manifest (which must exist)."""
  ckpt = Checkpointer(storage.join(workdir, "checkpoints"), read_only=True)
  steps = ckpt.all_steps()
  assert all(ckpt.verify(s) for s in steps), steps
  return steps


def _one_error_line(p: subprocess.CompletedProcess) -> str:
  """The run's single ``error:`` line; nothing else on stderr but TensorStore's native log."""
  assert p.returncode == 2, p.stderr[-3000:]
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
  others = [line for line in p.stderr.splitlines()
            if not line.startswith("error: ") and not NATIVE_LOG.match(line)]
  assert len(errors) == 1 and not others, p.stderr[-3000:]
  return errors[0]


@pytest.fixture(scope="module")
def unfaulted(stores, proxy) -> dict[int, float]:
  workdir = stores.bucket("s3") + "/run"
  p = _train(workdir, proxy)
  assert p.returncode == 0, p.stderr[-3000:]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


# -- TensorStore's retries, in process ------------------------------------------------------


def _max_wait(r: dict) -> float:
  """The longest TensorStore waits in all before giving a request up (its backoff: the
  initial delay doubling per retry plus up to min(1 s, initial) of jitter, capped)."""
  sec = lambda s: float(s.rstrip("s"))
  initial, cap = sec(r["initial_delay"]), sec(r["max_delay"])
  return sum(min(initial * 2 ** i + min(1.0, initial), cap) for i in range(r["max_retries"]))


def test_tensorstore_retries_are_bounded_on_every_object_store(monkeypatch):
  from orbax.checkpoint._src.serialization import tensorstore_utils
  monkeypatch.delenv(orbax_s3.RETRIES_VARIABLE, raising=False)
  assert 60 < _max_wait(orbax_s3.RETRIES) <= 132  # TensorStore's own default: ~15 minutes
  assert _max_wait({"max_retries": 32, "initial_delay": "1s", "max_delay": "32s"}) > 800
  for url, resource in [("s3://lmjax-b/run/checkpoints/2/state", "s3_request_retries"),
                        ("gs://lmjax-b/run/checkpoints/2/state", "gcs_request_retries")]:
    for ocdbt in (True, False):
      spec = tensorstore_utils.build_kvstore_tspec(url, name="p", use_ocdbt=ocdbt)
      store = spec["base"] if ocdbt else spec
      assert store[resource] == orbax_s3.RETRIES, spec
  local = tensorstore_utils.build_kvstore_tspec("/tmp/lmjax-x/2/state", name="p", use_ocdbt=False)
  assert "s3_request_retries" not in json.dumps(local)


def test_tensorstore_retries_setting_is_read_and_checked(monkeypatch):
  mine = {"max_retries": 3, "initial_delay": "0.5s", "max_delay": "2s"}
  monkeypatch.setenv(orbax_s3.RETRIES_VARIABLE, json.dumps(mine))
  assert orbax_s3.retries() == mine
  for bad in ("3", "{not json", '{"retries": 3}'):
    monkeypatch.setenv(orbax_s3.RETRIES_VARIABLE, bad)
    with pytest.raises(ConfigError, match=orbax_s3.RETRIES_VARIABLE):
      orbax_s3.retries()


@pytest.mark.slow
def test_tensorstore_gives_up_after_its_retries(stores, flaky, monkeypatch):
  import tensorstore as ts
  from orbax.checkpoint._src.serialization import tensorstore_utils
  monkeypatch.setenv("AWS_ENDPOINT_URL", flaky.url)
  monkeypatch.setenv(orbax_s3.RETRIES_VARIABLE, SHORT_RETRIES[orbax_s3.RETRIES_VARIABLE])
  url = stores.bucket("s3") + "/run/checkpoints/2/state"
  spec = tensorstore_utils.build_kvstore_tspec(url, name="p", use_ocdbt=False)
  flaky.fail(writes_under("checkpoints/"), times=2)
  ts.KvStore.open(spec).result().write("a", b"x").result(timeout=30)  # 2 failures, then done
  flaky.fail(writes_under("checkpoints/"))
  start = time.monotonic()
  with pytest.raises(ValueError, match="All 2 retry attempts failed: SlowDown"):
    ts.KvStore.open(spec).result().write("b", b"x").result(timeout=30)
  assert time.monotonic() - start < 10
  assert flaky.count(writes_under("checkpoints/"), failed=True) == 2 + 3


# -- whole runs, through the command line ---------------------------------------------------


@pytest.mark.slow
def test_transient_errors_are_retried_and_the_run_is_unchanged(stores, flaky, unfaulted):
  workdir = stores.bucket("s3") + "/run"
  flaky.fail(writes_under("checkpoints/"), times=4)  # arrays or any other checkpoint file
  flaky.fail(key_endswith("metrics.jsonl"), times=2)
  p = _train(workdir, flaky)  # lmjax's own retry settings
  assert p.returncode == 0, p.stderr[-3000:]
  assert flaky.count(failed=True) == 6
  assert _whole_checkpoints(workdir) == [2, 4, 6]
  assert _losses(workdir) == unfaulted


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["", "state/"], ids=["every-file", "arrays-only"])
def test_a_save_that_keeps_failing_stops_the_run_and_the_rerun_resumes(stores, flaky, unfaulted,
                                                                        failing):
  workdir = stores.bucket("s3") + "/run"
  flaky.fail(_writes_from_step(4, failing))  # from step 4 on, the store refuses them
  p = _train(workdir, flaky, **SHORT_RETRIES)
  error = _one_error_line(p)
  assert f"saving checkpoint step 4 in {workdir}/checkpoints/4 failed" in error, error
  assert "Please reduce your request rate" in error and "rerun the same command" in error
  assert _whole_checkpoints(workdir) == [2]
  written = storage.files(f"{workdir}/checkpoints/4") if failing else {}
  assert not failing or (written and "commit_success.txt" not in written), written  # half

  flaky.heal()
  p = _train(workdir, flaky, **SHORT_RETRIES)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resuming from" in p.stdout and "(step 2)" in p.stdout
  assert _whole_checkpoints(workdir) == [2, 4, 6]
  assert _losses(workdir) == unfaulted


@pytest.mark.slow
def test_a_metrics_upload_that_keeps_failing_stops_the_run_and_loses_no_record(stores, flaky,
                                                                              unfaulted):
  workdir = stores.bucket("s3") + "/run"
  # Uploaded at step 1 and before the checkpoint of step 2; refused from then on.
  flaky.fail(key_endswith("metrics.jsonl"), after=2)
  p = _train(workdir, flaky, **SHORT_RETRIES)
  error = _one_error_line(p)
  assert error.startswith(f"error: {workdir}/metrics.jsonl: ") and "uploading it failed" in error
  # metrics.jsonl holds every step up to the newest checkpoint, written before it.
  assert _whole_checkpoints(workdir) == [2]
  assert sorted(_losses(workdir)) == [1, 2]

  flaky.heal()
  p = _train(workdir, flaky, **SHORT_RETRIES)
  assert p.returncode == 0, p.stderr[-3000:]
  assert _losses(workdir) == unfaulted
