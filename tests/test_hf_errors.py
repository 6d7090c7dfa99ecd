"""Broken Hugging Face checkpoints fail with one line, never a traceback.

Small random ``transformers`` checkpoints (Llama, GPT-2, a sharded Llama; nothing is
downloaded) are saved, then broken: a required config.json key deleted or of the wrong
type, config.json no JSON object, a tensor of the wrong shape, transposed, missing or of an
integer dtype. Each import raises :class:`lmjax.hf.ConversionError` whose one line names the
file, the key or Hugging Face tensor, what was found and what was expected; the command
line turns it into "error: ..." and exit status 2. Export checks lmjax parameter shapes the
same way.
"""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from lmjax import hf, hf_layout
from lmjax.model import Transformer

ROOT = Path(__file__).resolve().parents[1]
LLAMA = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
GPT2 = dict(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
            eos_token_id=2)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """name -> a saved checkpoint directory: "llama", "llama_sharded", "gpt2"."""
  root = tmp_path_factory.mktemp("hf_errors")
  torch.manual_seed(0)
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
  llama.save_pretrained(root / "llama")
  llama.save_pretrained(root / "llama_sharded", max_shard_size="20KB")
  transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).save_pretrained(root / "gpt2")
  return {name: root / name for name in ("llama", "llama_sharded", "gpt2")}


def _copy(saved, name, tmp_path):
  shutil.copytree(saved[name], tmp_path / name)
  return tmp_path / name


def _edit_config(hf_dir, change):
  path = hf_dir / "config.json"
  config = json.loads(path.read_text())
  change(config)
  path.write_text(json.dumps(config))


def _edit_tensor(hf_dir, name, change):
  """Rewrites the safetensors file holding tensor ``name`` with ``change(tensor)`` (None
  deletes it); returns that file."""
  index = hf_dir / hf.INDEX
  shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else hf.SINGLE
  file = hf_dir / shard
  tensors = load_file(file)
  value = change(tensors.pop(name))
  if value is not None:
    tensors[name] = value
  save_file(tensors, file, metadata={"format": "pt"})
  return file


def _import_error(hf_dir, tmp_path) -> str:
  with pytest.raises(hf.ConversionError) as e:
    hf.import_checkpoint(hf_dir, tmp_path / "run", say=lambda m: None)
  message = str(e.value)
  assert "\n" not in message
  assert not (tmp_path / "run" / "checkpoints").exists()  # nothing half-written
  return message


@pytest.mark.parametrize("name,key", [
    ("llama", "num_hidden_layers"), ("llama", "vocab_size"), ("llama", "hidden_size"),
    ("llama", "num_attention_heads"), ("llama", "intermediate_size"),
    ("gpt2", "n_embd"), ("gpt2", "vocab_size"), ("gpt2", "n_layer"), ("gpt2", "n_head"),
])
def test_missing_config_key_names_file_and_key(saved, tmp_path, name, key):
  hf_dir = _copy(saved, name, tmp_path)
  _edit_config(hf_dir, lambda c: c.pop(key))
  message = _import_error(hf_dir, tmp_path)
  assert str(hf_dir / "config.json") in message
  assert f"no {key}" in message and f"model_type {name!r}" in message


@pytest.mark.parametrize("value,found", [("32", "'32'"), (None, "None"), (0, "0"), (2.5, "2.5")])
def test_config_value_of_the_wrong_type_names_key_and_value(saved, tmp_path, value, found):
  hf_dir = _copy(saved, "llama", tmp_path)
  _edit_config(hf_dir, lambda c: c.update(hidden_size=value))
  message = _import_error(hf_dir, tmp_path)
  assert str(hf_dir / "config.json") in message
  assert f"hidden_size is {found}; expected a positive integer" in message


def test_config_that_is_no_json_object(saved, tmp_path):
  hf_dir = _copy(saved, "llama", tmp_path)
  (hf_dir / "config.json").write_text('["llama"]')
  assert "config.json: a JSON list; expected an object" in _import_error(hf_dir, tmp_path)
  (hf_dir / "config.json").write_text('{"model_type": "llama",')
  assert "config.json: not valid JSON" in _import_error(hf_dir, tmp_path)
  (hf_dir / "config.json").write_text('{"vocab_size": 97}')
  message = _import_error(hf_dir, tmp_path)
  assert "config.json: no model_type; lmjax converts llama, mistral, mixtral, gpt2" in message


