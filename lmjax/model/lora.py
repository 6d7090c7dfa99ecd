"""LoRA (Hu et al. 2021): low-rank adapters on the attention and MLP projections.

For a projection weight W whose leading axes I are its inputs and the rest O its outputs
(q, k, v: (d | n, k, h); o: (n, h | d); gate, up: (d | f); down: (f | d)), an adapter is a
pair A (I..., r), B (r, O...) and the projection becomes ``x W + (alpha / r) (x A) B``,
computed in the compute dtype. A starts as PEFT's default (kaiming-uniform with a = sqrt(5):
uniform in +-1/sqrt(fan_in), fan_in the size of I), B at zero, so a new adapter changes
nothing. A carries W's input axis names and B its output names (the rank axis is
unsharded): each adapter is sharded like its base weight, and stacks along ``layers`` with
its block.

The parameters of a LoRA model are one tree, base weights and adapters (``q_lora_a``,
``q_lora_b`` beside ``q``); :func:`trainable` picks the adapters, :func:`combine` puts a
subset back, :func:`base` drops them, and :func:`merge_lora` folds them into W.

  >>> adapters = trainable(params)                   # {"blocks": {"attn": {"q_lora_a": ...}}}
  >>> params = combine(params, new_adapters)
  >>> merged, model_cfg = merge_lora(params, cfg.model)  # a plain model, lora_rank 0
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax.config_relations import LORA_TARGETS as TARGETS  # q, k, v, o, gate, up, down
from lmjax.mesh import constrain

SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"


@dataclasses.dataclass(frozen=True)
class Adapters:
  """What to adapt: rank r > 0, alpha and the projections (of :data:`TARGETS`).

  >>> Adapters.from_config(cfg.model)  # None when model.lora_rank is 0
  """
  rank: int
  alpha: float
  targets: tuple[str, ...]

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def from_config(cls, m: Any) -> Adapters | None:
    """``config.model``'s adapters (a ConfigDict, dict or ModelConfig), or None."""
    get = (lambda k: getattr(m, k)) if not isinstance(m, Mapping) else m.__getitem__
    rank = int(get("lora_rank"))
    return cls(rank, float(get("lora_alpha")), tuple(get("lora_targets"))) if rank > 0 else None


def attach(module: nnx.Module, rngs: nnx.Rngs, spec: Adapters | None,
           inputs: Mapping[str, int]) -> None:
  """Gives ``module`` an adapter pair ``<name>_lora_a``, ``<name>_lora_b`` for each target
  projection ``name`` of ``inputs`` (name -> how many leading axes of its weight are
  inputs). The adapters' keys are derived from the module's next parameter key without
  drawing it, so the base weights are those of the same model without LoRA."""
  if spec is None:
    return
  for name, n_in in inputs.items():
    if name not in spec.targets:
      continue
    w = getattr(module, name)
    shape, axes = w[...].shape, tuple(w.get_metadata()["out_sharding"])
    stream = rngs.params
    key = jax.random.fold_in(jax.random.fold_in(stream.key[...], stream.count[...]),
                             1000 + TARGETS.index(name))
    bound = 1.0 / math.sqrt(math.prod(shape[:n_in]))  # kaiming-uniform, a = sqrt(5), as PEFT
    a = jax.random.uniform(key, (*shape[:n_in], spec.rank), jnp.float32, -bound, bound)
    b = jnp.zeros((spec.rank, *shape[n_in:]), jnp.float32)
    setattr(module, name + SUFFIX_A, nnx.Param(a.astype(w.dtype), out_sharding=(*axes[:n_in], None),
                                               eager_sharding=False))
    setattr(module, name + SUFFIX_B, nnx.Param(b.astype(w.dtype), out_sharding=(None, *axes[n_in:]),
                                               eager_sharding=False))
  module.lora_scale = spec.scale


def _cast(p: nnx.Param, dtype) -> jax.Array:
  x = p[...]
  if x.dtype == dtype:
    return x
  axes = tuple(p.get_metadata()["out_sharding"])[-x.ndim:]  # a scanned layer's slice has no "layers"
  return constrain(x.astype(dtype), axes)


