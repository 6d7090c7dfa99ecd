"""The device mesh, the logical-axis rules table, and helpers that shard pytrees.

Model code names array axes logically (``"embed"``, ``"mlp"``, ``"act_batch"`` ...).
:data:`RULES` is the one table that maps those names onto the mesh axes
``data``, ``stage``, ``fsdp``, ``expert`` and ``tensor``: an activation name ``act_X`` without a rule
follows ``X``, and a name without any rule is replicated. ``config.mesh.rules`` overrides
entries (overriding ``heads`` also moves ``act_heads``, unless that is overridden too).

A logical axis whose mesh axes do not divide the array dimension is replicated
along that dimension (e.g. 2 KV heads on a 4-way ``tensor`` axis), so every
config runs on every mesh; the math never depends on the layout.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections

from lmjax.config import MESH_AXES, ConfigError, resolve_mesh_shape

MeshAxes = str | tuple[str, ...] | None

# logical name -> mesh axes: parameters, then activations ("act_" prefix). An activation
# name act_X without a rule of its own follows X's (act_vocab, act_heads, act_kv_heads,
# act_mlp); a known name without any rule (head_dim, norm, act_seq) is replicated.
RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("layers", "stage"),  # stacked-block axis: contiguous groups of layers per pipeline stage
    ("stage", "stage"),  # the stage axis of pipelined parameters and activations
    ("vocab", "tensor"),
    ("embed", ("fsdp", "context")),  # context devices share the weights' storage like FSDP
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("experts", "expert"),  # a MoE layer's experts; tokens travel to them (lmjax.model.moe)
    ("act_batch", ("data", "stage", "fsdp", "expert")),  # inside the pipeline, "stage" is taken
    ("act_seq", "context"),  # context parallelism: every activation's sequence (lmjax.model.context)
    ("act_res_seq", "context"),  # the residual stream's; + tensor with mesh.sequence_parallel
    ("act_embed", None),  # the residual stream stays whole (FSDP splits only the weights)
)
# Every logical name model code uses, ruled or not; anything else is a typo.
LOGICAL_AXES = ("layers", "stage", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp",
                "experts", "norm", "act_batch", "act_seq", "act_res_seq", "act_embed", "act_heads", "act_kv_heads",
                "act_mlp", "act_vocab")


def make_rules(overrides: Sequence[tuple[str, Any]] = ()) -> dict[str, MeshAxes]:
  """Every logical name's mesh axes: its rule in ``overrides`` or :data:`RULES`, else for
  act_X the rule X ends up with, else None (replicated). An unknown name is an error.

  >>> make_rules((("heads", None),))["act_heads"]  # None: act_heads follows heads
  """
  table = dict(RULES)
  for i, (name, axes) in enumerate(overrides):
    if name not in LOGICAL_AXES:
      raise ConfigError(f"config.mesh.rules[{i}]: unknown logical axis {name!r}; known: "
                        f"{', '.join(LOGICAL_AXES)}.")
    table[name] = tuple(axes) if isinstance(axes, list) else axes
  return {name: table[name] if name in table else table.get(name.removeprefix("act_"))
          for name in LOGICAL_AXES}


UNCONSTRAINED = P.UNCONSTRAINED  # a logical-axes entry that leaves the dimension to the compiler

_current_rules: contextvars.ContextVar[dict[str, MeshAxes]] = contextvars.ContextVar(
    "lmjax_rules", default=make_rules())
# Mesh axes a surrounding vmap already maps over (spmd_axis_name), e.g. inside pipeline stages.
_taken_axes: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "lmjax_taken_axes", default=())


def rules_from_config(cfg: ml_collections.ConfigDict) -> dict[str, MeshAxes]:
  """:func:`make_rules` with ``config.mesh.rules`` as the overrides; with
  ``mesh.sequence_parallel`` the residual stream's sequence also splits over ``tensor``."""
  rules = make_rules(cfg.mesh.rules)
  if cfg.mesh.get("sequence_parallel") and "act_res_seq" not in dict(cfg.mesh.rules):
    seq = rules["act_res_seq"]
    seq = () if seq is None else (seq,) if isinstance(seq, str) else tuple(seq)
    rules["act_res_seq"] = tuple(a for a in seq if a != "tensor") + ("tensor",)
  return rules


@contextlib.contextmanager
def use_rules(rules: dict[str, MeshAxes]) -> Iterator[None]:
  """Makes ``rules`` the table that :func:`constrain` uses while tracing."""
  token = _current_rules.set(dict(rules))
  try:
    yield
  finally:
    _current_rules.reset(token)


@contextlib.contextmanager
def axes_taken(logical_name: str) -> Iterator[tuple[str, ...]]:
  """Within the block, :func:`constrain` leaves out the mesh axes of ``logical_name``
  (a surrounding ``vmap(..., spmd_axis_name=...)`` owns them). Yields those mesh axes."""
  axes = mesh_axes(logical_name)
  token = _taken_axes.set(_taken_axes.get() + axes)
  try:
    yield axes
  finally:
    _taken_axes.reset(token)


