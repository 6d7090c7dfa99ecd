"""S3 checkpoints through Orbax and TensorStore, with bounded retries on every object store.

Orbax 0.12 writes ``gs://`` checkpoints natively but not ``s3://`` ones, though TensorStore
has an ``s3`` kvstore driver. Three places in Orbax decide, from the path alone, how a
checkpoint is written; :func:`install` extends each to ``s3://`` and changes nothing for
other paths:

* the TensorStore kvstore spec (``tensorstore_utils.build_kvstore_tspec``): Orbax
  normalises the directory with ``os.path.normpath``, which turns ``s3://b/x`` into
  ``s3:/b/x``, then refuses it as a relative path. An ``s3://`` directory is built as Orbax
  builds a ``gs://`` one, and every ``gcs`` driver in the result becomes TensorStore's ``s3``
  driver with the bucket, the path, and the endpoint and region that AWS's own tools read
  (``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``; ``AWS_REGION`` or ``AWS_DEFAULT_REGION``),
  since TensorStore takes the endpoint only from the spec. Credentials: the keys in
  ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` when set, else TensorStore's default chain
  (``AWS_PROFILE`` in ``~/.aws/credentials``, the instance's role).
* how a save is committed (``atomicity_defaults``): S3 has no directory rename (a "rename"
  copies every object), so an ``s3://`` checkpoint commits as a ``gs://`` one does: written
  in place, then marked whole by a ``commit_success.txt`` written last. A step directory
  without it is an unfinished save: never listed, and removed on the next start.

TensorStore writes the arrays of ``s3://`` and ``gs://`` checkpoints itself and retries a
request the store turns away for now (S3's 503 ``SlowDown``, another 5xx) on its own. Its
default (32 retries, waiting 1 s, 2 s, 4 s ... up to 32 s between them) keeps a save going for
about 15 minutes per request while the store keeps failing; every ``s3`` and ``gcs`` kvstore
Orbax builds here carries :data:`RETRIES` instead: 8 retries, waiting 1 s doubling to at most
32 s, about 2 minutes (at most 132 s of waiting) before the save fails and the run stops with
one line naming the step. ``LMJAX_TENSORSTORE_RETRIES`` replaces it with TensorStore's own JSON
(``{"max_retries": 3, "initial_delay": "0.5s", "max_delay": "2s"}``). The other files of a
checkpoint go through fsspec, whose retries :func:`lmjax.storage.configure` bounds.
"""

from __future__ import annotations

import json
import os
from typing import Any

from orbax.checkpoint._src.path import atomicity, atomicity_defaults
from orbax.checkpoint._src.serialization import tensorstore_utils

from lmjax.config import ConfigError

S3 = "s3://"
# TensorStore's s3_request_retries / gcs_request_retries: 1+2+4+8+16+32+32+32 s of waiting,
# plus up to 1 s of jitter on each of the first five.
RETRIES = {"max_retries": 8, "initial_delay": "1s", "max_delay": "32s"}
RETRIES_VARIABLE = "LMJAX_TENSORSTORE_RETRIES"
_RETRY_RESOURCE = {"s3": "s3_request_retries", "gcs": "gcs_request_retries",
                   "gcs_grpc": "gcs_request_retries"}
_installed = False


def _s3_url(directory: Any) -> str | None:
  """``directory`` as an ``s3://`` URL, or None if it is not one (also after normpath)."""
  text = os.fspath(directory) if not isinstance(directory, str) else directory
  if text.startswith(S3):
    return text
  if text.startswith("s3:/"):
    return S3 + text[len("s3:/"):]
  return None


def endpoint() -> str | None:
  """The S3 endpoint AWS's own tools would use (None: AWS itself)."""
  return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def region() -> str:
  return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def retries() -> dict[str, Any]:
  """The retry settings of TensorStore's object-store requests: :data:`RETRIES`, or the JSON
  object in ``$LMJAX_TENSORSTORE_RETRIES``."""
  text = os.environ.get(RETRIES_VARIABLE, "").strip()
  if not text:
    return dict(RETRIES)
  try:
    value = json.loads(text)
  except ValueError:
    value = None
  if not isinstance(value, dict) or not set(value) <= set(RETRIES):
    raise ConfigError(f"{RETRIES_VARIABLE}={text!r}: not TensorStore's retry settings; give a "
                      'JSON object such as {"max_retries": 8, "initial_delay": "1s", '
                      '"max_delay": "32s"}, or unset it')
  return value


def _each_kvstore(spec: Any, change: Any) -> Any:
  """``spec`` with ``change(d)`` applied to every dict in it, innermost first."""
  if isinstance(spec, list):
    return [_each_kvstore(s, change) for s in spec]
  if not isinstance(spec, dict):
    return spec
  return change({k: _each_kvstore(v, change) for k, v in spec.items()})


def _with_retries(spec: Any) -> Any:
  """``spec`` with :func:`retries` set on every ``s3``/``gcs`` kvstore in it."""
  def change(d: dict) -> dict:
    resource = _RETRY_RESOURCE.get(d.get("driver"))
    return {**d, resource: retries()} if resource and resource not in d else d
  return _each_kvstore(spec, change)


def _to_s3(spec: Any) -> Any:
  """``spec`` with every TensorStore ``gcs`` kvstore turned into the same ``s3`` one."""
  def change(d: dict) -> dict:
    if d.get("driver") not in ("gcs", "gcs_grpc"):
      return d
    out = {"driver": "s3", "bucket": d["bucket"], "path": d.get("path", ""),
           "aws_region": region()}
    if endpoint():
      out["endpoint"] = endpoint()
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
      # The keys in the environment win, as with AWS's tools; naming that source spares
      # TensorStore's default chain, which logs an error for each missing ~/.aws file.
      out["aws_credentials"] = {"type": "environment"}
    return out
  return _each_kvstore(spec, change)


def install() -> None:
  """Teaches the Orbax in this process ``s3://`` checkpoints and bounded retries (idempotent)."""
  global _installed
  if _installed:
    return
  _installed = True
  build = tensorstore_utils.build_kvstore_tspec

  def build_kvstore_tspec(directory: str, *args: Any, **kwargs: Any) -> Any:
    url = _s3_url(directory)
    if url is None:
      return _with_retries(build(directory, *args, **kwargs))
    return _with_retries(_to_s3(build("gs://" + url[len(S3):], *args, **kwargs)))

  build_kvstore_tspec.__doc__ = build.__doc__
  tensorstore_utils.build_kvstore_tspec = build_kvstore_tspec

  for name in ("get_default_temporary_path_class", "get_item_default_temporary_path_class"):
    default = getattr(atomicity_defaults, name)

    def temporary_path_class(path: Any, *, atomicity_options: Any = None, _default=default):
      if _s3_url(path) is not None and atomicity_options is None:
        return atomicity.CommitFileTemporaryPath
      return _default(path, atomicity_options=atomicity_options)

    setattr(atomicity_defaults, name, temporary_path_class)
