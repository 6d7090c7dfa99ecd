"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):  # pytest-xdist workers inherit it
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import tempfile  # noqa: E402

# Tokenizers generated for the default corpus are cached here for the whole session
# (subprocesses inherit it), never in the user's home.
os.environ.setdefault("LMJAX_CACHE", tempfile.mkdtemp(prefix="lmjax-test-cache-"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def stores(tmp_path_factory):
  """A real S3 server and GCS emulator on loopback (tests/object_stores.py), their settings
  exported to this process for the session (subprocesses get ``stores.env``)."""
  from tests.object_stores import Stores
  servers = Stores(str(tmp_path_factory.mktemp("stores")))
  saved = {k: os.environ.get(k) for k in servers.env}
  os.environ.update(servers.env)
  try:
    yield servers
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    servers.close()


@pytest.fixture(scope="session")
def prepared_default(tmp_path_factory) -> str:
  """The default corpus prepared at seq_len 64 with the cached 1024-piece tokenizer."""
  from lmjax import data as data_lib
  from lmjax.config import default_config
  out = tmp_path_factory.mktemp("prepared") / "default"
  tok = data_lib.get_tokenizer(default_config().data, 1024)
  data_lib.prepare(["default"], str(out), tok, seq_len=64, eval_fraction=0.05)
  return str(out)