def mesh_rules() -> dict[str, MeshAxes]:
  """The rules table :func:`constrain` uses now (see :func:`use_rules`)."""
  return _current_rules.get()


def mesh_axes(logical_name: str) -> tuple[str, ...]:
  """The mesh axes the current rules map ``logical_name`` to."""
  axes = _current_rules.get().get(logical_name)
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with axes (data, stage, fsdp, expert, tensor) sized from ``config.mesh``; with
  ``mesh.dcn_data``/``mesh.dcn_fsdp`` > 1 a hybrid mesh whose outer groups of those axes
  span slices or nodes."""
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(cfg, len(devices))
  types = (AxisType.Auto,) * len(MESH_AXES)
  dcn = tuple(cfg.mesh.get(f"dcn_{a}", 1) for a in MESH_AXES)
  if math.prod(dcn) == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
  # Several slices (TPU) or nodes/processes (GPU, CPU): the dcn part of an axis crosses
  # them, the rest stays on the fast interconnect inside one.
  from jax.experimental import mesh_utils
  ici = tuple(s // d for s, d in zip(shape, dcn))
  granule_is_process = not hasattr(devices[0], "slice_index") or devices[0].platform != "tpu"
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=granule_is_process)
  return Mesh(grid, MESH_AXES, axis_types=types)


def logical_to_spec(logical_axes: Sequence[Any], rules: dict[str, MeshAxes],
                    shape: Sequence[int] | None = None,
                    mesh_shape: dict[str, int] | None = None,
                    exclude: Sequence[str] = ()) -> P:
  """Maps logical axis names to a PartitionSpec with ``rules``.

  With ``shape`` and ``mesh_shape``, mesh axes that do not divide a dimension are
  dropped (that dimension is replicated). A mesh axis is used at most once (first come,
  first served) and never if it is in ``exclude``.
  """
  used: set[str] = set(exclude)
  spec = []
  for i, name in enumerate(logical_axes):
    if name is None or name is UNCONSTRAINED:
      spec.append(name)
      continue
    if name not in rules:
      raise ConfigError(f"config.mesh.rules: no rule for logical axis {name!r}; "
                        f"known: {sorted(rules)}.")
    axes = rules[name]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used)
    if shape is not None and mesh_shape is not None:
      kept = []
      for a in axes:
        if shape[i] % (math.prod(mesh_shape[k] for k in kept) * mesh_shape[a]) == 0:
          kept.append(a)
      axes = tuple(a for a in kept if mesh_shape[a] > 1)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*spec)


def tree_shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh,
                   rules: dict[str, MeshAxes]) -> Any:
  """NamedShardings for ``abstract_tree`` from a matching tree of logical-axis tuples."""
  mesh_shape = dict(mesh.shape)

  def one(axes, x):
    return NamedSharding(mesh, logical_to_spec(axes, rules, x.shape, mesh_shape))

  return jax.tree.map(one, logical_tree, abstract_tree,
                      is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x))


def activation_spec(shape: Sequence[int], logical_axes: Sequence[Any]) -> P:
  """The PartitionSpec :func:`constrain` gives an activation of ``shape`` under the current
  mesh and rules, leaving out axes a surrounding ``vmap`` owns (see :func:`axes_taken`)."""
  mesh = jax.sharding.get_abstract_mesh()
  return logical_to_spec(logical_axes, _current_rules.get(), shape, dict(mesh.shape),
                         exclude=_taken_axes.get())


def activation_axes(shape: Sequence[int], logical_axes: Sequence[Any]) -> list[tuple[str, ...]]:
  """Per dimension of an activation of ``shape``, the mesh axes :func:`constrain` shards it
  over (none outside a mesh), e.g. to split a kernel's inputs the same way in ``shard_map``.

  >>> rows, heads = activation_axes((b, n), ("act_batch", "act_heads"))
  """
  if jax.sharding.get_abstract_mesh().empty:
    return [()] * len(shape)
  return [() if e is None else (e,) if isinstance(e, str) else tuple(e)
          for e in activation_spec(shape, logical_axes)]


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Annotates an activation with its logical axes (a no-op outside a mesh context)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = activation_spec(x.shape, logical_axes)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules: dict[str, MeshAxes], shape: tuple[int, int]) -> NamedSharding:
  """Sharding of a (batch, seq) input array: batch over the ``act_batch`` mesh axes."""
  return NamedSharding(mesh, logical_to_spec(("act_batch", "act_seq"), rules, shape, dict(mesh.shape)))


def host_to_global(batch: dict[str, np.ndarray], mesh: Mesh,
                   sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles process-local batch rows into global arrays sharded over the mesh."""
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
