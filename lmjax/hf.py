"""Hugging Face checkpoints in and out: Llama / Mistral-family, Mixtral and GPT-2.

A Hugging Face checkpoint is a directory with ``config.json`` and safetensors weights
(``model.safetensors``, or shards listed in ``model.safetensors.index.json``), as
``save_pretrained`` writes it. :func:`import_checkpoint` turns one into an lmjax run
directory: ``config.json``, the weights as a parameters-only Orbax checkpoint (restored onto
any mesh, sharded as the rules table says), and the tokenizer that came with it (a
``tokenizer.json`` with its ``tokenizer_config.json``, a sentencepiece ``tokenizer.model`` or
Llama 3's tiktoken ``original/tokenizer.model``)::

  hf.import_checkpoint("/models/Mistral-7B-v0.1", "runs/mistral7b")
  run = lmjax.load("runs/mistral7b")                 # evaluate, generate
  # fine-tune: --config.train.init_from=runs/mistral7b in a new --workdir

:func:`export_checkpoint` writes a run's parameters back in the same format, loadable with
``transformers.AutoModelForCausalLM.from_pretrained``, with the run's tokenizer files that
``transformers.AutoTokenizer.from_pretrained`` reads. Nothing is downloaded and nothing
needs PyTorch. ``tools/convert_hf.py`` is the command line. Each directory may be a local
path or a ``gs://`` / ``s3://`` URL (:mod:`lmjax.storage`); safetensors files in a bucket
are read from local copies in the cache.

:mod:`lmjax.hf_layout` holds the mapping between the two layouts (config fields, tensor names
and shapes); this module reads and writes the files.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save

from lmjax import config as config_lib
from lmjax import config_file, storage
from lmjax.checkpoint import SHAPE_KEYS, Checkpointer
from lmjax.data.tokenizer import Tokenizer
from lmjax.hf_layout import (ARCHITECTURES, FIX_CONFIG, FUSED_EXPERTS, IGNORED, ConversionError,
                             check_shape, config_from_hf, hf_config, hf_kind, mappings, stacked)
from lmjax.model import Transformer
from lmjax.rundir import run_config
from lmjax.trained import load

__all__ = ["ARCHITECTURES", "INDEX", "SINGLE", "TOKENIZER", "TOKENIZER_SOURCES", "ConversionError",
           "Weights", "config_from_hf", "export_checkpoint", "hf_config", "import_checkpoint",
           "params_from_hf", "params_to_hf", "read_config", "write_safetensors"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER = "tokenizer.model"
# Where an import looks for the tokenizer, first found first: what transformers' AutoTokenizer
# reads, then a sentencepiece (or tiktoken) model, then Llama 3's tiktoken original.
TOKENIZER_SOURCES = ("tokenizer.json", TOKENIZER, "tokenizer.tiktoken", "original/tokenizer.model")
FLOATS = ("F32", "BF16", "F16", "F64")  # safetensors dtypes that import (cast to param_dtype)


# -- reading -------------------------------------------------------------------------------


def read_config(hf_dir: str | Path) -> dict[str, Any]:
  path = storage.path(hf_dir) / "config.json"
  if not path.is_file():
    storage.check(path)  # a URL's bucket that is missing or refused, named as such
    raise ConversionError(f"{path}: no such file; a Hugging Face checkpoint directory holds "
                          "config.json and *.safetensors (save_pretrained writes both).")
  try:
    config = json.loads(path.read_bytes())
  except ValueError as e:
    raise ConversionError(f"{path}: not valid JSON ({e}).") from None
  if not isinstance(config, dict):
    raise ConversionError(f"{path}: a JSON {type(config).__name__.replace('dict', 'object')}; "
                          "expected an object of fields, as save_pretrained writes it.")
  return config


class Weights:
  """The tensors of a safetensors checkpoint (one file or shards with an index), read one
  at a time as NumPy arrays (bfloat16 through ml_dtypes) without loading the rest."""

  def __init__(self, hf_dir: str | Path):
    self.dir = storage.path(hf_dir)
    index, single = self.dir / INDEX, self.dir / SINGLE
    self.source = index if index.is_file() else single  # named for a missing tensor
    self._local: dict[str, str] = {}  # file -> a local file holding it (itself, or a copy)
    if index.is_file():
      try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        self.files = {k: self.dir / f for k, f in weight_map.items()}
      except (ValueError, KeyError) as e:
        raise ConversionError(f"{index}: unreadable index ({e}).") from None
    elif single.is_file():
      try:
        with safe_open(self.local(single), "numpy") as f:
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

  def local(self, file: Any) -> str:
    """A local file holding ``file`` (safetensors reads only local files)."""
    key = os.fspath(file)
    if key not in self._local:
      self._local[key] = storage.local_file(key)
    return self._local[key]

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Tensor ``name``, checked to be a float tensor of ``shape`` before it is read."""
    if name not in self.files:
      raise ConversionError(f"{self.source}: no tensor {name}, which {self.dir / 'config.json'} "
                            f"implies; {_FIX_WEIGHTS}.")
    self.used.add(name)
    file = self.files[name]
    try:
      with jax.default_device(jax.devices("cpu")[0]), safe_open(self.local(file), "flax") as f:
        header = f.get_slice(name)
        if header.get_dtype() not in FLOATS:
          raise ConversionError(f"{file}: tensor {name} has dtype {header.get_dtype()}; lmjax "
                                f"imports {', '.join(FLOATS)} weights (dequantize a quantized "
                                "checkpoint first).")
        check_shape(f"{file}: tensor {name}", header.get_shape(), shape, "config.json",
                    _FIX_WEIGHTS)
        return np.asarray(f.get_tensor(name))
    except ConversionError:
      raise
    except Exception as e:  # noqa: BLE001 - a damaged file: name it
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ConversionError(f"{file}: cannot read tensor {name} ({reason}).") from None

  def unused(self) -> list[str]:
    return sorted(k for k in self.files if k not in self.used and not IGNORED.search(k))


