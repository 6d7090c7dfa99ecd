"""Hugging Face checkpoints in and out: Llama / Mistral-family and GPT-2.

A Hugging Face checkpoint is a directory with ``config.json`` and safetensors weights
(``model.safetensors``, or shards listed in ``model.safetensors.index.json``), as
``save_pretrained`` writes it. :func:`import_checkpoint` turns one into an lmjax run
directory: ``config.json``, the weights as a parameters-only Orbax checkpoint (restored onto
any mesh, sharded as the rules table says), and the ``tokenizer.model`` that came with it::

  hf.import_checkpoint("/models/Mistral-7B-v0.1", "runs/mistral7b")
  run = lmjax.load("runs/mistral7b")                 # evaluate, generate
  # fine-tune: --config.train.init_from=runs/mistral7b in a new --workdir

:func:`export_checkpoint` writes a run's parameters back in the same format, loadable with
``transformers.AutoModelForCausalLM.from_pretrained``. Nothing is downloaded and nothing
needs PyTorch. ``tools/convert_hf.py`` is the command line.

Layouts (HF stores ``nn.Linear`` weights as (out, in), GPT-2's ``Conv1D`` as (in, out)):

=====================  ======================================  ===========================
lmjax                  Llama / Mistral (layer i)               GPT-2 (layer i)
=====================  ======================================  ===========================
embed.table (v, d)     model.embed_tokens.weight               transformer.wte.weight
pos_embed (s, d)       -                                       transformer.wpe.weight
attn.q (d, n, h)       self_attn.q_proj.weight.T               attn.c_attn.weight[:, :d]
attn.k, attn.v         self_attn.{k,v}_proj.weight.T           attn.c_attn.weight[:, d:2d], [2d:]
attn.o (n, h, d)       self_attn.o_proj.weight.T               attn.c_proj.weight
attn_norm, mlp_norm    input_layernorm, post_attention_...     ln_1, ln_2 (weight, bias)
mlp.gate, up, down     mlp.{gate,up,down}_proj.weight.T        -, mlp.c_fc, mlp.c_proj
final_norm             model.norm                              transformer.ln_f
lm_head.table          lm_head.weight (untied)                 lm_head.weight (untied)
=====================  ======================================  ===========================

Llama's RoPE in the Hugging Face layout is the half-split rotation lmjax uses, so q and k
need no permutation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from lmjax import config as config_lib
from lmjax.checkpoint import SHAPE_KEYS, Checkpointer
from lmjax.data.tokenizer import Tokenizer
from lmjax.model import Transformer
from lmjax.rundir import run_config
from lmjax.trained import load

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "gpt2": "GPT2LMHeadModel"}
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER = "tokenizer.model"


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message names the file or field and why."""


# -- configs -------------------------------------------------------------------------------


def read_config(hf_dir: str | Path) -> dict[str, Any]:
  path = Path(hf_dir) / "config.json"
  if not path.is_file():
    raise ConversionError(f"{path}: no such file; a Hugging Face checkpoint directory holds "
                          "config.json and *.safetensors (save_pretrained writes both).")
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ConversionError(f"{path}: not valid JSON ({e}).") from None


