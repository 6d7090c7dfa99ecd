"""The workdir lock in a bucket (``s3://`` on a real S3 server, ``gs://`` on the GCS
emulator): one holder, refused starts naming it, a dead run's lock taken over, and
conditional writes so that racing starts, refreshes and releases never undo each other.

moto enforces S3's conditions (If-None-Match, If-Match on PutObject and DeleteObject);
gcp-storage-emulator ignores GCS's ifGenerationMatch, so on it the lock runs in its
documented best-effort mode (write, wait, read back), and says so."""

import json
import os
import socket
import threading
import time

import pytest

from lmjax import storage, workdir_lock, workdir_lock_remote
from lmjax.config import ConfigError
from lmjax.workdir_lock import LOCK_FILE, WorkdirInUse, acquire

SCHEMES = ["s3", "gs"]
STRICT = {"s3": True, "gs": False}  # whether the test server enforces conditional writes


@pytest.fixture(params=SCHEMES)
def workdir(request, stores, monkeypatch):
  monkeypatch.setattr(workdir_lock_remote, "SETTLE", 0.3)
  return storage.join(stores.bucket(request.param), "runs", "a")


def _scheme(url: str) -> str:
  return url.split("://")[0]


def _lock(workdir: str) -> str:
  return storage.join(workdir, LOCK_FILE)


def _holder(workdir: str) -> dict:
  return json.loads(storage.path(_lock(workdir)).read_text())


def _write_lock(workdir: str, **fields) -> None:
  """Another run's lock, written unconditionally (as a take-over elsewhere would)."""
  holder = {"host": "elsewhere", "pid": 4242, "proc_start": None,
            "started": "2026-01-01 00:00:00 UTC", "argv": ["lmjax", "train"], "token": "old"}
  holder.update(fields)
  storage.write_text(_lock(workdir), json.dumps(holder))


def _best_effort(workdir: str, warnings: list[str]) -> list[str]:
  """``warnings`` less the one a store without conditional writes gives (checked here)."""
  said = [w for w in warnings if "ignores conditional writes" in w]
  if STRICT[_scheme(workdir)]:
    assert said == []
  else:
    assert len(said) == 1 and said[0].startswith(f"{_lock(workdir)}: this store ") and \
        "best effort" in said[0]
  return [w for w in warnings if w not in said]


def test_acquire_and_release_in_a_bucket(workdir):
  warnings = []
  with acquire(workdir, warn=warnings.append) as lock:
    holder = _holder(workdir)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert holder["token"] == lock.token and lock.path == _lock(workdir)
    assert storage.glob(storage.join(workdir, "*")) == [_lock(workdir)]
  assert _best_effort(workdir, warnings) == []
  assert storage.glob(storage.join(workdir, "**")) == []  # released, nothing left behind
  with acquire(workdir, warn=warnings.append):
    pass
  assert not storage.path(_lock(workdir)).exists()


def test_a_second_start_is_refused_naming_the_holder(workdir):
  with acquire(workdir, warn=lambda m: None):
    holder = _holder(workdir)
    with pytest.raises(WorkdirInUse) as e:
      acquire(workdir, warn=lambda m: None)
    message = str(e.value)
    assert "\n" not in message
    assert f"{workdir} is in use by pid {os.getpid()} on host {socket.gethostname()} since " \
           f"{holder['started']}" in message
    assert message.endswith(f"delete {_lock(workdir)}")
    assert _holder(workdir)["token"] == holder["token"]  # untouched


def test_another_hosts_lock_is_taken_over_once_not_refreshed(workdir, monkeypatch):
  _write_lock(workdir)
  with pytest.raises(WorkdirInUse, match="in use by pid 4242 on host elsewhere"):
    acquire(workdir, warn=lambda m: None)
  monkeypatch.setattr(workdir_lock, "STALE_AFTER", 0.5)
  time.sleep(0.6)  # the store's last-modified time, not the lock's fields, is what counts
  warnings = []
  with acquire(workdir, warn=warnings.append):
    assert _holder(workdir)["host"] == socket.gethostname()
  warnings = _best_effort(workdir, warnings)
  assert len(warnings) == 1 and warnings[0].startswith(
      f"took over {_lock(workdir)} from pid 4242 on host elsewhere since 2026-01-01")
  assert "not refreshed for" in warnings[0]