_FIX_WEIGHTS = FIX_CONFIG + ", or save the model again with save_pretrained"


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
  out_dtype = np.dtype(jax.numpy.dtype(dtype or m.param_dtype))
  params: dict[str, Any] = {}
  for path, name, shape, to_lmjax, _ in mappings(m, fused_experts=FUSED_EXPERTS in weights):
    name, indices = rename(name), stacked(name, m)
    keys, counts = [k for k, _ in indices], [n for _, n in indices]
    value = None  # filled in place: (layers, experts, ...) of the per-tensor arrays
    for index in itertools.product(*map(range, counts)):
      part = to_lmjax(weights.get(name.format(**dict(zip(keys, index))), shape), m)
      if value is None:
        value = np.empty((*counts, *np.shape(part)), out_dtype)
      value[index] = part
    _put(params, path, value)
  if m.tie_embeddings and "lm_head.weight" in weights:
    weights.used.add("lm_head.weight")  # a tied copy of the embedding
  extra = weights.unused()
  if extra:
    raise ConversionError(f"{hf_dir}: tensors lmjax would not use: {', '.join(extra[:8])}"
                          f"{' ...' if len(extra) > 8 else ''} (an architecture feature lmjax "
                          "lacks, or a config.json that does not match the weights).")
  missing = [".".join(p) for p in _paths(_shapes(m)) if _dig_or_none(params, p) is None]
  if missing:
    raise ConversionError(f"no Hugging Face tensor for lmjax parameters {missing}.")
  return params


