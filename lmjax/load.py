"""Load a trained run back, in a notebook or a script, to evaluate it or generate from it.

  run = lmjax.load("runs/tiny")           # newest usable checkpoint
  run.evaluate()                          # held-out loss, perplexity, bits per byte
  run.history[-1]["loss"]                 # the metrics the run wrote
  model = run.model()                     # the Flax NNX module with the trained weights
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections

from lmjax import data as data_lib
from lmjax.checkpoint import Checkpointer, CheckpointError
from lmjax.config import from_saved
from lmjax.metrics import read_metrics


@dataclasses.dataclass
class TrainedRun:
  """A run's config, parameters (sharded on the current devices) and tokenizer."""
  workdir: Path
  step: int
  cfg: ml_collections.ConfigDict
  setup: Any  # lmjax.train.Setup
  params: Any
  tokenizer: Any  # None for imported weights that came without a sentencepiece tokenizer

  @property
  def history(self) -> list[dict[str, float]]:
    return read_metrics(self.workdir)

  def model(self):
    return self.setup.model(self.params)

  def text_tokenizer(self):
    """The tokenizer, or a DataError saying how to give one when the run has none."""
    if self.tokenizer is None:
      raise data_lib.DataError(
          f"{self.workdir} holds imported weights without a sentencepiece tokenizer: import "
          "again with its tokenizer.model beside the weights, pass a config whose "
          "data.tokenizer names one (lmjax.load(workdir, cfg=...); lmjax generate --config), "
          "or work with token ids.")
    return self.tokenizer

  def evaluate(self, source: str | None = None, max_batches: int | None = None) -> dict[str, float]:
    """Loss, perplexity and bits per byte on the run's held-out split, or on every document
    of ``source`` (a file, directory or glob)."""
    from lmjax import evaluate as ev
    self.text_tokenizer()
    if source is None and self.cfg.data.format == "prompt_response":
      from lmjax.data import finetune
      batches = finetune.make_iterator(self.cfg, self.tokenizer, split="eval")
    elif source is None:
      batches = data_lib.make_eval_iterator(self.cfg, self.tokenizer)
    else:
      docs = data_lib.load_documents(source, self.cfg.data.text_field)
      batches = ev.document_batches(docs, self.tokenizer, self.cfg.data.seq_len,
                                    self.cfg.data.global_batch_size)
    return ev.perplexity(self.setup, self.params, self.tokenizer, batches, max_batches)

  def multiple_choice(self, path: str) -> dict[str, float]:
    from lmjax import evaluate as ev
    return ev.multiple_choice(self.setup, self.params, self.text_tokenizer(), ev.read_choices(path))


def run_config(workdir: str | Path, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a run was trained with: the checkpoint's copy, else ``config.json``."""
  workdir = Path(workdir)
  ckpt_dir = workdir / "checkpoints"
  if ckpt_dir.is_dir():
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    steps = ckpt.all_steps()
    if steps:  # on today's defaults: fields added since the run keep their defaults
      return from_saved(ckpt.saved_config(step if step is not None else steps[-1]))
  if (workdir / "config.json").exists():
    return from_saved(json.loads((workdir / "config.json").read_text()))
  raise FileNotFoundError(f"{workdir} holds no checkpoint and no config.json: not an lmjax run")


def run_tokenizer(cfg: ml_collections.ConfigDict):
  """The tokenizer a run uses: ``data.tokenizer``, else a fine-tuning run's pre-trained
  run's, else the one generated for its data source."""
  if cfg.train.init_from and not cfg.data.tokenizer:
    return run_tokenizer(run_config(cfg.train.init_from))
  return data_lib.get_tokenizer(cfg.data, cfg.model.vocab_size)


def load(workdir: str | Path, step: int | None = None, *, cfg: ml_collections.ConfigDict | None = None,
         devices: list[jax.Device] | None = None, mesh: dict[str, int] | None = None) -> TrainedRun:
  """Restores ``workdir``'s newest usable checkpoint (or ``step``) onto ``devices``, read-only
  (safe while the run is still training).

  ``cfg`` defaults to the run's own config. ``mesh`` overrides its mesh sizes (e.g.
  ``{"fsdp": -1}``); by default a run whose mesh does not fit the devices is loaded with FSDP
  over all of them.
  """
  from lmjax.train import build
  workdir = Path(workdir)
  cfg = run_config(workdir, step) if cfg is None else cfg
  devices = jax.devices() if devices is None else list(devices)
  if mesh is None:
    sizes = [cfg.mesh[a] for a in ("data", "stage", "fsdp", "tensor")]
    if -1 not in sizes and jax.numpy.prod(jax.numpy.array(sizes)) != len(devices):
      mesh = {"data": 1, "stage": 1, "fsdp": -1, "tensor": 1}
  for k, v in (mesh or {}).items():
    cfg.mesh[k] = v
  setup = build(cfg, devices)
  ckpt = Checkpointer(workdir / "checkpoints", read_only=True)
  if step is None:  # only the parameters are read, never the optimizer state
    step, state, _ = ckpt.restore_latest(cfg, setup.abstract_state, params_only=True)
    if step is None:
      raise CheckpointError(f"{workdir / 'checkpoints'} holds no checkpoint")
    params = state["params"]
  else:
    ckpt.verify(step)
    ckpt.check_compatible(step, cfg, params_only=True)
    params = ckpt.restore_params(step, setup.abstract_state["params"])
  imported = ckpt.meta(step).get("params_only", False)
  ckpt.manager.close()
  # Imported weights whose tokenizer lmjax cannot read (not sentencepiece) come without one.
  tokenizer = None if imported and not cfg.data.tokenizer else run_tokenizer(cfg)
  return TrainedRun(workdir=workdir, step=step, cfg=cfg, setup=setup, params=params,
                    tokenizer=tokenizer)
