"""Where lmjax's files live: local paths, ``gs://`` and ``s3://`` URLs, through one layer.

Every path lmjax takes (workdir, data sources and globs, prepared data, tokenizers, Hugging
Face directories, sweeps) goes through :func:`path`, an ``etils.epath.Path``: local paths as
``pathlib`` does, ``gs://`` through ``gcsfs`` (extra ``lmjax[gcs]``) and ``s3://`` through
``s3fs`` (extra ``lmjax[s3]``), both fsspec file systems. Checkpoints go to the same URLs
through Orbax and TensorStore (:mod:`lmjax.orbax_s3` adds ``s3://``). Another scheme
(``hdfs://``, ``gcs://``, ``http://``) is refused, never taken for a local directory.

Endpoints and credentials are the ones Google's and AWS's own tools read, set once for every
library (:func:`configure`):

* GCS: ``GOOGLE_APPLICATION_CREDENTIALS`` (else the gcloud default credentials or the VM's
  service account); ``STORAGE_EMULATOR_HOST`` for an emulator, also handed to TensorStore as
  ``TENSORSTORE_GCS_HTTP_URL`` unless that is set.
* S3: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (or ``AWS_PROFILE`` in
  ``~/.aws/credentials``), ``AWS_REGION``/``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL``
  (or ``AWS_ENDPOINT_URL_S3``) for another S3 server (MinIO, Ceph, R2, a local test server).

:func:`check` reaches a URL before a run compiles anything, and turns a missing bucket,
refused credentials or an unreachable endpoint into one line naming the URL
(:class:`StorageError`).
"""

from __future__ import annotations

import glob as glob_lib
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import tempfile
import uuid
from typing import Any

from etils import epath

from lmjax.config import ConfigError

SCHEMES = {"gs": ("gcsfs", "lmjax[gcs]"), "s3": ("s3fs", "lmjax[s3]")}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
PathLike = str | os.PathLike


class StorageError(ConfigError):
  """A URL that cannot be used: one line naming it and what to do (exit status 2)."""


def scheme(p: PathLike) -> str | None:
  """``"gs"`` or ``"s3"`` for a URL, None for a local path; StorageError for another scheme."""
  text = os.fspath(p)
  m = _URL.match(text)
  if m is None:
    return None
  name = m.group(1).lower()
  if name not in SCHEMES:
    raise StorageError(f"{text}: lmjax reads and writes local paths, gs:// and s3:// URLs, not "
                       f"{name}://; copy the files to one of those")
  module, extra = SCHEMES[name]
  if importlib.util.find_spec(module) is None:
    raise StorageError(f"{text}: {name}:// URLs need {module}: pip install '{extra}'")
  configure()
  return name


def is_url(p: PathLike) -> bool:
  return scheme(p) is not None


def path(p: PathLike) -> epath.Path:
  """``p`` as an ``epath.Path`` (``~`` expanded for local paths)."""
  text = os.fspath(p)
  if scheme(text) is None:
    text = os.path.expanduser(text)
  return epath.Path(text)


def absolute(p: PathLike) -> epath.Path:
  """``p`` made absolute (a URL already is)."""
  q = path(p)
  return q if is_url(q) else epath.Path(os.path.abspath(os.fspath(q)))


def join(base: PathLike, *parts: str) -> str:
  return os.fspath(path(base).joinpath(*parts))


def has_glob(p: PathLike) -> bool:
  return any(c in os.fspath(p) for c in "*?[")


def glob(pattern: PathLike) -> list[str]:
  """The files (not directories) matching ``pattern``, sorted; ``**`` recurses."""
  pattern = os.fspath(pattern)
  name = scheme(pattern)
  if name is None:
    return sorted(p for p in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                  if os.path.isfile(p))
  fs = filesystem(name)
  found = fs.glob(pattern, detail=True)
  return sorted(f"{name}://{k}" for k, info in found.items() if info.get("type") == "file")


def filesystem(name: str):
  """The fsspec file system of scheme ``name`` (the instance epath uses too)."""
  import fsspec
  return fsspec.filesystem(name)


def size_and_version(p: PathLike) -> tuple[int, str]:
  """``p``'s size and a string that changes when the file does (mtime, etag, generation)."""
  q = path(p)
  if not is_url(q):
    st = os.stat(os.fspath(q))
    return st.st_size, str(st.st_mtime_ns)
  return _size_and_version(filesystem(scheme(q)).info(os.fspath(q)))


