"""A run directory: what it holds and how to read it back.

A run directory (``--workdir``) holds ``config.json``, ``metrics.jsonl``, ``tensorboard/``
and ``checkpoints/<step>/``; a Hugging Face import (``lmjax.hf``) holds a parameters-only
checkpoint and its tokenizer. This module reads them: the saved config, the tokenizer, and
the parameters at a step or the newest usable one, onto any mesh.

  cfg = run_config("runs/tiny")                 # on today's defaults
  step, params, meta = restore_params("runs/tiny", build(cfg))
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import ml_collections

from lmjax import config as config_lib
from lmjax import data as data_lib
from lmjax import storage
from lmjax.checkpoint import Checkpointer, CheckpointError
from lmjax.model import lora

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
# Loading (evaluation, generation, export) needs no pipeline stages and the training layout
# may not fit this machine: a run whose mesh does not fit the devices loads with FSDP over all.
LOAD_MESH = {"data": 1, "stage": 1, "fsdp": -1, "expert": 1, "context": 1, "tensor": 1}


def checkpoint_dir(run: str | os.PathLike) -> os.PathLike:
  """The checkpoint directory of run directory ``run`` (or ``run`` itself if it is one)."""
  run = storage.path(run)
  return run / CHECKPOINTS if (run / CHECKPOINTS).is_dir() else run


def run_config(workdir: str | os.PathLike, step: int | None = None) -> ml_collections.ConfigDict:
  """The config a run was trained with, on today's defaults (fields added since the run
  keep their defaults): the checkpoint's copy (``step`` or the newest), else ``config.json``."""
  storage.check(workdir)  # a bucket URL: reachable, one line if not
  workdir = storage.path(workdir)
  ckpt_dir = workdir / CHECKPOINTS
  if ckpt_dir.is_dir():
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    steps = ckpt.all_steps()
    if steps:
      return config_lib.from_saved(ckpt.saved_config(step if step is not None else steps[-1]))
  if (workdir / CONFIG_FILE).exists():
    return config_lib.from_saved(json.loads((workdir / CONFIG_FILE).read_text()))
  raise FileNotFoundError(f"{workdir} holds no checkpoint and no {CONFIG_FILE}: not an lmjax run")


def run_tokenizer(cfg: ml_collections.ConfigDict) -> data_lib.Tokenizer:
  """The tokenizer a run uses: ``data.tokenizer`` (any kind: a sentencepiece ``.model``, a
  ``tokenizer.json``, a tiktoken file), else a fine-tuning run's pre-trained run's (else a
  DPO run's reference's, a distillation's teacher's), else the one its data source calls for
  (a prepared dataset's, or one trained for the source and cached)."""
  t = cfg.train
  source_run = t.init_from or (t.reference if t.objective == "dpo" else "") or t.teacher
  if source_run and not cfg.data.tokenizer:
    return run_tokenizer(run_config(source_run))
  return data_lib.get_tokenizer(cfg.data, cfg.model.vocab_size)


def check_vocab(cfg: ml_collections.ConfigDict, tokenizer: data_lib.Tokenizer) -> None:
  """Raises ConfigError unless the model's vocabulary is the tokenizer's."""
  if tokenizer.vocab_size != cfg.model.vocab_size:
    raise config_lib.ConfigError(
        f"config.model.vocab_size: {cfg.model.vocab_size} differs from the tokenizer's "
        f"vocabulary size {tokenizer.vocab_size} ({tokenizer.path}); set them equal.")


def loading_config(cfg: ml_collections.ConfigDict, num_devices: int,
                   mesh: dict[str, int] | None = None) -> ml_collections.ConfigDict:
  """``cfg`` with mesh sizes ``mesh`` applied. When none are given, a pipelined run
  (``mesh.stage`` > 1) loads unpipelined, its stages' devices joining FSDP (evaluation and
  generation need no pipeline; generation needs none), and a run whose mesh does not cover
  ``num_devices`` loads on :data:`LOAD_MESH` (parameters restore onto any mesh)."""
  if mesh is None:
    try:
      shape = dict(zip(config_lib.MESH_AXES, config_lib.resolve_mesh_shape(cfg, num_devices)))
      mesh = {"stage": 1, "fsdp": shape["fsdp"] * shape["stage"]} if shape["stage"] > 1 else {}
    except config_lib.ConfigError:
      mesh = LOAD_MESH
  for axis, size in mesh.items():
    cfg.mesh[axis] = size
  return cfg


def restore_params(run: str | os.PathLike, setup: Any, step: int | None = None,
                   warn: Callable[[str], None] = print) -> tuple[int, Any, dict[str, Any]]:
  """Reads the parameters (never the optimizer state) of run ``run`` (a run directory or
  its checkpoint directory) at ``step``, or of the newest usable checkpoint, sharded as
  ``setup``'s; read-only, so safe beside a run that is saving. Returns ``(step, params,
  meta)``; ``meta["params_only"]`` marks imported weights. Raises CheckpointError when
  there is no usable checkpoint (or ``step`` is not one), naming the directory.

  A LoRA setup (``model.lora_rank`` > 0) reading a run without adapters gets the base
  weights alone (its adapters start from their initialisation: :func:`lmjax.model.lora.combine`
  them in); a run with other adapters than ``setup``'s is refused (merge it first)."""
  directory = checkpoint_dir(run)
  ckpt = Checkpointer(directory, read_only=True)
  try:
    abstract = setup.abstract_state["params"]
    steps = ckpt.all_steps()
    if steps:
      abstract = _lora_target(ckpt, step if step in steps else steps[-1], setup, abstract, directory)
    if step is None or step < 0:
      step, state, _ = ckpt.restore_latest(setup.cfg, {"params": abstract}, params_only=True, warn=warn)
      if step is None:
        raise CheckpointError(f"{directory} holds no checkpoint")
      params = state["params"]
    else:
      steps = ckpt.all_steps()
      if step not in steps:
        raise CheckpointError(f"{directory}: step {step} is not among its checkpoints {steps}")
      ckpt.verify(step)
      ckpt.check_compatible(step, setup.cfg, params_only=True)
      params = ckpt.restore_params(step, abstract)
    return step, params, ckpt.meta(step)
  finally:
    ckpt.manager.close()


def _lora_target(ckpt: Checkpointer, step: int, setup: Any, abstract: Any,
                 directory: os.PathLike) -> Any:
  """What to restore of ``step`` into ``setup``'s ``abstract`` params, by their adapters."""
  try:
    saved = lora.Adapters.from_config(config_lib.from_saved(ckpt.saved_config(step)).model)
  except Exception:  # noqa: BLE001 - an unreadable step is the restore's to report
    return abstract
  wanted = lora.Adapters.from_config(setup.cfg.model)
  shape = lambda a: a and (a.rank, frozenset(a.targets))  # what the saved tree holds
  if shape(saved) == shape(wanted):
    return abstract
  if saved is None:  # a run without adapters: its base weights
    return lora.base(abstract)
  run = directory.parent if directory.name == CHECKPOINTS else directory
  raise CheckpointError(
      f"{directory / str(step)} holds LoRA adapters (model.lora_rank={saved.rank}, lora_targets="
      f"{list(saved.targets)}) that this config does not have (model.lora_rank="
      f"{setup.cfg.model.lora_rank}); merge them into a plain run first (python "
      f"tools/merge_lora.py {run} MERGED) and use MERGED, or use the run's own LoRA settings.")
