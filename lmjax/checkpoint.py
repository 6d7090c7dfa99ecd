"""Checkpoints: an Orbax CheckpointManager around everything a resume needs.

Each step directory holds three items:
  ``state``  parameters, optimizer state and step (Orbax PyTree, restored directly sharded
             onto whatever mesh the abstract target names);
  ``data``   the Grain iterator's position, one JSON file per process;
  ``config`` the resolved config as JSON, so a run can be inspected without its config file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp

FORMAT_VERSION = 1


class Checkpointer:
  """Saves every ``train.checkpoint_every`` steps (asynchronously), keeps the newest K."""

  def __init__(self, directory: str | Path, cfg: ml_collections.ConfigDict):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=cfg.train.keep_checkpoints,
        enable_async_checkpointing=cfg.train.async_checkpointing,
        create=True,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "config"),
        metadata={"format_version": FORMAT_VERSION})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_iterator: Any, cfg: ml_collections.ConfigDict) -> bool:
    """Starts saving ``state`` at ``step``; returns once the save no longer needs the arrays."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(json.loads(cfg.to_json())),
    )
    return self.manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any | None = None) -> Any:
    """Restores ``state`` shaped and sharded like ``abstract_state`` and, if given,
    moves ``data_iterator`` to the saved position (in place). Returns the state."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def saved_config(self, step: int) -> dict[str, Any]:
    restored = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return restored["config"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying the target shardings: what a restore should produce."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
