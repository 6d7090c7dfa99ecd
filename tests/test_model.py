"""The model's forward pass against an independent NumPy implementation."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.config import default_config
from lmjax.model import Transformer, count_params, logical_axes
from tests import reference


def _cfg(**overrides):
  m = default_config().model
  m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = 97, 3, 32, 4, 2
  m.head_dim, m.mlp_dim, m.max_seq_len = 8, 48, 16
  m.init_std = 0.2  # large enough that every layer moves the logits
  for k, v in overrides.items():
    m[k] = v
  return m


def _packed_batch(rng, b=2, t=12, vocab=97):
  tokens = rng.integers(0, vocab, (b, t))
  # row 0: documents of 5 and 7 tokens; row 1: one document of 9 tokens then padding.
  segment_ids = np.array([[1] * 5 + [2] * 7, [1] * 9 + [0] * 3])
  positions = np.array([list(range(5)) + list(range(7)), list(range(9)) + list(range(3))])
  return tokens, positions, segment_ids


def _forward(cfg, tokens, positions, segment_ids):
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  params = nnx.split(model)[1].to_pure_dict()
  logits = jax.jit(lambda p, *a: nnx.merge(nnx.split(model)[0], p)(*a))(
      params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids))
  return np.asarray(logits), jax.device_get(params)


def test_forward_matches_numpy_reference():
  cfg = _cfg(tie_embeddings=False)
  tokens, positions, segment_ids = _packed_batch(np.random.default_rng(0))
  logits, params = _forward(cfg, tokens, positions, segment_ids)
  want = reference.forward(params, cfg, tokens, positions, segment_ids)
  real = segment_ids != 0
  assert logits.shape == (2, 12, 97) and logits.dtype == np.float32
  np.testing.assert_allclose(logits[real], want[real], rtol=2e-5, atol=2e-5)
  assert np.std(want[real]) > 0.1  # the comparison is not between near-zero numbers


def test_tied_unrolled_and_remat_give_the_same_logits():
  tokens, positions, segment_ids = _packed_batch(np.random.default_rng(1))
  base, params = _forward(_cfg(), tokens, positions, segment_ids)
  want = reference.forward(params, _cfg(), tokens, positions, segment_ids)
  np.testing.assert_allclose(base[segment_ids != 0], want[segment_ids != 0], rtol=2e-5, atol=2e-5)
  unrolled, _ = _forward(_cfg(scan_layers=False, remat="full"), tokens, positions, segment_ids)
  np.testing.assert_allclose(unrolled, base, rtol=1e-6, atol=1e-6)


def test_packed_documents_do_not_see_each_other():
  cfg = _cfg()
  tokens, positions, segment_ids = _packed_batch(np.random.default_rng(2))
  packed, _ = _forward(cfg, tokens, positions, segment_ids)
  alone, _ = _forward(cfg, tokens[:1, 5:], positions[:1, 5:], segment_ids[:1, 5:])
  np.testing.assert_allclose(packed[0, 5:], alone[0], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = _cfg(compute_dtype="bfloat16")
  tokens, positions, segment_ids = _packed_batch(np.random.default_rng(3))
  logits, params = _forward(cfg, tokens, positions, segment_ids)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))
  want = reference.forward(params, cfg, tokens, positions, segment_ids)
  real = segment_ids != 0
  err = np.abs(logits[real] - want[real]).max() / np.abs(want[real]).max()
  assert logits.dtype == np.float32 and 0 < err < 0.05


def test_parameters_carry_logical_axes_and_counts():
  cfg = _cfg(tie_embeddings=False)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  axes = logical_axes(abstract)
  assert axes["blocks"]["mlp"]["gate"] == ("layers", "embed", "mlp")
  assert axes["blocks"]["attn"]["k"] == ("layers", "embed", "kv_heads", "head_dim")
  assert axes["embed"]["table"] == ("vocab", "embed")
  params = nnx.split(abstract)[1].to_pure_dict()
  d, f, l, v, n, k, h = 32, 48, 3, 97, 4, 2, 8
  per_block = 2 * d + d * (n + 2 * k) * h + n * h * d + 3 * d * f
  assert count_params(params) == l * per_block + 2 * v * d + d
