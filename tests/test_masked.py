"""The masked-language-model objective: bidirectional attention, BERT masking, training,
evaluation and the refusals around it."""

import dataclasses
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmjax import cli, objectives
from lmjax.config import ConfigError, default_config, validate
from lmjax.data import default_documents, train_tokenizer
from lmjax.evaluate import choice_loglikelihoods
from lmjax.generate import generate_ids
from lmjax.metrics import read_metrics
from lmjax.model import Transformer
from lmjax.model import attention as attn, kernels
from lmjax.state import build, init_state
from lmjax.trainer import compile_train_step, train

SPECIAL = (0, 1, 2, 3)  # pad, unk (the mask id), bos, eos: lmjax's sentencepiece ids


def _masking(vocab=1000, fraction=0.15, seed=0, special=SPECIAL, mask_id=1):
  return objectives.Masking(fraction=fraction, mask_id=mask_id, special_ids=special,
                            vocab_size=vocab, seed=seed)


def _packed(b, t, vocab, seed=0):
  """Rows of 1-4 documents ([bos] + tokens), then 0-5 padding tokens: a packed text batch."""
  rng = np.random.default_rng(seed)
  inputs, seg = np.zeros((b, t), np.int32), np.zeros((b, t), np.int32)
  for r in range(b):
    fill = t - rng.integers(0, 6)
    cuts = np.sort(rng.choice(np.arange(1, fill), rng.integers(0, 4), replace=False))
    seg[r, :fill] = np.searchsorted(cuts, np.arange(fill), side="right") + 1
    inputs[r, :fill] = rng.integers(4, vocab, fill)
    starts = np.concatenate([[0], cuts])
    inputs[r, starts] = 2  # bos
  pos = np.zeros_like(seg)
  for r in range(b):
    for s in np.unique(seg[r][seg[r] > 0]):
      idx = np.flatnonzero(seg[r] == s)
      pos[r, idx] = np.arange(len(idx))
  targets = np.roll(inputs, -1, axis=1)
  return {"inputs": inputs, "targets": targets, "segment_ids": seg, "positions": pos}


# -- selection statistics -------------------------------------------------------------------

def test_selection_fraction_split_and_what_is_never_selected():
  m = _masking(special=(0, 1, 2, 3, 7))
  batch = _packed(64, 512, m.vocab_size, seed=1)
  batch["inputs"][:, 5::50] = 7  # another special token, inside documents
  padding = batch["segment_ids"] == 0
  batch["inputs"][padding] = 9  # padding is told by its segment id, whatever id it holds
  assert padding.sum() > 100
  out = jax.device_get(jax.jit(objectives.mask_batch, static_argnums=0)(m, batch, jax.random.key(3)))
  inputs, seg = batch["inputs"], batch["segment_ids"]
  sel = out["weights"] > 0
  eligible = (seg != 0) & ~np.isin(inputs, m.special_ids)
  assert not (sel & ~eligible).any()  # never padding, bos or another special id
  assert abs(sel.sum() / eligible.sum() - 0.15) < 0.005, sel.sum() / eligible.sum()
  np.testing.assert_array_equal(out["targets"], inputs)  # the original tokens, unshifted
  for key in ("segment_ids", "positions"):
    np.testing.assert_array_equal(out[key], batch[key])
  np.testing.assert_array_equal(out["inputs"][~sel], inputs[~sel])  # only selected change
  got = out["inputs"][sel]
  masked = got == m.mask_id
  kept = got == inputs[sel]
  randomised = ~masked & ~kept
  n = sel.sum()  # ~ 4,300
  assert abs(masked.mean() - 0.8) < 0.02 and abs(kept.mean() - 0.1) < 0.015, (masked.mean(), kept.mean())
  assert abs(randomised.mean() - 0.1) < 0.015 and n > 4000
  assert not np.isin(got[randomised], m.special_ids).any()  # drawn from the non-special ids
  assert got[randomised].min() >= 4 and got[randomised].max() < m.vocab_size


