"""How lmjax and Hugging Face name and lay out the same model: config fields both ways, and
one mapping per parameter between an lmjax path and a Hugging Face tensor name, with the
tensor's shape the config implies (:func:`check_shape` compares before anything is reshaped).

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

Mixtral is Mistral with a mixture of experts in every layer (expert j of layer i; lmjax
``model.router="softmax"``, top-k renormalised, dropless):

=========================  ===================================================
lmjax                      Mixtral (``model.layers.{i}.block_sparse_moe.``)
=========================  ===================================================
moe.router (d, E)          gate.weight.T (E, d)
moe.gate, moe.up (E, d, f) experts.{j}.w1.weight.T, experts.{j}.w3.weight.T
moe.down (E, f, d)         experts.{j}.w2.weight.T (d, f)
=========================  ===================================================

``save_pretrained`` writes these per-expert names; the fused tensors ``transformers``
holds in memory (``model.layers.{i}.mlp.gate.weight``, ``mlp.experts.gate_up_proj`` (E, 2f,
d) = [w1; w3], ``mlp.experts.down_proj`` (E, d, f)) import too (:func:`mappings` with
``fused_experts``); export writes the per-expert names.

Llama's RoPE in the Hugging Face layout is the half-split rotation lmjax uses, so q and k
need no permutation.

:mod:`lmjax.hf` reads and writes checkpoints with these.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import ml_collections
import numpy as np

from lmjax import config as config_lib

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "mixtral": "MixtralForCausalLM", "gpt2": "GPT2LMHeadModel"}


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message names the file or field and why."""


# -- configs -------------------------------------------------------------------------------

FIX_CONFIG = "use the config.json that save_pretrained wrote with these weights"


def _number(hf: dict[str, Any], key: str, source: str, needed_by: str, default: Any = None,
            integer: bool = True, low: int = 1, label: str = "") -> Any:
  """Field ``key`` (called ``label`` in messages) of ``source``, a config.json: an integer
  >= ``low``, or a number (> 0; >= 0 with ``low`` 0); ``default`` when absent or null, else
  required."""
  label, value = label or key, hf.get(key)
  if value is None and default is not None:
    return default
  if key not in hf:
    raise ConversionError(f"{source}: no {label}, which {needed_by} needs ({FIX_CONFIG}).")
  number = not isinstance(value, bool) and isinstance(value, (int,) if integer else (int, float))
  if not number or not (value >= low if integer or not low else value > 0):
    want = (("a positive integer" if low else "an integer >= 0") if integer
            else "a positive number" if low else "a number >= 0")
    raise ConversionError(f"{source}: {label} is {value!r}; expected {want} ({FIX_CONFIG}).")
  return value if integer else float(value)


def _rope_settings(hf: dict[str, Any], source: str) -> dict[str, Any]:
  """lmjax RoPE fields from ``rope_theta`` + ``rope_scaling`` (transformers 4) or
  ``rope_parameters`` (transformers 5)."""
  for key in ("rope_parameters", "rope_scaling"):
    if hf.get(key) is not None and not isinstance(hf[key], dict):
      raise ConversionError(f"{source}: {key} is {hf[key]!r}; expected an object or null.")
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or params)
  parent = "rope_scaling." if hf.get("rope_scaling") else "rope_parameters."
  src, label = ((params, "rope_parameters.rope_theta") if "rope_theta" in params
                else (hf, "rope_theta"))
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  theta = _number(src, "rope_theta", source, "RoPE", 10000.0, integer=False, label=label)
  out = {"rope_theta": theta, "rope_scaling": "none"}
  if kind == "default":
    return out
  get = lambda key, integer=False: _number(scaling, key, source, f"{kind} RoPE scaling",
                                           integer=integer, label=parent + key)
  if kind == "linear":
    return {**out, "rope_scaling": "linear", "rope_scaling_factor": get("factor")}
  if kind == "llama3":
    return {**out, "rope_scaling": "llama3", "rope_scaling_factor": get("factor"),
            "rope_low_freq_factor": get("low_freq_factor"),
            "rope_high_freq_factor": get("high_freq_factor"),
            "rope_original_max_len": get("original_max_position_embeddings", True)}
  if kind == "yarn":
    return {**out, **_yarn_settings(hf, scaling, source, parent)}
  raise ConversionError(f"{source}: rope scaling {kind!r} is not supported (lmjax has "
                        "default, linear, llama3 and yarn RoPE).")


