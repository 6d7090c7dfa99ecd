"""A store that fails while a run in a bucket saves: the tests' S3 server (moto) and GCS
emulator behind proxies that answer chosen requests with the store's retryable 503 (S3's
SlowDown; tests/flaky_proxy.py).

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
    "--config.model.max_seq_len=64", "--config.data.seq_len=64",
    "--config.data.global_batch_size=8",
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
    "FSSPEC_S3": json.dumps({"config_kwargs": {
        "connect_timeout": 5, "read_timeout": 30,
        "retries": {"max_attempts": 2, "mode": "standard"}}}),
}
# Lines that runs print with or without faults, not lmjax's: TensorStore's native log (missing
# ~/.aws or gcloud files) and Orbax's note that a save waited for the one before.
NOT_LMJAX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ |"
                       r"^WARNING:absl:Waiting for previous save to complete took ")


def _writes_from_step(step: int, under: str = ""):
  """Uploads into checkpoint steps ``step`` and later (optionally only ``under`` them)."""
  def match(r) -> bool:
    m = re.search(r"(?:^|/)checkpoints/(\d+)/(.*)$", r.key)
    return (r.method in ("PUT", "POST") and m is not None and int(m.group(1)) >= step
            and m.group(2).startswith(under))
  return match


@pytest.fixture(scope="module")
def proxies(stores):
  """A proxy in front of each store: ``{"s3": ..., "gs": ...}``."""
  with FlakyProxy(stores.env["AWS_ENDPOINT_URL"]) as s3, \
      FlakyProxy(stores.env["STORAGE_EMULATOR_HOST"]) as gs:
    yield {"s3": s3, "gs": gs}


@pytest.fixture
def flaky(proxies):
  for p in proxies.values():
    p.heal()
    p.log.clear()
  yield proxies
  for p in proxies.values():
    p.heal()


def _through(proxy: FlakyProxy, scheme: str) -> dict[str, str]:
  """The settings that send lmjax's requests to the ``scheme`` store through ``proxy``."""
  if scheme == "s3":
    return {"AWS_ENDPOINT_URL": proxy.url}
  return {"STORAGE_EMULATOR_HOST": proxy.url, "TENSORSTORE_GCS_HTTP_URL": proxy.url}


def _train(workdir: str, proxies: dict, **env) -> subprocess.CompletedProcess:
  scheme = workdir.split("://")[0]
  return subprocess.run(
      [sys.executable, "-m", "lmjax.cli", "train", "--config", "configs/tiny.py",
       "--workdir", workdir, *OVERRIDES],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, **_through(proxies[scheme], scheme), **env})


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
  """The run's single ``error:`` line; nothing else on stderr but what any run prints."""
  assert p.returncode == 2, p.stderr[-3000:]
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
  others = [line for line in p.stderr.splitlines()
            if not line.startswith("error: ") and not NOT_LMJAX.match(line)]
  assert len(errors) == 1 and not others, p.stderr[-3000:]
  return errors[0]


@pytest.fixture(scope="module")
def unfaulted(stores, proxies) -> dict[int, float]:
  """The losses of a run that no fault touched (the same in either store)."""
  workdir = stores.bucket("s3") + "/run"
  p = _train(workdir, proxies)
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
  import tensorstore as ts
  assert 60 < _max_wait(orbax_s3.RETRIES) <= 132
  for resource in ("s3_request_retries", "gcs_request_retries"):  # TensorStore's: ~15 minutes
    assert _max_wait(ts.Context({resource: {}})[resource].to_json(include_defaults=True)) > 800
  for url, resource in [("s3://lmjax-b/run/checkpoints/2/state", "s3_request_retries"),
                        ("gs://lmjax-b/run/checkpoints/2/state", "gcs_request_retries")]:
    for ocdbt in (True, False):
      spec = tensorstore_utils.build_kvstore_tspec(url, name="p", use_ocdbt=ocdbt)
      store = spec["base"] if ocdbt else spec
      assert store[resource] == orbax_s3.RETRIES, spec
  local = tensorstore_utils.build_kvstore_tspec("/tmp/lmjax-x/2/state", name="p", use_ocdbt=False)
  assert "_request_retries" not in json.dumps(local)