def test_random_replacements_cover_the_non_special_ids_uniformly():
  m = _masking(vocab=12, fraction=1.0, special=(0, 1, 2, 5, 11))
  x = jax.random.randint(jax.random.key(0), (200_000,), 0, 7)
  counts = np.bincount(np.asarray(objectives._non_special(m, x)), minlength=12)
  assert set(np.flatnonzero(counts)) == {3, 4, 6, 7, 8, 9, 10}
  assert np.allclose(counts[counts > 0] / 200_000, 1 / 7, atol=0.005)


# -- determinism: (seed, step), any mesh ----------------------------------------------------

def _cfg(vocab=32, t=32, b=8):
  c = default_config()
  m = c.model
  m.vocab_size, m.num_layers, m.embed_dim, m.mlp_dim = vocab, 2, 32, 64
  m.num_heads, m.num_kv_heads, m.head_dim = 2, 2, 16
  m.max_seq_len = c.data.seq_len = t
  m.causal, c.train.objective = False, "masked"
  m.param_dtype = m.compute_dtype = "float32"
  c.data.global_batch_size = b
  c.train.progress_bar = False
  return c


def _masked_fn(setup):
  fn = jax.jit(lambda step, batch: objectives.training_batch(setup, step, batch)[0],
               in_shardings=(None, setup.batch_sharding))
  def run(step, batch):
    with setup.context():
      return jax.device_get(fn(jnp.int32(step), batch))
  return run


def test_masks_depend_on_seed_and_step_only_and_not_on_the_mesh():
  assert jax.config.jax_threefry_partitionable  # what makes sharded draws mesh-independent
  cfg = _cfg(vocab=64)
  cfg.mesh.update(data=2, fsdp=4)
  eight = build(cfg, jax.devices())
  one_cfg = _cfg(vocab=64)
  one_cfg.mesh.update(data=1, fsdp=1)
  one = build(one_cfg, jax.devices()[:1])
  assert dict(eight.mesh.shape)["data"] == 2 and dict(eight.mesh.shape)["fsdp"] == 4
  batch = _packed(8, 32, 64, seed=2)
  on_eight, on_one = _masked_fn(eight), _masked_fn(one)
  a = on_eight(5, batch)
  for key in a:
    np.testing.assert_array_equal(a[key], on_one(5, batch)[key])  # bit for bit
    np.testing.assert_array_equal(a[key], on_eight(5, batch)[key])  # and again
  assert (a["weights"] != on_eight(6, batch)["weights"]).any()  # the next step: other tokens
  reseeded = build(_reseed(cfg, 1), jax.devices())
  assert (a["weights"] != _masked_fn(reseeded)(5, batch)["weights"]).any()


def _reseed(cfg, seed):
  c = cfg.copy_and_resolve_references()
  c.seed = seed
  return c


# -- attention ------------------------------------------------------------------------------