def _yarn_settings(hf: dict[str, Any], scaling: dict[str, Any], source: str,
                   parent: str) -> dict[str, Any]:
  """lmjax fields of a yarn ``scaling``, defaulted as ``transformers`` does: the original
  length to ``max_position_embeddings``, the factor to their ratio, beta_fast / beta_slow
  (absent, null or 0) to 32 / 1, the attention factor (absent) to one derived from the
  factor and mscale / mscale_all_dim."""
  get = lambda key, default=None, integer=False, low=1: _number(
      scaling, key, source, "yarn RoPE scaling", default, integer=integer, low=low, label=parent + key)
  longest = _number(hf, "max_position_embeddings", source, "yarn RoPE scaling", 2048)
  original = get("original_max_position_embeddings", longest, integer=True)
  truncate = scaling.get("truncate", True) or False  # null: false, as transformers reads it
  if not isinstance(truncate, bool):
    raise ConversionError(f"{source}: {parent}truncate is {truncate!r}; expected true or false "
                          f"({FIX_CONFIG}).")
  return {"rope_scaling": "yarn", "rope_scaling_factor": get("factor", longest / original),
          "rope_original_max_len": original, "rope_beta_fast": get("beta_fast", 32.0, low=0) or 32.0,
          "rope_beta_slow": get("beta_slow", 1.0, low=0) or 1.0, "rope_truncate": truncate,
          "rope_attention_factor": get("attention_factor", 0.0),
          "rope_mscale": get("mscale", 0.0, low=0), "rope_mscale_all_dim": get("mscale_all_dim", 0.0, low=0)}


