"""Checkpoints: an Orbax CheckpointManager around everything a resume needs.

Each step directory holds four items, committed together by Orbax's atomic rename (a save
killed half-way leaves only a ``*.orbax-checkpoint-tmp`` directory, never listed and removed
on the next start):
  ``state``  parameters, optimizer state and step (Orbax PyTree; restored directly sharded
             onto whatever mesh the abstract target names, each device reading its slices);
  ``data``   the data iterator's position: ``global.json`` for prepared data (one state for
             every process, so a resume may use another process count or mesh), else one
             ``process_<i>-of-<n>.json`` per process (raw text);
  ``config`` the resolved config as JSON;
  ``meta``   the checkpoint format version (and, for imported weights, where they came from).
A checkpoint of imported weights (``lmjax.hf``) holds only ``state.params``, ``config`` and
``meta`` (``params_only``): runs load it, evaluate it and fine-tune from it
(``train.init_from``), but it is no run to resume. Once a step is committed, a manifest
(``lmjax_manifest.json``: size and SHA-256 of every file) is added beside them; a restore
checks it, so a truncated or tampered checkpoint is reported and the previous good one used
instead. A training run (writable, process 0) then moves the bad step aside to
``<step>.unusable-<UTC time>``, a name Orbax never lists: its files stay for inspection and
the run writes that step anew. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from lmjax import config as config_lib
from lmjax import storage
from lmjax.data import DataError

FORMAT_VERSION = 1
MANIFEST = "lmjax_manifest.json"
# Config fields that change the shape of the saved state: a mismatch is an error, not a
# reason to fall back to an older checkpoint.
SHAPE_KEYS = ("vocab_size", "num_layers", "embed_dim", "num_heads", "num_kv_heads", "head_dim",
              "mlp_dim", "tie_embeddings", "param_dtype", "num_experts", "expert_mlp_dim",
              "num_shared_experts", "first_dense_layers", "moe_every", "router")
UNUSABLE = ".unusable-"  # checkpoints/<step>.unusable-<UTC time>: a bad step, moved aside
ADDED_LATER = ("spike_run",)  # train-state fields older checkpoints lack: restored as zeros


def _drop_read_only_notice(record: logging.LogRecord) -> bool:
  """Orbax warns "Given directory is read only" on every read-only manager (each eval,
  generate and load); that one message alone is dropped."""
  return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_drop_read_only_notice)


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message names the step, the file and the problem."""


