"""Hugging Face checkpoints in and out, against ``transformers`` itself.

Each test builds a small random model with ``transformers`` from a local config (nothing is
downloaded), saves it with ``save_pretrained``, converts it, and compares logits in float32:
Llama with GQA, untied embeddings, Llama 3 RoPE scaling, biases and sharded safetensors;
Llama with tied embeddings and linear RoPE scaling; Llama with YaRN RoPE scaling; Mistral with a sliding window; GPT-2
(LayerNorm, GELU, learned positions, fused q/k/v, tied embeddings). Then back: the exported
directory loads in ``transformers`` with the same weights and logits.
"""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import lmjax
from lmjax import hf
from lmjax.checkpoint import Checkpointer, IncompatibleCheckpoint
from lmjax.config import default_config
from lmjax.generate import generate_ids
from lmjax.rundir import run_config
from lmjax.mesh import use_rules
from lmjax.state import build, init_state
from lmjax.trainer import train
from tools import convert_hf, inspect_checkpoint

ROOT = Path(__file__).resolve().parents[1]
V = 97  # vocabulary of the random models

HF_MODELS = {
    "llama_gqa_untied_llama3_bias": (transformers.LlamaConfig, dict(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False, attention_bias=True, mlp_bias=True, rope_theta=5e5,
        rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "llama_tied_mha_linear_rope": (transformers.LlamaConfig, dict(
        vocab_size=V, hidden_size=32, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
        tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # YaRN: 4 x the original 16 positions (TOKENS are 24 long); theta 10 puts the ramp over
    # dimensions 0..4 of 8 (kept, blended, divided by 4) and cos/sin are scaled by 1.139.
    "llama_yarn_rope": (transformers.LlamaConfig, dict(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
        tie_word_embeddings=False, rope_theta=10.0,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})),
    "mistral_sliding_window": (transformers.MistralConfig, dict(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        sliding_window=5)),
    "gpt2": (transformers.GPT2Config, dict(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
        eos_token_id=2)),
}


def _hf_model(name, seed=0):
  config_cls, kwargs = HF_MODELS[name]
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs),
                                                       attn_implementation="eager").eval()
  with torch.no_grad():  # far from the zero biases and unit norms of a fresh init
    for key, p in model.named_parameters():
      p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in key or ".ln_" in key
              else 0.1 * torch.randn_like(p))
  return model


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def _logits(run, tokens):
  with jax.set_mesh(run.setup.mesh), use_rules(run.setup.rules):
    fn = jax.jit(lambda p, t: run.setup.model(p)(t))
    return np.asarray(fn(run.params, jnp.asarray(tokens)))


TOKENS = np.random.default_rng(0).integers(0, V, (2, 24))  # longer than the sliding window


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """name -> (HF model, HF directory, lmjax run directory)."""
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for name in HF_MODELS:
    model = _hf_model(name)
    model.save_pretrained(root / name, max_shard_size="20KB" if name.startswith("llama_gqa") else "5GB")
    hf.import_checkpoint(root / name, root / f"{name}-run", say=lambda m: None)
    out[name] = (model, root / name, root / f"{name}-run")
  return out


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_imported_logits_equal_transformers(converted, name):
  model, hf_dir, workdir = converted[name]
  if name.startswith("llama_gqa"):
    assert (hf_dir / hf.INDEX).exists()  # sharded safetensors
  run = lmjax.load(workdir, devices=jax.devices()[:1])
  want = _hf_logits(model, TOKENS)
  np.testing.assert_allclose(_logits(run, TOKENS), want, rtol=1e-5, atol=1e-5)
  assert np.std(want) > 0.3


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_exported_checkpoint_loads_in_transformers_unchanged(converted, name, tmp_path):
  model, _, workdir = converted[name]
  hf.export_checkpoint(workdir, tmp_path / "out", max_shard_size="30KB", say=lambda m: None)
  assert_loads_back_unchanged(model, tmp_path / "out")