def _size_and_version(info: dict) -> tuple[int, str]:
  version = (info.get("generation") or info.get("ETag") or info.get("etag") or info.get("mtime")
             or info.get("LastModified") or info.get("updated") or "")
  return int(info.get("size") or 0), str(version)


def sizes_and_versions(paths: list[str]) -> list[tuple[int, str]]:
  """:func:`size_and_version` of each of ``paths``; files in a bucket cost one listing per
  directory, not one request per file."""
  listed: dict[str, dict[str, dict]] = {}
  out = []
  for p in paths:
    if not is_url(p):
      out.append(size_and_version(p))
      continue
    parent = os.fspath(path(p).parent)
    if parent not in listed:
      fs = filesystem(scheme(p))
      listed[parent] = {f"{scheme(p)}://{info['name'].split('://')[-1]}": info
                        for info in fs.ls(parent, detail=True)}
    info = listed[parent].get(os.fspath(path(p)))
    out.append(_size_and_version(info) if info is not None else size_and_version(p))
  return out


def write_bytes(p: PathLike, data: bytes) -> None:
  """Writes ``p`` whole: readers see the old file or the new one, never a part. Locally
  through a temporary file and a rename; an object store's upload is whole already."""
  q = path(p)
  if is_url(q):
    q.write_bytes(data)
    return
  q.parent.mkdir(parents=True, exist_ok=True)
  tmp = q.with_name(f".{q.name}.{uuid.uuid4().hex[:8]}.tmp")
  try:
    tmp.write_bytes(data)
    os.replace(os.fspath(tmp), os.fspath(q))
  finally:
    if tmp.exists():
      tmp.unlink()


def write_text(p: PathLike, text: str) -> None:
  write_bytes(p, text.encode("utf-8"))


def makedirs(p: PathLike) -> None:
  """Creates local directory ``p`` with its parents. An object store has no directories
  (a prefix exists once an object is under it): nothing to do, and nothing is created, so a
  missing bucket is never made silently."""
  if not is_url(p):
    os.makedirs(os.fspath(path(p)), exist_ok=True)


def move(src: PathLike, dst: PathLike) -> None:
  """Renames file or directory ``src`` to ``dst`` (an object store copies, then deletes)."""
  a, b = path(src), path(dst)
  if is_url(a):
    fs = filesystem(scheme(a))
    if fs.isfile(os.fspath(a)):
      pairs = [(os.fspath(a), os.fspath(b))]
    else:  # object by object: a "directory" is only the prefix of their names
      pairs = [(join(a, name), join(b, name)) for name in files(a)]
    for old, new in pairs:
      fs.copy(old, new)
    fs.rm([old for old, _ in pairs])
  else:
    os.rename(os.fspath(a), os.fspath(b))


def files(directory: PathLike) -> dict[str, tuple[int, str | None]]:
  """Every file under ``directory``: relative name -> (size, the store's checksum of its
  contents, or None for a local file). One listing on an object store: GCS reports each
  object's CRC32C, S3 its ETag (an MD5 of the contents, or of the parts of a multipart upload)."""
  root = path(directory)
  if not is_url(root):
    top = os.fspath(root)
    out = {}
    for dirpath, _, names in os.walk(top):
      for name in names:
        full = os.path.join(dirpath, name)
        out[os.path.relpath(full, top)] = (os.path.getsize(full), None)
    return out
  name = scheme(root)
  prefix = os.fspath(root).split("://", 1)[1].rstrip("/") + "/"
  found = filesystem(name).find(os.fspath(root), detail=True)
  out = {}
  for key, info in found.items():
    if info.get("type") == "file" and key.startswith(prefix):
      digest = info.get("crc32c") or info.get("ETag") or info.get("etag") or info.get("md5Hash")
      out[key[len(prefix):]] = (int(info.get("size") or 0), str(digest).strip('"') if digest else "")
  return out


class WholeFileWriter:
  """A file written by appending, for object stores, which cannot append: the bytes are
  kept here and the whole file is uploaded on :meth:`flush` (at most every ``every``
  seconds unless forced) and on :meth:`close`. Locally it is a plain file opened to append."""

  def __init__(self, p: PathLike, initial: bytes = b"", every: float = 30.0):
    import io
    import time
    self._time = time.monotonic
    self.path = path(p)
    self.remote = is_url(self.path)
    self.every = every
    if self.remote:
      self._buffer = io.BytesIO(initial)
      self._buffer.seek(0, io.SEEK_END)
      self._flushed = None  # never uploaded: the first flush always uploads
    else:
      makedirs(self.path.parent)
      self._file = open(os.fspath(self.path), "ab")
      if initial:
        self._file.write(initial)
    self.closed = False

  def write(self, data: bytes) -> None:
    (self._buffer if self.remote else self._file).write(data)

  def flush(self, force: bool = False) -> None:
    if not self.remote:
      self._file.flush()
      return
    now = self._time()
    if force or self._flushed is None or now - self._flushed >= self.every:
      self.path.write_bytes(self._buffer.getvalue())
      self._flushed = now

  def close(self) -> None:
    if self.closed:
      return
    self.closed = True
    if self.remote:
      self.flush(force=True)
    else:
      self._file.close()


