"""Distillation (train.teacher): the chunked loss equals the whole-logits one and NumPy; a
smaller student's KL to a pre-trained teacher falls; the teacher sharded over 8 devices gives
the one-device loss; a teacher of another vocabulary or tokenizer is refused in one line."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax import data as data_lib
from lmjax import frozen as frozen_lib
from lmjax import rundir
from lmjax.config import ConfigError
from lmjax.mesh import host_to_global
from lmjax.model.distill import Teacher, distill_cross_entropy, plain_distill_cross_entropy
from lmjax.state import build, init_state
from lmjax.trainer import compile_train_step
from tests import frozen_runs


def _inputs(b=2, t=10, d=16, dt=24, v=50, seed=0):
  k = jax.random.split(jax.random.key(seed), 6)
  x = jax.random.normal(k[0], (b, t, d))
  w = 0.3 * jax.random.normal(k[1], (v, d))
  xt = jax.random.normal(k[2], (b, t, dt))
  wt = 0.3 * jax.random.normal(k[3], (v, dt))
  targets = jax.random.randint(k[4], (b, t), 0, v)
  weights = (jax.random.uniform(k[5], (b, t)) > 0.3).astype(jnp.float32) * 1.5  # not just 0/1
  return x, w, xt, wt, targets, weights


def _numpy(x, w, xt, wt, targets, weights, alpha, temp, z):
  f64 = lambda a: np.asarray(a, np.float64)
  s, u = np.einsum("btd,vd->btv", f64(x), f64(w)), np.einsum("btd,vd->btv", f64(xt), f64(wt))
  log_softmax = lambda a: a - np.log(np.sum(np.exp(a - a.max(-1, keepdims=True)), -1, keepdims=True)) - a.max(-1, keepdims=True)
  lse = np.log(np.sum(np.exp(s), axis=-1))
  nll = -np.take_along_axis(log_softmax(s), np.asarray(targets)[..., None], axis=-1)[..., 0]
  log_p, log_q = log_softmax(u / temp), log_softmax(s / temp)
  kl = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
  total = np.sum(f64(weights) * ((1 - alpha) * nll + z * lse ** 2 + alpha * temp ** 2 * kl))
  return total, nll, lse, kl


# chunk 3: t=10 padded to 12; 64 > t: one chunk
@pytest.mark.parametrize("chunk,alpha,temp,z", [(3, 0.5, 1.0, 0.0), (4, 0.8, 2.0, 1e-2), (64, 1.0, 0.5, 0.0)])
def test_chunked_distillation_equals_whole_logits_and_numpy(chunk, alpha, temp, z):
  x, w, xt, wt, targets, weights = _inputs()
  teacher = lambda: Teacher(xt, wt, alpha, temp)
  chunked = lambda x, w: distill_cross_entropy(x, w, targets, weights, teacher(), z, chunk)
  plain = lambda x, w: plain_distill_cross_entropy(jnp.einsum("btd,vd->btv", x, w), targets,
                                                   weights, teacher(), z)
  want = _numpy(x, w, xt, wt, targets, weights, alpha, temp, z)
  for got, p, n in zip(jax.jit(chunked)(x, w), plain(x, w), want):  # total, nll, lse, kl
    np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, n, rtol=1e-5, atol=1e-5)
  g_chunked = jax.grad(lambda x, w: chunked(x, w)[0], (0, 1))(x, w)
  g_plain = jax.grad(lambda x, w: plain(x, w)[0], (0, 1))(x, w)
  for got, want in zip(g_chunked, g_plain):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The teacher is frozen: no gradient reaches its hidden states or projection.
  g_teacher = jax.grad(lambda xt: distill_cross_entropy(x, w, targets, weights,
                                                        Teacher(xt, wt, alpha, temp), z, chunk)[0])(xt)
  assert not np.any(g_teacher)


def test_a_teacher_of_another_vocabulary_or_tokenizer_is_refused(tmp_path):
  cfg = frozen_runs.tiny_cfg(1)
  teacher = tmp_path / "teacher"
  teacher.mkdir()
  other = frozen_runs.tiny_cfg(1)
  other.model.vocab_size = 1024
  (teacher / rundir.CONFIG_FILE).write_text(other.to_json())
  cfg.train.teacher = str(teacher)
  setup = build(cfg, jax.devices()[:1])
  tok = data_lib.get_tokenizer(cfg.data, cfg.model.vocab_size)
  with pytest.raises(ConfigError) as e:
    frozen_lib.attach(setup, tok)
  message = str(e.value)
  assert message.startswith("config.train.teacher:") and "vocab_size is 1024" in message
  assert "\n" not in message
  # The same size, another tokenizer.
  docs = list(data_lib.default_documents())
  data_lib.train_tokenizer(docs[:300], 512, str(tmp_path / "other.model"), "unigram")
  other.model.vocab_size, other.data.tokenizer = 512, str(tmp_path / "other.model")
  (teacher / rundir.CONFIG_FILE).write_text(other.to_json())
  with pytest.raises(ConfigError, match=r"^config.train.teacher: .*tokenizer .*other.model.* is not this run's"):
    frozen_lib.attach(setup, tok)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  return frozen_runs.pretrained(tmp_path_factory)


def _student(teacher, steps, **mesh):
  """A 1-layer, width-16 student of the 2-layer, width-32 teacher."""
  cfg = frozen_runs.tiny_cfg(steps, layers=1, width=16)
  cfg.train.teacher, cfg.train.distill_weight, cfg.train.distill_temperature = teacher, 0.7, 2.0
  cfg.model.loss_chunk = 8
  for k, v in mesh.items():
    cfg.mesh[k] = v
  return cfg


@pytest.mark.slow
def test_a_smaller_students_kl_to_the_teacher_falls(teacher, tmp_path):
  cfg = _student(teacher, 30)
  cfg.train.eval_every, cfg.train.log_every = 30, 1
  history = lmjax.train(cfg, tmp_path / "student")
  first, last = history[0], history[-1]
  w, t = 0.7, 2.0
  np.testing.assert_allclose(first["loss"], (1 - w) * first["ce"] + w * t * t * first["distill_kl"], rtol=1e-5)
  assert last["distill_kl"] < 0.5 * first["distill_kl"]
  assert last["ce"] < first["ce"]
  assert 0 < last["eval_distill_kl"] < first["distill_kl"] and np.isfinite(last["eval_loss"])


@pytest.mark.slow
def test_the_teacher_sharded_over_8_devices_gives_the_one_device_loss(teacher):
  losses = []
  for devices, mesh in ((jax.devices()[:1], {"fsdp": 1}), (jax.devices(), {"fsdp": 4, "tensor": 2})):
    cfg = _student(teacher, 1, **mesh)
    tok = rundir.run_tokenizer(cfg)
    setup = frozen_lib.attach(build(cfg, devices), tok)
    frozen = frozen_lib.load(setup)
    if len(devices) > 1:  # the teacher's weights are split, not replicated
      specs = {str(x.sharding.spec) for x in jax.tree.leaves(frozen["teacher"])}
      assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs)
    batch = next(data_lib.make_iterator(cfg, tok, split="train"))
    state = init_state(setup)
    _, metrics = compile_train_step(setup)(state, host_to_global(batch, setup.mesh, setup.batch_sharding), frozen)
    losses.append({k: float(metrics[k]) for k in ("loss", "ce", "distill_kl")})
  for k in losses[0]:
    np.testing.assert_allclose(losses[1][k], losses[0][k], rtol=2e-5)
