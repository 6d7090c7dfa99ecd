"""The workdir lock as an object in a bucket (``gs://``, ``s3://``), for :mod:`lmjax.workdir_lock`.

An object store has no hard links, renames or mtimes to touch; it has conditional writes,
which every step of the lock goes through, so that of two writers at most one succeeds:

* create: only if absent (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``);
* take-over: a rewrite only if the object is still the version judged stale (S3
  ``If-Match: <ETag>``, GCS ``ifGenerationMatch=<generation>``);
* refresh: the holder reads the lock and, if it still holds its run's token, rewrites it
  with a new ``refreshed`` time under the same condition on the version it read, so a
  take-over in between is never overwritten. Every write has another ETag (an S3 ETag is
  the content's MD5): a take-over judged on a version refreshed since fails;
* release: likewise a read, then a delete conditioned on the version read (S3 ``If-Match``
  on DeleteObject, GCS ``ifGenerationMatch``). On a store that enforced the writes'
  conditions but not the delete's, the read alone would guard it: a take-over would be
  deleted only if it fell between the read and the delete.

How long a lock has gone unrefreshed is judged from the object's last-modified time, the
store's clock, the same for every host: a host whose clock is wrong cannot take over a live
run's lock, nor keep a dead run's lock held for ever (the ``refreshed`` field, the holder's
clock, is for people reading the lock).

S3 goes through s3fs (the client lmjax's ``s3://`` paths use), GCS through
google-cloud-storage (installed with gcsfs; gcsfs uploads only with ``ifGenerationMatch=0``).
Both honour the endpoint and credential settings of :mod:`lmjax.storage`.

AWS S3 and Google Cloud Storage enforce these conditions. A store that ignores them (an
emulator such as gcp-storage-emulator, an older S3-compatible server) is found at once:
after a start's write, :meth:`LockObject.confirm` repeats a create-if-absent and a write
conditioned on a version that does not exist, which must both be refused. Where they are
not, the lock falls back to a weaker guarantee, with a warning, rather than refusing the
store (which would make runs there impossible): a start reads before it writes, then waits
:data:`SETTLE` seconds and reads the lock back, and holds it only if it still holds its own
text. It still refuses a second run started while the first holds the lock and still takes
over a dead run's; two starts can both hold it only if one's write reaches the store more
than :data:`SETTLE` seconds after its own check, and a refresh or release racing a take-over
can undo it.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from lmjax import storage

SETTLE = 2.0  # seconds a start waits before reading its lock back on a store without conditions
_NO_SUCH_VERSION = {"s3": '"00000000000000000000000000000000"', "gs": 1}


class LockObject:
  """``url``'s object, read and written only under conditions on its version (an S3 ETag,
  a GCS generation)."""

  def __init__(self, url: str):
    self.url = self.name = url
    self.scheme = storage.scheme(url)
    self.bucket, self.key = url.split("://", 1)[1].split("/", 1)
    if self.scheme == "s3":
      self._fs = storage.filesystem("s3")
    else:
      from google.cloud import storage as gcs
      try:
        self._blobs = gcs.Client(project=None).bucket(self.bucket)
      except Exception as e:  # noqa: BLE001 - no credentials, mostly: one line
        raise storage.explain(url, e) from None

  # -- the store's operations: None/False where a condition failed, StorageError otherwise

  def _guard(self, op, *args):
    try:
      return op(*args)
    except _Refused:
      return None
    except Exception as e:  # noqa: BLE001 - any other failure of the store is one line
      raise storage.explain(self.url, e) from None

  def _s3(self, method: str, **kwargs) -> dict:
    import fsspec.asyn

    async def call():
      response = await self._fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
      if method == "get_object":
        try:
          response["Data"] = await response["Body"].read()
        finally:
          response["Body"].close()
      return response

    try:
      return fsspec.asyn.sync(self._fs.loop, call)
    except OSError as e:  # s3fs's translation of the error; botocore's is its cause
      code = getattr(e.__cause__, "response", {}).get("Error", {}).get("Code")
      if code != "NoSuchBucket" and (isinstance(e, (FileExistsError, FileNotFoundError)) or code
                                     in ("PreconditionFailed", "ConditionalRequestConflict")):
        raise _Refused() from None
      raise

  def _s3_get(self) -> tuple[bytes, str, float]:
    response = self._s3("get_object")
    return response["Data"], response["ETag"], response["LastModified"].timestamp()

  def _gs(self, call):
    from google.api_core import exceptions
    try:
      return call()
    except (exceptions.PreconditionFailed, exceptions.Conflict):
      raise _Refused() from None
    except exceptions.NotFound:
      if not self._blobs.exists(timeout=30):
        raise FileNotFoundError(f"bucket {self.bucket} does not exist") from None
      raise _Refused() from None

  def _gs_put(self, data: bytes, generation: int) -> int:
    blob = self._blobs.blob(self.key)
    self._gs(lambda: blob.upload_from_string(data, content_type="application/json",
                                             if_generation_match=generation, timeout=30))
    return blob.generation

  def _gs_get(self) -> tuple[bytes, int, float]:
    blob = self._gs(lambda: self._blobs.get_blob(self.key, timeout=30))
    if blob is None:
      raise _Refused()
    # (read before the download, which resets them from headers an emulator may not send)
    generation, mtime = blob.generation, blob.updated.timestamp()
    # That generation's bytes, or a refusal if it was replaced in between.
    data = self._gs(lambda: blob.download_as_bytes(if_generation_match=generation, timeout=30))
    return data, generation, mtime

  def _put(self, data: bytes, version: Any) -> Any:
    """Writes ``data`` if the object is at ``version`` (None: absent); its new version."""
    if self.scheme == "s3":
      condition = {"IfNoneMatch": "*"} if version is None else {"IfMatch": version}
      written = self._s3("put_object", Body=data, ContentType="application/json",
                         **condition)["ETag"]
    else:
      written = self._gs_put(data, 0 if version is None else version)
    self._changed()
    return written

  def _changed(self) -> None:
    """Drops fsspec's cached listings of the workdir, which lmjax's paths read."""
    storage.filesystem(self.scheme).invalidate_cache(self.url)

  def _delete(self, version: Any) -> bool:
    if self.scheme == "s3":
      self._s3("delete_object", IfMatch=version)
    else:
      blob = self._blobs.blob(self.key)
      self._gs(lambda: blob.delete(if_generation_match=version, timeout=30))
    self._changed()
    return True

  # -- what the lock asks

  def read(self) -> tuple[str, Any, float] | None:
    """The lock's text, version and last-modified time (Unix seconds); None if absent."""
    for _ in range(3):  # a GCS object replaced between its metadata and its bytes: again
      got = self._guard(self._s3_get if self.scheme == "s3" else self._gs_get)
      if got is not None or not self._guard(self._exists):
        break
    if got is None:
      return None
    data, version, mtime = got
    return data.decode("utf-8", "replace"), version, mtime

  def _exists(self) -> bool:
    if self.scheme == "s3":
      self._s3("head_object")
      return True
    return self._gs(lambda: self._blobs.blob(self.key).exists(timeout=30))

  def create(self, text: str) -> bool:
    """Writes the lock if there is none. Reads first: on a store that ignores the condition,
    a start then overwrites only a lock written since that read."""
    return not self._guard(self._exists) and self.take_over(None, text)

  def take_over(self, version: Any, text: str) -> bool:
    """Rewrites the lock with ``text`` if it is still at ``version`` (None: absent): the
    version a start judged stale, or the one a refresh read as its run's own."""
    return self._guard(self._put, text.encode(), version) is not None

  touch = take_over

  def delete(self, version: Any) -> bool:
    """Deletes the lock if it is still at ``version``."""
    return self._guard(self._delete, version) is not None

  def confirm(self, text: str, warn: Callable[[str], None]) -> bool:
    """After this process wrote ``text``: whether it holds the lock. True at once where the
    store enforces the conditions; elsewhere (``warn``ed) after :data:`SETTLE` seconds, if
    the lock still holds ``text`` then."""
    data = text.encode()
    ignored = [what for what, version in (("If-None-Match", None),
                                          ("If-Match", _NO_SUCH_VERSION[self.scheme]))
               if self._guard(self._put, data, version) is not None]
    if not ignored:
      return True
    what = ("ifGenerationMatch" if self.scheme == "gs" else " and ".join(ignored))
    warn(f"{self.url}: this store ignores conditional writes ({what}), so the run lock is "
         f"best effort: two runs started within {SETTLE:.0f} s of each other may both run")
    time.sleep(SETTLE)
    got = self.read()
    return got is not None and got[0] == text


class _Refused(Exception):
  """A condition of the request did not hold (or the object is absent)."""