def _compute_dtype(hf: dict[str, Any]) -> str:
  """bfloat16 compute for checkpoints stored in 16 bits, float32 for float32 ones."""
  dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
  return "bfloat16" if dtype in ("bfloat16", "float16") else "float32"


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ml_collections.ConfigDict:
  """The lmjax config of a Hugging Face ``config.json`` (Llama, Mistral, Mixtral or GPT-2;
  read from the file ``source``); raises ConversionError naming a field that is missing, of
  the wrong type, or that lmjax cannot represent.

  Mixtral: ``num_local_experts`` and ``num_experts_per_tok`` are required (save_pretrained
  writes both); ``intermediate_size`` is the experts' width (``model.expert_mlp_dim``, and
  ``mlp_dim``, which no layer uses); the router is softmax top-k, renormalised, dropless
  (``capacity_factor`` 0). For fine-tuning, ``router_aux_loss_coef`` becomes
  ``model.moe_aux_loss`` (both weigh E * sum_i f_i P_i, k when balanced) and
  ``model.moe_z_loss`` is 0, as Mixtral trains without a router z-loss."""
  kind = hf.get("model_type")
  cfg = config_lib.default_config()
  m = cfg.model
  need = lambda key, **kw: _number(hf, key, source, f"a model_type {kind!r} config", **kw)
  if kind in ("llama", "mistral", "mixtral"):
    if hf.get("hidden_act", "silu") != "silu":
      raise ConversionError(f"{source}: hidden_act {hf['hidden_act']!r}; lmjax's SwiGLU uses silu.")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
      raise ConversionError(f"{source}: partial_rotary_factor != 1 is not supported.")
    d, heads = need("hidden_size"), need("num_attention_heads")
    if d % heads and hf.get("head_dim") is None:
      raise ConversionError(f"{source}: hidden_size {d} is no multiple of num_attention_heads "
                            f"{heads} and there is no head_dim; {FIX_CONFIG}.")
    m.vocab_size, m.num_layers, m.embed_dim = need("vocab_size"), need("num_hidden_layers"), d
    m.num_heads, m.num_kv_heads = heads, need("num_key_value_heads", default=heads)
    m.head_dim = need("head_dim", default=d // heads)
    m.mlp_dim = need("intermediate_size")
    m.max_seq_len = need("max_position_embeddings", default=2048)
    m.norm_eps = need("rms_norm_eps", default=1e-6, integer=False)
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", False))
    m.attention_bias = bool(hf.get("attention_bias", False)) and kind != "mixtral"
    m.mlp_bias = bool(hf.get("mlp_bias", False)) and kind != "mixtral"
    m.sliding_window = need("sliding_window", default=0, low=0) if kind != "llama" else 0
    for key, value in _rope_settings(hf, source).items():
      m[key] = value
    if kind == "mixtral":
      m.num_experts, m.experts_per_token = need("num_local_experts"), need("num_experts_per_tok")
      if m.experts_per_token > m.num_experts:
        raise ConversionError(f"{source}: num_experts_per_tok {m.experts_per_token} exceeds "
                              f"num_local_experts {m.num_experts}; {FIX_CONFIG}.")
      m.expert_mlp_dim = m.mlp_dim
      m.router, m.router_scale, m.capacity_factor = "softmax", 1.0, 0.0
      m.moe_aux_loss = need("router_aux_loss_coef", default=0.001, integer=False, low=0)
      m.moe_z_loss = 0.0
  elif kind == "gpt2":
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise ConversionError(f"{source}: activation_function {act!r}; lmjax's GELU MLP is the "
                            "tanh approximation (gelu_new).")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
      if hf.get(flag):
        raise ConversionError(f"{source}: {flag}=true is not supported.")
    if not hf.get("scale_attn_weights", True):
      raise ConversionError(f"{source}: scale_attn_weights=false is not supported.")
    d, heads = need("n_embd"), need("n_head")
    if d % heads:
      raise ConversionError(f"{source}: n_embd {d} is no multiple of n_head {heads}; {FIX_CONFIG}.")
    m.vocab_size, m.num_layers, m.embed_dim = need("vocab_size"), need("n_layer"), d
    m.num_heads = m.num_kv_heads = heads
    m.head_dim = d // heads
    m.mlp_dim = need("n_inner", default=4 * d)
    m.max_seq_len = need("n_positions", default=1024)
    m.norm, m.mlp, m.position_embedding = "layernorm", "gelu", "learned"
    m.norm_eps = need("layer_norm_epsilon", default=1e-5, integer=False)
    m.attention_bias = m.mlp_bias = True
    m.tie_embeddings = bool(hf.get("tie_word_embeddings", True))
  else:
    found = "no model_type" if kind is None else f"model_type {kind!r} is not supported"
    raise ConversionError(f"{source}: {found}; lmjax converts {', '.join(ARCHITECTURES)}.")
  m.compute_dtype = _compute_dtype(hf)
  cfg.data.seq_len = min(cfg.data.seq_len, m.max_seq_len)
  return cfg


def hf_config(cfg: ml_collections.ConfigDict, dtype: str = "float32",
              bos_id: int | None = None, eos_id: int | None = None) -> dict[str, Any]:
  """The Hugging Face ``config.json`` of an lmjax model; ConversionError if no supported
  Hugging Face architecture computes the same function."""
  m = cfg.model
  kind = hf_kind(m)
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
  if kind == "mixtral":
    return {**out, "sliding_window": m.sliding_window or None, "num_local_experts": m.num_experts,
            "num_experts_per_tok": m.experts_per_token,
            "intermediate_size": m.expert_mlp_dim or m.mlp_dim,
            "router_aux_loss_coef": m.moe_aux_loss, "router_jitter_noise": 0.0,
            "output_router_logits": False}
  return {**out, "attention_bias": m.attention_bias, "mlp_bias": m.mlp_bias}


def _hf_rope_scaling(m: ml_collections.ConfigDict) -> dict[str, Any] | None:
  if m.rope_scaling == "linear":
    return {"rope_type": "linear", "factor": m.rope_scaling_factor}
  if m.rope_scaling == "llama3":
    return {"rope_type": "llama3", "factor": m.rope_scaling_factor,
            "low_freq_factor": m.rope_low_freq_factor, "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_max_len}
  if m.rope_scaling == "yarn":
    mscales = {"mscale": m.rope_mscale, "mscale_all_dim": m.rope_mscale_all_dim}
    return {"rope_type": "yarn", "factor": m.rope_scaling_factor,
            "original_max_position_embeddings": m.rope_original_max_len,
            "beta_fast": m.rope_beta_fast, "beta_slow": m.rope_beta_slow, "truncate": m.rope_truncate,
            **({"attention_factor": m.rope_attention_factor} if m.rope_attention_factor else {}),
            **{key: value for key, value in mscales.items() if value}}
  return None


# What a mixture-of-experts model needs to be Mixtral (sliding_window and RoPE scaling are
# free; capacity_factor too: Mixtral runs the same weights dropless, as lmjax generates).
MIXTRAL = {"norm": "rmsnorm", "mlp": "swiglu", "position_embedding": "rope",
           "attention_bias": False, "router": "softmax", "router_scale": 1.0,
           "num_shared_experts": 0, "first_dense_layers": 0, "moe_every": 1}


def hf_kind(m: ml_collections.ConfigDict) -> str:
  """"llama", "mistral", "mixtral" or "gpt2": the Hugging Face architecture of model config
  ``m``."""
  if not m.causal:
    raise ConversionError("model.causal=False (a bidirectional, masked-LM model) has no Hugging "
                          "Face causal-LM architecture: Llama, Mistral, Mixtral and GPT-2 attend "
                          "causally and would compute another function.")
  if m.num_experts:
    differ = {k: m[k] for k, v in MIXTRAL.items() if m[k] != v}
    if differ:
      raise ConversionError(f"a mixture-of-experts model (model.num_experts={m.num_experts}) "
                            f"exports as Mixtral, which needs {MIXTRAL}; this model has {differ}.")
    return "mixtral"
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
# One entry per lmjax parameter: (lmjax path, the HF tensor name, the HF tensor's shape (of
# one layer, one expert) that the config implies, to_lmjax(tensor, m) -> array, to_hf(array,
# m) -> tensor). A name with "{i}" is one tensor per layer, stacked along the parameter's
# first axis; with "{j}" too, one per expert of each layer, stacked along the next
# (:func:`stacked`). GPT-2's fused q/k/v tensors (c_attn) and Mixtral's fused experts are
# split on import; c_attn is joined again in lmjax.hf.params_to_hf (to_hf None), the experts
# are written per expert. Every tensor goes through check_shape before it is reshaped.

Mapping = tuple[tuple[str, ...], str, tuple[int, ...], Callable, Callable | None]


def stacked(name: str, m: ml_collections.ConfigDict) -> list[tuple[str, int]]:
  """The indices of HF tensor ``name`` (outermost first) with their counts: "i" over the
  layers, "j" over the experts; [] for a single tensor."""
  counts = (("i", m.num_layers), ("j", m.num_experts))
  return [(key, n) for key, n in counts if "{" + key + "}" in name]


def check_shape(what: str, found: Any, expected: Any, implied_by: str, fix: str) -> None:
  """ConversionError "<what> has shape <found>; <implied_by> implies <expected> ... <fix>"
  unless the shapes are equal: the one shape check of import and export."""
  found, expected = tuple(found), tuple(expected)
  if found != expected:
    flipped = len(found) == 2 and found == expected[::-1]
    raise ConversionError(f"{what} has shape {found}; {implied_by} implies {expected}"
                          f"{' (stored transposed?)' if flipped else ''}: {fix}.")


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


def _llama_mappings(m: ml_collections.ConfigDict, fused_experts: bool) -> list[Mapping]:
  layer = "model.layers.{i}."
  d, f, v = m.embed_dim, m.mlp_dim, m.vocab_size
  nh, kh = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
  maps: list[Mapping] = [
      (("embed", "table"), "model.embed_tokens.weight", (v, d), _same, _same),
      (("final_norm", "scale"), "model.norm.weight", (d,), _same, _same),
      (("blocks", "attn_norm", "scale"), layer + "input_layernorm.weight", (d,), _same, _same),
      (("blocks", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", (d,), _same,
       _same),
      (("blocks", "attn", "q"), layer + "self_attn.q_proj.weight", (nh, d), *_linear_in("n")),
      (("blocks", "attn", "k"), layer + "self_attn.k_proj.weight", (kh, d), *_linear_in("k")),
      (("blocks", "attn", "v"), layer + "self_attn.v_proj.weight", (kh, d), *_linear_in("k")),
      (("blocks", "attn", "o"), layer + "self_attn.o_proj.weight", (d, nh),  # <-> (n, h, d)
       lambda t, m: t.T.reshape(m.num_heads, m.head_dim, m.embed_dim),
       lambda a, m: a.reshape(-1, m.embed_dim).T),
  ]
  if m.num_experts:
    maps += _mixtral_experts(m, fused_experts)
  else:
    maps += [(("blocks", "mlp", p), layer + f"mlp.{p}_proj.weight", shape, _transposed,
              _transposed) for p, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f)))]
  if m.attention_bias:
    maps += [
        (("blocks", "attn", "q_bias"), layer + "self_attn.q_proj.bias", (nh,), *_heads("n")),
        (("blocks", "attn", "k_bias"), layer + "self_attn.k_proj.bias", (kh,), *_heads("k")),
        (("blocks", "attn", "v_bias"), layer + "self_attn.v_proj.bias", (kh,), *_heads("k")),
        (("blocks", "attn", "o_bias"), layer + "self_attn.o_proj.bias", (d,), _same, _same),
    ]
  if m.mlp_bias:
    maps += [(("blocks", "mlp", f"{p}_bias"), layer + f"mlp.{p}_proj.bias", shape, _same, _same)
             for p, shape in (("gate", (f,)), ("up", (f,)), ("down", (d,)))]
  if not m.tie_embeddings:
    maps.append((("lm_head", "table"), "lm_head.weight", (v, d), _same, _same))
  return maps