def assert_loads_back_unchanged(model, out_dir):
  """``transformers`` loads the export in ``out_dir`` as ``model``'s class with exactly its
  weights and logits."""
  back = transformers.AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager").eval()
  assert type(back) is type(model)
  want, got = model.state_dict(), back.state_dict()
  assert set(got) == set(want)
  for key in want:
    torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)  # float32 both ways: exact
  np.testing.assert_allclose(_hf_logits(back, TOKENS), _hf_logits(model, TOKENS), rtol=1e-6, atol=1e-6)


def test_gpt2_files_of_the_original_layout(converted, tmp_path):
  """The original GPT-2 files name tensors without "transformer." and carry causal-mask
  buffers (h.<i>.attn.bias); both import the same."""
  from safetensors.numpy import load_file, save_file
  model, hf_dir, _ = converted["gpt2"]
  tensors = {k.removeprefix("transformer."): v for k, v in load_file(hf_dir / "model.safetensors").items()}
  tensors.update({f"h.{i}.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float32)) for i in range(2)})
  (tmp_path / "old").mkdir()
  save_file(tensors, tmp_path / "old" / "model.safetensors", metadata={"format": "pt"})
  shutil.copyfile(hf_dir / "config.json", tmp_path / "old" / "config.json")
  hf.import_checkpoint(tmp_path / "old", tmp_path / "run", say=lambda m: None)
  run = lmjax.load(tmp_path / "run", devices=jax.devices()[:1])
  np.testing.assert_allclose(_logits(run, TOKENS), _hf_logits(model, TOKENS), rtol=1e-5, atol=1e-5)


def test_imported_weights_restore_onto_other_meshes(converted):
  model, _, workdir = converted["llama_gqa_untied_llama3_bias"]
  want = _hf_logits(model, TOKENS)
  for mesh in ({"fsdp": 2, "tensor": 4}, {"data": 2, "fsdp": 4}):
    run = lmjax.load(workdir, mesh={"data": 1, "stage": 1, "fsdp": 1, "expert": 1, "tensor": 1, **mesh})
    assert dict(run.setup.mesh.shape) == {"data": 1, "stage": 1, "fsdp": 1, "expert": 1, "context": 1, "tensor": 1, **mesh}
    q = run.params["blocks"]["attn"]["q"]
    assert q.sharding.shard_shape(q.shape) != q.shape  # really sharded
    np.testing.assert_allclose(_logits(run, TOKENS), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mistral_sliding_window", "gpt2", "llama_yarn_rope"])
def test_greedy_generation_equals_transformers(converted, name):
  model, _, workdir = converted[name]
  run = lmjax.load(workdir, devices=jax.devices()[:1])
  prompt = TOKENS[0, :6].tolist()
  out = generate_ids(run.setup, run.params, [prompt], max_new_tokens=12, temperature=0)
  with torch.no_grad():
    want = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].numpy()
  np.testing.assert_array_equal(out.tokens[0], want)


@pytest.mark.parametrize("options", [
    {},  # Llama
    dict(sliding_window=3, tie_embeddings=False, num_kv_heads=1),  # Mistral
    dict(norm="layernorm", mlp="gelu", position_embedding="learned", attention_bias=True,
         mlp_bias=True, num_kv_heads=4, head_dim=16, norm_eps=1e-5),  # GPT-2
    dict(rope_scaling="yarn", rope_scaling_factor=4.0, rope_original_max_len=16, rope_theta=100.0,
         rope_beta_fast=16.0, rope_beta_slow=0.5, rope_truncate=False, rope_mscale=1.0,
         rope_mscale_all_dim=0.5),  # Llama, YaRN with every setting away from its default
], ids=["llama", "mistral", "gpt2", "llama_yarn_rope"])
def test_lmjax_models_export_to_transformers(options, tmp_path):
  cfg = default_config()
  m = cfg.model
  m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = V, 2, 64, 4, 2
  m.head_dim, m.mlp_dim, m.max_seq_len, m.init_std = 16, 96, 64, 0.1
  cfg.data.seq_len = 64
  for key, value in options.items():
    m[key] = value
  cfg.mesh.fsdp = 1
  setup = build(cfg, jax.devices()[:1])
  params = init_state(setup)["params"]
  Checkpointer(tmp_path / "run" / "checkpoints", cfg).save_params(0, params, cfg)
  config = hf.export_checkpoint(tmp_path / "run", tmp_path / "out", say=lambda m: None)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out",
                                                           attn_implementation="eager").eval()
  assert config["architectures"] == [type(back).__name__]
  with jax.set_mesh(setup.mesh), use_rules(setup.rules):
    want = np.asarray(jax.jit(lambda p, t: setup.model(p)(t))(params, jnp.asarray(TOKENS)))
  np.testing.assert_allclose(_hf_logits(back, TOKENS), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_sentencepiece_tokenizer_comes_along_and_fine_tuning_starts(tmp_path):
  """A Llama checkpoint with its tokenizer.model (unk 0, bos 1, eos 2, as Llama's): the run
  uses it as it is, evaluates text and fine-tunes from the imported weights."""
  import sentencepiece as spm
  docs = lmjax.data.default_documents()[:60]
  spm.SentencePieceTrainer.train(sentence_iterator=iter(d for doc in docs for d in doc.splitlines() if d.strip()),
                                 model_prefix=str(tmp_path / "sp"), vocab_size=400, unk_id=0,
                                 bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, minloglevel=2)
  config_cls, kwargs = HF_MODELS["llama_tied_mha_linear_rope"]
  torch.manual_seed(1)
  model = transformers.LlamaForCausalLM(config_cls(**{**kwargs, "vocab_size": 400}))
  model.save_pretrained(tmp_path / "hf")
  shutil.copyfile(tmp_path / "sp.model", tmp_path / "hf" / "tokenizer.model")
  hf.import_checkpoint(tmp_path / "hf", tmp_path / "run",
                       {"data.seq_len": "32", "model.param_dtype": "bfloat16"}, say=lambda m: None)

  run = lmjax.load(tmp_path / "run", devices=jax.devices()[:1])
  assert run.params["blocks"]["mlp"]["up"].dtype == jnp.bfloat16  # stored as asked
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
  text = "def f(x):\n    return x + 1"
  assert (run.tokenizer.bos_id, run.tokenizer.eos_id) == (1, 2)
  assert run.tokenizer.encode(text) == sp.encode(text)
  assert Path(run.cfg.data.tokenizer) == (tmp_path / "run" / "tokenizer.model").absolute()
  (tmp_path / "doc.txt").write_text(docs[0])
  result = run.evaluate(str(tmp_path / "doc.txt"))
  assert 4.0 < result["loss"] < 8.0  # a random model over 400 pieces: near ln 400 = 6.0

  # Resuming "training" in the import directory is refused with the way to fine-tune.
  cfg = run_config(tmp_path / "run")
  cfg.train.steps, cfg.train.progress_bar, cfg.mesh.fsdp = 2, False, 1
  with pytest.raises(IncompatibleCheckpoint, match="init_from="):
    train(cfg, tmp_path / "run", devices=jax.devices()[:1])
  # configs/finetune.py:RUN takes the model, tokenizer and parameters from the import.
  spec = importlib.util.spec_from_file_location("finetune", ROOT / "configs" / "finetune.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  cfg = module.get_config(str(tmp_path / "run"))
  cfg.train.steps, cfg.train.progress_bar, cfg.train.eval_every, cfg.mesh.fsdp = 2, False, 0, 1
  cfg.data.global_batch_size = 2
  history = train(cfg, tmp_path / "tuned", devices=jax.devices()[:1])
  assert len(history) == 2 and np.isfinite(history[-1]["loss"])
  tuned = lmjax.load(tmp_path / "tuned", devices=jax.devices()[:1])
  assert tuned.tokenizer.sha256 == run.tokenizer.sha256 and tuned.cfg.train.init_from == str(tmp_path / "run")
  assert tuned.params["blocks"]["mlp"]["up"].dtype == jnp.float32  # float32 master weights
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b, np.float32)).max()),
                       tuned.params, run.params)
  assert 0 < max(jax.tree.leaves(moved)) < 1e-3  # two steps at lr <= 2e-5 from the imported weights


