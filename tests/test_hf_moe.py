"""Mixtral checkpoints in and out, against ``transformers``' MixtralForCausalLM.

A small random Mixtral (4 experts, top-2, GQA) built from a local config is saved with
``save_pretrained`` (per-expert tensors), imported, and its logits compared in float32 with
transformers' on one device and on expert-parallel meshes; the fused tensor names
transformers holds in memory import the same. Back: the exported directory loads in
transformers with the same weights, and an lmjax-made mixture of experts (tied embeddings,
a sliding window) exports as a Mixtral computing its logits. Models Mixtral cannot express
are refused, naming what differs.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.torch import save_file

import lmjax
from lmjax import hf, hf_layout
from lmjax.checkpoint import Checkpointer
from lmjax.config import default_config
from lmjax.model import Transformer
from tests.test_hf import TOKENS, V, _hf_logits, _logits, assert_loads_back_unchanged
from tools import convert_hf

MIXTRAL = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
               num_experts_per_tok=2, max_position_embeddings=64, router_aux_loss_coef=0.02)
MESH = {"data": 1, "stage": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1}
quiet = lambda m: None


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
  """(HF model, its save_pretrained directory, the imported lmjax run directory)."""
  root = tmp_path_factory.mktemp("hf_moe")
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(transformers.MixtralConfig(**MIXTRAL),
                                                       attn_implementation="eager").eval()
  with torch.no_grad():  # far from the unit norms of a fresh init
    for key, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in key else 0.1 * torch.randn_like(p))
  model.save_pretrained(root / "hf")
  hf.import_checkpoint(root / "hf", root / "run", say=quiet)
  return model, root / "hf", root / "run"


def test_imported_logits_equal_transformers(mixtral):
  model, hf_dir, workdir = mixtral
  names = json.loads((hf_dir / "config.json").read_text())
  assert names["model_type"] == "mixtral"
  run = lmjax.load(workdir, devices=jax.devices()[:1])
  m = run.cfg.model
  assert (m.num_experts, m.experts_per_token, m.expert_mlp_dim, m.router) == (4, 2, 48, "softmax")
  assert (m.capacity_factor, m.moe_aux_loss, m.moe_z_loss, m.sliding_window) == (0.0, 0.02, 0.0, 0)
  assert run.params["blocks"]["moe"]["gate"].shape == (2, 4, 32, 48)
  want = _hf_logits(model, TOKENS)
  np.testing.assert_allclose(_logits(run, TOKENS), want, rtol=1e-5, atol=1e-5)
  assert np.std(want) > 0.3


def test_exported_checkpoint_loads_in_transformers_unchanged(mixtral, tmp_path):
  model, _, workdir = mixtral
  config = hf.export_checkpoint(workdir, tmp_path / "out", max_shard_size="30KB", say=quiet)
  assert config["architectures"] == ["MixtralForCausalLM"]
  assert (config["num_local_experts"], config["num_experts_per_tok"]) == (4, 2)
  assert config["router_aux_loss_coef"] == 0.02 and config["sliding_window"] is None
  assert_loads_back_unchanged(model, tmp_path / "out")


@pytest.mark.parametrize("mesh", [
    pytest.param({"expert": 4}, id="expert4"),
    pytest.param({"expert": 2, "fsdp": 2}, id="expert2_fsdp2", marks=pytest.mark.slow),
    pytest.param({"expert": 2, "tensor": 2}, id="expert2_tensor2", marks=pytest.mark.slow)])
def test_imported_weights_restore_onto_expert_parallel_meshes(mixtral, mesh):
  """Experts split over the expert axis; tokens travel to them (4 rows: one per device of
  the batch axes) and the logits stay transformers'."""
  model, _, workdir = mixtral
  tokens = np.concatenate([TOKENS, TOKENS[:, ::-1]])  # (4, 24)
  run = lmjax.load(workdir, devices=jax.devices()[:4], mesh={**MESH, **mesh})
  assert dict(run.setup.mesh.shape) == {**MESH, **mesh}
  up = run.params["blocks"]["moe"]["up"]  # (l, E, d, f)
  assert up.sharding.shard_shape(up.shape)[1] == 4 // mesh["expert"]  # experts really split
  np.testing.assert_allclose(_logits(run, tokens), _hf_logits(model, tokens), rtol=1e-5, atol=1e-5)


def test_fused_expert_names_import_the_same(mixtral, tmp_path):
  """transformers' in-memory names (mlp.gate, mlp.experts.gate_up_proj / down_proj), as a
  state_dict saved directly holds them."""
  model, hf_dir, _ = mixtral
  (tmp_path / "fused").mkdir()
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert hf_layout.FUSED_EXPERTS in state
  save_file(state, tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
  shutil.copyfile(hf_dir / "config.json", tmp_path / "fused" / "config.json")
  hf.import_checkpoint(tmp_path / "fused", tmp_path / "run", say=quiet)
  run = lmjax.load(tmp_path / "run", devices=jax.devices()[:1])
  np.testing.assert_allclose(_logits(run, TOKENS), _hf_logits(model, TOKENS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True])
def test_layout_shapes_agree_with_the_model(mixtral, fused):
  """Each mapping's per-layer, per-expert tensor shape becomes the lmjax parameter's slice."""
  cfg = hf.config_from_hf(hf.read_config(mixtral[1]))
  m = cfg.model
  want = nnx.split(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))))[1].to_pure_dict()
  for path, tensor, shape, to_lmjax, to_hf in hf_layout.mappings(m, fused_experts=fused):
    target = want
    for k in path:
      target = target[k]
    inner = target.shape[len(hf_layout.stacked(tensor, m)):]
    assert to_lmjax(np.zeros(shape), m).shape == inner, tensor
    if to_hf is not None:
      assert to_hf(np.zeros(inner), m).shape == shape, tensor