def _rope_settings(hf: dict[str, Any]) -> dict[str, Any]:
  """lmjax RoPE fields from ``rope_theta`` + ``rope_scaling`` (transformers 4) or
  ``rope_parameters`` (transformers 5)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or params)
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  out = {"rope_theta": float(theta), "rope_scaling": "none"}
  if kind == "default":
    return out
  if kind == "linear":
    return {**out, "rope_scaling": "linear", "rope_scaling_factor": float(scaling["factor"])}
  if kind == "llama3":
    return {**out, "rope_scaling": "llama3", "rope_scaling_factor": float(scaling["factor"]),
            "rope_low_freq_factor": float(scaling["low_freq_factor"]),
            "rope_high_freq_factor": float(scaling["high_freq_factor"]),
            "rope_original_max_len": int(scaling["original_max_position_embeddings"])}
  raise ConversionError(f"config.json: rope scaling {kind!r} is not supported (lmjax has "
                        "default, linear and llama3 RoPE).")


def _compute_dtype(hf: dict[str, Any]) -> str:
  """bfloat16 compute for checkpoints stored in 16 bits, float32 for float32 ones."""
  dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
  return "bfloat16" if dtype in ("bfloat16", "float16") else "float32"


def config_from_hf(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  """The lmjax config of a Hugging Face ``config.json`` (Llama, Mistral or GPT-2); raises
  ConversionError naming a field lmjax cannot represent."""
  kind = hf.get("model_type")
  cfg = config_lib.default_config()
  m = cfg.model
  if kind in ("llama", "mistral"):
    if hf.get("hidden_act", "silu") != "silu":
      raise ConversionError(f"config.json: hidden_act {hf['hidden_act']!r}; lmjax's SwiGLU uses silu.")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConversionError("config.json: partial_rotary_factor != 1 is not supported.")
    heads = hf["num_attention_heads"]
    m.vocab_size, m.num_layers, m.embed_dim = hf["vocab_size"], hf["num_hidden_layers"], hf["hidden_size"]
    m.num_heads, m.num_kv_heads = heads, hf.get("num_key_value_heads") or heads
    m.head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    m.mlp_dim = hf["intermediate_size"]
    m.max_seq_len = hf.get("max_position_embeddings", 2048)
    m.norm_eps = float(hf.get("rms_norm_eps", 1e-6))
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.attention_bias = bool(hf.get("attention_bias", False))
    m.mlp_bias = bool(hf.get("mlp_bias", False))
    m.sliding_window = int(hf.get("sliding_window") or 0) if kind == "mistral" else 0
    for key, value in _rope_settings(hf).items():
      m[key] = value
  elif kind == "gpt2":
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ConversionError(f"config.json: activation_function {act!r}; lmjax's GELU MLP is the "
                            "tanh approximation (gelu_new).")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
      if hf.get(flag):
        raise ConversionError(f"config.json: {flag}=true is not supported.")
    if not hf.get("scale_attn_weights", True):
      raise ConversionError("config.json: scale_attn_weights=false is not supported.")
    d, heads = hf["n_embd"], hf["n_head"]
    m.vocab_size, m.num_layers, m.embed_dim = hf["vocab_size"], hf["n_layer"], d
    m.num_heads = m.num_kv_heads = heads
    m.head_dim = d // heads
    m.mlp_dim = hf.get("n_inner") or 4 * d
    m.max_seq_len = hf.get("n_positions", 1024)
    m.norm, m.mlp, m.position_embedding = "layernorm", "gelu", "learned"
    m.norm_eps = float(hf.get("layer_norm_epsilon", 1e-5))
    m.attention_bias = m.mlp_bias = True
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", True))
  else:
    raise ConversionError(f"config.json: model_type {kind!r} is not supported; lmjax converts "
                          f"{', '.join(ARCHITECTURES)}.")
  m.compute_dtype = _compute_dtype(hf)
  cfg.data.seq_len = min(cfg.data.seq_len, m.max_seq_len)
  return cfg


def hf_config(cfg: ml_collections.ConfigDict, dtype: str = "float32",
              bos_id: int | None = None, eos_id: int | None = None) -> dict[str, Any]:
  """The Hugging Face ``config.json`` of an lmjax model; ConversionError if no supported
  Hugging Face architecture computes the same function."""
  m = cfg.model
  kind = _hf_kind(m)
  common = {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "vocab_size": m.vocab_size,
            "tie_word_embeddings": m.tie_embeddings, "torch_dtype": dtype,
            "bos_token_id": bos_id, "eos_token_id": eos_id}
  if kind == "gpt2":
    return {**common, "n_embd": m.embed_dim, "n_layer": m.num_layers, "n_head": m.num_heads,
            "n_inner": m.mlp_dim, "n_positions": m.max_seq_len, "activation_function": "gelu_new",
            "layer_norm_epsilon": m.norm_eps, "scale_attn_weights": True,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
  out = {**common, "hidden_size": m.embed_dim, "num_hidden_layers": m.num_layers,
         "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
         "head_dim": m.head_dim, "intermediate_size": m.mlp_dim,
         "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "hidden_act": "silu",
         "rope_theta": m.rope_theta, "rope_scaling": _hf_rope_scaling(m), "attention_dropout": 0.0}
  if kind == "mistral":
    return {**out, "sliding_window": m.sliding_window}
  return {**out, "attention_bias": m.attention_bias, "mlp_bias": m.mlp_bias}


def _hf_rope_scaling(m: ml_collections.ConfigDict) -> dict[str, Any] | None:
  if m.rope_scaling == "linear":
    return {"rope_type": "linear", "factor": m.rope_scaling_factor}
  if m.rope_scaling == "llama3":
    return {"rope_type": "llama3", "factor": m.rope_scaling_factor,
            "low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_max_len}
  return None


def _hf_kind(m: ml_collections.ConfigDict) -> str:
  """"llama", "mistral" or "gpt2": the Hugging Face architecture of model config ``m``."""
  llama = {"norm": "rmsnorm", "mlp": "swiglu", "position_embedding": "rope"}
  gpt2 = {"norm": "layernorm", "mlp": "gelu", "position_embedding": "learned",
          "attention_bias": True, "mlp_bias": True, "sliding_window": 0}
  if all(m[k] == v for k, v in llama.items()):
    if m.sliding_window == 0:
      return "llama"
    if not (m.attention_bias or m.mlp_bias):
      return "mistral"
    raise ConversionError("model.sliding_window with projection biases has no Hugging Face "
                          "architecture here (Mistral has no biases).")
  if all(m[k] == v for k, v in gpt2.items()):
    if m.num_kv_heads != m.num_heads or m.num_heads * m.head_dim != m.embed_dim:
      raise ConversionError("GPT-2 needs model.num_kv_heads == model.num_heads and "
                            "num_heads * head_dim == embed_dim.")
    return "gpt2"
  options = {k: m[k] for k in ("norm", "mlp", "position_embedding", "attention_bias", "mlp_bias",
                               "sliding_window")}
  raise ConversionError(f"no Hugging Face architecture matches this model ({options}): Llama "
                        f"and Mistral are {llama}, GPT-2 is {gpt2}.")


# -- weight names --------------------------------------------------------------------------
# One entry per lmjax parameter: (lmjax path, the HF tensor name ("{i}" for the layer),
# to_lmjax(tensor, m) -> array, to_hf(array, m) -> tensor). GPT-2's fused q/k/v tensors
# (c_attn) are split on import and joined again in params_to_hf (to_hf None).

Mapping = tuple[tuple[str, ...], str, Callable, Callable | None]


def _same(t: np.ndarray, m: ml_collections.ConfigDict) -> np.ndarray:
  return t


def _transposed(t: np.ndarray, m: ml_collections.ConfigDict) -> np.ndarray:
  return t.T


def _linear_in(heads: str) -> tuple[Callable, Callable]:
  """An (out, in) nn.Linear weight of (heads * h) outputs <-> lmjax (d, heads, h)."""
  count = lambda m: m.num_heads if heads == "n" else m.num_kv_heads
  return (lambda t, m: t.T.reshape(m.embed_dim, count(m), m.head_dim),
          lambda a, m: a.reshape(m.embed_dim, -1).T)


def _heads(heads: str) -> tuple[Callable, Callable]:
  """A bias of (heads * h) <-> lmjax (heads, h)."""
  count = lambda m: m.num_heads if heads == "n" else m.num_kv_heads
  return (lambda t, m: t.reshape(count(m), m.head_dim), lambda a, m: a.reshape(-1))


def _llama_mappings(m: ml_collections.ConfigDict) -> list[Mapping]:
  layer = "model.layers.{i}."
  maps: list[Mapping] = [
      (("embed", "table"), "model.embed_tokens.weight", _same, _same),
      (("final_norm", "scale"), "model.norm.weight", _same, _same),
      (("blocks", "attn_norm", "scale"), layer + "input_layernorm.weight", _same, _same),
      (("blocks", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", _same, _same),
      (("blocks", "attn", "q"), layer + "self_attn.q_proj.weight", *_linear_in("n")),
      (("blocks", "attn", "k"), layer + "self_attn.k_proj.weight", *_linear_in("k")),
      (("blocks", "attn", "v"), layer + "self_attn.v_proj.weight", *_linear_in("k")),
      (("blocks", "attn", "o"), layer + "self_attn.o_proj.weight",  # (d, n*h) <-> (n, h, d)
       lambda t, m: t.T.reshape(m.num_heads, m.head_dim, m.embed_dim),
       lambda a, m: a.reshape(-1, m.embed_dim).T),
  ] + [(("blocks", "mlp", p), layer + f"mlp.{p}_proj.weight", _transposed, _transposed)
       for p in ("gate", "up", "down")]
  if m.attention_bias:
    maps += [
        (("blocks", "attn", "q_bias"), layer + "self_attn.q_proj.bias", *_heads("n")),
        (("blocks", "attn", "k_bias"), layer + "self_attn.k_proj.bias", *_heads("k")),
        (("blocks", "attn", "v_bias"), layer + "self_attn.v_proj.bias", *_heads("k")),
        (("blocks", "attn", "o_bias"), layer + "self_attn.o_proj.bias", _same, _same),
    ]
  if m.mlp_bias:
    maps += [(("blocks", "mlp", f"{p}_bias"), layer + f"mlp.{p}_proj.bias", _same, _same)
             for p in ("gate", "up", "down")]
  if not m.tie_embeddings:
    maps.append((("lm_head", "table"), "lm_head.weight", _same, _same))
  return maps


def _gpt2_mappings(m: ml_collections.ConfigDict) -> list[Mapping]:
  layer = "transformer.h.{i}."

  def part(i: int, shape: Callable) -> Callable:  # q, k or v of a fused (..., 3d) tensor
    return lambda t, m: np.split(t, 3, axis=-1)[i].reshape(shape(m))

  maps: list[Mapping] = [
      (("embed", "table"), "transformer.wte.weight", _same, _same),
      (("pos_embed",), "transformer.wpe.weight", _same, _same),
      (("final_norm", "scale"), "transformer.ln_f.weight", _same, _same),
      (("final_norm", "bias"), "transformer.ln_f.bias", _same, _same),
      (("blocks", "attn", "o"), layer + "attn.c_proj.weight",  # Conv1D (n*h, d) <-> (n, h, d)
       lambda t, m: t.reshape(m.num_heads, m.head_dim, m.embed_dim),
       lambda a, m: a.reshape(-1, m.embed_dim)),
      (("blocks", "attn", "o_bias"), layer + "attn.c_proj.bias", _same, _same),
      (("blocks", "mlp", "up"), layer + "mlp.c_fc.weight", _same, _same),
      (("blocks", "mlp", "up_bias"), layer + "mlp.c_fc.bias", _same, _same),
      (("blocks", "mlp", "down"), layer + "mlp.c_proj.weight", _same, _same),
      (("blocks", "mlp", "down_bias"), layer + "mlp.c_proj.bias", _same, _same),
  ]
  for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
    maps += [(("blocks", norm, "scale"), layer + f"{ln}.weight", _same, _same),
             (("blocks", norm, "bias"), layer + f"{ln}.bias", _same, _same)]
  for i, name in enumerate("qkv"):
    maps += [(("blocks", "attn", name), layer + "attn.c_attn.weight",
              part(i, lambda m: (m.embed_dim, m.num_heads, m.head_dim)), None),
             (("blocks", "attn", f"{name}_bias"), layer + "attn.c_attn.bias",
              part(i, lambda m: (m.num_heads, m.head_dim)), None)]
  if not m.tie_embeddings:
    maps.append((("lm_head", "table"), "lm_head.weight", _same, _same))
  return maps


def _mappings(m: ml_collections.ConfigDict) -> list[Mapping]:
  return _gpt2_mappings(m) if m.position_embedding == "learned" else _llama_mappings(m)


# Tensors a checkpoint may hold that carry no weights (buffers of older transformers).
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|(^|\.)attn\.masked_bias|(^|\.)attn\.bias)$")


# -- reading -------------------------------------------------------------------------------


class Weights:
  """The tensors of a safetensors checkpoint (one file or shards with an index), read one
  at a time as NumPy arrays (bfloat16 through ml_dtypes) without loading the rest."""

  def __init__(self, hf_dir: str | Path):
    self.dir = Path(hf_dir)
    index, single = self.dir / INDEX, self.dir / SINGLE
    if index.is_file():
      try:
        self.files = {k: self.dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
      except (ValueError, KeyError) as e:
        raise ConversionError(f"{index}: unreadable index ({e}).") from None
    elif single.is_file():
      from safetensors import safe_open
      try:
        with safe_open(str(single), "numpy") as f:
          self.files = {k: single for k in f.keys()}
      except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ConversionError(f"{single}: not a readable safetensors file ({e}).") from None
    else:
      found = sorted(p.name for p in self.dir.glob("*.bin")) or ["nothing"]
      raise ConversionError(f"{self.dir}: no {SINGLE} or {INDEX} (found {', '.join(found)}); save "
                            "the model with save_pretrained(..., safe_serialization=True).")
    for path in set(self.files.values()):
      if not path.is_file():
        raise ConversionError(f"{path}: listed in {INDEX} but missing.")
    self.used: set[str] = set()

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise ConversionError(f"{self.dir}: no tensor {name!r} (the config says it should be there).")
    from safetensors import safe_open
    self.used.add(name)
    try:
      with jax.default_device(jax.devices("cpu")[0]), safe_open(str(self.files[name]), "flax") as f:
        return np.asarray(f.get_tensor(name))
    except Exception as e:  # noqa: BLE001 - a damaged file: name it
      raise ConversionError(f"{self.files[name]}: cannot read tensor {name!r} ({e}).") from None

  def unused(self) -> list[str]:
    return sorted(k for k in self.files if k not in self.used and not _IGNORED.search(k))


def _gpt2_prefix(weights: Weights) -> str:
  """GPT-2 checkpoints name tensors "transformer.h.0..." or, in older files, "h.0..."."""
  return "" if "wte.weight" in weights and "transformer.wte.weight" not in weights else "transformer."


def params_from_hf(hf_dir: str | Path, cfg: ml_collections.ConfigDict,
                   dtype: str | None = None) -> dict[str, Any]:
  """The lmjax parameters (a pure dict of NumPy arrays in ``dtype``, default
  ``model.param_dtype``) of the checkpoint in ``hf_dir``, checked against the shapes
  ``cfg`` implies; every tensor of the checkpoint must be used."""
  m = cfg.model
  weights = Weights(hf_dir)
  prefix = _gpt2_prefix(weights) if m.position_embedding == "learned" else "transformer."
  rename = lambda name: name.replace("transformer.", prefix, 1)
  abstract = nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0)))
  want = nnx.split(abstract)[1].to_pure_dict()
  out_dtype = np.dtype(jax.numpy.dtype(dtype or m.param_dtype))
  params: dict[str, Any] = {}
  for path, name, to_lmjax, _ in _mappings(m):
    name = rename(name)
    if "{i}" in name:
      value = np.stack([to_lmjax(weights.get(name.format(i=i)), m) for i in range(m.num_layers)])
    else:
      value = to_lmjax(weights.get(name), m)
    target = _dig(want, path)
    if value.shape != target.shape:
      raise ConversionError(f"{hf_dir}: {name} gives lmjax {'.'.join(path)} the shape "
                            f"{value.shape}; config.json implies {target.shape}.")
    _put(params, path, value.astype(out_dtype))
  if m.tie_embeddings and "lm_head.weight" in weights:
    weights.used.add("lm_head.weight")  # a tied copy of the embedding
  extra = weights.unused()
  if extra:
    raise ConversionError(f"{hf_dir}: tensors lmjax would not use: {', '.join(extra[:8])}"
                          f"{' ...' if len(extra) > 8 else ''} (an architecture feature lmjax "
                          "lacks, or a config.json that does not match the weights).")
  missing = [".".join(p) for p in _paths(want) if _dig_or_none(params, p) is None]
  if missing:
    raise ConversionError(f"no Hugging Face tensor for lmjax parameters {missing}.")
  return params


def _paths(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
  out = []
  for k, v in tree.items():
    out.extend(_paths(v, prefix + (k,)) if isinstance(v, dict) else [prefix + (k,)])
  return out


def _dig(tree: dict, path: tuple[str, ...]) -> Any:
  for k in path:
    tree = tree[k]
  return tree


def _dig_or_none(tree: dict, path: tuple[str, ...]) -> Any:
  try:
    return _dig(tree, path)
  except KeyError:
    return None


def _put(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# -- import --------------------------------------------------------------------------------


def import_checkpoint(hf_dir: str | Path, workdir: str | Path,
                      overrides: dict[str, Any] | None = None,
                      say: Callable[[str], None] = print) -> ml_collections.ConfigDict:
  """Converts the Hugging Face checkpoint in ``hf_dir`` into the lmjax run ``workdir``
  (which must not hold checkpoints yet). ``overrides`` are dotted config fields applied on
  top of the converted config (e.g. ``{"model.compute_dtype": "bfloat16",
  "data.seq_len": 2048}``); shape fields must stay. Returns the run's config.

  A ``tokenizer.model`` (sentencepiece) beside the weights is copied into ``workdir`` and
  becomes ``data.tokenizer``; other tokenizers (``tokenizer.json`` only) are not read.
  """
  hf_dir, workdir = Path(hf_dir), Path(workdir).absolute()
  cfg = config_from_hf(read_config(hf_dir))
  shape = {k: cfg.model[k] for k in SHAPE_KEYS if k != "param_dtype"}
  for key, value in (overrides or {}).items():
    _set(cfg, key, value)
  changed = [k for k, v in shape.items() if cfg.model[k] != v]
  if changed:
    raise ConversionError(f"overrides change the model's shape ({', '.join('model.' + k for k in changed)}): "
                          "the weights fix it.")
  if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
    raise ConversionError(f"{workdir}/checkpoints already holds checkpoints; import into a new "
                          "directory.")
  tokenizer_src = hf_dir / TOKENIZER
  if tokenizer_src.is_file():
    tok = Tokenizer.load(str(tokenizer_src))  # DataError if it is no usable sentencepiece model
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_src, workdir / TOKENIZER)
    cfg.data.tokenizer = str(workdir / TOKENIZER)
    if tok.vocab_size != cfg.model.vocab_size:
      say(f"note: {TOKENIZER} has {tok.vocab_size} pieces, the model {cfg.model.vocab_size} rows; "
          "lmjax trains only with equal sizes.")
  else:
    say(f"note: no sentencepiece {TOKENIZER} in {hf_dir}; lmjax reads only those. Evaluate and "
        "generate with --config.data.tokenizer=..., or with token ids.")
  config_lib.validate(cfg)
  params = params_from_hf(hf_dir, cfg)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "config.json").write_text(cfg.to_json(indent=2))
  ckpt = Checkpointer(workdir / "checkpoints", cfg)
  ckpt.save_params(0, params, cfg, source=str(hf_dir.absolute()))
  ckpt.close()
  n = sum(x.size for x in jax.tree.leaves(params))
  say(f"imported {n:,} parameters ({read_config(hf_dir)['model_type']}) from {hf_dir} "
      f"into {workdir / 'checkpoints' / '0'}")
  return cfg


def _set(cfg: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  *parents, leaf = dotted.split(".")
  node = cfg
  for p in parents:
    if p not in node or not isinstance(node[p], ml_collections.ConfigDict):
      raise ConversionError(f"override {dotted}: no such config field.")
    node = node[p]
  if leaf not in node:
    raise ConversionError(f"override {dotted}: no such config field.")
  current = node[leaf]
  if isinstance(value, str) and not isinstance(current, str):  # from the command line
    try:
      value = json.loads(value.lower() if isinstance(current, bool) else value)
    except ValueError:
      raise ConversionError(f"override {dotted}={value}: not a {type(current).__name__}.") from None
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  node[leaf] = value


# -- export --------------------------------------------------------------------------------


def params_to_hf(params: dict[str, Any], cfg: ml_collections.ConfigDict,
                 dtype: str = "float32") -> dict[str, np.ndarray]:
  """Hugging Face tensors (name -> NumPy array in ``dtype``) of lmjax ``params``."""
  m = cfg.model
  kind = _hf_kind(m)
  out_dtype = np.dtype(jax.numpy.dtype(dtype))
  get = lambda path: np.asarray(_dig(params, path))
  tensors: dict[str, np.ndarray] = {}
  for path, name, _, to_hf in _mappings(m):
    if to_hf is None:
      continue
    value = get(path)
    if "{i}" in name:
      for i in range(m.num_layers):
        tensors[name.format(i=i)] = to_hf(value[i], m)
    else:
      tensors[name] = to_hf(value, m)
  if kind == "gpt2":  # q, k, v fused into c_attn: (d, 3d) weights and (3d,) biases
    for i in range(m.num_layers):
      w = [get(("blocks", "attn", p))[i] for p in "qkv"]
      b = [get(("blocks", "attn", f"{p}_bias"))[i] for p in "qkv"]
      tensors[f"transformer.h.{i}.attn.c_attn.weight"] = np.concatenate(
          [a.reshape(m.embed_dim, -1) for a in w], axis=-1)
      tensors[f"transformer.h.{i}.attn.c_attn.bias"] = np.concatenate([a.reshape(-1) for a in b])
  return {k: np.ascontiguousarray(v.astype(out_dtype)) for k, v in tensors.items()}


def _parse_size(text: str | int) -> int:
  if isinstance(text, int):
    return text
  match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
  if not match:
    raise ConversionError(f"size {text!r}: use e.g. 5GB, 500MB or 2GiB.")
  number, unit, suffix = match.groups()
  base = 1024 if suffix and suffix.lower() == "ib" else 1000
  return int(float(number) * base ** " KMGT".index((unit or " ").upper()))


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str | Path,
                      max_shard_size: str | int = "5GB") -> list[str]:
  """Writes ``tensors`` as ``model.safetensors`` or, over ``max_shard_size``, as numbered
  shards with ``model.safetensors.index.json`` (the layout ``save_pretrained`` writes).
  Returns the file names."""
  from safetensors.numpy import save_file
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  limit = _parse_size(max_shard_size)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, t in tensors.items():
    if shards[-1] and size + t.nbytes > limit:
      shards.append({})
      size = 0
    shards[-1][name] = t
    size += t.nbytes
  metadata = {"format": "pt"}  # what transformers checks for
  if len(shards) == 1:
    save_file(shards[0], str(out_dir / SINGLE), metadata=metadata)
    return [SINGLE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    save_file(shard, str(out_dir / name), metadata=metadata)
    weight_map.update({k: name for k in shard})
  total = sum(t.nbytes for t in tensors.values())
  (out_dir / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                           "weight_map": weight_map}, indent=2))
  return names + [INDEX]


def export_checkpoint(workdir: str | Path, out_dir: str | Path, step: int | None = None,
                      dtype: str | None = None, max_shard_size: str | int = "5GB",
                      say: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes run ``workdir``'s parameters (newest usable checkpoint, or ``step``) to
  ``out_dir`` as a Hugging Face checkpoint: ``config.json``, safetensors (``dtype``, default
  bfloat16 for bf16-compute runs, else float32) and the run's ``tokenizer.model`` if it
  has a sentencepiece tokenizer. Returns the written ``config.json`` contents."""
  cfg = run_config(workdir, step)
  _hf_kind(cfg.model)  # fail before restoring anything
  # Onto the host: the weights go to NumPy anyway, and no accelerator need hold them whole.
  cfg.model.attention = "xla"  # any backend restores the same parameters; xla runs on the CPU
  run = load(workdir, step, cfg=cfg, devices=jax.devices("cpu")[:1],
             mesh={"data": 1, "stage": 1, "fsdp": 1, "tensor": 1})
  dtype = dtype or ("bfloat16" if run.cfg.model.compute_dtype == "bfloat16" else "float32")
  tok = run.tokenizer
  out_dir = Path(out_dir)
  config = hf_config(run.cfg, dtype, bos_id=tok.bos_id if tok else None,
                     eos_id=tok.eos_id if tok else None)
  params = jax.tree.map(np.asarray, jax.device_get(run.params))
  files = write_safetensors(params_to_hf(params, run.cfg, dtype), out_dir, max_shard_size)
  (out_dir / "config.json").write_text(json.dumps(config, indent=2))
  if tok is not None and tok.path and os.path.isfile(tok.path):
    shutil.copyfile(tok.path, out_dir / TOKENIZER)
    files.append(TOKENIZER)
  say(f"exported {workdir} step {run.step} ({config['architectures'][0]}, {dtype}) to {out_dir}: "
      f"{', '.join(['config.json'] + files)}")
  return config