YARN_SETTINGS = [
    {},  # beta_fast 32, beta_slow 1, truncated ramp, attention factor 0.1 ln(factor) + 1
    {"truncate": False, "beta_fast": 8.0, "beta_slow": 0.5},
    {"mscale": 1.0, "mscale_all_dim": 0.5},  # DeepSeek's attention factor
    {"attention_factor": 1.25, "mscale": 0.707, "mscale_all_dim": 1.0},  # given: wins
    {"factor": 1.0},  # no attention factor below 1
]


@pytest.mark.parametrize("settings", YARN_SETTINGS, ids=["defaults", "betas_untruncated", "mscale",
                                                         "attention_factor", "factor_1"])
def test_yarn_rope_equals_transformers(settings):
  from transformers.modeling_rope_utils import _compute_yarn_parameters
  from lmjax.model.layers import Rope
  for theta, h, original in ((10.0, 16, 16), (1e4, 64, 4096), (5e5, 128, 8192)):
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": original,
              **settings}
    config = transformers.LlamaConfig(hidden_size=2 * h, num_attention_heads=2, head_dim=h,
                                      max_position_embeddings=64 * original, rope_theta=theta,
                                      rope_scaling=dict(params))
    freqs, scale = _compute_yarn_parameters(config)
    ours = {k: v for k, v in params.items() if k not in ("rope_type", "original_max_position_embeddings")}
    rope = Rope(theta=theta, scaling="yarn", original_max_len=original, **ours)
    np.testing.assert_allclose(rope.frequencies(h), freqs.numpy(), rtol=1e-6, atol=0)
    assert rope.attention_scaling == pytest.approx(scale, rel=1e-12)


