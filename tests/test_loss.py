"""The chunked cross-entropy (lmjax.model.cross_entropy) equals the plain loss from whole
logits, value and gradients, on one device and on a mesh; it holds less memory; the z-loss is
what it says and reaches the update."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.config import default_config
from lmjax.mesh import host_to_global
from lmjax.model.cross_entropy import cross_entropy, plain_cross_entropy
from lmjax.state import build, init_state, loss_terms
from lmjax.trainer import compile_train_step


def _inputs(b=2, t=10, d=16, v=50, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(k[0], (b, t, d))
  w = 0.3 * jax.random.normal(k[1], (v, d))
  targets = jax.random.randint(k[2], (b, t), 0, v)
  weights = (jax.random.uniform(k[3], (b, t)) > 0.3).astype(jnp.float32) * 1.5  # not just 0/1
  return x, w, targets, weights


@pytest.mark.parametrize("chunk", [3, 5, 10, 64])  # 3: padded to 12; 64 > t: one chunk
@pytest.mark.parametrize("z", [0.0, 1e-2])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(chunk, z):
  x, w, targets, weights = _inputs()
  chunked = lambda x, w: cross_entropy(x, w, targets, weights, z, chunk)
  plain = lambda x, w: plain_cross_entropy(jnp.einsum("btd,vd->btv", x, w), targets, weights, z)
  for got, want in zip(jax.jit(chunked)(x, w), plain(x, w)):  # loss sum, nll, lse
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  g_chunked = jax.grad(lambda x, w: chunked(x, w)[0], (0, 1))(x, w)
  g_plain = jax.grad(lambda x, w: plain(x, w)[0], (0, 1))(x, w)
  for got, want in zip(g_chunked, g_plain):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Scaled cotangents scale the gradients (the backward uses its cotangent).
  g3 = jax.grad(lambda x, w: 3.0 * chunked(x, w)[0], (0, 1))(x, w)
  np.testing.assert_allclose(g3[1], 3.0 * g_chunked[1], rtol=1e-6)


def test_nll_and_lse_match_numpy():
  x, w, targets, weights = _inputs(seed=1)
  total, nll, lse = cross_entropy(x, w, targets, weights, 0.1, 4)
  logits = np.einsum("btd,vd->btv", np.asarray(x, np.float64), np.asarray(w, np.float64))
  want_lse = np.log(np.sum(np.exp(logits), axis=-1))
  want_nll = want_lse - np.take_along_axis(logits, np.asarray(targets)[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(lse, want_lse, rtol=1e-5)
  np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(total, np.sum(np.asarray(weights) * (want_nll + 0.1 * want_lse ** 2)),
                             rtol=1e-5)


B, T, V = 4, 32, 512


def _cfg(loss_chunk, mesh=None, dtype="float32", z_loss=0.0, vocab=V):
  c = default_config()
  m = c.model
  m.vocab_size, m.num_layers, m.embed_dim, m.head_dim, m.mlp_dim, m.max_seq_len = vocab, 2, 32, 8, 64, T
  m.num_heads, m.num_kv_heads, m.tie_embeddings = 4, 2, False
  m.loss_chunk, m.compute_dtype = loss_chunk, dtype
  c.data.seq_len, c.data.global_batch_size = T, B
  c.optim.warmup_steps, c.train.z_loss = 0, z_loss
  c.mesh.fsdp = 1
  for k, v in (mesh or {}).items():
    c.mesh[k] = v
  return c


def _batch(vocab=V, seed=0):
  rng = np.random.default_rng(seed)
  seg = np.ones((B, T), np.int32)
  seg[1, 20:] = 2  # two documents in row 1
  seg[2, 28:] = 0  # padding at the end of row 2: no weight
  return {"inputs": rng.integers(0, vocab, (B, T), dtype=np.int32),
          "targets": rng.integers(0, vocab, (B, T), dtype=np.int32),
          "segment_ids": seg, "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


def _loss_and_grads(cfg, devices, params=None):
  setup = build(cfg, devices)
  if params is None:
    params = init_state(setup)["params"]
  params = jax.device_put(params, setup.state_shardings["params"])
  batch = host_to_global(_batch(), setup.mesh, setup.batch_sharding)
  fn = jax.jit(jax.value_and_grad(lambda p, b: loss_terms(setup.graphdef, p, b, cfg.train.z_loss),
                                  has_aux=True))
  with setup.context():
    (total, terms), grads = fn(params, batch)
  return jax.device_get((total, terms, grads)), params


def test_model_loss_chunked_on_a_mesh_equals_plain_on_one_device():
  """The chunked loss (chunk 8 of 32 positions, vocabulary over tensor, rows over data and
  fsdp) against whole logits on one device: loss, per-token log-probabilities, gradients."""
  (total0, terms0, grads0), params = _loss_and_grads(_cfg(0, z_loss=1e-3), jax.devices()[:1])
  mesh = dict(data=2, fsdp=2, tensor=2)
  (total1, terms1, grads1), _ = _loss_and_grads(_cfg(8, mesh, z_loss=1e-3), jax.devices()[:8],
                                                 jax.device_get(params))
  np.testing.assert_allclose(total1, total0, rtol=1e-5)
  for k in ("logprob", "nll", "z", "weight"):
    np.testing.assert_allclose(terms1[k], terms0[k], rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _temp_bytes(cfg):
  setup = build(cfg, jax.devices()[:1])
  state = init_state(setup)
  batch = host_to_global(_batch(cfg.model.vocab_size), setup.mesh, setup.batch_sharding)
  return compile_train_step(setup).lower(state, batch).compile().memory_analysis().temp_size_in_bytes


def test_chunked_loss_never_holds_the_whole_logits():
  """Vocabulary 16384: the (4, 32, v) float32 logits are 8 MiB. The train step with the plain
  loss needs at least that (logits and their gradient); chunks of 8 positions hold a quarter."""
  vocab = 16384
  logits_bytes = B * T * vocab * 4
  plain = _temp_bytes(_cfg(0, vocab=vocab))
  chunked = _temp_bytes(_cfg(8, vocab=vocab))
  assert plain >= logits_bytes, (plain, logits_bytes)
  assert chunked < plain - logits_bytes / 2, (chunked, plain)


def test_z_loss_is_reported_and_reaches_the_update():
  """train.z_loss: the reported z_loss is the weighted mean of logsumexp(logits)^2 (NumPy from
  the model's logits), the reported loss stays the cross-entropy, and the update differs
  from the one without it."""
  batch = _batch()
  out = {}
  for z in (0.0, 0.5):
    setup = build(_cfg(16, z_loss=z), jax.devices()[:1])
    state = init_state(setup)
    logits = np.asarray(setup.model(state["params"])(batch["inputs"], batch["positions"],
                                                    batch["segment_ids"]), np.float64)
    new, metrics = compile_train_step(setup)(state, host_to_global(batch, setup.mesh, setup.batch_sharding))
    out[z] = jax.device_get((new["params"], metrics))
  weights = (batch["segment_ids"] != 0).astype(np.float64)
  lse = np.log(np.sum(np.exp(logits), axis=-1))
  nll = lse - np.take_along_axis(logits, batch["targets"][..., None], axis=-1)[..., 0]
  metrics = out[0.5][1]
  np.testing.assert_allclose(metrics["z_loss"], np.sum(weights * lse ** 2) / weights.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], np.sum(weights * nll) / weights.sum(), rtol=1e-5)
  assert "z_loss" not in out[0.0][1]
  np.testing.assert_allclose(out[0.0][1]["loss"], metrics["loss"], rtol=1e-6)
  changed = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), out[0.0][0], out[0.5][0])
  assert changed["lm_head"]["table"] > 1e-6, changed
