"""DPO (train.objective="dpo") on preference pairs: the row layout, the loss, metrics and
gradient against a direct computation, training that raises the reward margin, and a
bit-exact resume with the reference read again."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lmjax
from lmjax import data as data_lib
from lmjax import frozen as frozen_lib
from lmjax.data import preference
from lmjax.mesh import host_to_global
from lmjax.state import build, init_state
from lmjax.trainer import compile_train_step
from tests import frozen_runs


class _Chars:
  """A tokenizer of one id per character: lengths are easy to reason about."""
  bos_id, eos_id, vocab_size = 1, 2, 64

  def encode(self, text):
    return [3 + ord(c) % 61 for c in text]


PAIRS = [("ab", "cde", "f", "x.jsonl:1"), ("", "gh", "ijkl", "x.jsonl:2")]


def test_each_pair_is_one_row_of_two_segments():
  rows, counts = preference.pack_preferences(PAIRS, _Chars(), 16)
  assert counts == {} and rows["inputs"].shape == (2, 16)
  enc = _Chars().encode
  # Row 0: [bos] a b c d e -> targets a b c d e eos; then [bos] a b f -> a b f eos.
  assert rows["inputs"][0, :9].tolist() == [1] + enc("abcde") + [1] + enc("ab")
  assert rows["targets"][0, :10].tolist() == enc("abcde") + [2] + enc("abf") + [2]
  assert rows["segment_ids"][0].tolist() == [1] * 6 + [2] * 4 + [0] * 6
  assert rows["positions"][0, :10].tolist() == list(range(6)) + list(range(4))
  assert rows["preference"][0].tolist() == [0, 0, 1, 1, 1, 1, 0, 0, -1, -1] + [0] * 6
  np.testing.assert_array_equal(rows["weights"], np.abs(rows["preference"]))
  assert rows["preference"][1, :8].tolist() == [1, 1, 1, -1, -1, -1, -1, -1]  # no prompt
  # Within a segment the targets are the next inputs.
  seg = rows["segment_ids"][0]
  for s in (1, 2):
    i = np.flatnonzero(seg == s)
    assert rows["targets"][0, i[:-1]].tolist() == rows["inputs"][0, i[1:]].tolist()


def test_long_pairs_are_cut_skipped_or_refused():
  long = [("abcdefghijkl", "mnopqrstuvwx", "yz", "f.jsonl:7")]  # 2*12 + 13 + 3 = 40 > 16
  rows, counts = preference.pack_preferences(long, _Chars(), 16, "truncate")
  assert counts == {"truncated": 1}
  pref, seg = rows["preference"][0], rows["segment_ids"][0]
  # Each response keeps at least a quarter of the row (4) before the prompt is cut to
  # (16 - 4 - 3) // 2 = 4 tokens, its tail; the chosen one takes what the rejected one leaves.
  assert np.sum(pref > 0) == 5 and np.sum(pref < 0) == 3  # 16 - 2 * 4 - 3; all of "yz" + eos
  assert (seg == 1).sum() == 9 and (seg == 2).sum() == 7
  enc = _Chars().encode
  assert rows["inputs"][0, :5].tolist() == [1] + enc("ijkl")  # bos and the prompt's tail
  assert rows["targets"][0, 4:9].tolist() == enc("mnopq")  # the chosen response's start, no eos
  assert rows["targets"][0, 13:16].tolist() == enc("yz") + [2]
  rows, counts = preference.pack_preferences(long + PAIRS, _Chars(), 16, "skip")
  assert counts == {"long_document": 1} and len(rows["inputs"]) == 2
  with pytest.raises(data_lib.DataError, match=r"^f.jsonl:7: the pair takes 40 tokens"):
    preference.pack_preferences(long, _Chars(), 16, "fail")


def test_pairs_stay_whole_in_microbatches_and_bad_lines_are_named(tmp_path):
  cfg = frozen_runs.tiny_cfg(1)
  cfg.data.format, cfg.train.objective, cfg.train.init_from = "preference", "dpo", "unused"
  cfg.data.source = frozen_runs.preference_file(tmp_path / "p.jsonl", 20)
  cfg.data.global_batch_size, cfg.data.eval_fraction, cfg.optim.grad_accum_steps = 4, 0.25, 2
  batch = next(data_lib.make_iterator(cfg, _Chars(), split="train"))
  # The train step's split into microbatches (lmjax.trainer.train_step): rows move whole.
  accum = cfg.optim.grad_accum_steps
  micro = batch["preference"].reshape(4 // accum, accum, -1).swapaxes(0, 1)
  for mb in micro:
    for row in mb:
      assert (row > 0).any() and (row < 0).any()
  evals = list(data_lib.make_iterator(cfg, _Chars(), split="eval"))  # 5 pairs, once
  assert len(evals) == 2 and evals[1]["segment_ids"][1:].sum() == 0  # padded with empty rows
  it = data_lib.make_iterator(cfg, _Chars(), split="train")
  want = [next(it)["inputs"] for _ in range(5)]
  again = data_lib.make_iterator(cfg, _Chars(), split="train")
  next(again), next(again)
  resumed = data_lib.make_iterator(cfg, _Chars(), split="train")
  resumed.set_state(json.loads(json.dumps(again.get_state())))
  for k in range(2, 5):
    np.testing.assert_array_equal(next(resumed)["inputs"], want[k])
  (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n'
                                      '{"prompt": "a", "chosen": "b"}\n')
  cfg.data.source = str(tmp_path / "bad.jsonl")
  with pytest.raises(data_lib.DataError, match=r"bad.jsonl:2: expected a JSON object"):
    data_lib.make_iterator(cfg, _Chars(), split="train")


def _direct_logprobs(setup, params, batch):
  """Per-token log-probabilities of the targets from the whole logits (no chunking)."""
  model = setup.model(params)
  logits = model(jnp.asarray(batch["inputs"]), jnp.asarray(batch["positions"]),
                 jnp.asarray(batch["segment_ids"]))
  return jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(batch["targets"])[..., None], -1)[..., 0]


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_dpo_loss_metrics_and_gradient_equal_a_direct_computation(accum):
  cfg = frozen_runs.tiny_cfg(1)
  cfg.model.vocab_size, cfg.model.loss_chunk, cfg.data.seq_len = 64, 8, 16
  cfg.data.format, cfg.train.objective, cfg.train.init_from = "preference", "dpo", "unused"
  cfg.data.global_batch_size, cfg.optim.grad_accum_steps, cfg.train.dpo_beta = 4, accum, 0.5
  cfg.optim.grad_clip_norm = 0.0
  pairs = PAIRS + [("hi", "there", "you", "x:3"), ("q", "r", "stuvw", "x:4")]
  batch, _ = preference.pack_preferences(pairs, _Chars(), 16)
  ref_cfg = frozen_runs.tiny_cfg(1, layers=1)  # another shape than the policy's
  ref_cfg.model.vocab_size, ref_cfg.seed = 64, 7
  setup = frozen_lib.with_frozen(build(cfg, jax.devices()[:1]), ref_cfg, "reference")
  policy = init_state(setup)
  reference = init_state(build(ref_cfg, jax.devices()[:1]))["params"]
  # Distinct models: perturb the policy so that the margins are not zero.
  policy["params"] = jax.tree.map(lambda p: p * 1.3, policy["params"])
  ref_setup = build(ref_cfg, jax.devices()[:1])
  pref = batch["preference"]
  beta = 0.5

  def direct(params):
    pol = _direct_logprobs(setup, params, batch)
    ref = _direct_logprobs(ref_setup, reference, batch)
    chosen = beta * jnp.sum(jnp.where(pref > 0, pol - ref, 0.0), axis=1)
    rejected = beta * jnp.sum(jnp.where(pref < 0, pol - ref, 0.0), axis=1)
    return jnp.mean(-jax.nn.log_sigmoid(chosen - rejected)), (chosen, rejected)

  (want_loss, (chosen, rejected)), want_grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(policy["params"])
  chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
  margin = chosen - rejected
  assert np.all(np.abs(margin) > 1e-3)
  np.testing.assert_allclose(want_loss, np.mean(np.log1p(np.exp(-margin))), rtol=1e-5)

  frozen = {"reference": reference}
  grads = jax.jit(lambda p, b: frozen_lib.dpo_grads(setup, p, b, reference)[1])(policy["params"], batch)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(np.asarray(got) / len(pairs), want, rtol=2e-4, atol=1e-7)
  # The eval metrics are the same quantities.
  evals = frozen_lib.evaluate(setup, policy["params"], frozen, [batch], None)
  want = {"loss": want_loss, "chosen_reward": np.mean(chosen), "rejected_reward": np.mean(rejected),
          "reward_margin": np.mean(margin), "reward_accuracy": np.mean(margin > 0)}
  for k, v in want.items():
    np.testing.assert_allclose(evals[f"eval_{k}"], v, rtol=1e-4, atol=1e-6)
  _, m = compile_train_step(setup)(policy, host_to_global(batch, setup.mesh, setup.batch_sharding), frozen)
  for k, v in want.items():
    np.testing.assert_allclose(m[k], v, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  return frozen_runs.pretrained(tmp_path_factory)


def _dpo_cfg(pretrained, source, steps):
  cfg = frozen_runs.tiny_cfg(steps)
  cfg.data.format, cfg.data.source, cfg.data.eval_fraction = "preference", source, 0.25
  cfg.train.objective, cfg.train.init_from = "dpo", pretrained
  cfg.optim.learning_rate = 3e-3
  return cfg


@pytest.mark.slow
def test_dpo_raises_the_reward_margin_on_train_and_held_out_pairs(pretrained, tmp_path):
  cfg = _dpo_cfg(pretrained, frozen_runs.preference_file(tmp_path / "p.jsonl"), 30)
  cfg.train.log_every, cfg.train.eval_every = 1, 15
  history = lmjax.train(cfg, tmp_path / "dpo")
  first, mid, last = history[0], history[14], history[-1]
  # The first step's policy is the reference: every reward 0, the loss log 2.
  np.testing.assert_allclose(first["loss"], np.log(2), rtol=1e-5)
  assert first["reward_margin"] == 0 and first["reward_accuracy"] == 0
  assert last["reward_margin"] > 0.5 and last["reward_accuracy"] == 1.0 and last["loss"] < 0.5
  assert last["chosen_reward"] > 0 > last["rejected_reward"] or last["chosen_reward"] > last["rejected_reward"]
  assert 0 < mid["eval_reward_margin"] < last["eval_reward_margin"]
  assert last["eval_reward_accuracy"] == 1.0 and last["eval_loss"] < mid["eval_loss"] < np.log(2)


@pytest.mark.slow
def test_dpo_resumes_bit_exactly_with_the_reference_read_again(pretrained, tmp_path):
  source = frozen_runs.preference_file(tmp_path / "p.jsonl")
  cfg = _dpo_cfg(pretrained, source, 8)
  cfg.train.log_every, cfg.train.checkpoint_every, cfg.optim.grad_accum_steps = 1, 4, 2
  cfg.mesh.fsdp, cfg.mesh.tensor = 4, 2  # 8 rows: 2 microbatches over 4 batch shards
  cfg.optim.schedule = "constant"  # the same schedule whether the run stops at 4 or 8
  straight = lmjax.train(cfg, tmp_path / "straight")
  cfg.train.steps = 4
  lmjax.train(cfg, tmp_path / "resumed")
  cfg.train.steps = 8
  resumed = lmjax.train(cfg, tmp_path / "resumed")
  assert [r["step"] for r in resumed] == [5, 6, 7, 8]
  for a, b in zip(straight[4:], resumed):
    for k in ("loss", "reward_margin", "chosen_reward", "rejected_reward", "grad_norm"):
      assert a[k] == b[k], k
  p1, p2 = lmjax.load(tmp_path / "straight").params, lmjax.load(tmp_path / "resumed").params
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