@pytest.mark.parametrize("rope_parameters", [
    {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 0.5,
     "beta_fast": 4, "beta_slow": 0.5, "truncate": False, "attention_factor": None},
    {"factor": None, "original_max_position_embeddings": 8},  # factor: 64 / 8
    {"factor": 2.0, "beta_fast": 0, "beta_slow": None, "truncate": None},  # as 32, 1, false
], ids=["all_keys", "no_factor", "nulls_and_zeros"])
def test_yarn_config_imports_and_exports_as_transformers_reads_it(rope_parameters):
  """config.json's yarn fields, defaults and nulls included, give lmjax the frequencies and
  attention factor ``transformers`` computes from them, and export keeps them."""
  from transformers.modeling_rope_utils import _compute_yarn_parameters
  from lmjax.config import validate
  from lmjax.model.config import ModelConfig
  from lmjax.model.layers import Rope
  hf_json = {"model_type": "llama", "vocab_size": V, "hidden_size": 32, "intermediate_size": 48,
             "num_hidden_layers": 1, "num_attention_heads": 2, "head_dim": 16,
             "max_position_embeddings": 64,
             "rope_parameters": {"rope_type": "yarn", "rope_theta": 10.0, **rope_parameters}}

  cfg = hf.config_from_hf(json.loads(json.dumps(hf_json)))
  validate(cfg)
  rope = Rope.from_config(ModelConfig.from_config(cfg.model))
  exported = hf.hf_config(cfg)
  assert rope.scaling == "yarn" and exported["rope_scaling"]["rope_type"] == "yarn"
  for source in (hf_json, exported):
    freqs, scale = _compute_yarn_parameters(transformers.LlamaConfig(**json.loads(json.dumps(source))))
    np.testing.assert_allclose(rope.frequencies(16), freqs.numpy(), rtol=1e-6, atol=0)
    assert rope.attention_scaling == pytest.approx(scale, rel=1e-12)
  assert hf.config_from_hf(exported).model == cfg.model
  with pytest.raises(hf.ConversionError, match="rope_parameters.truncate is 'no'; expected true or false"):
    hf.config_from_hf({**hf_json, "rope_parameters": {**hf_json["rope_parameters"], "truncate": "no"}})