def test_the_lock_of_a_dead_process_on_this_host_is_taken_over(workdir):
  _write_lock(workdir, host=socket.gethostname(), pid=2**31 - 1)
  warnings = []
  with acquire(workdir, warn=warnings.append):
    assert _holder(workdir)["pid"] == os.getpid()
  assert f"pid {2**31 - 1} is no longer running" in _best_effort(workdir, warnings)[0]


def test_of_two_concurrent_starts_exactly_one_wins(workdir):
  for _ in range(3):
    barrier = threading.Barrier(2)
    won, refused = [], []

    def start():
      barrier.wait()
      try:
        won.append(acquire(workdir, warn=lambda m: None))
      except WorkdirInUse as e:
        refused.append(str(e))

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert len(won) == 1 and len(refused) == 1, (won, refused)
    assert _holder(workdir)["token"] == won[0].token
    assert "is in use by pid" in refused[0]
    won[0].release()
    assert not storage.path(_lock(workdir)).exists()


def test_a_lock_taken_over_meanwhile_is_neither_refreshed_nor_released(workdir):
  lock = acquire(workdir, warn=lambda m: None)
  _write_lock(workdir, token="another run's")
  lock.refresh()
  assert _holder(workdir)["token"] == "another run's"
  lock.release()
  assert _holder(workdir)["token"] == "another run's"


def test_the_holder_refreshes_its_lock(workdir):
  with acquire(workdir, warn=lambda m: None) as lock:
    before = storage.size_and_version(_lock(workdir))[1]
    lock.refresh()
    holder = _holder(workdir)
    assert holder["token"] == lock.token and "refreshed" in holder
    assert storage.size_and_version(_lock(workdir))[1] != before
  assert not storage.path(_lock(workdir)).exists()


def test_a_start_whose_create_was_retried_holds_its_own_lock(workdir, monkeypatch):
  """A create that reached the store but whose answer was lost is retried by the store's
  client and refused (the lock exists: its own): the start must see its own token."""
  create = workdir_lock_remote.LockObject.create
  monkeypatch.setattr(workdir_lock_remote.LockObject, "create",
                      lambda self, text: create(self, text) and False)
  warnings = []
  with acquire(workdir, warn=warnings.append) as lock:
    assert _holder(workdir)["token"] == lock.token
  assert _best_effort(workdir, warnings) == []
  assert not storage.path(_lock(workdir)).exists()


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if STRICT[s]])
def test_the_stores_conditions_keep_a_take_over_from_being_undone(stores, scheme, monkeypatch):
  """Where the store enforces conditions, a take-over that falls between the holder's check
  and its write is safe too: the refresh, the release, and a second take-over judged on the
  same stale version are refused by the store."""
  workdir = stores.bucket(scheme)
  lock = acquire(workdir, warn=lambda m: None)
  stale = lock.store.read()
  _write_lock(workdir, token="another run's")
  monkeypatch.setattr(lock.store, "read", lambda: stale)  # the check ran just before
  lock.refresh()
  assert _holder(workdir)["token"] == "another run's"
  lock.release()
  assert _holder(workdir)["token"] == "another run's"
  assert not lock.store.take_over(stale[1], stale[0])
  assert _holder(workdir)["token"] == "another run's"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_missing_bucket_is_one_line(stores, scheme):
  url = f"{scheme}://lmjax-no-such-bucket/run"
  with pytest.raises(ConfigError) as e:
    acquire(url, warn=lambda m: None)
  assert str(e.value).startswith(f"{url}/lock.json: bucket lmjax-no-such-bucket does not exist")
  assert "\n" not in str(e.value)