def test_tensorstore_retries_setting_is_read_and_checked(monkeypatch):
  mine = {"max_retries": 3, "initial_delay": "0.5s", "max_delay": "2s"}
  monkeypatch.setenv(orbax_s3.RETRIES_VARIABLE, json.dumps(mine))
  assert orbax_s3.retries() == mine
  for bad in ("3", "{not json", '{"retries": 3}'):
    monkeypatch.setenv(orbax_s3.RETRIES_VARIABLE, bad)
    with pytest.raises(ConfigError, match=orbax_s3.RETRIES_VARIABLE):
      orbax_s3.retries()


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_tensorstore_gives_up_after_its_retries(stores, flaky, monkeypatch, scheme):
  import tensorstore as ts
  from orbax.checkpoint._src.serialization import tensorstore_utils
  proxy = flaky[scheme]
  for k, v in {**_through(proxy, scheme), **SHORT_RETRIES}.items():
    monkeypatch.setenv(k, v)
  url = stores.bucket(scheme) + "/run/checkpoints/2/state"
  spec = tensorstore_utils.build_kvstore_tspec(url, name="p", use_ocdbt=False)
  proxy.fail(writes_under("checkpoints/"), times=2)
  ts.KvStore.open(spec).result().write("a", b"x").result(timeout=30)  # 2 failures, then done
  proxy.fail(writes_under("checkpoints/"))
  start = time.monotonic()
  with pytest.raises(ValueError, match="All 2 retry attempts failed"):
    ts.KvStore.open(spec).result().write("b", b"x").result(timeout=30)
  assert time.monotonic() - start < 10
  assert proxy.count(writes_under("checkpoints/"), failed=True) == 2 + 3


# -- whole runs, through the command line ---------------------------------------------------


@pytest.mark.slow
def test_transient_errors_are_retried_and_the_run_is_unchanged(stores, flaky, unfaulted):
  workdir = stores.bucket("s3") + "/run"
  flaky["s3"].fail(writes_under("checkpoints/"), times=4)  # arrays or any other checkpoint file
  flaky["s3"].fail(key_endswith("metrics.jsonl"), times=2)
  p = _train(workdir, flaky)  # lmjax's own retry settings
  assert p.returncode == 0, p.stderr[-3000:]
  assert flaky["s3"].count(failed=True) == 6
  assert _whole_checkpoints(workdir) == [2, 4, 6]
  assert _losses(workdir) == unfaulted


@pytest.mark.slow
# The arrays alone refused, TensorStore's writes: the step is then half written. (A file
# written through fsspec that keeps failing is the metrics test below.)
@pytest.mark.parametrize("scheme,failing", [("gs", "state/")], ids=["gs-arrays-only"])
def test_a_save_that_keeps_failing_stops_the_run_and_the_rerun_resumes(stores, flaky, unfaulted,
                                                                        scheme, failing):
  workdir = stores.bucket(scheme) + "/run"
  flaky[scheme].fail(_writes_from_step(4, failing))  # from step 4 on, the store refuses them
  p = _train(workdir, flaky, **SHORT_RETRIES)
  error = _one_error_line(p)
  assert f"saving checkpoint step 4 in {workdir}/checkpoints/4 failed" in error, error
  assert "All 2 retry attempts failed" in error or "Please reduce your request rate" in error
  assert "rerun the same command" in error
  assert _whole_checkpoints(workdir) == [2]
  written = storage.files(f"{workdir}/checkpoints/4") if failing else {}
  assert not failing or (written and "commit_success.txt" not in written), written  # half

  flaky[scheme].heal()
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
  flaky["s3"].fail(key_endswith("metrics.jsonl"), after=2)
  p = _train(workdir, flaky, **SHORT_RETRIES)
  error = _one_error_line(p)
  assert error.startswith(f"error: {workdir}/metrics.jsonl: ") and "uploading it failed" in error
  # metrics.jsonl holds every step up to the newest checkpoint, written before it.
  assert _whole_checkpoints(workdir) == [2]
  assert sorted(_losses(workdir)) == [1, 2]

  flaky["s3"].heal()
  p = _train(workdir, flaky, **SHORT_RETRIES)
  assert p.returncode == 0, p.stderr[-3000:]
  assert _losses(workdir) == unfaulted