def test_bad_checkpoints_fail_with_the_file_and_reason(converted, tmp_path):
  _, llama_dir, workdir = converted["llama_tied_mha_linear_rope"]
  with pytest.raises(hf.ConversionError, match="config.json: no such file"):
    hf.import_checkpoint(tmp_path, tmp_path / "a")
  bad = tmp_path / "bad"
  shutil.copytree(llama_dir, bad)
  config = json.loads((bad / "config.json").read_text())
  (bad / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
  with pytest.raises(hf.ConversionError, match="model_type 'falcon' is not supported"):
    hf.import_checkpoint(bad, tmp_path / "b")
  (bad / "config.json").write_text(json.dumps({**config, "rope_parameters": {"rope_type": "longrope", "factor": 2.0}}))
  with pytest.raises(hf.ConversionError, match="rope scaling 'longrope' is not supported"):
    hf.import_checkpoint(bad, tmp_path / "c")
  (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 64}))
  with pytest.raises(hf.ConversionError, match=r"model.safetensors: tensor model.layers.0.mlp.gate_proj.weight "
                     r"has shape \(40, 32\); config.json implies \(64, 32\)"):
    hf.import_checkpoint(bad, tmp_path / "d")
  (bad / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
  with pytest.raises(hf.ConversionError, match="tensors lmjax would not use: model.layers.2"):
    hf.import_checkpoint(bad, tmp_path / "e")
  (bad / "config.json").write_text(json.dumps(config))
  (bad / "model.safetensors").write_bytes(b"\0" * 100)
  with pytest.raises(hf.ConversionError, match="model.safetensors"):
    hf.import_checkpoint(bad, tmp_path / "f")
  (bad / "model.safetensors").unlink()
  (bad / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(hf.ConversionError, match="found pytorch_model.bin.*safe_serialization"):
    hf.import_checkpoint(bad, tmp_path / "g")
  with pytest.raises(hf.ConversionError, match="already holds checkpoints"):
    hf.import_checkpoint(llama_dir, workdir)
  with pytest.raises(hf.ConversionError, match="change the model's shape.*model.embed_dim"):
    hf.import_checkpoint(llama_dir, tmp_path / "h", {"model.embed_dim": "64"})
  cfg = default_config()
  cfg.model.norm = "layernorm"  # LayerNorm with RoPE and SwiGLU: no such HF architecture
  with pytest.raises(hf.ConversionError, match="no Hugging Face architecture matches"):
    hf.hf_config(cfg)


@pytest.mark.slow
def test_command_line_imports_and_exports(converted, tmp_path, capsys):
  _, hf_dir, _ = converted["gpt2"]
  tool = [sys.executable, str(ROOT / "tools" / "convert_hf.py")]
  run = lambda *a: subprocess.run([*tool, *a], cwd=ROOT, capture_output=True, text=True, timeout=300)
  out = run("import", str(hf_dir), str(tmp_path / "run"), "--set", "model.compute_dtype=bfloat16")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "imported" in out.stdout and "no tokenizer (tokenizer.json" in out.stdout
  assert json.loads((tmp_path / "run" / "config.json").read_text())["model"]["compute_dtype"] == "bfloat16"
  report = inspect_checkpoint.describe(tmp_path / "run")
  assert "step 0:" in report and "verified; parameters only, imported from" in report
  out = run("export", str(tmp_path / "run"), str(tmp_path / "out"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
  # Bad input: exit status 2 and one line naming the problem (same entry point, in-process).
  capsys.readouterr()
  assert convert_hf.main(["import", str(tmp_path / "nothing"), str(tmp_path / "run2")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "config.json" in err
  assert convert_hf.main(["import", str(hf_dir), str(tmp_path / "run3"), "--set", "model.nope=1"]) == 2
  assert "model.nope: no such config field" in capsys.readouterr().err
