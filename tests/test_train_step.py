"""The pure train step's loss-spike skipping on real batches: isolated spikes are skipped, and
a lasting new loss level (a data mixture change) is accepted after a bounded run of skips."""

import jax
import numpy as np
import pytest

from lmjax.config import default_config
from lmjax.mesh import host_to_global
from lmjax.state import build, init_state
from lmjax.trainer import compile_train_step

B, T, V = 4, 16, 64


def _cfg():
  c = default_config()
  m = c.model
  m.vocab_size, m.num_layers, m.embed_dim, m.head_dim, m.mlp_dim, m.max_seq_len = V, 1, 32, 8, 64, T
  c.data.seq_len, c.data.global_batch_size = T, B
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 0
  t = c.train
  t.skip_spikes, t.spike_window, t.spike_max_consecutive = True, 4, 3
  return c


def _batch(rng, target):
  """Random inputs, every target ``target``: one token the model learns to predict."""
  return {"inputs": rng.integers(0, V, (B, T), dtype=np.int32),
          "targets": np.full((B, T), target, np.int32),
          "segment_ids": np.ones((B, T), np.int32),
          "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))}


@pytest.fixture(scope="module")
def trained():
  """A step function and a state trained on target 5 until its loss window is full of it."""
  setup = build(_cfg(), jax.devices()[:1])
  step = compile_train_step(setup)
  state, rng = init_state(setup), np.random.default_rng(0)
  for _ in range(12):
    state, m = step(state, host_to_global(_batch(rng, 5), setup.mesh, setup.batch_sharding))
  assert int(state["skipped"]) == 0 and float(m["loss"]) < 1.0
  return setup, step, jax.device_get(state)


def _run(trained, targets):
  """Per step of ``targets`` (one batch each): whether it was skipped, its loss, and the
  parameter norm after it."""
  setup, step, host_state = trained
  state = jax.device_put(host_state, setup.state_shardings)
  rng = np.random.default_rng(1)
  out = []
  for target in targets:
    skipped = int(state["skipped"])
    state, m = step(state, host_to_global(_batch(rng, target), setup.mesh, setup.batch_sharding))
    out.append((int(state["skipped"]) - skipped, float(m["loss"]), float(m["param_norm"])))
  return out


def test_isolated_spikes_are_skipped(trained):
  # Target 7 after training on 5: a loss far above the window's (a bad batch). Runs of
  # spikes shorter than spike_max_consecutive (3) are all skipped; normal batches apply.
  targets = [5, 7, 5, 5, 7, 7, 5, 5, 7, 5]
  out = _run(trained, targets)
  assert [s for s, _, _ in out] == [int(t == 7) for t in targets]
  normal = max(loss for (_, loss, _), t in zip(out, targets) if t == 5)
  for i, t in enumerate(targets):
    if t == 7:  # far above the window, and the parameters untouched
      assert out[i][1] > 2 * normal and out[i][2] == out[i - 1][2]


def test_a_lasting_new_loss_level_is_accepted_after_a_bounded_run_of_skips(trained):
  # The data switches to target 7 for good. The window only learns from applied steps, so
  # without a bound every later step would be a spike, skipped, with the parameters frozen.
  out = _run(trained, [7] * 12)
  skipped = [s for s, _, _ in out]
  assert skipped == [1, 1, 1] + [0] * 9, skipped
  norms = [n for _, _, n in out]
  assert norms[0] == norms[1] == norms[2] != norms[3]  # frozen, then updating again
  assert len(set(norms[3:])) == 9
  losses = [loss for _, loss, _ in out]
  assert losses[-1] < losses[0] - 1  # and the model learns the new level


def test_the_run_of_spikes_is_saved_in_the_state(trained):
  setup, step, host_state = trained
  state = jax.device_put(host_state, setup.state_shardings)
  rng = np.random.default_rng(2)
  runs = []
  for target in (7, 7, 5, 7):
    state, _ = step(state, host_to_global(_batch(rng, target), setup.mesh, setup.batch_sharding))
    runs.append(int(state["spike_run"]))
  assert runs == [1, 2, 0, 1]
  assert set(setup.abstract_state) == set(state)  # saved and restored with the rest


class _Position:
  """The least a data iterator needs to be checkpointed."""
  topology_independent = False

  def __init__(self):
    self.state = {"position": 7}

  def get_state(self):
    return self.state

  def set_state(self, state):
    self.state = state


def test_a_checkpoint_from_before_spike_run_resumes_with_it_at_zero(trained, tmp_path):
  """Checkpoints written before the state had ``spike_run`` still restore (it starts at 0)."""
  from lmjax.checkpoint import Checkpointer
  setup, _, host_state = trained
  cfg = _cfg()
  cfg.train.async_checkpointing = False
  old = {k: v for k, v in jax.device_put(host_state, setup.state_shardings).items() if k != "spike_run"}
  ckpt = Checkpointer(tmp_path / "checkpoints", cfg)
  ckpt.save(12, old, _Position(), cfg)
  ckpt.close()
  position = _Position()
  position.state = {}
  restored = Checkpointer(tmp_path / "checkpoints", cfg).restore(12, setup.abstract_state, position)
  assert int(restored["spike_run"]) == 0 and restored["spike_run"].sharding == setup.state_shardings["spike_run"]
  assert position.state == {"position": 7}
  np.testing.assert_array_equal(jax.device_get(restored["params"])["embed"]["table"],
                                host_state["params"]["embed"]["table"])