def _shapes(m: ml_collections.ConfigDict) -> dict[str, Any]:
  """The lmjax parameters of model config ``m`` as a dict of ShapeDtypeStructs."""
  return nnx.split(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))))[1].to_pure_dict()


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

  The tokenizer beside the weights (the first of :data:`TOKENIZER_SOURCES`: a
  ``tokenizer.json`` with its ``tokenizer_config.json`` and ``special_tokens_map.json``, a
  sentencepiece ``tokenizer.model``, a tiktoken file) is copied into ``workdir`` and becomes
  ``data.tokenizer``.
  """
  hf_dir, workdir = storage.absolute(hf_dir), storage.absolute(workdir)
  storage.check(workdir, write=True)
  cfg = config_from_hf(read_config(hf_dir), str(hf_dir / "config.json"))
  shape = {k: cfg.model[k] for k in SHAPE_KEYS if k != "param_dtype"}
  for key, value in (overrides or {}).items():
    _override(cfg, key, value)
  changed = [k for k, v in shape.items() if cfg.model[k] != v]
  if changed:
    raise ConversionError(f"overrides change the model's shape ({', '.join('model.' + k for k in changed)}): "
                          "the weights fix it.")
  if (workdir / "checkpoints").is_dir() and any((workdir / "checkpoints").iterdir()):
    raise ConversionError(f"{workdir}/checkpoints already holds checkpoints; import into a new "
                          "directory.")
  _import_tokenizer(hf_dir, workdir, cfg, say)
  config_lib.validate(cfg)
  params = params_from_hf(hf_dir, cfg)
  storage.write_text(workdir / "config.json", cfg.to_json(indent=2))
  ckpt = Checkpointer(workdir / "checkpoints", cfg)
  ckpt.save_params(0, params, cfg, source=str(hf_dir))
  ckpt.close()
  n = sum(x.size for x in jax.tree.leaves(params))
  say(f"imported {n:,} parameters ({read_config(hf_dir)['model_type']}) from {hf_dir} "
      f"into {workdir / 'checkpoints' / '0'}")
  return cfg


def _import_tokenizer(hf_dir: Path, workdir: Path, cfg: ml_collections.ConfigDict,
                      say: Callable[[str], None]) -> None:
  """Copies the tokenizer of ``hf_dir`` (the first of :data:`TOKENIZER_SOURCES`) into
  ``workdir`` and names it in ``cfg.data.tokenizer``; a note when there is none."""
  source = next((hf_dir / name for name in TOKENIZER_SOURCES if (hf_dir / name).is_file()), None)
  if source is None:
    say(f"note: no tokenizer ({', '.join(TOKENIZER_SOURCES)}) in {hf_dir}. Evaluate and generate "
        "with --config.data.tokenizer=..., or with token ids.")
    return
  tok = Tokenizer.load(str(source))  # DataError if it is no usable tokenizer
  cfg.data.tokenizer = tok.save(str(workdir))
  say(f"tokenizer: {source.relative_to(hf_dir)} ({tok.kind}, {tok.vocab_size} ids) -> "
      f"{', '.join(tok.files())}")
  if tok.vocab_size != cfg.model.vocab_size:
    say(f"note: the tokenizer has {tok.vocab_size} ids, the model {cfg.model.vocab_size} rows; "
        "lmjax trains only with equal sizes.")


def _override(cfg: ml_collections.ConfigDict, key: str, value: Any) -> None:
  """:func:`lmjax.config.override`; its ConfigError becomes a ConversionError naming the key."""
  try:
    config_lib.override(cfg, key, value)
  except config_lib.ConfigError as e:
    problem = "bad value" if _is_field(cfg, key) else "no such config field"
    raise ConversionError(f"override {key}: {problem} ({e})") from None


def _is_field(cfg: ml_collections.ConfigDict, key: str) -> bool:
  try:
    cfg[key]  # a ConfigDict reads dotted keys
    return True
  except (KeyError, TypeError):
    return False


# -- export --------------------------------------------------------------------------------


def params_to_hf(params: dict[str, Any], cfg: ml_collections.ConfigDict,
                 dtype: str = "float32") -> dict[str, np.ndarray]:
  """Hugging Face tensors (name -> NumPy array in ``dtype``) of lmjax ``params``, whose
  shapes are checked against those ``cfg`` implies."""
  m = cfg.model
  kind = hf_kind(m)
  out_dtype = np.dtype(jax.numpy.dtype(dtype))
  want = _shapes(m)
  for path, *_ in mappings(m):
    what = f"lmjax parameter {'.'.join(path)}"
    if _dig_or_none(params, path) is None:
      raise ConversionError(f"{what} is missing; pass the parameters of a model of this config.")
    check_shape(what, np.shape(_dig(params, path)), _dig(want, path).shape, "the config",
                "pass the parameters of a model of this config (lmjax.load(workdir).params)")
  get = lambda path: np.asarray(_dig(params, path))
  tensors: dict[str, np.ndarray] = {}
  for path, name, _, _, to_hf in mappings(m):
    if to_hf is None:
      continue
    value, indices = get(path), stacked(name, m)
    keys = [k for k, _ in indices]
    for index in itertools.product(*(range(n) for _, n in indices)):
      tensors[name.format(**dict(zip(keys, index)))] = to_hf(value[index], m)
  if kind == "gpt2":  # q, k, v fused into c_attn: (d, 3d) weights and (3d,) biases
    for i in range(m.num_layers):
      w = [get(("blocks", "attn", p))[i] for p in "qkv"]
      b = [get(("blocks", "attn", f"{p}_bias"))[i] for p in "qkv"]
      tensors[f"transformer.h.{i}.attn.c_attn.weight"] = np.concatenate(
          [a.reshape(m.embed_dim, -1) for a in w], axis=-1)
      tensors[f"transformer.h.{i}.attn.c_attn.bias"] = np.concatenate([a.reshape(-1) for a in b])
  return {k: np.ascontiguousarray(v.astype(out_dtype)) for k, v in tensors.items()}


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str | Path,
                      max_shard_size: str | int = "5GB") -> list[str]:
  """Writes ``tensors`` as ``model.safetensors`` or, over ``max_shard_size``, as numbered
  shards with ``model.safetensors.index.json`` (the layout ``save_pretrained`` writes).
  Returns the file names."""
  out_dir = storage.path(out_dir)
  limit = config_file.parse_size(max_shard_size)
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
    storage.write_bytes(out_dir / SINGLE, save(shards[0], metadata=metadata))
    return [SINGLE]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for name, shard in zip(names, shards):
    storage.write_bytes(out_dir / name, save(shard, metadata=metadata))
    weight_map.update({k: name for k in shard})
  total = sum(t.nbytes for t in tensors.values())
  storage.write_text(out_dir / INDEX, json.dumps({"metadata": {"total_size": total},
                                                  "weight_map": weight_map}, indent=2))
  return names + [INDEX]


def export_checkpoint(workdir: str | Path, out_dir: str | Path, step: int | None = None,
                      dtype: str | None = None, max_shard_size: str | int = "5GB",
                      say: Callable[[str], None] = print) -> dict[str, Any]:
  """Writes run ``workdir``'s parameters (newest usable checkpoint, or ``step``) to
  ``out_dir`` as a Hugging Face checkpoint: ``config.json``, safetensors (``dtype``, default
  bfloat16 for bf16-compute runs, else float32) and the run's tokenizer: a
  ``tokenizer.json`` with its ``tokenizer_config.json`` (a tiktoken tokenizer is converted to
  one), or a sentencepiece ``tokenizer.model``. Returns the written ``config.json`` contents. A mixture of
  experts exports as Mixtral (:data:`lmjax.hf_layout.MIXTRAL` says which models can); a LoRA
  run exports its adapters merged into the weights (:func:`lmjax.model.lora.merge_lora`), a
  plain model."""
  storage.check(out_dir, write=True)  # fail before restoring anything
  cfg = run_config(workdir, step)
  if hf_kind(cfg.model) == "mixtral" and cfg.model.capacity_factor > 0:
    say(f"note: model.capacity_factor={cfg.model.capacity_factor} drops the assignments over "
        "an expert's capacity in lmjax's forward pass; Mixtral runs the same weights dropless "
        "(as lmjax generates).")
  # Onto the host: the weights go to NumPy anyway, and no accelerator need hold them whole.
  cfg.model.attention = "xla"  # any backend restores the same parameters; xla runs on the CPU
  run = load(workdir, step, cfg=cfg, devices=jax.devices("cpu")[:1],
             mesh={"data": 1, "stage": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1},
             merge=True)  # LoRA adapters folded in: run.cfg.model.lora_rank is 0
  dtype = dtype or ("bfloat16" if run.cfg.model.compute_dtype == "bfloat16" else "float32")
  tok = run.tokenizer
  out_dir = storage.path(out_dir)
  config = hf_config(run.cfg, dtype, bos_id=tok.bos_id if tok else None,
                     eos_id=tok.eos_id if tok else None)
  params = jax.tree.map(np.asarray, jax.device_get(run.params))
  files = write_safetensors(params_to_hf(params, run.cfg, dtype), out_dir, max_shard_size)
  storage.write_text(out_dir / "config.json", json.dumps(config, indent=2))
  if tok is not None:
    for name, data in tok.hf_files().items():
      storage.write_bytes(out_dir / name, data)
      files.append(name)
  say(f"exported {workdir} step {run.step} ({config['architectures'][0]}, {dtype}) to {out_dir}: "
      f"{', '.join(['config.json'] + files)}")
  return config