def cache_root() -> str:
  """lmjax's local cache (``$LMJAX_CACHE``, else ``~/.cache/lmjax``)."""
  return os.path.expanduser(os.environ.get("LMJAX_CACHE") or os.path.join("~", ".cache", "lmjax"))


def local_file(p: PathLike) -> str:
  """A local file holding ``p``'s bytes, for libraries that read only local files
  (ArrayRecord, safetensors): ``p`` itself, or a copy of the remote file in the cache
  (``<cache>/remote/``), fetched again when the remote file changes."""
  q = path(p)
  if not is_url(q):
    return os.fspath(q)
  size, version = size_and_version(q)
  key = hashlib.sha256(f"{os.fspath(q)}\0{size}\0{version}".encode()).hexdigest()[:20]
  target = os.path.join(cache_root(), "remote", key, q.name)
  if os.path.isfile(target) and os.path.getsize(target) == size:
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".fetch-")
  try:
    with os.fdopen(fd, "wb") as out, q.open("rb") as src:
      while chunk := src.read(1 << 24):
        out.write(chunk)
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return target


_SETTINGS = ("STORAGE_EMULATOR_HOST", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
_configured_for: tuple | None = None


def configure() -> None:
  """Hands the standard endpoint settings to every library lmjax uses (idempotent; run on
  import and whenever a URL is used, so settings made after the import count too): the GCS
  emulator to TensorStore, ``s3://`` to Orbax; quiets what an emulator cannot answer."""
  global _configured_for
  if tuple(os.environ.get(k) for k in _SETTINGS) == _configured_for:
    return  # nothing changed since the last call
  emulator = os.environ.get("STORAGE_EMULATOR_HOST")
  if emulator:
    if not emulator.startswith(("http://", "https://")):
      emulator = "http://" + emulator
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", emulator)
    # An emulator has no storage-control API: gcsfs's bucket-layout probe would warn each call.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  if os.environ.get("AWS_ENDPOINT_URL_S3") and not os.environ.get("AWS_ENDPOINT_URL"):
    os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL_S3"]
  import fsspec
  # Bounded waits, a few retries: a dead endpoint is an error in seconds, not a hang.
  fsspec.config.conf.setdefault("s3", {}).setdefault(
      "config_kwargs", {"connect_timeout": 10, "read_timeout": 120,
                        "retries": {"max_attempts": 5, "mode": "standard"}})
  # No cached listings: an object store changes under other processes, through TensorStore
  # (checkpoints) and through other fsspec instances (epath keeps its own), so a cached
  # listing could hide a step just written or show a file just deleted.
  for name in ("s3", "gs", "gcs"):
    fsspec.config.conf.setdefault(name, {}).setdefault("use_listings_cache", False)
  # gcsfs logs each failed request with a traceback before raising it; lmjax reports the
  # error itself, in one line.
  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
  from lmjax import orbax_s3
  orbax_s3.install()
  _configured_for = tuple(os.environ.get(k) for k in _SETTINGS)


configure()


def _bucket(url: str) -> str:
  return url.split("://", 1)[1].split("/", 1)[0]


def _reach(name: str) -> None:
  """Opens a TCP connection to the store's endpoint (5 s at most): an unreachable endpoint
  fails here at once instead of after the libraries' retries."""
  import socket
  from urllib.parse import urlparse
  if name == "s3":
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    url = os.environ.get("AWS_ENDPOINT_URL") or f"https://s3.{region}.amazonaws.com"
  else:
    url = os.environ.get("STORAGE_EMULATOR_HOST") or "https://storage.googleapis.com"
  parsed = urlparse(url if "://" in url else "http://" + url)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  with socket.create_connection((parsed.hostname, port), timeout=5):
    pass


def _load_google_credentials(url: str) -> None:
  """Reads the credentials file ``GOOGLE_APPLICATION_CREDENTIALS`` names, as Google's
  libraries will: a missing or malformed file is named now, not after a network timeout."""
  import google.auth
  where = os.environ["GOOGLE_APPLICATION_CREDENTIALS"]
  try:
    google.auth.load_credentials_from_file(where)
  except Exception as e:  # noqa: BLE001 - google.auth raises several kinds
    first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
    raise StorageError(f"{url}: the credentials file GOOGLE_APPLICATION_CREDENTIALS={where} "
                       f"cannot be used ({first}); point it at a service-account or "
                       "authorized-user JSON key, or unset it") from None


def _endpoint(name: str) -> str:
  if name == "s3":
    return os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
  return os.environ.get("STORAGE_EMULATOR_HOST") or "Google Cloud Storage"


def explain(url: PathLike, err: BaseException) -> StorageError:
  """A one-line StorageError for ``err`` raised using ``url``: what failed and what to do."""
  url = os.fspath(url)
  name = scheme(url) or "file"
  text = f"{type(err).__name__}: {err}"
  low = text.lower()
  bucket = _bucket(url) if name != "file" else ""
  creds = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)" if name == "s3" else
           "set GOOGLE_APPLICATION_CREDENTIALS or run gcloud auth application-default login")
  if isinstance(err, (FileNotFoundError,)) and ("bucket" in low or "nosuchbucket" in low) or \
      "nosuchbucket" in low or "bucket does not exist" in low or "no such bucket" in low:
    why = f"bucket {bucket} does not exist at {_endpoint(name)}; create it or fix the URL"
  elif any(s in low for s in ("nocredentials", "unable to locate credentials",
                              "invalidaccesskeyid", "signaturedoesnotmatch", "401",
                              "access key id", "not exist in our records",
                              "credentials", "unauthorized", "invalid_grant")):
    why = f"{_endpoint(name)} refused the credentials; {creds}"
  elif any(s in low for s in ("403", "accessdenied", "access denied", "forbidden", "permission")):
    why = f"no permission on bucket {bucket}; use credentials that may read and write it"
  elif any(s in low for s in ("connect", "timeout", "timed out", "name or service", "resolve",
                              "unreachable", "refused", "endpoint")):
    setting = "AWS_ENDPOINT_URL" if name == "s3" else "STORAGE_EMULATOR_HOST"
    why = (f"cannot reach {_endpoint(name)} ({type(err).__name__}); check the network and "
           f"{setting}")
  else:
    why = f"{text.splitlines()[0][:200]}"
  return StorageError(f"{url}: {why}")


