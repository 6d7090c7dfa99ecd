"""The data pipeline meets the model and the trainer: packed rows give each document the loss
it has alone, and training from prepared data resumes exactly on another mesh."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lmjax.config import default_config
from lmjax.data import default_documents, make_iterator, prepare
from lmjax.model import Transformer
from lmjax.state import token_losses
from lmjax.trainer import train
from tests.test_data import TINY_DOCS, data_cfg, tok, write_corpus  # noqa: F401 - fixture


def _tiny_model_cfg(cfg):
  m = cfg.model
  m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2, 32, 4, 2, 8, 64
  m.max_seq_len = 64
  m.init_std = 0.2  # large enough that attention to the wrong tokens would change the loss
  return cfg


@pytest.mark.slow
def test_packed_batch_gives_each_document_its_loss_alone(tmp_path, tok):
  docs = TINY_DOCS + [" ".join(default_documents()[3].split()[:60])]  # one spans rows
  cfg = _tiny_model_cfg(data_cfg(write_corpus(tmp_path, docs, "jsonl"), seq_len=48,
                                 global_batch_size=4, eval_fraction=0.0))
  it = make_iterator(cfg, tok, split="train")
  batch = next(it)
  it.close()
  model = Transformer(cfg.model, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  @jax.jit
  def per_token(inputs, positions, segment_ids, targets):
    logits = nnx.merge(graphdef, params)(inputs, positions, segment_ids)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)

  packed = np.asarray(per_token(*(batch[k] for k in ("inputs", "positions", "segment_ids", "targets"))))
  # Every document piece alone at the start of its own row (positions from 0, nothing else
  # in the row), all in one batch.
  where, alone = [], {k: [] for k in ("inputs", "positions", "segment_ids", "targets")}
  t = batch["inputs"].shape[1]
  for r in range(batch["inputs"].shape[0]):
    seg = batch["segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      mask = seg == s
      n = int(mask.sum())
      where.append((r, mask, n))
      for k, v in (("inputs", batch["inputs"][r][mask]), ("targets", batch["targets"][r][mask]),
                   ("positions", np.arange(n)), ("segment_ids", np.ones(n))):
        alone[k].append(np.pad(v, (0, t - n)).astype(np.int32))
  single = np.asarray(per_token(*(np.stack(alone[k]) for k in ("inputs", "positions", "segment_ids", "targets"))))
  whole = 0
  for i, (r, mask, n) in enumerate(where):
    np.testing.assert_allclose(packed[r][mask], single[i][:n], rtol=1e-5, atol=1e-5)
    whole += int(alone["inputs"][i][0] == tok.bos_id and alone["targets"][i][n - 1] == tok.eos_id)
  pieces = len(where)
  assert pieces >= 8 and whole >= 4  # several rows of several documents, most of them whole
  # The trainer's loss of the packed batch is the sum of the documents' losses.
  loss_sum, count = token_losses(graphdef, params, {k: jnp.asarray(v) for k, v in batch.items()})
  assert int(count) == int((batch["segment_ids"] > 0).sum())
  np.testing.assert_allclose(float(loss_sum), packed[batch["segment_ids"] > 0].sum(), rtol=1e-5)


def _train_cfg(source: str, steps: int):
  c = _tiny_model_cfg(default_config())
  c.data.source, c.data.seq_len, c.data.global_batch_size = source, 32, 8
  c.optim.warmup_steps = 2
  c.train.steps, c.train.log_every, c.train.eval_every = steps, 1, 0
  c.train.checkpoint_every, c.train.progress_bar = 3, False
  return c


@pytest.mark.slow
def test_training_from_prepared_data_resumes_on_another_mesh(tmp_path, tok):
  src = write_corpus(tmp_path / "src", default_documents()[:30] + [""], "jsonl")
  ds = str(tmp_path / "ds")
  prepare([src], ds, tok, seq_len=32)
  full = train(_train_cfg(ds, 6), tmp_path / "full")  # 8 devices, fsdp=8
  first = train(_train_cfg(ds, 3), tmp_path / "split")
  data = tmp_path / "split" / "checkpoints" / "3" / "data"
  assert json.loads((data / "global.json").read_text())["rows"] == 24
  second = train(_train_cfg(ds, 6), tmp_path / "split", devices=jax.devices()[:4])  # fsdp=4
  assert [r["step"] for r in second] == [4, 5, 6]
  losses = lambda h: [r["loss"] for r in h]
  # The same global batches on another mesh: equal up to the order of float reductions.
  np.testing.assert_allclose(losses(first + second), losses(full), rtol=2e-5)
  assert full[-1]["data_skipped"] == 1.0 and full[-1]["data_skipped/empty_document"] == 1.0