def _moe_run(tmp_path, **options):
  """A random lmjax mixture of experts saved as run tmp_path/run: (graphdef, parameters)."""
  cfg = default_config()
  m = cfg.model
  m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = V, 2, 32, 4, 2
  m.head_dim, m.mlp_dim, m.max_seq_len, m.init_std = 8, 64, 64, 0.1
  m.num_experts, m.experts_per_token, m.expert_mlp_dim = 4, 2, 24
  cfg.data.seq_len = 64
  for key, value in options.items():
    m[key] = value
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)  # NumPy draws: no initializer to compile
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32),
                        shapes.to_pure_dict())
  Checkpointer(tmp_path / "run" / "checkpoints", cfg).save_params(0, params, cfg)
  return graphdef, params


def test_lmjax_moe_exports_to_mixtral(tmp_path):
  """Tied embeddings, a sliding window, and a capacity that drops nothing here (24 tokens,
  C = 2 * 24 * 2 / 4 = 24): transformers computes lmjax's logits."""
  graphdef, params = _moe_run(tmp_path, sliding_window=3, capacity_factor=2.0)
  notes = []
  config = hf.export_checkpoint(tmp_path / "run", tmp_path / "out", say=notes.append)
  assert any("capacity_factor=2.0" in n and "dropless" in n for n in notes), notes
  assert (config["tie_word_embeddings"], config["sliding_window"], config["intermediate_size"]) == (True, 3, 24)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                           attn_implementation="eager").eval()
  assert type(back).__name__ == "MixtralForCausalLM"
  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))
  want = np.asarray(forward(params, jnp.asarray(TOKENS)))
  np.testing.assert_allclose(_hf_logits(back, TOKENS), want, rtol=1e-5, atol=1e-5)


def test_command_line_converts_mixtral(mixtral, tmp_path, capsys):
  model, hf_dir, _ = mixtral
  assert convert_hf.main(["import", str(hf_dir), str(tmp_path / "run")]) == 0
  assert "imported" in capsys.readouterr().out
  assert convert_hf.main(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
  assert "MixtralForCausalLM" in capsys.readouterr().out
  assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mixtral"


def test_what_mixtral_cannot_express_fails_with_one_line(mixtral, tmp_path):
  _, hf_dir, workdir = mixtral
  config = json.loads((hf_dir / "config.json").read_text())
  for name, change, match in [
      ("a", lambda c: c.pop("num_local_experts"), r"config.json: no num_local_experts, which a "
                                                  r"model_type 'mixtral' config needs"),
      ("b", lambda c: c.update(num_experts_per_tok=5), "num_experts_per_tok 5 exceeds num_local_experts 4"),
      ("c", lambda c: c.update(router_aux_loss_coef=-1), "router_aux_loss_coef is -1; expected a number >= 0"),
      ("d", lambda c: c.update(intermediate_size=40), r"tensor model.layers.0.block_sparse_moe.experts.0.w1.weight "
                                                      r"has shape \(48, 32\); config.json implies \(40, 32\)"),
      ("e", lambda c: c.update(num_local_experts=3), r"tensor model.layers.0.block_sparse_moe.gate.weight "
                                                     r"has shape \(4, 32\); config.json implies \(3, 32\)"),
  ]:
    bad = tmp_path / name
    shutil.copytree(hf_dir, bad)
    edited = dict(config)
    change(edited)
    (bad / "config.json").write_text(json.dumps(edited))
    with pytest.raises(hf.ConversionError, match=match) as e:
      hf.import_checkpoint(bad, tmp_path / f"{name}-run", say=quiet)
    assert "\n" not in str(e.value)
  with pytest.raises(hf.ConversionError, match="change the model's shape.*model.num_experts"):
    hf.import_checkpoint(hf_dir, tmp_path / "f-run", {"model.num_experts": "8"}, say=quiet)

  cfg = hf.config_from_hf(config)
  for change, named in [({"router": "sigmoid"}, "'router': 'sigmoid'"),
                        ({"num_shared_experts": 1}, "'num_shared_experts': 1"),
                        ({"router_scale": 2.5, "first_dense_layers": 1}, "'router_scale': 2.5, 'first_dense_layers': 1"),
                        ({"norm": "layernorm"}, "'norm': 'layernorm'")]:
    changed = cfg.copy_and_resolve_references()
    changed.model.update(change)
    with pytest.raises(hf.ConversionError, match="exports as Mixtral") as e:
      hf.hf_config(changed)
    assert named in str(e.value) and "\n" not in str(e.value)


def test_lmjax_sigmoid_router_export_is_refused(tmp_path):
  """A DeepSeek-style router (sigmoid with a balancing bias) has no Mixtral form."""
  _moe_run(tmp_path, router="sigmoid")
  with pytest.raises(hf.ConversionError, match="exports as Mixtral.*'router': 'sigmoid'"):
    hf.export_checkpoint(tmp_path / "run", tmp_path / "out", say=quiet)
  assert not (tmp_path / "out" / "config.json").exists()