def check(url: PathLike, *, write: bool = False) -> None:
  """Reaches ``url`` (a local path passes) and, with ``write``, proves it writable with a
  small object written and deleted; raises StorageError (one line) when it cannot. Uses
  short timeouts: a dead endpoint answers in seconds."""
  url = os.fspath(url)
  name = scheme(url)
  if name is None:
    return
  import fsspec
  opts: dict[str, Any] = {"skip_instance_cache": True}
  if name == "s3":
    opts["config_kwargs"] = {"connect_timeout": 5, "read_timeout": 20,
                             "retries": {"max_attempts": 2, "mode": "standard"}}
  else:
    opts.update(timeout=20)
  try:
    bucket = _bucket(url)
    if not bucket:
      raise StorageError(f"{url}: names no bucket; write {name}://BUCKET/PATH")
    if name == "gs" and os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
      _load_google_credentials(url)  # before gcsfs, which would try other sources first
    _reach(name)
    fs = fsspec.filesystem(name, **opts)
    try:
      fs.ls(bucket, detail=False)  # a missing bucket or refused credentials fail here
    except FileNotFoundError:
      raise StorageError(f"{url}: bucket {bucket} does not exist at {_endpoint(name)}; create "
                         "it or fix the URL") from None
    if write:
      probe = f"{url.rstrip('/')}/.lmjax-write-check-{uuid.uuid4().hex[:12]}"
      fs.pipe_file(probe, b"lmjax")
      fs.rm_file(probe)
  except StorageError:
    raise
  except Exception as e:  # noqa: BLE001 - any failure of the store becomes one line
    raise explain(url, e) from None


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies the file ``src`` to ``dst`` (local paths or URLs, either way), streamed; as with
  :func:`write_bytes`, readers of ``dst`` see the old file or the whole new one."""
  s, d = path(src), path(dst)
  if is_url(d):
    with s.open("rb") as f, d.open("wb") as out:
      shutil.copyfileobj(f, out, 1 << 24)
    return
  d.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.fspath(d.parent), prefix=f".{d.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as out, s.open("rb") as f:
      shutil.copyfileobj(f, out, 1 << 24)
    os.replace(tmp, os.fspath(d))
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
