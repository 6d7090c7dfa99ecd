"""An independent NumPy (float64) implementation of the lmjax decoder, for tests."""

import numpy as np


def _rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x, pos, theta):
  h = x.shape[-1]
  inv = theta ** (-np.arange(0, h, 2) / h)
  ang = pos[..., None] * inv  # (b, t, h/2)
  sin, cos = np.sin(ang)[:, :, None], np.cos(ang)[:, :, None]
  x1, x2 = x[..., : h // 2], x[..., h // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _silu(x):
  return x / (1 + np.exp(-x))


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
  blocks = p["blocks"]
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  mask = np.tril(np.ones((t, t), bool))[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  for l in range(cfg.num_layers):
    get = lambda *path: f64(_dig(blocks, path)[l])
    y = _rms(x, get("attn_norm", "scale"), cfg.norm_eps)
    q = np.einsum("btd,dnh->btnh", y, get("attn", "q"))
    kk = np.einsum("btd,dkh->btkh", y, get("attn", "k"))
    v = np.einsum("btd,dkh->btkh", y, get("attn", "v"))
    q, kk = _rope(q, positions, cfg.rope_theta), _rope(kk, positions, cfg.rope_theta)
    kk = np.repeat(kk, n // k, axis=2)
    v = np.repeat(v, n // k, axis=2)
    s = np.einsum("btnh,bsnh->bnts", q, kk) / np.sqrt(h)
    s = np.where(mask[:, None], s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s = s / s.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", s, v)
    x = x + np.einsum("btnh,nhd->btd", o, get("attn", "o"))
    y = _rms(x, get("mlp_norm", "scale"), cfg.norm_eps)
    hdn = _silu(y @ get("mlp", "gate")) * (y @ get("mlp", "up"))
    x = x + hdn @ get("mlp", "down")
  x = _rms(x, f64(p["final_norm"]["scale"]), cfg.norm_eps)
  head = table if cfg.tie_embeddings else f64(p["lm_head"]["table"])
  return x @ head.T


def _dig(tree, path):
  for key in path:
    tree = tree[key]
  return tree
