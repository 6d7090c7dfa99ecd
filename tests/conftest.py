"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""

import os

# 8 fake CPU devices; LLVM at -O0 without its expensive passes: XLA's HLO optimisations (what
# layouts, fusions and buffers the tests read) are unchanged, the machine code is built ~1.5x
# faster and runs slower, which tiny test shapes never notice. Results differ from -O2 code in
# float32 rounding only; every comparison is between runs compiled alike or allows for it.
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true")
for _flag in _FLAGS:  # pytest-xdist workers and subprocesses inherit them
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import tempfile  # noqa: E402

# One persistent compilation cache for the session, shared by the xdist workers and every
# subprocess they start: the CLI runs of the resilience, storage and README tests compile
# the same tiny train step again and again. The size limit turns on JAX's file lock, so
# concurrent writers never leave a half-written entry for a reader.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmjax-test-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

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


# The longest files first (xdist runs with --no-loadscope-reorder, one file per worker at a
# time), so that no long file starts last while the other worker idles.
_LONGEST = ("test_readme", "test_storage_runs", "test_resilience", "test_sharding",
            "test_storage_faults", "test_multiprocess", "test_moe", "test_plan", "test_hf",
            "test_pipeline", "test_lock", "test_data_model", "test_train", "test_loss")


def pytest_collection_modifyitems(items):
  rank = lambda item: (_LONGEST.index(item.path.stem) if item.path.stem in _LONGEST
                       else len(_LONGEST))
  items.sort(key=rank)  # stable: the order within a file and among the rest is kept