def test_rope_scaling_without_its_fields(saved, tmp_path):
  hf_dir = _copy(saved, "llama", tmp_path)
  _edit_config(hf_dir, lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": 8.0}))
  message = _import_error(hf_dir, tmp_path)
  assert str(hf_dir / "config.json") in message and "no rope_scaling.low_freq_factor" in message


@pytest.mark.parametrize("name,tensor,change,found,expected", [
    ("llama", "model.layers.1.self_attn.q_proj.weight", lambda t: np.zeros((40, 32), t.dtype),
     (40, 32), (32, 32)),
    ("llama", "model.layers.0.self_attn.k_proj.weight", lambda t: np.zeros((32, 32), t.dtype),
     (32, 32), (16, 32)),
    ("llama", "model.layers.1.self_attn.o_proj.weight", lambda t: np.zeros((32, 16), t.dtype),
     (32, 16), (32, 32)),
    ("llama_sharded", "model.layers.1.mlp.down_proj.weight", lambda t: np.ascontiguousarray(t.T),
     (48, 32), (32, 48)),
    ("llama", "model.embed_tokens.weight", lambda t: t[:90], (90, 32), (97, 32)),
    ("gpt2", "transformer.h.1.attn.c_attn.weight", lambda t: t[:, :64], (32, 64), (32, 96)),
    ("gpt2", "transformer.h.0.mlp.c_fc.bias", lambda t: t[:100], (100,), (128,)),
])
def test_tensor_of_the_wrong_shape_names_file_tensor_and_shapes(saved, tmp_path, name, tensor,
                                                                change, found, expected):
  hf_dir = _copy(saved, name, tmp_path)
  file = _edit_tensor(hf_dir, tensor, change)
  message = _import_error(hf_dir, tmp_path)
  assert f"{file}: tensor {tensor} has shape {found}; config.json implies {expected}" in message
  if found == expected[::-1]:
    assert "transposed" in message


def test_missing_tensor_names_file_and_tensor(saved, tmp_path):
  hf_dir = _copy(saved, "llama", tmp_path)
  file = _edit_tensor(hf_dir, "model.layers.1.mlp.up_proj.weight", lambda t: None)
  message = _import_error(hf_dir, tmp_path)
  assert f"{file}: no tensor model.layers.1.mlp.up_proj.weight" in message
  assert "config.json" in message


def test_tensor_of_an_integer_dtype(saved, tmp_path):
  hf_dir = _copy(saved, "gpt2", tmp_path)
  file = _edit_tensor(hf_dir, "transformer.h.0.ln_1.weight", lambda t: t.astype(np.int8))
  message = _import_error(hf_dir, tmp_path)
  assert f"{file}: tensor transformer.h.0.ln_1.weight has dtype I8" in message
  assert "F32" in message


def test_export_checks_parameter_shapes(saved):
  cfg = hf.config_from_hf(hf.read_config(saved["llama"]))
  params = hf.params_from_hf(saved["llama"], cfg)
  params["blocks"]["mlp"]["down"] = np.zeros((2, 32, 48), np.float32)  # (layers, f, d) wanted
  with pytest.raises(hf.ConversionError) as e:
    hf.params_to_hf(params, cfg)
  assert ("lmjax parameter blocks.mlp.down has shape (2, 32, 48); the config implies "
          "(2, 48, 32)") in str(e.value)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_layout_shapes_agree_with_the_model(saved, name):
  """Each mapping's Hugging Face shape becomes the lmjax parameter's shape and back."""
  cfg = hf.config_from_hf(hf.read_config(saved[name]))
  m = cfg.model
  want = nnx.split(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))))[1].to_pure_dict()
  for path, tensor, shape, to_lmjax, to_hf in hf_layout.mappings(m):
    target = want
    for k in path:
      target = target[k]
    per_layer = target.shape[1:] if "{i}" in tensor else target.shape
    assert to_lmjax(np.zeros(shape), m).shape == per_layer, tensor
    if to_hf is not None:
      assert to_hf(np.zeros(per_layer), m).shape == shape, tensor


def test_command_line_exits_2_with_one_line(saved, tmp_path):
  hf_dir = _copy(saved, "llama", tmp_path)
  _edit_config(hf_dir, lambda c: c.pop("num_hidden_layers"))
  out = subprocess.run([sys.executable, str(ROOT / "tools" / "convert_hf.py"), "import",
                        str(hf_dir), str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert "Traceback" not in out.stderr
  lines = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and re.search(r"config\.json: no num_hidden_layers", lines[0]), out.stderr


def test_export_refuses_a_bidirectional_model():
  from lmjax.config import default_config
  m = default_config().model
  assert hf_layout.hf_kind(m) == "llama"
  m.causal = False
  with pytest.raises(hf.ConversionError) as e:
    hf_layout.hf_kind(m)
  assert "model.causal=False" in str(e.value) and "\n" not in str(e.value)
