"""Generation with a KV cache, on CPU with a tiny random model: the cached decode against
recomputing the whole sequence, batching, sampling, stop tokens, sharding and the CLI."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from lmjax import generate as generate_lib
from lmjax.config import ConfigError, default_config
from lmjax import config as config_lib
from lmjax.data import default_documents, train_tokenizer
from lmjax.generate import generate, generate_ids, load_run, prompt_width, sample_logits
from lmjax.mesh import use_rules
from lmjax.model import Transformer
from lmjax.state import build
from lmjax.trainer import train

N = 8  # new tokens per generation
TOL = dict(rtol=1e-5, atol=1e-5)  # float32 logits
PROMPTS = [list(np.random.default_rng(0).integers(4, 97, n)) for n in (2, 6, 4)]
REPO = Path(__file__).resolve().parents[1]


def _model_cfg(vocab_size=97):
  m = default_config().model
  m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = vocab_size, 2, 48, 4, 2
  m.head_dim, m.mlp_dim, m.max_seq_len = 8, 48, 32
  return m


@functools.cache
def _model(vocab_size=97):
  """(graphdef, params) of the tiny model with random weights (numpy: nothing to compile),
  shared so that compiled programs are reused."""
  abstract = nnx.eval_shape(lambda: Transformer(_model_cfg(vocab_size), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(0)

  def init(path, x):
    if path[-1].key == "scale":  # norms
      return np.ones(x.shape, np.float32)
    return (0.2 * rng.standard_normal(x.shape)).astype(np.float32)  # every layer matters

  return graphdef, jax.tree_util.tree_map_with_path(init, state.to_pure_dict())


def _generate(prompts=PROMPTS, **kw):
  graphdef, params = _model()
  kw = {"temperature": 0.0, "return_logits": True, **kw}
  return generate_ids(graphdef, params, prompts, max_new_tokens=N, **kw)


@functools.cache
def _greedy():
  return _generate()


@jax.jit
def _forward(params, tokens, segment_ids):
  return nnx.merge(_model()[0], params)(tokens, None, segment_ids)


def _full_logits(seq, length=16):
  """The plain forward pass over ``seq`` (right-padded to one compiled length): the logits
  of its last token (b=1)."""
  tokens = np.zeros((1, length), np.int32)
  tokens[0, :len(seq)] = seq
  segment_ids = (np.arange(length) < len(seq)).astype(np.int32)[None]
  return np.asarray(_forward(_model()[1], tokens, segment_ids))[0, len(seq) - 1]


def test_cached_decode_matches_recomputing_the_full_sequence():
  out = _greedy()
  assert out.tokens.shape == (3, N) and out.logits.shape == (3, N, 97)
  assert (out.lengths == N).all()  # no stop tokens
  for row, prompt in enumerate(PROMPTS):
    for i in range(N):
      want = _full_logits(prompt + list(out.tokens[row, :i]))
      np.testing.assert_allclose(out.logits[row, i], want, **TOL)
      assert out.tokens[row, i] == np.argmax(want)
  assert np.std(out.logits) > 0.1  # the comparison is not between near-zero numbers


def test_prefill_and_decode_give_the_forward_logits_at_every_position():
  graphdef, params = _model()
  model = nnx.merge(graphdef, params)
  rng = np.random.default_rng(1)
  seqs = rng.integers(4, 97, (2, 9))  # row 1 gets 3 tokens of left padding
  full = np.asarray(_forward(params, seqs, np.ones_like(seqs)))  # (2, 9, v)
  prompts = np.stack([seqs[0, :7], np.r_[[0, 0, 0], seqs[1, :4]]])  # (2, 7), left-padded
  cache = model.init_cache(2, 9, start=jnp.array([0, 3]))
  logits, cache = jax.jit(lambda c, t: model.decode(t, c))(cache, jnp.asarray(prompts))
  np.testing.assert_allclose(logits[0], full[0, :7], **TOL)
  np.testing.assert_allclose(logits[1, 3:], full[1, :4], **TOL)
  assert cache.k.shape == (2, 2, 9, 2, 8) and int(cache.index) == 7
  step = jnp.asarray([[seqs[0, 7]], [seqs[1, 4]]])
  logits, cache = jax.jit(lambda c, t: model.decode(t, c, last_only=True))(cache, step)
  np.testing.assert_allclose(logits[:, 0], full[[0, 1], [7, 4]], **TOL)
  assert int(cache.index) == 8


@pytest.mark.slow
def test_batched_prompts_of_different_lengths_match_each_prompt_alone():
  batched = _greedy()
  for row, prompt in enumerate(PROMPTS):
    alone = _generate([prompt])
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[row])
    np.testing.assert_allclose(alone.logits[0], batched.logits[row], **TOL)


def test_top_k_1_and_a_tiny_top_p_are_greedy():
  greedy = _greedy().tokens
  np.testing.assert_array_equal(_generate(temperature=1.0, top_k=1, seed=3).tokens, greedy)
  np.testing.assert_array_equal(_generate(temperature=0.7, top_p=1e-6, seed=4).tokens, greedy)


def test_sampling_is_deterministic_for_a_seed_and_differs_across_seeds():
  a = _generate(temperature=1.0, seed=0).tokens
  np.testing.assert_array_equal(_generate(temperature=1.0, seed=0).tokens, a)
  assert (_generate(temperature=1.0, seed=1).tokens != a).any()
  assert (a != _greedy().tokens).any()


def test_sample_logits_draws_from_the_top_k_and_top_p_tokens():
  probs = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
  logits = jnp.log(jnp.asarray(probs))[None]  # (1, 5)
  settings = {"all": {}, "top2": dict(top_k=2), "p75": dict(top_p=0.75),
              "top3_p50": dict(top_k=3, top_p=0.5), "hot": dict(temperature=100.0),
              "greedy": dict(temperature=0.0)}

  @jax.jit
  def draw(keys):  # every setting in one program: one compilation
    return {name: jax.vmap(lambda k, kw=kw: sample_logits(logits, k, **kw)[0])(keys)
            for name, kw in settings.items()}

  keys = jax.random.split(jax.random.key(0), 4000)
  f = {name: np.bincount(np.asarray(d), minlength=5) / len(keys) for name, d in draw(keys).items()}
  np.testing.assert_allclose(f["all"], probs, atol=0.03)
  np.testing.assert_allclose(f["top2"], np.array([0, 0.4, 0, 0.3, 0]) / 0.7, atol=0.03)
  # 0.4 + 0.3 < 0.75: the 0.15 token is still needed, the 0.1 one is not.
  np.testing.assert_allclose(f["p75"], np.array([0, 0.4, 0, 0.3, 0.15]) / 0.85, atol=0.03)
  np.testing.assert_allclose(f["top3_p50"], np.array([0, 0.4, 0, 0.3, 0]) / 0.7, atol=0.03)
  for name in ("top2", "p75", "top3_p50"):
    assert f[name][[0, 2]].sum() == 0, name  # never outside the cut
  assert f["hot"].min() > 0.15  # nearly uniform
  np.testing.assert_array_equal(f["greedy"], [0, 1, 0, 0, 0])


def test_stop_tokens_end_each_row_and_pad_the_rest():
  base = _greedy().tokens
  stop = int(base[0, 2])  # row 0 stops at its third token (or earlier)
  out = _generate(stop_tokens=(stop,))
  for row in range(len(PROMPTS)):
    hits = np.flatnonzero(base[row] == stop)
    n = hits[0] + 1 if len(hits) else N
    assert out.lengths[row] == n
    np.testing.assert_array_equal(out.tokens[row, :n], base[row, :n])
    assert (out.tokens[row, n:] == 0).all()  # padding after the stop token
  assert out.lengths[0] <= 3


def test_sharded_generation_matches_one_device():
  cfg = default_config()
  cfg.model = _model_cfg()
  cfg.data.seq_len, cfg.data.global_batch_size = 32, 12
  cfg.mesh.fsdp, cfg.mesh.tensor = 3, 2  # rows and weights over fsdp, heads over tensor
  setup = build(cfg, jax.devices()[:6])
  params = jax.device_put(_model()[1], setup.state_shardings["params"])
  assert params["blocks"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)  # (l, d, n, h)
  sharded = generate_ids(setup, params, PROMPTS, max_new_tokens=N, temperature=0.0,
                         return_logits=True)
  np.testing.assert_array_equal(sharded.tokens, _greedy().tokens)
  np.testing.assert_allclose(sharded.logits, _greedy().logits, **TOL)
  with jax.set_mesh(setup.mesh), use_rules(setup.rules):
    cache = jax.jit(lambda p: setup.model(p).init_cache(3, 16))(params)
  want = NamedSharding(setup.mesh, P(None, "fsdp", None, "tensor", None))  # (l, b, s, k, h)
  assert cache.k.sharding.is_equivalent_to(want, 5)


def test_bad_arguments_are_refused_before_compiling():
  graphdef, params = _model()
  gen = functools.partial(generate_ids, graphdef, params)
  with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
    gen([[1]], max_new_tokens=0)
  with pytest.raises(ValueError, match="0 < top_p <= 1"):
    gen([[1]], max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match="temperature=nan"):  # NaN compares false with 0
    gen([[1]], max_new_tokens=2, temperature=float("nan"))
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    gen([[1], []], max_new_tokens=2)
  with pytest.raises(ValueError, match=r"outside \[0, 97\)"):
    gen([[97]], max_new_tokens=2)
  with pytest.raises(ValueError, match="past model.max_seq_len=32"):
    gen([[1] * 30], max_new_tokens=4)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
  """A real (tiny) tokenizer and a random model over its vocabulary: (graphdef, params, tok)."""
  tok = train_tokenizer(default_documents()[:40], 512, str(tmp_path_factory.mktemp("tok") / "t.model"))
  return *_model(tok.vocab_size), tok


def test_generated_text_keeps_the_space_after_the_prompt(text_model):
  """Decoding the new ids alone would drop the space of their leading "▁" piece:
  ``The for statement`` + ``is`` instead of `` is``."""
  graphdef, params, tok = text_model
  prompts = ["The for statement", "def f(x):", "a\n  b", "x = 1", "Rain", "It was", "(", "é"]
  leading_space = 0
  for seed in range(4):  # 32 draws: 66 of the 512 pieces start with "▁"
    kw = dict(max_new_tokens=6, temperature=1.0, seed=seed)
    texts = generate(graphdef, params, tok, prompts, **kw)
    ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
    out = generate_ids(graphdef, params, ids, stop_tokens=(tok.eos_id,), **kw)
    for p, prompt_ids, text, row, n in zip(prompts, ids, texts, out.tokens, out.lengths):
      new = [int(i) for i in row[:n] if i != tok.eos_id]
      assert p + text == tok.decode(prompt_ids + new)
      leading_space += text.startswith(" ")
  assert leading_space  # the case that lost its space was drawn
  assert tok.decode_continuation(ids[0], tok.encode("is")) == " is"  # the piece "▁is"
  # A prompt ending inside a character spelled in bytes reads differently alone: the new
  # pieces are decoded on their own, with the space of their leading "▁" kept.
  byte = lambda b: tok.processor.piece_to_id(f"<0x{b:02X}>")
  head = [tok.bos_id] + [byte(b) for b in "ą".encode()[:1]]
  assert tok.decode_continuation(head, [byte("ą".encode()[1])] + tok.encode("is")) == "\ufffd is"
  assert tok.decode_continuation(head, []) == ""


def test_a_saved_config_missing_newer_keys_loads_on_the_defaults():
  saved = default_config().to_dict()
  del saved["data"]["format"]  # e.g. a run trained before data.format existed
  saved["model"]["num_layers"] = 3
  cfg = config_lib.from_saved(saved)
  assert cfg.model.num_layers == 3 and cfg.data.format == default_config().data.format
  saved["model"]["dropout"] = 0.1
  with pytest.raises(ConfigError, match="config.model.dropout: in the run's saved config"):
    config_lib.from_saved(saved)


def _run_cfg(steps):
  """A tiny run on the default corpus (as tests/test_train.py)."""
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 2, 64, 192
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 16
  c.model.max_seq_len = c.data.seq_len = 64
  c.data.global_batch_size = 8
  c.train.steps = steps
  c.train.log_every, c.train.eval_every, c.train.checkpoint_every = 1, 0, 0
  c.train.progress_bar = False
  return c


@pytest.mark.slow
def test_cli_generate_prints_the_continuations_of_a_trained_run(tmp_path):
  # One CPU device throughout (compiles faster than 8): for training, for the CLI (a
  # subprocess without the fake-device flag) and for the same generation in-process.
  one = jax.devices()[:1]
  cfg = _run_cfg(2)
  train(cfg, tmp_path, devices=one)
  prompts = ["def f(x):", "The"]
  cmd = [sys.executable, "-m", "lmjax.cli", "generate", "--workdir", str(tmp_path),
         "--max_new_tokens", "12", "--temperature", "0"]
  for p in prompts:
    cmd += ["--prompt", p]
  env = dict(os.environ, XLA_FLAGS=os.environ.get("XLA_FLAGS", "").replace(
      "--xla_force_host_platform_device_count=8", "").strip())
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith(f"# {tmp_path} step 2: temperature 0.0")

  run = load_run(tmp_path, devices=one)  # the same in-process: the CLI prints these texts
  texts = generate(run.setup, run.params, run.tokenizer, prompts, max_new_tokens=12,
                   temperature=0.0)
  assert any(texts)
  body = proc.stdout.split("\n", 1)[1]
  assert body == "".join(f"--- {i + 1}/2\n{p}{t}\n" for i, (p, t) in enumerate(zip(prompts, texts)))

  given = load_run(tmp_path, cfg, devices=one)  # an explicit config (the CLI's --config)
  assert given.step == run.step == 2
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(given.params),
               jax.device_get(run.params))


def test_an_equal_model_reuses_the_compiled_programs(monkeypatch):
  """The programs are keyed on the model's GraphDef, which its frozen ModelConfig makes
  hashable: a second, separately built model of the same config traces nothing again."""
  traces = []
  decode = Transformer.decode

  def counted(self, *args, **kwargs):  # runs only while a program is traced
    traces.append(1)
    return decode(self, *args, **kwargs)

  monkeypatch.setattr(Transformer, "decode", counted)
  cfg = _model_cfg()
  cfg.max_seq_len = 31  # programs of their own, not shared with the other tests
  params = _model()[1]
  build = lambda seed: nnx.merge(nnx.graphdef(nnx.eval_shape(
      lambda: Transformer(cfg, rngs=nnx.Rngs(seed)))), params)
  first, second = build(0), build(1)
  assert first is not second and nnx.graphdef(first) == nnx.graphdef(second)
  want = generate_ids(first, params, PROMPTS[:2], max_new_tokens=3, temperature=0.0)
  traced = len(traces)
  assert traced > 0  # the prefill and the decode loop
  got = generate_ids(second, params, PROMPTS[:2], max_new_tokens=3, temperature=0.0)
  assert len(traces) == traced  # nothing traced again
  np.testing.assert_array_equal(got.tokens, want.tokens)


def test_prompts_of_lengths_in_one_bucket_share_the_compiled_programs(monkeypatch):
  """A chat's turns and a task's prompts differ in length: padded to a power of two they
  reuse the programs, and the padding changes no token."""
  traces = []
  decode = Transformer.decode

  def counted(self, *args, **kwargs):  # runs only while a program is traced
    traces.append(1)
    return decode(self, *args, **kwargs)

  monkeypatch.setattr(Transformer, "decode", counted)
  graphdef, params = _model()
  short = generate_ids(graphdef, params, [PROMPTS[0][:3]], max_new_tokens=4, temperature=0.0)
  traced = len(traces)
  longer = generate_ids(graphdef, params, [PROMPTS[0][:3] + [7] * 9], max_new_tokens=4, temperature=0.0)
  assert len(traces) == traced  # 3 and 12 tokens: both 16 wide
  assert [prompt_width(n) for n in (1, 16, 17, 100)] == [16, 16, 32, 128]
  for out, prompt in ((short, PROMPTS[0][:3]), (longer, PROMPTS[0][:3] + [7] * 9)):
    seq = list(prompt)
    for token in out.tokens[0]:
      assert token == np.argmax(_full_logits(seq, length=24))
      seq.append(int(token))