def _mixtral_experts(m: ml_collections.ConfigDict, fused: bool) -> list[Mapping]:
  """Mixtral's router and experts: per expert as save_pretrained writes them, or ``fused``
  as transformers holds them in memory (import only)."""
  e, d, f = m.num_experts, m.embed_dim, m.expert_mlp_dim or m.mlp_dim
  moe = lambda name: ("blocks", "moe", name)
  if not fused:
    layer = "model.layers.{i}.block_sparse_moe."
    return [(moe("router"), layer + "gate.weight", (e, d), _transposed, _transposed)] + [
        (moe(p), layer + f"experts.{{j}}.{w}.weight", shape, _transposed, _transposed)
        for p, w, shape in (("gate", "w1", (f, d)), ("up", "w3", (f, d)), ("down", "w2", (d, f)))]
  layer = "model.layers.{i}.mlp."
  half = lambda i: lambda t, m: np.split(t, 2, axis=1)[i].transpose(0, 2, 1)  # of [w1; w3]
  return [(moe("router"), layer + "gate.weight", (e, d), _transposed, None),
          (moe("gate"), layer + "experts.gate_up_proj", (e, 2 * f, d), half(0), None),
          (moe("up"), layer + "experts.gate_up_proj", (e, 2 * f, d), half(1), None),
          (moe("down"), layer + "experts.down_proj", (e, d, f),
           lambda t, m: t.transpose(0, 2, 1), None)]


