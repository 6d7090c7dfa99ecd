"""Real object-store servers on loopback for the tests: an S3 server (``moto`` in server
mode) and a GCS emulator (``gcp-storage-emulator``, through tests/gcs_emulator.py), each a
subprocess on a free port.

``Stores.env`` holds the settings a user would export (``AWS_ENDPOINT_URL``, the AWS keys,
``STORAGE_EMULATOR_HOST``) and nothing lmjax-specific: lmjax derives the rest itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

S3_KEYS = {"AWS_ACCESS_KEY_ID": "lmjax-test", "AWS_SECRET_ACCESS_KEY": "lmjax-test-secret",
           "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait(port: int, proc: subprocess.Popen, log: str, timeout: float = 60.0) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"the server exited ({proc.returncode}): {open(log).read()[-2000:]}")
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
      return
    time.sleep(0.2)
  raise RuntimeError(f"the server did not listen on {port} within {timeout} s")


class Stores:
  """Both servers; :meth:`bucket` makes a fresh bucket and returns its URL."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.procs: list[subprocess.Popen] = []
    self.s3_port, self.gcs_port = free_port(), free_port()
    bindir = os.path.dirname(sys.executable)
    moto = shutil.which("moto_server", path=bindir) or shutil.which("moto_server")
    self._start([moto, "-H", "127.0.0.1", "-p", str(self.s3_port)], "moto.log", self.s3_port)
    emulator = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator.py")
    self._start([sys.executable, emulator, "127.0.0.1", str(self.gcs_port)], "gcs.log",
                self.gcs_port)
    self.env = {**S3_KEYS, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.s3_port}",
                "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{self.gcs_port}"}

  def _start(self, argv: list, log: str, port: int) -> None:
    path = os.path.join(self.workdir, log)
    with open(path, "w") as out:
      proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    self.procs.append(proc)
    _wait(port, proc, path)

  def strict_s3(self) -> str:
    """The endpoint of a second S3 server that checks credentials (it knows none, so every
    key is wrong); started on first use."""
    if not hasattr(self, "_strict"):
      port = free_port()
      moto = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or "moto_server"
      path = os.path.join(self.workdir, "moto-strict.log")
      with open(path, "w") as out:
        proc = subprocess.Popen([moto, "-H", "127.0.0.1", "-p", str(port)], stdout=out,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"})
      self.procs.append(proc)
      _wait(port, proc, path)
      self._strict = f"http://127.0.0.1:{port}"
    return self._strict

  def bucket(self, scheme: str, prefix: str = "lmjax", name: str | None = None) -> str:
    """A new, empty bucket on the ``scheme`` (``"s3"`` or ``"gs"``) server (named ``name``,
    else ``<prefix>-<random>``): its URL."""
    name = name or f"{prefix}-{uuid.uuid4().hex[:12]}"
    if scheme == "s3":
      import botocore.session
      client = botocore.session.get_session().create_client(
          "s3", endpoint_url=self.env["AWS_ENDPOINT_URL"], region_name="us-east-1",
          aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
          aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])
      client.create_bucket(Bucket=name)
    else:
      import json
      import urllib.request
      req = urllib.request.Request(
          f"{self.env['STORAGE_EMULATOR_HOST']}/storage/v1/b?project=test",
          data=json.dumps({"name": name}).encode(), method="POST",
          headers={"Content-Type": "application/json"})
      urllib.request.urlopen(req, timeout=10).read()
    return f"{scheme}://{name}"

  def close(self) -> None:
    for proc in self.procs:
      proc.terminate()
    for proc in self.procs:
      try:
        proc.wait(10)
      except subprocess.TimeoutExpired:
        proc.kill()
