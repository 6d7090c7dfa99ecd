"""An independent NumPy (float64) implementation of the lmjax decoder, for tests.

It follows ``config.model``: RMSNorm or LayerNorm, SwiGLU or GELU (tanh) MLP, RoPE (with
linear, Llama 3 or YaRN frequency scaling), learned or no position embeddings, projection
biases and a sliding attention window.
"""

import math

import numpy as np


def _norm(x, p, cfg):
  if cfg.norm == "layernorm":
    c = x - x.mean(-1, keepdims=True)
    return c / np.sqrt(np.mean(c * c, axis=-1, keepdims=True) + cfg.norm_eps) * p["scale"] + p["bias"]
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + cfg.norm_eps) * p["scale"]


def _inv_freq(cfg):
  h = cfg.head_dim
  inv = cfg.rope_theta ** (-np.arange(0, h, 2) / h)
  if cfg.rope_scaling == "linear":
    return inv / cfg.rope_scaling_factor
  if cfg.rope_scaling == "llama3":  # as Meta's apply_scaling for Llama 3.1
    old = cfg.rope_original_max_len
    out = []
    for f in inv:
      wavelen = 2 * math.pi / f
      if wavelen < old / cfg.rope_high_freq_factor:
        out.append(f)
      elif wavelen > old / cfg.rope_low_freq_factor:
        out.append(f / cfg.rope_scaling_factor)
      else:
        smooth = (old / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        out.append((1 - smooth) * f / cfg.rope_scaling_factor + smooth * f)
    return np.array(out)
  if cfg.rope_scaling == "yarn":  # as the YaRN authors' code: a ramp over dimension indices
    def dim_turning(turns):  # the dimension whose frequency turns `turns` times in the old length
      return h * math.log(cfg.rope_original_max_len / (turns * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))
    low, high = dim_turning(cfg.rope_beta_fast), dim_turning(cfg.rope_beta_slow)
    if cfg.rope_truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, h - 1)
    out = []
    for i, f in enumerate(inv):
      interpolate = min(max((i - low) / max(high - low, 1e-3), 0.0), 1.0)
      out.append(interpolate * f / cfg.rope_scaling_factor + (1 - interpolate) * f)
    return np.array(out)
  return inv


def _yarn_scale(cfg):
  """What YaRN multiplies cos and sin by (1 for the other scalings)."""
  if cfg.rope_scaling != "yarn":
    return 1.0
  if cfg.rope_attention_factor:
    return cfg.rope_attention_factor
  g = lambda m: 0.1 * m * math.log(cfg.rope_scaling_factor) + 1
  if cfg.rope_mscale and cfg.rope_mscale_all_dim:
    return g(cfg.rope_mscale) / g(cfg.rope_mscale_all_dim)
  return g(1.0)


def _rope(x, pos, inv, scale=1.0):
  h = x.shape[-1]
  ang = pos[..., None] * inv  # (b, t, h/2)
  sin, cos = scale * np.sin(ang)[:, :, None], scale * np.cos(ang)[:, :, None]
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _silu(x):
  return x / (1 + np.exp(-x))


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def forward(params, cfg, tokens, positions=None, segment_ids=None):
  """Logits (b, t, v) of the model ``cfg`` (config.model) with ``params`` (pure dict)."""
  p = {k: v for k, v in params.items()}
  f64 = lambda a: np.asarray(a, np.float64)
  b, t = tokens.shape
  if positions is None:
    positions = np.broadcast_to(np.arange(t), (b, t))
  if segment_ids is None:
    segment_ids = np.ones((b, t), np.int64)
  table = f64(p["embed"]["table"])
  x = table[tokens]
  if cfg.position_embedding == "learned":
    x = x + f64(p["pos_embed"])[positions]
  blocks = p["blocks"]
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  causal = (j <= i) & ((i - j < cfg.sliding_window) if cfg.sliding_window else True)
  mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  inv = _inv_freq(cfg)
  for l in range(cfg.num_layers):
    get = lambda *path: f64(_dig(blocks, path)[l])
    layer = lambda name: {key: get(name, key) for key in _dig(blocks, (name,))}
    bias = lambda name: get("attn", name) if cfg.attention_bias else 0.0
    y = _norm(x, layer("attn_norm"), cfg)
    q = np.einsum("btd,dnh->btnh", y, get("attn", "q")) + bias("q_bias")
    kk = np.einsum("btd,dkh->btkh", y, get("attn", "k")) + bias("k_bias")
    v = np.einsum("btd,dkh->btkh", y, get("attn", "v")) + bias("v_bias")
    if cfg.position_embedding == "rope":
      q, kk = _rope(q, positions, inv, _yarn_scale(cfg)), _rope(kk, positions, inv, _yarn_scale(cfg))
    kk = np.repeat(kk, n // k, axis=2)
    v = np.repeat(v, n // k, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(h)
    s = np.where(mask[:, None], s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s = s / s.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", s, v)
    x = x + np.einsum("btnh,nhd->btd", o, get("attn", "o")) + bias("o_bias")
    y = _norm(x, layer("mlp_norm"), cfg)
    mb = lambda name: get("mlp", name) if cfg.mlp_bias else 0.0
    up = y @ get("mlp", "up") + mb("up_bias")
    if cfg.mlp == "gelu":
      hdn = _gelu_tanh(up)
    else:
      hdn = _silu(y @ get("mlp", "gate") + mb("gate_bias")) * up
    x = x + hdn @ get("mlp", "down") + mb("down_bias")
  x = _norm(x, {key: f64(val) for key, val in p["final_norm"].items()}, cfg)
  head = table if cfg.tie_embeddings else f64(p["lm_head"]["table"])
  return x @ head.T


def _dig(tree, path):
  for key in path:
    tree = tree[key]
  return tree