def _gpt2_mappings(m: ml_collections.ConfigDict) -> list[Mapping]:
  layer = "transformer.h.{i}."
  d, f, v = m.embed_dim, m.mlp_dim, m.vocab_size
  nh = m.num_heads * m.head_dim

  def part(i: int, shape: Callable) -> Callable:  # q, k or v of a fused (..., 3d) tensor
    return lambda t, m: np.split(t, 3, axis=-1)[i].reshape(shape(m))

  maps: list[Mapping] = [
      (("embed", "table"), "transformer.wte.weight", (v, d), _same, _same),
      (("pos_embed",), "transformer.wpe.weight", (m.max_seq_len, d), _same, _same),
      (("final_norm", "scale"), "transformer.ln_f.weight", (d,), _same, _same),
      (("final_norm", "bias"), "transformer.ln_f.bias", (d,), _same, _same),
      (("blocks", "attn", "o"), layer + "attn.c_proj.weight", (nh, d),  # Conv1D <-> (n, h, d)
       lambda t, m: t.reshape(m.num_heads, m.head_dim, m.embed_dim),
       lambda a, m: a.reshape(-1, m.embed_dim)),
      (("blocks", "attn", "o_bias"), layer + "attn.c_proj.bias", (d,), _same, _same),
      (("blocks", "mlp", "up"), layer + "mlp.c_fc.weight", (d, f), _same, _same),
      (("blocks", "mlp", "up_bias"), layer + "mlp.c_fc.bias", (f,), _same, _same),
      (("blocks", "mlp", "down"), layer + "mlp.c_proj.weight", (f, d), _same, _same),
      (("blocks", "mlp", "down_bias"), layer + "mlp.c_proj.bias", (d,), _same, _same),
  ]
  for norm, ln in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
    maps += [(("blocks", norm, "scale"), layer + f"{ln}.weight", (d,), _same, _same),
             (("blocks", norm, "bias"), layer + f"{ln}.bias", (d,), _same, _same)]
  for i, name in enumerate("qkv"):
    maps += [(("blocks", "attn", name), layer + "attn.c_attn.weight", (d, 3 * nh),
              part(i, lambda m: (m.embed_dim, m.num_heads, m.head_dim)), None),
             (("blocks", "attn", f"{name}_bias"), layer + "attn.c_attn.bias", (3 * nh,),
              part(i, lambda m: (m.num_heads, m.head_dim)), None)]
  if not m.tie_embeddings:
    maps.append((("lm_head", "table"), "lm_head.weight", (v, d), _same, _same))
  return maps


def mappings(m: ml_collections.ConfigDict, fused_experts: bool = False) -> list[Mapping]:
  """Every parameter's mapping for model config ``m`` (GPT-2's when positions are learned,
  Mixtral's with experts; ``fused_experts``: the in-memory names of transformers' Mixtral,
  import only)."""
  if m.position_embedding == "learned":
    return _gpt2_mappings(m)
  return _llama_mappings(m, fused_experts)


# A Mixtral checkpoint of the fused names holds this tensor (lmjax.hf picks the mappings).
FUSED_EXPERTS = "model.layers.0.mlp.experts.gate_up_proj"


# Tensors a checkpoint may hold that carry no weights (buffers of older transformers).
IGNORED = re.compile(r"(rotary_emb\.inv_freq|(^|\.)attn\.masked_bias|(^|\.)attn\.bias)$")