class Checkpointer:
  """Saves every ``train.checkpoint_every`` steps (asynchronously); keeps the newest
  ``train.keep_checkpoints`` plus every ``train.keep_every``-th step."""

  def __init__(self, directory: str | os.PathLike, cfg: ml_collections.ConfigDict | None = None,
               read_only: bool = False):
    """``read_only`` (loading, inspecting, fine-tuning from a run): never writes, deletes
    or cleans up, so it is safe beside a run that is saving."""
    self.directory = storage.absolute(directory)
    self.read_only = read_only
    t = cfg.train if cfg is not None else None
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else t.keep_checkpoints,
        keep_period=None if read_only or t.keep_every <= 0 else t.keep_every,
        enable_async_checkpointing=False if read_only else t.async_checkpointing,
        save_interval_steps=0 if read_only else 1,  # else Orbax sets it, with a warning
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "config", "meta"))
    self._in_flight: int | None = None

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, cfg: ml_collections.ConfigDict) -> float:
    """Starts saving ``state`` at ``step``; returns the seconds the caller was blocked
    (waiting for the previous save, copying arrays off the devices, writing manifests)."""
    start = time.perf_counter()
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=DataSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(cfg.to_json())),
        meta=ocp.args.JsonSave({"format_version": FORMAT_VERSION, "step": step}),
    )
    self.wait()  # the previous save: a failure there is reported as that step's
    with self._saving(step):
      self.manager.save(step, args=args, force=True)
      self._in_flight = step
    return time.perf_counter() - start

  def save_params(self, step: int, params: Any, cfg: ml_collections.ConfigDict,
                  source: str = "") -> None:
    """Saves parameters alone (no optimizer state, no data position) at ``step`` and waits
    for them to be committed: a checkpoint to load or fine-tune from, not to resume."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params}),
        config=ocp.args.JsonSave(json.loads(cfg.to_json())),
        meta=ocp.args.JsonSave({"format_version": FORMAT_VERSION, "step": step,
                                "params_only": True, "source": source}),
    )
    self.manager.save(step, args=args, force=True)
    self.wait()

  def wait(self) -> None:
    with self._saving(self._in_flight):
      self.manager.wait_until_finished()
      self._in_flight = None
      self._write_manifests()

  @contextlib.contextmanager
  def _saving(self, step: int | None):
    """Turns a failed save of ``step`` (the store still failing after the retries of
    :mod:`lmjax.orbax_s3` and :func:`lmjax.storage.configure`) into one CheckpointError. The
    step is left unfinished: never listed, never resumed from."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - every failure to write is reported alike
      what = f"checkpoint step {step} in {self._step_dir(step)}" if step is not None else \
          f"a checkpoint in {self.directory}"
      cause = re.sub(r" \[[\w-]+='.*?'\]", "", (str(e).strip() or repr(e)).splitlines()[0])
      raise CheckpointError(f"saving {what} failed ({type(e).__name__}: {cause[:300]}); rerun "
                            "the same command to resume from the newest whole checkpoint") from e

  def close(self) -> None:
    self.wait()
    self.manager.close()

  # -- integrity -------------------------------------------------------------------------

  def _step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def _write_manifests(self) -> None:
    """Adds a manifest to every committed step that lacks one (process 0 writes)."""
    if jax.process_index() != 0 or self.read_only:
      return
    for step in self.all_steps():
      path = self._step_dir(step)
      if step == self._in_flight or not path.is_dir() or (path / MANIFEST).exists():
        continue
      files = {name: [size, digest or _sha256(path / name)]
               for name, (size, digest) in sorted(storage.files(path).items())}
      storage.write_text(path / MANIFEST, json.dumps(
          {"format_version": FORMAT_VERSION, "step": step, "files": files}))

  def verify(self, step: int) -> bool:
    """Checks ``step`` against its manifest; raises CheckpointError naming the first bad
    file. Returns False if the step has no manifest yet (killed right after its commit)."""
    path = self._step_dir(step)
    manifest = path / MANIFEST
    if not manifest.exists():
      return False
    try:
      files = json.loads(manifest.read_text())["files"]
      files = {str(name): (int(size), str(digest)) for name, (size, digest) in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      raise CheckpointError(f"{manifest}: unreadable manifest ({type(e).__name__}: {e})") from None
    present = storage.files(path)
    for name, (size, digest) in files.items():
      f = path / name
      if name not in present:
        raise CheckpointError(f"{f}: missing (listed in {MANIFEST})")
      found, checksum = present[name]
      if found != size:
        raise CheckpointError(f"{f}: {found} bytes, expected {size} (truncated?)")
      if (checksum or _sha256(f)) != digest:
        raise CheckpointError(f"{f}: contents differ from the manifest's checksum (corrupted)")
    return True

  # -- restoring -------------------------------------------------------------------------

  def saved_config(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def meta(self, step: int) -> dict[str, Any]:
    """The step's ``meta`` item: format version, step, and ``params_only`` / ``source``
    for imported weights."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any unreadable item makes the step unusable
      raise CheckpointError(f"{self._step_dir(step)}: cannot read its format version ({e})") from None

  def check_compatible(self, step: int, cfg: ml_collections.ConfigDict,
                       params_only: bool = False) -> None:
    """Raises CheckpointError if ``step`` was written by another format, model shape or
    optimizer (``optim.name``, when a whole train state is needed), or holds parameters alone
    (imported weights) when a whole train state is needed (``params_only=False``)."""
    meta = self.meta(step)
    if meta.get("format_version") != FORMAT_VERSION:
      raise IncompatibleCheckpoint(
          f"{self._step_dir(step)} has checkpoint format {meta.get('format_version')}; this "
          f"lmjax reads format {FORMAT_VERSION}.")
    saved_config = self.saved_config(step)
    saved = saved_config["model"]
    # Parameters alone restore into any dtype (Orbax casts); a whole train state does not.
    keys = [k for k in SHAPE_KEYS if not (params_only and k == "param_dtype")]
    default = config_lib.default_config().model  # for keys older checkpoints' configs lack
    diffs = [f"model.{k}: checkpoint {saved.get(k, default[k])!r}, config {cfg.model[k]!r}"
             for k in keys if saved.get(k, default[k]) != cfg.model[k]]
    # LoRA adapters are parameters too (a params-only read takes what it needs: rundir)
    rank = lambda m: m.get("lora_rank", 0)
    lora = lambda m: (rank(m), sorted(m.get("lora_targets", ())) if rank(m) else [])
    if not params_only and lora(saved) != lora(cfg.model):
      diffs.append(f"model.lora_rank, lora_targets: checkpoint {lora(saved)}, config {lora(cfg.model)}")
    if diffs:
      raise IncompatibleCheckpoint(
          f"{self._step_dir(step)} holds a different model ({'; '.join(diffs)}). Use the "
          f"checkpoint's config, or a new workdir to start afresh.")
    run = self.directory.parent if self.directory.name == "checkpoints" else self.directory
    optimizer = saved_config.get("optim", {}).get("name", "adamw")
    if not params_only and not meta.get("params_only") and optimizer != cfg.optim.name:
      raise IncompatibleCheckpoint(
          f"{self._step_dir(step)} holds {optimizer} optimizer state, but config.optim.name is "
          f"{cfg.optim.name!r}. Resume with --config.optim.name={optimizer}, or train from its "
          f"parameters in a new --workdir with --config.train.init_from={run}.")
    if meta.get("params_only") and not params_only:
      raise IncompatibleCheckpoint(
          f"{self._step_dir(step)} holds parameters only (imported from "
          f"{meta.get('source') or 'elsewhere'}), not a run to resume: train from it in a new "
          f"--workdir with --config.train.init_from={run}.")

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    """Restores ``state`` shaped and sharded like ``abstract_state`` and, if given,
    moves ``data_iterator`` to the saved position (in place). Returns the state."""
    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(self._step_dir(step) / "state"))
    later = [k for k in ADDED_LATER if k in abstract_state and k not in saved]
    target = {k: v for k, v in abstract_state.items() if k not in later}
    items = {"state": ocp.args.StandardRestore(target)}
    if data_iterator is not None:
      items["data"] = DataRestore(data_iterator)
    state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    for k in later:  # a field newer than the checkpoint starts at zero
      x = abstract_state[k]
      state[k] = jax.device_put(np.zeros(x.shape, x.dtype), x.sharding)
    return state

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the parameters of ``step``, shaped and sharded like ``abstract_params`` (the
    optimizer state is not read): the start of a fine-tuning run."""
    item = {"params": abstract_params}
    restore_args = ocp.checkpoint_utils.construct_restore_args(item)
    args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]["params"]

  def restore_latest(self, cfg: ml_collections.ConfigDict, abstract_state: Any,
                     make_iterator: Callable[[], Any] | None = None,
                     warn: Callable[[str], None] = print,
                     params_only: bool = False) -> tuple[int | None, Any, Any]:
    """The newest usable checkpoint: ``(step, state, data_iterator)``, or ``(None, None,
    None)`` if there is none. A step that fails its manifest or cannot be read is reported
    with ``warn`` and the previous one tried; once one restores, the unusable newer ones are
    moved aside (:meth:`_move_aside`) unless read-only. A different model shape or format
    raises, and so does finding no usable step (then nothing is moved).
    ``params_only``: the state is ``{"params": ...}`` alone (read from any checkpoint,
    imported weights included; ``abstract_state`` may then hold just ``params``)."""
    bad: list[tuple[int, str]] = []  # (step, the first line of its error)
    found = None
    try:
      for step in reversed(self.all_steps()):
        try:
          self.verify(step)
          self.check_compatible(step, cfg, params_only)
          if params_only:
            found = step, {"params": self.restore_params(step, abstract_state["params"])}, None
          else:
            iterator = make_iterator() if make_iterator else None
            found = step, self.restore(step, abstract_state, iterator), iterator
          break
        except IncompatibleCheckpoint:
          raise
        except Exception as e:  # noqa: BLE001 - report and fall back to an older step
          bad.append((step, (str(e).strip() or repr(e)).splitlines()[0]))
    finally:
      moved = self._move_aside([s for s, _ in bad]) if found is not None else {}
      for step, e in bad:
        where = f"; moved it aside to {moved[step]} (kept for inspection)" if step in moved else ""
        warn(f"checkpoint step {step} is unusable, {'using' if moved else 'trying'} the previous "
             f"one{where}: {e}")
    if found is None and bad:
      raise CheckpointError(f"no usable checkpoint in {self.directory} (to start afresh, use a "
                            "new --workdir or move its steps elsewhere):\n  "
                            + "\n  ".join(f"step {s}: {e}" for s, e in bad))
    return found or (None, None, None)

  def _move_aside(self, steps: list[int]) -> dict[int, epath.Path]:
    """Renames each of ``steps`` to ``<step>.unusable-<UTC time>``, which Orbax never lists,
    so training can write that step again (else every rerun would stop at it). Process 0
    renames, the others wait for it; read-only checkpointers move nothing. Returns the new
    paths (process 0's; the others learn only the pattern)."""
    if self.read_only:
      return {}
    moved = {}
    if jax.process_index() == 0:
      stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
      for step in steps:
        target = self.directory / f"{step}{UNUSABLE}{stamp}"
        n = 1
        while target.exists():
          target, n = self.directory / f"{step}{UNUSABLE}{stamp}-{n}", n + 1
        storage.move(self._step_dir(step), target)
        moved[step] = target
    else:
      moved = {step: self.directory / f"{step}{UNUSABLE}*" for step in steps}
    if jax.process_count() > 1:  # every process restored, so every process is here
      multihost_utils.sync_global_devices("lmjax_checkpoint_move_aside")
    if steps:
      self.manager.reload()
    return moved


class IncompatibleCheckpoint(CheckpointError):
  """The checkpoint is intact but belongs to another model shape or format version."""


def _sha256(path: epath.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
  return h.hexdigest()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what a restore should produce."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class DataHandler(ocp.CheckpointHandler):
  """Saves a data iterator's JSON state: one global file or one file per process.

  An iterator with ``topology_independent = True`` (prepared data) has one state for all
  processes; process 0 writes it and any process of any process count reads it back.
  Other iterators (raw text) write ``process_<i>-of-<n>.json``, Grain's layout.
  """

  GLOBAL = "global.json"

  def save(self, directory: epath.Path, args: DataSave) -> None:
    state = json.dumps(args.item.get_state(), indent=1)
    if getattr(args.item, "topology_independent", False):
      if jax.process_index() == 0:
        (directory / self.GLOBAL).write_text(state)
    else:
      (directory / _process_file()).write_text(state)

  def restore(self, directory: epath.Path, args: DataRestore) -> Any:
    item = args.item
    elastic = getattr(item, "topology_independent", False)
    saved_global = (directory / self.GLOBAL).exists()
    if elastic != saved_global:
      kinds = ("raw-text (per-process)", "prepared (global)")
      raise DataError(f"{directory}: the data position was saved by a {kinds[saved_global]} "
                      f"iterator but this run reads {kinds[elastic]} data; data.source changed "
                      "kind since the checkpoint. Start a new workdir.")
    path = directory / (self.GLOBAL if elastic else _process_file())
    if not path.exists():
      saved = sorted(p.name for p in directory.iterdir() if p.name.endswith(".json"))
      raise DataError(f"{path} does not exist (saved: {', '.join(saved) or 'nothing'}): raw-text "
                      "data positions are per process, so resume with the process count that "
                      "saved them, or train from a prepared dataset (tools/prepare_data.py), "
                      "whose position any process count can restore.")
    item.set_state(json.loads(path.read_text()))
    return item

  def metadata(self, directory: epath.Path) -> None:
    del directory

  def structure(self, directory: epath.Path) -> None:
    del directory

  def finalize(self, directory: epath.Path) -> None:
    pass

  def close(self) -> None:
    pass


def _process_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any
