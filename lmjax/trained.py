"""Load a trained run back, in a notebook or a script, to evaluate it or generate from it.

  run = lmjax.load("runs/tiny")           # newest usable checkpoint
  run.evaluate()                          # held-out loss, perplexity, bits per byte
  run.history[-1]["loss"]                 # the metrics the run wrote
  model = run.model()                     # the Flax NNX module with the trained weights
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import ml_collections

from lmjax import data as data_lib
from lmjax import evaluate as ev
from lmjax import rundir, storage
from lmjax.metrics import read_metrics
from lmjax.model.lora import merge_lora
from lmjax.state import Setup, build


@dataclasses.dataclass
class TrainedRun:
  """A run's config, parameters (sharded on the current devices) and tokenizer."""
  workdir: Any
  step: int
  cfg: ml_collections.ConfigDict
  setup: Setup
  params: Any
  tokenizer: Any  # any kind (lmjax.data.Tokenizer); None for imported weights that came without one

  @property
  def history(self) -> list[dict[str, float]]:
    return read_metrics(self.workdir)

  def model(self):
    return self.setup.model(self.params)

  def text_tokenizer(self):
    """The tokenizer, or a DataError saying how to give one when the run has none."""
    if self.tokenizer is None:
      raise data_lib.DataError(
          f"{self.workdir} holds imported weights without a tokenizer: import again with its "
          "tokenizer.json (or tokenizer.model) beside the weights, pass a config whose "
          "data.tokenizer names one (lmjax.load(workdir, cfg=...); lmjax generate --config), "
          "or work with token ids.")
    return self.tokenizer

  def evaluate(self, source: str | None = None, max_batches: int | None = None) -> dict[str, float]:
    """Loss, perplexity and bits per byte on the run's held-out split, or on every document
    of ``source`` (a file, directory or glob)."""
    self.text_tokenizer()
    if source is None:
      batches = data_lib.make_iterator(self.cfg, self.tokenizer, split="eval")
    else:
      docs = data_lib.load_documents(source, self.cfg.data.text_field)
      batches = ev.document_batches(docs, self.tokenizer, self.cfg.data.seq_len,
                                    self.cfg.data.global_batch_size)
    return ev.perplexity(self.setup, self.params, self.tokenizer, batches, max_batches)

  def multiple_choice(self, path: str) -> dict[str, float]:
    return ev.multiple_choice(self.setup, self.params, self.text_tokenizer(), ev.read_choices(path))


def load(workdir: str | os.PathLike, step: int | None = None, *, cfg: ml_collections.ConfigDict | None = None,
         devices: list[jax.Device] | None = None, mesh: dict[str, int] | None = None,
         merge: bool = True) -> TrainedRun:
  """Restores ``workdir``'s newest usable checkpoint (or ``step``) onto ``devices``, read-only
  (safe while the run is still training).

  ``cfg`` defaults to the run's own config. ``mesh`` overrides its mesh sizes (e.g.
  ``{"fsdp": -1}``); by default a pipelined run loads unpipelined (its stages' devices join
  FSDP) and a run whose mesh does not fit the devices is loaded with FSDP over all of them.
  A LoRA run (``model.lora_rank`` > 0) loads with its adapters merged into the weights
  (:func:`lmjax.model.lora.merge_lora`; ``cfg`` then has ``lora_rank`` 0), so evaluating and
  generating cost what the base model does; ``merge=False`` keeps them apart.
  """
  workdir = storage.path(workdir)
  cfg = rundir.run_config(workdir, step) if cfg is None else cfg
  devices = jax.devices() if devices is None else list(devices)
  setup = build(rundir.loading_config(cfg, len(devices), mesh), devices)
  step, params, meta = rundir.restore_params(workdir, setup, step)
  if merge and cfg.model.lora_rank:
    params, merged = merge_lora(params, cfg.model)
    cfg = cfg.copy_and_resolve_references()
    cfg.model = merged
    setup = build(cfg, devices)  # abstract only: the merged params keep their shardings
  # Imported weights that came without a tokenizer have none.
  imported = meta.get("params_only", False)
  tokenizer = None if imported and not cfg.data.tokenizer else rundir.run_tokenizer(cfg)
  return TrainedRun(workdir=workdir, step=step, cfg=cfg, setup=setup, params=params,
                    tokenizer=tokenizer)
