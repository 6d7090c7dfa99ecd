"""The model's own view of ``config.model``: a frozen, hashable dataclass built once.

The fields are exactly the keys of ``lmjax.config.default_config().model`` (see there for
what each one means); their defaults live there and nowhere else. Being hashable, a
:class:`ModelConfig` makes the model's ``nnx.GraphDef`` hashable too, so two models built
from equal configs share compiled programs (a GraphDef is a valid static jit argument).

  >>> cfg = ModelConfig.from_config(default_config().model)  # a ConfigDict or a dict
  >>> cfg.num_heads, hash(cfg) == hash(ModelConfig.from_config(cfg))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """``config.model``, frozen. Dimension letters as in shape comments.

  >>> ModelConfig.from_config(default_config().model).head_dim  # 32
  """
  vocab_size: int  # v
  num_layers: int  # l
  embed_dim: int  # d
  num_heads: int  # n
  num_kv_heads: int  # k
  head_dim: int  # h
  mlp_dim: int  # f
  max_seq_len: int
  rope_theta: float
  rope_scaling: str
  rope_scaling_factor: float
  rope_low_freq_factor: float
  rope_high_freq_factor: float
  rope_original_max_len: int
  rope_beta_fast: float
  rope_beta_slow: float
  rope_truncate: bool
  rope_attention_factor: float
  rope_mscale: float
  rope_mscale_all_dim: float
  position_embedding: str
  norm: str
  norm_eps: float
  mlp: str
  attention_bias: bool
  mlp_bias: bool
  sliding_window: int
  tie_embeddings: bool
  param_dtype: str
  compute_dtype: str
  remat: str
  scan_layers: bool
  pipeline_microbatches: int
  pipeline_repeats: int
  pipeline_schedule: str
  attention: str
  context_attention: str
  context_load_balance: bool
  quantization: str
  num_experts: int  # E
  experts_per_token: int
  expert_mlp_dim: int
  num_shared_experts: int
  first_dense_layers: int
  moe_every: int
  router: str
  router_scale: float
  capacity_factor: float
  moe_aux_loss: float
  moe_z_loss: float
  router_bias_rate: float
  init_std: float
  causal: bool
  lora_rank: int
  lora_alpha: float
  lora_targets: tuple
  loss_chunk: int

  @property
  def moe_layers(self) -> tuple[int, ...]:
    """Indices of the layers whose feed-forward block is a mixture of experts: after the
    ``first_dense_layers``, every ``moe_every``-th (none for a dense model)."""
    if not self.num_experts:
      return ()
    k, p = self.first_dense_layers, self.moe_every
    return tuple(i for i in range(k, self.num_layers) if (i - k) % p == p - 1)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | ModelConfig) -> ModelConfig:
    """``config.model`` (a ConfigDict or a plain dict, e.g. from a run's ``config.json``)
    as a ModelConfig; a ModelConfig is returned as is. Unknown or missing keys and values
    of the wrong type are errors naming the key."""
    if isinstance(cfg, ModelConfig):
      return cfg
    values = dict(cfg.items())
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    missing = [name for name in fields if name not in values]
    if unknown or missing:
      raise ValueError(f"config.model: unknown keys {unknown}, missing keys {missing}; "
                       f"a model config has exactly the keys of default_config().model.")
    return cls(**{name: _typed(name, values[name], kind) for name, kind in fields.items()})


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": (tuple, list)}


def _typed(name: str, value: Any, kind: str) -> Any:
  """``value`` as field ``name``'s type (``kind``, the annotation's name); an int is also a
  float, nothing else converts."""
  want = _TYPES[kind]
  if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind == "tuple" and isinstance(value, list):  # a saved config.json holds lists
    return tuple(value)
  if not isinstance(value, want) or (kind == "int" and isinstance(value, bool)):
    raise TypeError(f"config.model.{name}: expected {kind}, got {value!r} "
                    f"({type(value).__name__}).")
  return value
