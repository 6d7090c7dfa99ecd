"""The model's forward pass against an independent NumPy implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


GPT2_LIKE = dict(norm="layernorm", mlp="gelu", position_embedding="learned", attention_bias=True,
                 mlp_bias=True, num_kv_heads=4, norm_eps=1e-5)


@pytest.mark.parametrize("options", [
    GPT2_LIKE,
    dict(sliding_window=4, tie_embeddings=False),  # Mistral-style local attention
    dict(rope_scaling="llama3", rope_scaling_factor=8.0, rope_original_max_len=8, rope_theta=5e5),
    dict(rope_scaling="linear", rope_scaling_factor=4.0, attention_bias=True),
    dict(position_embedding="none", mlp_bias=True),
    # Ramp from dimension 1.3 to 2.8 (kept below, divided by 4 above), cos/sin x 1.065.
    dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_len=4096, rope_truncate=False,
         rope_mscale=1.0, rope_mscale_all_dim=0.5),
], ids=["gpt2_like", "sliding_window", "llama3_rope", "linear_rope_qkv_bias", "nope_mlp_bias", "yarn_rope"])
def test_architecture_options_match_numpy_reference(options):
  cfg = _cfg(**options)
  tokens, positions, segment_ids = _packed_batch(np.random.default_rng(4))
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  params = state.to_pure_dict()
  # Biases and norm offsets start at zero: give them values so the comparison sees them.
  rng = np.random.default_rng(5)
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32)
      if "bias" in str(path[-1]) else x, params)
  logits = np.asarray(jax.jit(lambda p, *a: nnx.merge(graphdef, p)(*a))(
      params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segment_ids)))
  want = reference.forward(jax.device_get(params), cfg, tokens, positions, segment_ids)
  real = segment_ids != 0
  np.testing.assert_allclose(logits[real], want[real], rtol=2e-5, atol=2e-5)
  assert np.std(want[real]) > 0.1


def test_sliding_window_changes_only_tokens_past_the_window():
  tokens, positions, segment_ids = _packed_batch(np.random.default_rng(6))
  full, _ = _forward(_cfg(), tokens, positions, segment_ids)
  local, _ = _forward(_cfg(sliding_window=4), tokens, positions, segment_ids)
  # Within a document, positions 0..3 see at most 4 tokens: identical; later ones differ.
  early = positions < 4
  np.testing.assert_allclose(local[early], full[early], rtol=1e-5, atol=1e-5)
  assert np.abs(local[~early] - full[~early]).max() > 1e-3


def test_gpt2_like_parameters():
  cfg = _cfg(**GPT2_LIKE)
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  axes = logical_axes(abstract)
  params = nnx.split(abstract)[1].to_pure_dict()
  assert "gate" not in params["blocks"]["mlp"] and axes["pos_embed"] == (None, "embed")
  assert axes["blocks"]["attn"]["q_bias"] == ("layers", "heads", "head_dim")
  assert set(params["final_norm"]) == {"scale", "bias"}
  d, f, l, v, n, h, s = 32, 48, 3, 97, 4, 8, 16
  per_block = 4 * d + (d * 3 * n * h + 3 * n * h) + (n * h * d + d) + (2 * d * f + f + d)
  assert count_params(params) == l * per_block + v * d + s * d + 2 * d


def test_blockwise_attention_backend_gives_the_same_logits():
  tokens, positions, segment_ids = _packed_batch(np.random.default_rng(7))
  want, _ = _forward(_cfg(sliding_window=6), tokens, positions, segment_ids)
  got, _ = _forward(_cfg(sliding_window=6, attention="blockwise"), tokens, positions, segment_ids)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_model_config_is_frozen_hashable_and_has_the_config_keys():
  import dataclasses
  from lmjax.model import ModelConfig
  fields = [f.name for f in dataclasses.fields(ModelConfig)]
  assert sorted(fields) == sorted(default_config().model.keys())
  cfg = ModelConfig.from_config(default_config().model)
  assert cfg == ModelConfig.from_config(default_config().model.to_dict())  # a dict works too
  assert hash(cfg) == hash(ModelConfig.from_config(default_config().model))
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.num_layers = 3
  assert dataclasses.replace(cfg, num_layers=3) != cfg
  model = nnx.eval_shape(lambda: Transformer(_cfg(), rngs=nnx.Rngs(0)))
  assert isinstance(model.cfg, ModelConfig) and model.cfg.num_layers == 3
  assert hash(nnx.graphdef(model)) == hash(nnx.graphdef(nnx.eval_shape(
      lambda: Transformer(_cfg(), rngs=nnx.Rngs(1)))))  # the GraphDef can be a jit key
  raw = default_config().model.to_dict()
  raw["num_layer"] = 3  # misspelt
  with pytest.raises(ValueError, match=r"unknown keys \['num_layer'\]"):
    ModelConfig.from_config(raw)
  del raw["num_layer"], raw["mlp_dim"]
  with pytest.raises(ValueError, match=r"missing keys \['mlp_dim'\]"):
    ModelConfig.from_config(raw)
  raw["mlp_dim"] = "wide"
  with pytest.raises(TypeError, match="config.model.mlp_dim: expected int"):
    ModelConfig.from_config(raw)