def add(module: nnx.Module, name: str, eq: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """``y``, the projection ``einsum(eq, x, W)`` of ``module.<name>``, plus its adapter's
  ``(alpha / r) (x A) B`` in ``y``'s dtype (``y`` itself if it has none).

  >>> q = add(self, "q", "btd,dnh->btnh", x, project("btd,dnh->btnh", x, self.q, dt))
  """
  a = getattr(module, name + SUFFIX_A, None)
  if a is None:
    return y
  lhs, out = eq.split("->")
  xs, ws = lhs.split(",")
  assert "r" not in eq, eq
  ins = "".join(c for c in ws if c in xs)
  batch = "".join(c for c in xs if c not in ws)
  dt = y.dtype
  h = jnp.einsum(f"{xs},{ins}r->{batch}r", x.astype(dt), _cast(a, dt))  # (b, t, r)
  h = h * jnp.asarray(module.lora_scale, dt)
  b = _cast(getattr(module, name + SUFFIX_B), dt)
  return y + jnp.einsum(f"{batch}r,r{ws[len(ins):]}->{out}", h, b)  # (b, t, O...)


# -- parameter trees -----------------------------------------------------------------------

def is_adapter(name: str) -> bool:
  return name.endswith(SUFFIX_A) or name.endswith(SUFFIX_B)


def _select(tree: Mapping, keep) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      sub = _select(v, keep)
      if sub:
        out[k] = sub
    elif keep(str(k)):
      out[k] = v
  return out


def has_adapters(params: Mapping) -> bool:
  return bool(_select(params, is_adapter))


def trainable(params: Any) -> Any:
  """The parameters that train: the adapters if ``params`` (a nested dict, or a tree of the
  same structure such as its shardings) holds any, else all of ``params``."""
  adapters = _select(params, is_adapter) if isinstance(params, Mapping) else None
  return adapters if adapters else params


def base(params: Mapping) -> dict:
  """``params`` without the adapters."""
  return _select(params, lambda k: not is_adapter(k))


def combine(params: Any, subset: Any) -> Any:
  """``params`` with the leaves of ``subset`` (a nested dict of some of its keys) put in."""
  if subset is params or not isinstance(subset, Mapping):
    return subset
  out = dict(params)
  for k, v in subset.items():
    out[k] = combine(params[k], v) if isinstance(v, Mapping) and k in params else v
  return out


def merge_lora(params: Mapping, model_cfg: Any) -> tuple[dict, Any]:
  """``(params with W + (alpha / r) A B in place of each adapted W, in float32 and cast to
  W's dtype, and no adapters; model_cfg with lora_rank 0)``. ``model_cfg`` is
  ``config.model`` (a ConfigDict, dict or ModelConfig); a model without adapters comes back
  as it is. Device arrays keep W's sharding.

  >>> merged, m = merge_lora(run.params, run.cfg.model)
  """
  spec = Adapters.from_config(model_cfg)
  if spec is None:
    return dict(params), model_cfg

  def merge(tree: Mapping) -> dict:
    out = {}
    for k, v in tree.items():
      if isinstance(v, Mapping):
        out[k] = merge(v)
      elif is_adapter(k):
        continue
      elif k + SUFFIX_A in tree:
        out[k] = _merged(v, tree[k + SUFFIX_A], tree[k + SUFFIX_B], spec.scale)
      else:
        out[k] = v
    return out

  if isinstance(model_cfg, Mapping) and not hasattr(model_cfg, "unlocked"):
    new_cfg = {**model_cfg, "lora_rank": 0}
  elif hasattr(model_cfg, "unlocked"):  # a ConfigDict
    new_cfg = copy.deepcopy(model_cfg)
    with new_cfg.unlocked():
      new_cfg.lora_rank = 0
  else:
    new_cfg = dataclasses.replace(model_cfg, lora_rank=0)
  return merge(params), new_cfg


def _merged(w: Any, a: Any, b: Any, scale: float) -> Any:
  """W + scale A B: W (l..., I..., O...), A (l..., I..., r), B (l..., r, O...)."""
  lead = a.ndim - 1 + b.ndim - 1 - w.ndim
  letters = "abcdefghijklmnopq"[:w.ndim]
  n_in = a.ndim - 1 - lead
  eq = f"{letters[:lead + n_in]}z,{letters[:lead]}z{letters[lead + n_in:]}->{letters}"

  def f(w, a, b):
    delta = jnp.einsum(eq, a.astype(jnp.float32), b.astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (w.astype(jnp.float32) + np.float32(scale) * delta).astype(w.dtype)

  if isinstance(w, jax.Array):
    return jax.jit(f, out_shardings=w.sharding)(w, a, b)
  return np.asarray(jax.device_get(jax.jit(f)(w, a, b)))
