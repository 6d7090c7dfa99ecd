"""Config defaults, command-line overrides and every validation error naming its key."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import pytest

from lmjax.config import (ConfigError, default_config, override,
                          resolve_mesh_shape, validate)
from lmjax.config_file import parse_arg, parse_size
from lmjax.metrics import inactive_params
from lmjax.state import build

ROOT = Path(__file__).resolve().parents[1]


def _module(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _load(name, arg=None):
  return _module(ROOT / "configs" / f"{name}.py").get_config(arg)


# Every config file in configs/ (the others there are shared helpers: common.py, llama.py).
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if "def get_config" in p.read_text())
# finetune.py, chat.py ... start from a run directory: parse_arg(arg, run="", ...)
STANDALONE = [name for name in CONFIGS if 'run=""' not in (ROOT / "configs" / f"{name}.py").read_text()]


def test_defaults_and_shipped_configs_validate():
  validate(default_config(), num_devices=8)
  for name in ("tiny", "gpt2_small", "llama_1b"):
    validate(_load(name), num_devices=8)
  validate(_load("tiny", "runlocal"), num_devices=1)
  validate(_load("gpt2_small", "runlocal"), num_devices=1)
  validate(_load("gpt2_small", "gpt2,runlocal"), num_devices=1)


def test_gpt2_architecture_has_gpt2_small_parameter_count():
  cfg = _load("gpt2_small", "gpt2")
  cfg.model.vocab_size = 50257  # GPT-2's own vocabulary
  assert build(cfg, jax.devices()).num_params == 124_439_808  # GPT-2 small, tied embeddings


def test_every_default_field_is_documented_where_defined():
  source = (ROOT / "lmjax" / "config.py").read_text().splitlines()
  for line in source:
    stripped = line.strip()
    if stripped.startswith(("m.", "d.", "o.", "t.", "ms.", "c.seed")) and " = " in stripped:
      if stripped.split(" = ")[0] in ("o.b1", "o.b2", "o.eps"):
        continue  # AdamW's own hyper-parameters, named as in Optax
      assert "#" in stripped, f"config field without a comment: {stripped}"


@pytest.mark.parametrize("key,value,needle", [
    ("model.num_kv_heads", 3, "config.model.num_kv_heads: model.num_heads (4) must be divisible"),
    ("model.head_dim", 7, "config.model.head_dim: must be even"),
    ("model.remat", "some", "config.model.remat: must be one of"),
    ("model.param_dtype", "float64", "config.model.param_dtype"),
    # No loss scaling: float16's small gradients would underflow, so it is refused, naming bfloat16.
    ("model.compute_dtype", "float16", "config.model.compute_dtype: must be one of ('float32', "
                                       "'bfloat16'), got 'float16'. float16 needs loss scaling"),
    ("model.param_dtype", "float16", "(small gradients underflow): use bfloat16."),
    ("data.seq_len", 4096, "config.data.seq_len: must be in [1, model.max_seq_len=128]"),
    ("data.global_batch_size", 12, "config.data.global_batch_size: 12 must be divisible by mesh data*fsdp*expert (8)"),
    ("optim.learning_rate", -1.0, "config.optim.learning_rate: must be positive"),
    ("train.steps", 0, "config.train.steps: must be positive"),
    ("mesh.tensor", 3, "config.mesh: the fixed axes"),
    ("mesh.stage", 0, "config.mesh.stage: must be a positive size or -1"),
    ("train.nan_policy", "ignore", "config.train.nan_policy: must be one of ('halt', 'skip'), got 'ignore'."),
    ("data.format", "chats", "config.data.format: must be one of ('text', 'prompt_response', 'chat', 'preference')"),
    ("model.attention", "flash", "config.model.attention: must be one of"),
    ("model.sliding_window", -1, "config.model.sliding_window: must be >= 0, got -1."),
    ("train.spike_window", 1, "config.train.spike_window: must be >= 2, got 1."),
    ("train.spike_max_consecutive", 0, "config.train.spike_max_consecutive: must be positive, got 0."),
    ("mesh.dcn_fsdp", 0, "config.mesh.dcn_fsdp: must be >= 1, got 0."),
    ("model.pipeline_microbatches", 0, "config.model.pipeline_microbatches: must be positive or -1"),
    ("data.eval_fraction", 1.0, "config.data.eval_fraction: must be in [0, 1), got 1.0."),
    ("optim.end_lr_fraction", 1.5, "config.optim.end_lr_fraction: must be in [0, 1], got 1.5."),
    ("data.seq_len", 0, "config.data.seq_len: must be positive, got 0."),
    ("model.num_kv_heads", 0, "config.model.num_kv_heads: must be positive, got 0."),
    ("optim.name", "sgd", "config.optim.name: must be one of ('adamw', 'adafactor', 'lion', 'muon'), got 'sgd'."),
    ("optim.schedule", "step", "config.optim.schedule: must be one of ('cosine', 'wsd', 'constant', 'linear')"),
    ("optim.decay_shape", "sqrt", "config.optim.decay_shape: must be one of ('linear', 'cosine', '1-sqrt')"),
    ("optim.decay_fraction", 0.0, "config.optim.decay_fraction: must be in (0, 1], got 0.0."),
    ("optim.lion_b2", 1.0, "config.optim.lion_b2: must be in [0, 1), got 1.0."),
    ("optim.muon_ns_steps", 0, "config.optim.muon_ns_steps: must be positive, got 0."),
    ("optim.lr_multipliers", (("embed(", 0.1),), "config.optim.lr_multipliers[0]: invalid regex 'embed('"),
    ("optim.lr_multipliers", (("embed", -1.0),), "config.optim.lr_multipliers[0]: must be (regex, multiplier >= 0)"),
])
def test_validation_errors_name_the_key(key, value, needle):
  cfg = default_config()
  section, field = key.split(".")
  cfg[section][field] = value
  with pytest.raises(ConfigError) as e:
    validate(cfg, num_devices=8)
  assert needle in str(e.value)


def test_a_wsd_decay_that_does_not_fit_after_the_warmup_is_refused():
  cfg = default_config()
  cfg.optim.schedule, cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.decay_fraction = "wsd", 20, 100, 0.5
  validate(cfg)
  cfg.optim.decay_fraction = 0.9
  with pytest.raises(ConfigError, match=r"config.optim.decay_fraction: the wsd decay \(90 steps.*\(20\) exceed"):
    validate(cfg)


@pytest.mark.parametrize("overrides,needle", [
    (dict(rope_beta_fast=1.0), "config.model.rope_beta_fast: yarn RoPE scaling needs 0 < model.rope_beta_slow "
                               "(1.0) < model.rope_beta_fast (1.0)."),
    (dict(rope_beta_slow=0.0), "config.model.rope_beta_fast: yarn RoPE scaling needs 0 < model.rope_beta_slow (0.0)"),
    (dict(rope_original_max_len=0), "config.model.rope_original_max_len: must be positive, got 0."),
    (dict(rope_scaling_factor=0.5), "config.model.rope_scaling_factor: must be >= 1, got 0.5."),
    (dict(rope_mscale=-1.0), "config.model.rope_mscale: must be >= 0, got -1.0."),
    (dict(rope_attention_factor=-0.5), "config.model.rope_attention_factor: must be >= 0, got -0.5."),
])
def test_yarn_rope_settings_are_checked(overrides, needle):
  cfg = default_config()
  cfg.model.rope_scaling, cfg.model.rope_scaling_factor, cfg.model.rope_original_max_len = "yarn", 4.0, 32
  validate(cfg)
  for key, value in overrides.items():
    cfg.model[key] = value
  with pytest.raises(ConfigError) as e:
    validate(cfg)
  assert needle in str(e.value)
  cfg.model.rope_scaling = "none"  # the yarn relations bind yarn only (field checks bind always)
  if "rope_beta" in needle or "original_max_len" in needle:
    validate(cfg)


def test_validation_tables_name_real_keys_and_shared_choices():
  from lmjax import config
  from lmjax.data import packing, readers, sources
  keys = config._flat(default_config())
  tables = [*config.CHOICES, *config.POSITIVE, *config.AT_LEAST, *config.POSITIVE_OR_MINUS_ONE,
            *config.FRACTIONS]
  assert set(tables) <= set(keys) and len(tables) == len(set(tables))  # each key in one table
  assert readers.TXT_SPLITS is config.TXT_SPLITS  # defined once, imported
  assert sources.BAD_RECORD_POLICIES is config.BAD_RECORD_POLICIES
  assert packing.LONG_DOCUMENT_POLICIES is config.LONG_DOCUMENT_POLICIES
  from lmjax.model import transformer
  assert set(transformer.REMAT_POLICIES) | {"none"} == set(config.REMAT_POLICIES)


def test_unknown_missing_and_mistyped_keys():
  cfg = default_config()
  cfg.model.num_layer = 3  # misspelt
  with pytest.raises(ConfigError, match=r"config.model.num_layer: unknown key.*num_layers"):
    validate(cfg)
  cfg = default_config()
  del cfg.train["steps"]
  with pytest.raises(ConfigError, match="config.train.steps: missing"):
    validate(cfg)
  cfg = default_config()
  with pytest.raises(TypeError, match="num_layers"):  # ConfigDict is type-safe itself
    cfg.model.num_layers = "two"
  raw = default_config().to_dict()
  raw["model"]["num_layers"] = "two"  # a config built from plain dicts is checked too
  with pytest.raises(ConfigError, match=r"config.model.num_layers: expected int, got 'two'"):
    validate(ml_collections.ConfigDict(raw))


def test_mesh_sizes():
  cfg = default_config()
  assert resolve_mesh_shape(cfg, 8) == (1, 1, 8, 1, 1, 1)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, -1, 2
  assert resolve_mesh_shape(cfg, 8) == (2, 1, 2, 1, 1, 2)
  cfg.mesh.fsdp = 4
  with pytest.raises(ConfigError, match="multiply to 16, but there are 8 devices"):
    resolve_mesh_shape(cfg, 8)
  cfg.mesh.fsdp, cfg.mesh.data = -1, -1
  with pytest.raises(ConfigError, match="at most one axis may be -1"):
    validate(cfg)


def test_llama_1b_shapes_without_allocating():
  setup = build(_load("llama_1b"), jax.devices())
  assert 1.2e9 < setup.num_params < 1.3e9  # Llama-3.2-1B: 1.24B with tied embeddings
  q = setup.abstract_state["params"]["blocks"]["attn"]["q"]
  assert q.shape == (16, 2048, 32, 64)
  assert q.sharding.shard_shape(q.shape) == (16, 256, 32, 64)  # embed over fsdp=8


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "lmjax.cli", *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_cli_overrides_and_errors():
  out = _cli("validate", "--config", "configs/tiny.py", "--config.model.num_layers=3",
             "--config.optim.learning_rate=0.01")
  assert out.returncode == 0, out.stderr
  assert "num_layers: 3" in out.stdout and "learning_rate: 0.01" in out.stdout
  out = _cli("validate", "--config", "configs/tiny.py", "--config.model.num_layerz=3")
  assert out.returncode != 0 and "num_layerz" in out.stderr
  out = _cli("validate", "--config", "configs/tiny.py", "--config.model.num_kv_heads=3")
  assert out.returncode == 2 and "config.model.num_kv_heads" in out.stderr
  out = _cli("validate", "--config", "configs/tiny.py:runlocal")
  assert out.returncode == 0 and "steps: 200" in out.stdout
  out = _cli("validate", "--config", "configs/tiny.py:bogus")  # an unknown argument is an error
  assert out.returncode != 0 and "config argument 'bogus': unknown. Known arguments: runlocal" in out.stderr


@pytest.mark.parametrize("overrides,needle", [
    (dict(attention="cudnn"), "config.model.compute_dtype: attention 'cudnn' needs bfloat16"),
    (dict(attention="cudnn", compute_dtype="bfloat16", head_dim=12), "config.model.head_dim: attention 'cudnn'"),
    (dict(attention="splash"), "config.data.seq_len: attention 'splash' needs a multiple of 128"),
])
def test_attention_backend_requirements(overrides, needle):
  cfg = default_config()
  cfg.data.seq_len = 96
  cfg.model.update(overrides)
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
    validate(cfg)


def test_backend_the_platform_cannot_run_fails_before_compiling():
  cfg = default_config()
  cfg.model.attention, cfg.model.compute_dtype = "cudnn", "bfloat16"
  with pytest.raises(ConfigError, match="config.model.attention='cudnn' needs an NVIDIA GPU"):
    build(cfg, jax.devices())


# -- the shared helpers: override, parse_size, parse_arg --------------------------------------


def test_override_sets_dotted_keys_and_parses_command_line_strings():
  cfg = default_config()
  cfg.lock()
  override(cfg, "model.num_layers", 4)
  override(cfg, "optim.learning_rate", 1)  # an int for a float field becomes a float
  override(cfg, "seed", "7")  # strings from a command line are parsed for non-string fields
  override(cfg, "train.progress_bar", "FALSE")
  override(cfg, "optim.weight_decay", "1e-2")
  override(cfg, "train.steps", "1_000")
  override(cfg, "data.source", "5")  # a string field keeps the string
  override(cfg, "mesh.rules", [["act_seq", "tensor"]])  # lists become tuples, nested too
  assert (cfg.model.num_layers, cfg.seed, cfg.train.progress_bar, cfg.train.steps) == (4, 7, False, 1000)
  assert isinstance(cfg.optim.learning_rate, float) and cfg.optim.learning_rate == 1.0
  assert cfg.optim.weight_decay == 0.01 and cfg.data.source == "5"
  assert cfg.mesh.rules == (("act_seq", "tensor"),)
  override(cfg, "mesh.rules", '(("act_seq", None),)')  # a Python literal
  assert cfg.mesh.rules == (("act_seq", None),)
  override(cfg, "data.mixture", '[["a.txt", 0.7], ["b.txt", 0.3]]')  # or JSON
  assert cfg.data.mixture == (("a.txt", 0.7), ("b.txt", 0.3))
  validate(cfg)


@pytest.mark.parametrize("key,value,needle", [
    ("optim.learnig_rate", 1e-4, "config.optim.learnig_rate: unknown key. Known keys under optim: "
                                 "b1, b2, decay_fraction, decay_norms_and_embeddings"),
    ("optimizer.learning_rate", 1e-4, "config.optimizer.learning_rate: unknown key. Known keys under "
                                      "config: data, mesh, model, optim, seed, train."),
    ("seed.x", 1, "config.seed: not a config section, so config.seed.x does not exist."),
    ("model", 1, "config.model: a config section; set its keys"),
    ("model.num_layers", "four", "config.model.num_layers: cannot set 'four': expected int."),
    ("model.num_layers", 2.5, "config.model.num_layers: cannot set 2.5: expected int, got float."),
    ("model.num_layers", True, "config.model.num_layers: cannot set True: expected int, got bool."),
    ("train.progress_bar", "yes", "config.train.progress_bar: cannot set 'yes': expected bool."),
    ("train.progress_bar", 1, "config.train.progress_bar: cannot set 1: expected bool, got int."),
    ("data.source", 5, "config.data.source: cannot set 5: expected str, got int."),
    ("mesh.rules", 3, "config.mesh.rules: cannot set 3: expected tuple, got int."),
])
def test_override_errors_name_the_key_and_the_expected_type(key, value, needle):
  cfg = default_config()
  with pytest.raises(ConfigError) as e:
    override(cfg, key, value)
  assert needle in str(e.value)
  assert cfg.to_dict() == default_config().to_dict()  # nothing set


def test_parse_size_one_rule():
  GiB = 2**30
  assert parse_size("16G") == parse_size("16GiB") == parse_size("16 gib") == 16 * GiB  # binary
  assert parse_size("16GB") == 16 * 10**9  # decimal
  assert parse_size("500MB") == 500 * 10**6 and parse_size("5KB") == 5000
  assert parse_size("512MiB") == 512 * 2**20 and parse_size("1.5TiB") == int(1.5 * 2**40)
  assert parse_size("4096") == parse_size(4096) == parse_size("4096B") == 4096
  for bad in ("eighty", "80XB", "80iB", "", "-5", "1.2.3G", "16 G B", -1, True, None):
    with pytest.raises(ValueError, match="cannot read .* as a size; write e.g. 80GiB"):
      parse_size(bad)


def test_parse_arg_types_flags_and_errors():
  args = parse_arg("runlocal,variant=gpt2,steps=5,lr=0.5,fast=FALSE", runlocal=False,
                   variant="llama", steps=100, lr=1e-3, fast=True)
  assert args.to_dict() == dict(runlocal=True, variant="gpt2", steps=5, lr=0.5, fast=False)
  assert parse_arg(None, runlocal=False).runlocal is False
  assert parse_arg("", runlocal=False).to_dict() == {"runlocal": False}
  # A first bare word that is no key is the first (string) argument: a path and flags.
  assert parse_arg("runs/tiny,runlocal", run="", runlocal=False).to_dict() == {
      "run": "runs/tiny", "runlocal": True}
  assert parse_arg("run=runs/a", run="", runlocal=False).run == "runs/a"
  assert parse_arg("runs/s/lr=0.1,seed=1,runlocal", run="", runlocal=False).to_dict() == {
      "run": "runs/s/lr=0.1,seed=1", "runlocal": True}  # a sweep run's directory
  known = r"Known arguments: runlocal \(bool\), steps \(int\)"
  for arg, needle in (("bogus", r"config argument 'bogus': unknown. " + known),
                      ("runlocal,bogus=1", r"'bogus': unknown"),
                      ("steps=x", r"config argument steps='x': expected int. " + known),
                      ("steps=2.5", r"steps='2.5': expected int"),
                      ("runlocal=maybe", r"runlocal='maybe': expected bool"),
                      ("steps", r"config argument 'steps': needs a value"),
                      ("runlocal,runlocal", r"'runlocal': given twice")):
    with pytest.raises(ConfigError, match=needle):
      parse_arg(arg, runlocal=False, steps=3)
  with pytest.raises(ConfigError, match="'runs/tiny': unknown"):  # positional only for strings
    parse_arg("runs/tiny", runlocal=False)


# -- the shipped configs: arguments, runlocal variants --------------------------------------


def test_config_files_are_found():
  assert set(CONFIGS) >= {"tiny", "gpt2_small", "llama_1b", "llama_8b", "llama_70b", "mixtral",
                          "mixtral_8x7b", "finetune"}


@pytest.mark.parametrize("name", STANDALONE)
def test_every_config_validates_plain_and_runlocal(name):
  full = _load(name)
  validate(full, num_devices=8)
  local = _load(name, "runlocal")
  validate(local, num_devices=1)
  validate(local, num_devices=8)
  # The same family, shrunk: architecture options and head/MLP ratios kept.
  fm, lm = full.model, local.model
  for key in ("norm", "mlp", "position_embedding", "tie_embeddings", "attention_bias", "mlp_bias",
              "rope_theta", "rope_scaling", "sliding_window", "num_experts", "experts_per_token",
              "num_shared_experts", "router", "router_scale", "capacity_factor", "moe_aux_loss",
              "moe_z_loss"):
    assert lm[key] == fm[key], key
  assert lm.num_heads // lm.num_kv_heads == fm.num_heads // fm.num_kv_heads
  assert abs(lm.mlp_dim / lm.embed_dim - fm.mlp_dim / fm.embed_dim) < 0.05
  assert abs(lm.expert_mlp_dim / lm.embed_dim - fm.expert_mlp_dim / fm.embed_dim) < 0.05
  assert local.mesh.expert == 1  # experts unsplit, all devices on FSDP
  assert (lm.compute_dtype, lm.attention, lm.remat) == ("float32", "xla", "none")  # what a CPU runs


@pytest.mark.parametrize("name", STANDALONE)
def test_runlocal_is_small_enough_for_a_cpu(name):
  cfg = _load(name, "runlocal")
  assert cfg.train.steps * cfg.data.global_batch_size * cfg.data.seq_len <= 1_000_000  # tokens
  total = build(cfg, jax.devices()).num_params
  if cfg.model.num_experts:  # the experts a token skips cost memory, not FLOPs
    assert total - inactive_params(cfg.model) < 1_500_000 and total < 5_000_000
  else:
    assert total < 1_000_000


@pytest.mark.parametrize("name", CONFIGS)
def test_unknown_config_argument_is_an_error(name):
  with pytest.raises(ConfigError, match="config argument 'bogus': unknown. Known arguments: "):
    _load(name, "runlocal,bogus")


def test_gpt2_small_variants_combine():
  for arg in ("gpt2", "gpt2,runlocal", "runlocal,gpt2", "gpt2=true,runlocal=false"):
    cfg = _load("gpt2_small", arg)
    assert (cfg.model.norm, cfg.model.mlp, cfg.model.position_embedding) == ("layernorm", "gelu", "learned")
  assert _load("gpt2_small", "gpt2").model.num_layers == 12
  assert _load("gpt2_small", "gpt2,runlocal").model.mlp_dim == 512  # GELU 4x width, shrunk
  with pytest.raises(ConfigError, match="runlocal='maybe': expected bool"):
    _load("gpt2_small", "runlocal=maybe")


def test_runlocal_shrinks_experts_with_the_width():
  c = default_config()  # DeepSeek-like: narrow experts besides a dense MLP, experts on the mesh
  c.model.update(embed_dim=4096, mlp_dim=12288, num_experts=64, experts_per_token=6,
                 expert_mlp_dim=1536, num_shared_experts=2, first_dense_layers=1)
  c.mesh.expert = 8
  local = _module(ROOT / "configs" / "common.py").runlocal(c)
  assert (local.model.mlp_dim, local.model.expert_mlp_dim) == (384, 48)  # 3x and 3/8 x width 128
  assert (local.model.num_experts, local.model.experts_per_token) == (64, 6)
  assert local.mesh.expert == 1
  validate(local, num_devices=1)


def test_llama_family_shares_one_base():
  base = _module(ROOT / "configs" / "llama.py").base()
  for name in ("llama_1b", "llama_8b", "llama_70b"):
    cfg = _load(name)
    assert (cfg.model.vocab_size, cfg.model.rope_theta, cfg.model.num_kv_heads) == (128256, 5e5, 8)
    assert cfg.data.global_batch_size == base.data.global_batch_size == 512
  assert _load("llama_8b").to_dict() == {**base.to_dict(), "model": {
      **base.model.to_dict(), "num_layers": 32, "embed_dim": 4096, "num_heads": 32, "mlp_dim": 14336}}


def _fake_run(tmp_path):
  """A run directory holding only config.json (what run_config reads without a checkpoint)."""
  saved = default_config()
  saved.model.num_layers, saved.model.compute_dtype = 3, "bfloat16"
  (tmp_path / "config.json").write_text(saved.to_json())
  return tmp_path


def test_finetune_takes_a_run_directory_and_flags(tmp_path):
  run = str(_fake_run(tmp_path))
  cfg = _load("finetune", run)  # the documented configs/finetune.py:RUN_DIR
  validate(cfg, num_devices=8)
  assert cfg.model.num_layers == 3 and cfg.train.init_from == run and cfg.train.steps == 2000
  assert cfg.optim.learning_rate == 2e-5
  for arg in (f"{run},runlocal", f"run={run},runlocal", f"runlocal,run={run}"):
    local = _load("finetune", arg)
    validate(local, num_devices=1)
    assert local.model.num_layers == 3 and local.train.init_from == run  # the run's model as it is
    assert local.model.compute_dtype == "float32" and local.train.steps == 100
  with pytest.raises(ConfigError, match="needs the run to start from"):
    _load("finetune")
  with pytest.raises(ConfigError, match="config argument 'bogus': unknown"):
    _load("finetune", f"{run},bogus")
  with pytest.raises(FileNotFoundError, match="not an lmjax run"):
    _load("finetune", str(tmp_path / "missing"))


def test_experiment_configs_parse_their_argument():
  for path in sorted(ROOT.glob("experiments/*/sweep.py")):
    module = _module(path)
    validate(module.get_config())
    with pytest.raises(ConfigError, match="config argument 'bogus': unknown"):
      module.get_config("bogus")
  smoke = _module(ROOT / "experiments" / "gqa_vs_mha" / "sweep.py").get_config("smoke")
  assert smoke.train.steps == 4