def _numpy_bidirectional(q, k, v, seg, window=0):
  """Each token attends to every token of its own segment, both ways (and |i - j| < window)."""
  q, k, v, seg = (np.asarray(a, np.float64) for a in (q, k, v, seg))
  b, t, n, h = q.shape
  g = n // k.shape[2]
  out = np.zeros_like(q)
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  near = np.abs(i - j) < window if window else np.ones((t, t), bool)
  for r in range(b):
    mask = (seg[r][:, None] == seg[r][None, :]) & near
    for head in range(n):
      s = q[r, :, head] @ k[r, :, head // g].T / np.sqrt(h)
      s = np.where(mask, s, -np.inf)
      p = np.exp(s - s.max(axis=1, keepdims=True))
      out[r, :, head] = (p / p.sum(axis=1, keepdims=True)) @ v[r, :, head // g]
  return out


def _qkv(b, t, n, kv, h, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))
  seg = np.zeros((b, t), np.int32)
  for r in range(b):
    cuts = np.sort(rng.choice(np.arange(1, t - 4), 1 + r % 3, replace=False))
    seg[r] = np.searchsorted(cuts, np.arange(t), side="right") + 1
    seg[r, t - 1 - r % 3:] = 0  # padding at the end of every row
  return q, k, v, jnp.asarray(seg)


_BACKENDS = {
    "xla": lambda q, k, v, s, w: attn.dot_product_attention(q, k, v, s, backend="xla", window=w, causal=False),
    "blockwise": lambda q, k, v, s, w: kernels.blockwise_attention(q, k, v, s, window=w, block=8, causal=False),
    "cudnn": lambda q, k, v, s, w: kernels.cudnn_attention(q, k, v, s, window=w, causal=False,
                                                          implementation="xla"),
    "splash": lambda q, k, v, s, w: kernels.splash_attention(q, k, v, s, window=w, causal=False,
                                                            interpret=True),
}


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("backend", ["xla", "blockwise", "cudnn"])
def test_bidirectional_attention_equals_numpy_reference(backend, window):
  q, k, v, seg = _qkv(3, 32, 4, 2, 8)
  fn = jax.jit(functools.partial(_BACKENDS[backend], w=window))
  real = np.asarray(seg) != 0
  np.testing.assert_allclose(np.asarray(fn(q, k, v, seg))[real],
                             _numpy_bidirectional(q, k, v, seg, window)[real], rtol=1e-5, atol=1e-5)
  # Padding is seen by no real token: changing its keys and values changes no real output.
  pad = ~real[:, :, None, None]
  k2, v2 = jnp.where(pad, 100.0, k), jnp.where(pad, -50.0, v)
  np.testing.assert_allclose(np.asarray(fn(q, k2, v2, seg))[real], np.asarray(fn(q, k, v, seg))[real],
                             rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_bidirectional_splash_kernel_equals_numpy_reference():
  q, k, v, seg = _qkv(1, 128, 2, 1, 64, seed=4)
  real = np.asarray(seg) != 0
  for window in (0, 40):
    out = jax.jit(functools.partial(_BACKENDS["splash"], w=window))(q, k, v, seg)
    np.testing.assert_allclose(np.asarray(out)[real], _numpy_bidirectional(q, k, v, seg, window)[real],
                               rtol=1e-5, atol=1e-5)


def test_blockwise_bidirectional_gradients_equal_xla():
  q, k, v, seg = _qkv(2, 32, 4, 2, 8, seed=5)

  @functools.partial(jax.jit, static_argnums=0)
  def grads(name, q, k, v):
    return jax.grad(lambda *a: jnp.sum(jnp.sin(_BACKENDS[name](*a, seg, 0))), argnums=(0, 1, 2))(q, k, v)

  for got, want in zip(grads("blockwise", q, k, v), grads("xla", q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bidirectional_model_sees_later_tokens_of_its_document_only():
  cfg = _cfg().model
  causal = Transformer(dataclasses.replace(_model_cfg(cfg), causal=True), rngs=nnx.Rngs(0))
  both = Transformer(_model_cfg(cfg), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.arange(16, dtype=np.int32)[None] % 30 + 2)
  seg = jnp.asarray([[1] * 8 + [2] * 8])
  later = tokens.at[0, 5].set(31)  # a later token of document 1
  other = tokens.at[0, 12].set(31)  # a token of document 2
  first = lambda model, toks: np.asarray(model(toks, None, seg))[0, :5]
  np.testing.assert_array_equal(first(causal, tokens), first(causal, later))
  assert not np.allclose(first(both, tokens), first(both, later))
  np.testing.assert_allclose(first(both, tokens), first(both, other), rtol=1e-6, atol=1e-6)


def _model_cfg(model_cfg):
  from lmjax.model.config import ModelConfig
  return ModelConfig.from_config(model_cfg)


# -- training recovers masked tokens -------------------------------------------------------

def _progressions(b, t, seed):
  """Packed rows of counting documents: bos, then a, a+1, a+2, ... (mod 28, shifted past the
  4 special ids): a masked token is its neighbour's successor (or predecessor)."""
  rng = np.random.default_rng(seed)
  inputs, seg, pos = (np.zeros((b, t), np.int32) for _ in range(3))
  for r in range(b):
    at, doc = 0, 1
    while at < t - 4:
      n = min(int(rng.integers(6, 20)), t - at)
      start = rng.integers(0, 28)
      inputs[r, at:at + n] = [2] + list(4 + (start + np.arange(n - 1)) % 28)
      seg[r, at:at + n], pos[r, at:at + n] = doc, np.arange(n)
      at, doc = at + n, doc + 1
  return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1), "segment_ids": seg,
          "positions": pos}


@pytest.mark.slow
def test_a_tiny_model_learns_to_recover_masked_tokens():
  cfg = _cfg(vocab=32, t=32, b=16)
  cfg.optim.update(learning_rate=1e-2, warmup_steps=10, decay_steps=300)
  cfg.train.steps = 300
  setup = build(cfg, jax.devices()[:1])
  setup = dataclasses.replace(setup, masking=_masking(vocab=32))
  step_fn, state = compile_train_step(setup), init_state(setup)
  losses = []
  for i in range(300):
    state, metrics = step_fn(state, _progressions(16, 32, seed=i))
    losses.append(float(metrics["loss"]))
  assert losses[0] > 3.0 and np.mean(losses[-20:]) < 1.0, (losses[0], np.mean(losses[-20:]))
  correct = weight = 0.0
  targets = []
  for i in range(4):  # held-out rows, evaluation masks
    batch = _progressions(16, 32, seed=10_000 + i)
    sums = objectives.masked_eval_sums(setup, state["params"], batch, i)
    correct, weight = correct + sums["correct"], weight + sums["weight"]
    masked = jax.device_get(objectives.mask_batch(setup.masking, batch, objectives.eval_key(setup.masking, i)))
    targets.extend(masked["targets"][masked["weights"] > 0])
  baseline = np.bincount(targets).max() / len(targets)  # always the most frequent masked token
  assert weight == len(targets) > 200
  assert correct / weight > 0.8 and baseline < 0.1, (correct / weight, baseline)


# -- the command line: train, resume bit for bit, eval, generate refused --------------------

def _run(capsys, *argv):
  try:
    cli.main(list(argv))
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.mark.slow
def test_masked_run_resumes_bit_for_bit_evaluates_and_refuses_to_generate(capsys, tmp_path):
  tok = train_tokenizer(default_documents()[:40], 512, str(tmp_path / "tok.model"),
                        special_tokens=["[MASK]"])
  flags = ["--config", "configs/masked.py", "--config.data.tokenizer", str(tmp_path / "tok.model"),
           "--config.model.vocab_size=512", "--config.model.num_layers=1",
           "--config.model.embed_dim=32", "--config.model.mlp_dim=64", "--config.model.head_dim=16",
           "--config.model.num_heads=2", "--config.model.num_kv_heads=1",
           "--config.data.seq_len=32", "--config.model.max_seq_len=32",
           "--config.data.global_batch_size=8", "--config.train.log_every=1",
           "--config.train.eval_every=2", "--config.train.eval_batches=2",
           "--config.train.checkpoint_every=2", "--config.train.progress_bar=False",
           "--config.train.mask_token=[MASK]", "--config.data.worker_count=0"]
  run = lambda workdir, steps: _run(capsys, "train", *flags, f"--config.train.steps={steps}",
                                    "--workdir", str(tmp_path / workdir))
  assert run("full", 4)[0] == 0
  assert run("split", 2)[0] == 0 and run("split", 4)[0] == 0
  full, split = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "split")
  keys = ("loss", "masked_tokens", "eval_loss", "eval_masked_accuracy")
  assert [[r.get(k) for k in keys] for r in full] == [[r.get(k) for k in keys] for r in split]
  assert all(0 < r["masked_tokens"] < 0.3 * r["tokens"] for r in full)
  assert "eval_perplexity" not in full[-1] and full[-1]["eval_masked_accuracy"] >= 0

  code, out, err = _run(capsys, "eval", "--workdir", str(tmp_path / "full"), "--eval_batches", "2")
  held_out = json.loads(out)["held_out"]
  assert code == 0 and set(held_out) == {"loss", "masked_accuracy", "masked_tokens"}, err
  assert held_out["loss"] == pytest.approx(full[-1]["eval_loss"], rel=1e-4)  # the same fixed masks

  code, _, err = _run(capsys, "generate", "--workdir", str(tmp_path / "full"), "--prompt", "def")
  assert code == 2 and len(err.strip().splitlines()) == 1 and "bidirectional" in err, err
  assert tok.token_id("[MASK]") == 5


# -- refusals -------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,needle", [
    ({"model.causal": True}, "config.model.causal"),
    ({"data.format": "prompt_response"}, "config.data.format: 'prompt_response' with train.objective='masked'"),
    ({"mesh.context": 2}, "config.mesh.context: 2 with model.causal=False"),
])
def test_config_refusals(changes, needle):
  cfg = _cfg()
  for key, value in changes.items():
    section, name = key.split(".")
    cfg[section][name] = value
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(")) as e:
    validate(cfg, num_devices=8)
  assert "\n" not in str(e.value)


def _hf_like(unk=None, tokens=()):
  """A tokenizer without sentencepiece's processor: an unk_id attribute, or none."""
  def token_id(piece):
    if piece not in tokens:
      raise ValueError(f"no piece {piece!r}")
    return 100 + tokens.index(piece)
  return types.SimpleNamespace(vocab_size=200, pad_id=0, bos_id=1, eos_id=2, path="tokenizer.json",
                               special_tokens=list(tokens), token_id=token_id, unk_id=unk)


def test_mask_token_choice_and_refusals():
  cfg = _cfg()
  with pytest.raises(ConfigError, match=r"config\.train\.mask_token: .* has none"):
    objectives.masking(cfg, _hf_like())
  assert objectives.masking(cfg, _hf_like(unk=3)).mask_id == 3
  cfg.train.mask_token = "[MASK]"
  m = objectives.masking(cfg, _hf_like(tokens=("[MASK]", "<|user|>")))
  assert m.mask_id == 100 and m.special_ids == (0, 1, 2, 100, 101) and m.vocab_size == 200
  cfg.train.mask_token = "<mask>"
  with pytest.raises(ConfigError, match=r"config\.train\.mask_token: '<mask>' is not a token"):
    objectives.masking(cfg, _hf_like(tokens=("[MASK]",)))


def test_generation_and_multiple_choice_refuse_a_bidirectional_model():
  model = Transformer(_cfg().model, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="generate: the model is bidirectional"):
    generate_ids(model, nnx.state(model), [[2, 5]], max_new_tokens=2)
  with pytest.raises(ValueError, match="no KV-cache decoding"):
    model.decode(jnp.ones((1, 2), jnp.int32), model.init_cache(1, 4))
  setup = build(_cfg(), jax.devices()[:1])
  with pytest.raises(ConfigError, match="multiple-choice scoring needs next-token"):
    choice_loglikelihoods(setup, None, None, [{"context": "a", "choices": ["b", "c"], "label": 0}])


def test_causal_runs_are_untouched():
  cfg = _cfg()
  cfg.model.causal, cfg.train.objective = True, "causal"
  setup = build(cfg, jax.devices()[:1])
  assert objectives.attach(setup, None) is setup
  batch = _packed(2, 32, 32)
  assert objectives.training_batch(setup, 0, batch) == (batch, {})
