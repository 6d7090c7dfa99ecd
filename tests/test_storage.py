"""The storage layer (lmjax/storage.py) and S3 checkpoints through Orbax (lmjax/orbax_s3.py),
against a real S3 server and GCS emulator on loopback (tests/object_stores.py)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from orbax.checkpoint._src.path import atomicity, atomicity_defaults
from orbax.checkpoint._src.serialization import tensorstore_utils

from lmjax import orbax_s3, storage
from lmjax.checkpoint import MANIFEST, Checkpointer, CheckpointError
from lmjax.config import default_config

SCHEMES = ["s3", "gs"]


def test_an_s3_directory_gets_tensorstores_s3_driver_with_the_aws_endpoint(monkeypatch):
  monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1234")
  monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
  monkeypatch.delenv("AWS_REGION", raising=False)
  spec = tensorstore_utils.build_kvstore_tspec("s3://bkt/run/checkpoints/3/state", "w")
  bases = [layer.get("base", layer) for layer in spec["base"].get("layers", [spec["base"]])]
  s3 = [b for b in bases if b.get("driver") == "s3"]
  assert s3 and s3[0]["bucket"] == "bkt" and s3[0]["path"].startswith("run/checkpoints/3/state")
  assert s3[0]["endpoint"] == "http://127.0.0.1:1234" and s3[0]["aws_region"] == "eu-west-1"
  assert spec["path"] == "w"
  assert "gcs" not in str(spec)
  # Other paths are Orbax's own.
  assert tensorstore_utils.build_kvstore_tspec("gs://bkt/x", "w")["base"]["driver"] == "gcs"
  assert tensorstore_utils.build_kvstore_tspec("/tmp/x", "w")["base"]["driver"] == "file"
  for name in ("get_default_temporary_path_class", "get_item_default_temporary_path_class"):
    pick = getattr(atomicity_defaults, name)
    assert pick(storage.path("s3://bkt/x")) is atomicity.CommitFileTemporaryPath
    assert pick(storage.path("gs://bkt/x")) is atomicity.CommitFileTemporaryPath
    assert pick(storage.path("/tmp/x")) is atomicity.AtomicRenameTemporaryPath
  orbax_s3.install()  # twice is once


def test_paths_urls_and_refusals(tmp_path, monkeypatch):
  monkeypatch.setenv("HOME", str(tmp_path))
  assert os.fspath(storage.path("~/a")) == str(tmp_path / "a")
  assert os.fspath(storage.path("s3://b/a/c.txt").parent) == "s3://b/a"
  assert storage.join("gs://b/run", "checkpoints", "3") == "gs://b/run/checkpoints/3"
  assert storage.is_url("gs://b/x") and not storage.is_url("runs/x")
  for bad in ("hdfs://x/y", "http://host/x", "gcs://b/x"):
    with pytest.raises(storage.StorageError, match="not .*://"):
      storage.path(bad)
  storage.makedirs("s3://b/never/made")  # an object store has no directories: nothing to do
  storage.check(str(tmp_path))  # a local path passes


@pytest.mark.parametrize("scheme", SCHEMES)
def test_files_globs_moves_and_whole_writes(stores, scheme, tmp_path, monkeypatch):
  root = stores.bucket(scheme) + "/d"
  storage.write_text(f"{root}/a.txt", "one")
  storage.write_bytes(f"{root}/sub/b.jsonl", b'{"text": "two"}\n')
  storage.write_text(f"{root}/sub/deeper/c.txt", "three")
  assert storage.glob(f"{root}/*.txt") == [f"{root}/a.txt"]
  assert storage.glob(f"{root}/**/*.txt") == [f"{root}/a.txt", f"{root}/sub/deeper/c.txt"]
  files = storage.files(root)
  assert sorted(files) == ["a.txt", "sub/b.jsonl", "sub/deeper/c.txt"]
  assert files["a.txt"][0] == 3 and files["a.txt"][1]  # the store's checksum, no read-back
  storage.write_text(f"{root}/a.txt", "uno")
  assert storage.files(root)["a.txt"][1] != files["a.txt"][1]
  names = [f"{root}/a.txt", f"{root}/sub/b.jsonl", f"{root}/sub/deeper/c.txt"]
  assert storage.sizes_and_versions(names) == [storage.size_and_version(n) for n in names]
  assert storage.sizes_and_versions(names)[0][0] == 3
  storage.move(f"{root}/sub", f"{root}/moved")
  assert sorted(storage.files(root)) == ["a.txt", "moved/b.jsonl", "moved/deeper/c.txt"]
  # A local copy for libraries that read local files, fetched again when the file changes.
  monkeypatch.setenv("LMJAX_CACHE", str(tmp_path / "cache"))
  first = storage.local_file(f"{root}/a.txt")
  assert first.startswith(str(tmp_path / "cache")) and open(first).read() == "uno"
  assert storage.local_file(f"{root}/a.txt") == first
  storage.write_text(f"{root}/a.txt", "eins")
  assert open(storage.local_file(f"{root}/a.txt")).read() == "eins"


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_whole_file_writer_uploads_at_most_every_interval_and_on_close(stores, scheme):
  url = stores.bucket(scheme) + "/metrics.jsonl"
  w = storage.WholeFileWriter(url, b"old\n", every=3600)
  w.write(b"a\n")
  w.flush()  # the first flush uploads
  assert storage.path(url).read_bytes() == b"old\na\n"
  w.write(b"b\n")
  w.flush()  # within the interval: kept in memory
  assert storage.path(url).read_bytes() == b"old\na\n"
  w.flush(force=True)
  assert storage.path(url).read_bytes() == b"old\na\nb\n"
  w.write(b"c\n")
  w.close()
  assert storage.path(url).read_bytes() == b"old\na\nb\nc\n"


class _Iterator:
  """A data iterator whose position is a JSON state (what Checkpointer saves beside arrays)."""
  topology_independent = True

  def __init__(self):
    self.position = 0

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_checkpoints_in_a_bucket_save_restore_and_a_replaced_object_is_caught(stores, scheme):
  cfg = default_config()
  cfg.train.keep_checkpoints = 3
  cfg.train.async_checkpointing = False
  directory = stores.bucket(scheme) + "/run/checkpoints"
  state = {"params": {"w": jnp.arange(12.0).reshape(3, 4)}, "step": jnp.int32(0)}
  ckpt = Checkpointer(directory, cfg)
  for step in (1, 2):
    it = _Iterator()
    it.position = step * 10
    ckpt.save(step, {"params": {"w": state["params"]["w"] * step}, "step": jnp.int32(step)},
              it, cfg)
  ckpt.close()
  files = storage.files(directory)
  assert {"1/commit_success.txt", "2/commit_success.txt", f"1/{MANIFEST}", f"2/{MANIFEST}"} <= set(files)
  reader = Checkpointer(directory, read_only=True)
  assert reader.all_steps() == [1, 2] and reader.verify(2)
  it = _Iterator()
  restored = reader.restore(2, jax_abstract(state), it)
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(12.0).reshape(3, 4) * 2)
  assert it.position == 20
  # An object of step 2 replaced behind lmjax's back (same size, other bytes) is caught.
  victim = sorted(n for n in files if n.startswith("2/state/") and "/d/" in n)[0]
  data = storage.path(f"{directory}/{victim}").read_bytes()
  storage.write_bytes(f"{directory}/{victim}", bytes(b ^ 0xFF for b in data))
  with pytest.raises(CheckpointError, match="differ from the manifest"):
    reader.verify(2)
  reader.manager.close()
  # A training run falls back to step 1 and moves step 2 aside, in the bucket.
  writer, warnings = Checkpointer(directory, cfg), []
  step, restored, it = writer.restore_latest(cfg, jax_abstract(state), _Iterator, warnings.append)
  writer.close()
  assert step == 1 and it.position == 10 and "moved it aside" in warnings[0]
  names = {n.split("/", 1)[0] for n in storage.files(directory)}
  assert "2" not in names and any(n.startswith("2.unusable-") for n in names), names


def jax_abstract(tree):
  import jax
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=x.sharding), tree)
