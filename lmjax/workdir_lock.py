"""One run per workdir: ``<workdir>/lock.json`` names the run that holds it.

Process 0 of a training run creates the lock atomically (written under a unique name, then
hard-linked into place, which fails if the file exists) and removes it when the run ends,
normally, by an exception or stopped by SIGTERM. A second run finds it and stops at once,
naming the holder. A lock left by a killed run is taken over:

* same host: when its pid is gone, or now belongs to another process (the process start
  time, from ``/proc/<pid>/stat``, differs from the one recorded);
* another host, whose processes cannot be checked: when it has not been refreshed for
  :data:`STALE_AFTER` seconds. The holder touches the file every :data:`REFRESH_EVERY`
  seconds from a background thread;
* unreadable (cut short by a crash, edited by hand): :data:`UNREADABLE_AFTER` seconds after
  it was last written.

A take-over first renames the stale lock to a unique name, so two starters cannot both
replace it: the one whose rename moved something else (a lock written meanwhile) puts it
back, and only one O_EXCL-style create can win.

A workdir in a bucket (``gs://``, ``s3://``) holds the same lock as an object, created,
refreshed, taken over and removed by the store's conditional writes
(:mod:`lmjax.workdir_lock_remote`); there, "refreshed" is the object's last-modified time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from lmjax import storage
from lmjax.config import ConfigError
from lmjax.workdir_lock_remote import LockObject

LOCK_FILE = "lock.json"
UNREADABLE_AFTER = 10.0  # seconds: a lock that is not lmjax's JSON this long after its last write is a crash's
STALE_AFTER = 600.0  # seconds: another host's lock not refreshed for this long is a dead run's
REFRESH_EVERY = 60.0  # seconds between the holder's refreshes of the lock


class WorkdirInUse(ConfigError):
  """Another run holds the workdir (a ConfigError: the CLI prints it as one line, exit 2)."""


def _process_start(pid: int) -> int | None:
  """The start time of process ``pid`` (clock ticks since boot), or None if unknown. A
  zombie (killed, not yet reaped) counts as gone: -1."""
  try:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  except (OSError, IndexError):
    return None
  return -1 if fields[0] in ("Z", "X") else int(fields[19])


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's process
  return _process_start(pid) != -1


def _stale(holder: dict | None, mtime: float) -> str | None:
  """Why the lock ``holder`` (None: unreadable) no longer holds, or None if it may."""
  age = time.time() - mtime
  if holder is None:  # cut short by a crash on a file system without hard links, or edited
    return f"unreadable for {age:.0f} s" if age > UNREADABLE_AFTER else None
  if holder is not None and holder.get("host") == socket.gethostname():
    pid = holder.get("pid")
    if not isinstance(pid, int) or not _alive(pid):
      return f"pid {pid} is no longer running"
    now, then = _process_start(pid), holder.get("proc_start")
    if now is not None and then is not None and now != then:
      return f"pid {pid} is now another process"
    return None
  if age > STALE_AFTER:
    return f"not refreshed for {age / 60:.0f} min (more than {STALE_AFTER / 60:.0f})"
  return None


def _parse(text: str) -> dict | None:
  """The lock's holder, or None unless it names a host and a pid."""
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  if not isinstance(holder, dict) or not isinstance(holder.get("host"), str):
    return None
  pid = holder.get("pid")
  return holder if type(pid) is int and 0 < pid < 2**31 else None


def _read(path: Path) -> str:
  return path.read_bytes().decode("utf-8", "replace")


def _create(path: Path, text: str) -> bool:
  """Creates ``path`` holding ``text`` unless it exists; never shows a half-written file."""
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    tmp.write_text(text)
  except OSError as e:
    raise ConfigError(f"{path.parent}: cannot write the run's lock there ({e.strerror}); "
                      "give --workdir a writable directory") from None
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError:  # a file system without hard links: create exclusively, then write
    try:
      fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(text)
    return True
  finally:
    tmp.unlink(missing_ok=True)


def _take_away(path: Path, judged: str) -> None:
  """Removes the stale lock whose contents were ``judged``; if a new lock replaced it in the
  meantime, that one is put back."""
  aside = path.with_name(f".{path.name}.stale-{uuid.uuid4().hex}")
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return  # another starter took it away first
  try:
    if _read(aside) != judged:
      os.link(aside, path)
  except FileExistsError:
    pass
  finally:
    aside.unlink(missing_ok=True)


class _LockFile:
  """The lock as a file on a local (or mounted) file system: created by a hard link,
  refreshed by its mtime, taken over by a rename aside."""

  def __init__(self, path: Path):
    self.path, self.name = path, str(path)

  def read(self) -> tuple[str, str, float] | None:
    """The lock's text, version (the text itself) and mtime; None if absent."""
    try:
      text = _read(self.path)
      return text, text, self.path.stat().st_mtime
    except FileNotFoundError:
      return None  # released meanwhile
    except OSError as e:
      raise WorkdirInUse(f"{self.path}: cannot read this run lock ({e.strerror}); if no run "
                         "uses the workdir, delete it") from None

  def create(self, text: str) -> bool:
    return _create(self.path, text)

  def take_over(self, version: str, text: str) -> bool:
    _take_away(self.path, version)
    return _create(self.path, text)

  def touch(self, version: str, text: str) -> None:
    os.utime(self.path)

  def delete(self, version: str) -> None:
    self.path.unlink(missing_ok=True)

  def confirm(self, text: str, warn: Callable[[str], None]) -> bool:
    return True  # a hard link or an O_EXCL create has one winner


class WorkdirLock:
  """A held workdir lock: refreshed in the background, removed by :meth:`release` (or on
  leaving a ``with`` block)."""

  def __init__(self, store: _LockFile | LockObject, holder: dict):
    self.store, self.holder, self.token = store, holder, holder["token"]
    self.path = store.name
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="lmjax-workdir-lock", daemon=True)
    self._thread.start()

  def _ours(self) -> object | None:
    """The lock's version if it is still this run's lock, else None. A write or delete
    conditioned on it (where the store has conditions) cannot undo a take-over."""
    try:
      got = self.store.read()
    except (OSError, ConfigError):
      return None
    return got[1] if got and (_parse(got[0]) or {}).get("token") == self.token else None

  def refresh(self) -> None:
    """Marks the lock as held now, unless another run has taken it."""
    with contextlib.suppress(OSError, ConfigError):
      version = self._ours()
      if version is not None:
        self.store.touch(version, _text({**self.holder, "refreshed": _now()}))

  def _beat(self) -> None:
    while not self._stop.wait(REFRESH_EVERY):
      self.refresh()

  def release(self) -> None:
    """Removes the lock if it is still this run's. One the store cannot remove (unreachable)
    stays, to be taken over as a dead run's."""
    self._stop.set()
    if self._thread is not threading.current_thread():
      self._thread.join()
    with contextlib.suppress(OSError, ConfigError):
      version = self._ours()
      if version is not None:
        self.store.delete(version)

  def __enter__(self) -> WorkdirLock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _now() -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def _text(holder: dict) -> str:
  return json.dumps(holder, indent=1)


def _store(workdir: str | os.PathLike) -> _LockFile | LockObject:
  """The lock of ``workdir`` (a local directory, created here, or a bucket's URL)."""
  if storage.is_url(workdir):
    return LockObject(storage.join(workdir, LOCK_FILE))
  workdir = Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise ConfigError(f"{workdir}: a file is in the way of the run directory; give --workdir a "
                      "directory (new or a run's)") from None
  except PermissionError as e:
    raise ConfigError(f"{workdir}: cannot create the run directory ({e.strerror}: "
                      f"{e.filename}); give --workdir a writable place") from None
  return _LockFile(workdir / LOCK_FILE)


def acquire(workdir: str | os.PathLike, warn: Callable[[str], None] = print) -> WorkdirLock:
  """Takes ``workdir``'s lock (creating a local directory), taking over a stale one with a
  ``warn``ing; raises WorkdirInUse naming the holder if it is held."""
  store = _store(workdir)
  token = uuid.uuid4().hex
  holder = {"host": socket.gethostname(), "pid": os.getpid(),
            "proc_start": _process_start(os.getpid()), "started": _now(), "argv": sys.argv,
            "token": token}
  text = _text(holder)
  for _ in range(10):
    took = None
    if not store.create(text):
      got = store.read()
      if got is None:
        continue  # released meanwhile
      judged, version, mtime = got
      held = _parse(judged)
      if (held or {}).get("token") != token:  # ours: a create the store's client retried
        why = _stale(held, mtime)
        h = held or {}
        who = (f"pid {h['pid']} on host {h['host']} since {h.get('started', '?')}" if held else
               f"a run whose lock is unreadable ({len(judged)} bytes, written "
               f"{time.time() - mtime:.0f} s ago)")
        if why is None:
          command = shlex.join(map(str, h["argv"])) if isinstance(h.get("argv"), list) else ""
          command = (f" ({command[:97]}...)" if len(command) > 100 else
                     f" ({command})" if command else "")
          raise WorkdirInUse(
              f"{workdir} is in use by {who}{command}: wait for that run to end or, if it is "
              f"dead, delete {store.name}")
        if not store.take_over(version, text):
          continue  # another start was quicker
        took = f"took over {store.name} from {who}: {why}"
    if store.confirm(text, warn):
      if took:
        warn(took)
      return WorkdirLock(store, holder)
  raise WorkdirInUse(f"{store.name}: could not take the lock, other runs keep starting in "
                     f"{workdir}; try again")


def hold(workdir: str | os.PathLike,
         warn: Callable[[str], None] = print) -> contextlib.AbstractContextManager:
  """The workdir lock of a (possibly multi-process) run, for a ``with`` block: process 0
  takes it, the others do not touch it but stop with process 0 if it is refused."""
  lock, refused = None, None
  if jax.process_index() == 0:
    try:
      lock = acquire(workdir, warn)
    except Exception as e:  # noqa: BLE001 - re-raised below, once every process knows
      refused = e
  if jax.process_count() > 1:
    if multihost_utils.broadcast_one_to_all(np.int32(refused is not None)) and refused is None:
      refused = WorkdirInUse(f"{workdir} is in use by another run (process 0 names it)")
  if refused is not None:
    raise refused
  return lock if lock is not None else contextlib.nullcontext()
