"""Sweeps and monitoring: building override lists (grid, random, seeds), run names, a real
2-run sweep through the CLI (results tables equal to each run's metrics.jsonl, rerun skips,
printed commands parse back), successive halving, and ``lmjax runs``."""

import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmjax import cli
from lmjax import runs as runs_lib
from lmjax import sweep as sw
from lmjax.config import ConfigError, default_config, validate
from lmjax.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent

# A sweep file with the tiny config of tests/test_train.py; `:print` selects a sweep with
# values of every type for the command round trip (never trained).
SWEEP_FILE = '''
from lmjax import sweep as sw
from lmjax.config import default_config


def get_config(arg=None):
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 2, 64, 192
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 16
  c.model.max_seq_len = c.data.seq_len = 64
  c.data.global_batch_size = 8
  c.optim.warmup_steps = 0
  c.train.steps = 3
  c.train.log_every = 1
  c.train.eval_every = 2
  c.train.eval_batches = 1
  c.train.checkpoint_every = 0
  c.train.progress_bar = False
  return c


def sweep(arg=None):
  if arg == "print":
    return sw.chain(
        sw.random_search({"optim.learning_rate": sw.log_uniform(1e-4, 1e-2),
                          "optim.b2": sw.uniform(0.9, 0.999, digits=None),
                          "model.remat": ["full", "dots"],
                          "model.tie_embeddings": [True, False]}, n=3, seed=1),
        [{"data.source": "/data/my corpus/*.jsonl", "mesh.rules": (("act_seq", "tensor"),)}])
  return sw.zipped(sw.grid({"model.num_kv_heads": [4, 1]}),
                   sw.grid({"optim.learning_rate": [1e-2, 3e-3]}))


def search():
  return sw.SuccessiveHalving(
      trials=[{"optim.learning_rate": lr} for lr in (1e-5, 1e-2)], min_steps=2, eta=2)
'''


def _lmjax(*args, cwd=ROOT):
  """Runs ``lmjax ARGS`` in a subprocess on one CPU device; returns stdout."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "lmjax.cli", *map(str, args)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


# -- building sweeps -----------------------------------------------------------------------

def test_grid_product_zip_chain_and_seeds():
  g = sw.grid({"a": [1, 2], "b": ["x", "y"]})
  assert g == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}, {"a": 2, "b": "x"}, {"a": 2, "b": "y"}]
  assert sw.grid({"a": [1, 2], "b": ["x", "y"]}) == g  # deterministic
  assert sw.seeds(3) == [{"seed": 0}, {"seed": 1}, {"seed": 2}]
  assert sw.seeds([7, 9], key="data.seed") == [{"data.seed": 7}, {"data.seed": 9}]
  p = sw.product(sw.grid({"a": [1, 2]}), sw.seeds(2))
  assert p == [{"a": 1, "seed": 0}, {"a": 1, "seed": 1}, {"a": 2, "seed": 0}, {"a": 2, "seed": 1}]
  z = sw.zipped(sw.grid({"a": [1, 2]}), sw.grid({"b": [3, 4]}))
  assert z == [{"a": 1, "b": 3}, {"a": 2, "b": 4}]
  assert sw.chain([{"a": 1}], [{"b": 2}]) == [{"a": 1}, {"b": 2}]
  assert sw.product(sw.grid({"a": [1]}), [{"a": 5, "c": 0}]) == [{"a": 5, "c": 0}]  # later wins
  with pytest.raises(ValueError, match="different lengths"):
    sw.zipped(sw.grid({"a": [1, 2]}), sw.grid({"b": [3]}))
  with pytest.raises(TypeError, match="list of values"):
    sw.grid({"a": "abc"})


def test_random_search_is_deterministic_and_draws_from_the_space():
  space = {"optim.learning_rate": sw.log_uniform(1e-4, 1e-1),
           "optim.b1": sw.uniform(0.8, 0.95, digits=None),
           "optim.warmup_steps": sw.int_uniform(0, 10),
           "model.remat": ["none", "full"],
           "seed": 3}
  draws = sw.random_search(space, n=200, seed=0)
  assert draws == sw.random_search(space, n=200, seed=0)
  assert draws != sw.random_search(space, n=200, seed=1)
  lrs = [d["optim.learning_rate"] for d in draws]
  assert all(1e-4 <= lr <= 1e-1 and lr == float(f"{lr:.3g}") for lr in lrs)
  # Log-uniform: about a third of the draws in each decade.
  per_decade = [sum(10 ** -k <= lr < 10 ** (1 - k) for lr in lrs) for k in (4, 3, 2)]
  assert all(40 < c < 95 for c in per_decade), per_decade
  assert all(0.8 <= d["optim.b1"] <= 0.95 for d in draws)
  assert {d["optim.warmup_steps"] for d in draws} == set(range(11))
  assert all(type(d["optim.warmup_steps"]) is int for d in draws)
  assert {d["model.remat"] for d in draws} == {"none", "full"}
  assert {d["seed"] for d in draws} == {3}


def test_run_names_are_readable_unique_and_stable():
  g = sw.product(sw.grid({"model.num_kv_heads": [4, 1], "optim.learning_rate": [1e-3, 3e-4]}),
                 sw.seeds(2))
  names = sw.run_names(g)
  assert names[0] == "num_kv_heads=4,learning_rate=0.001,seed=0"
  assert names[3] == "num_kv_heads=4,learning_rate=0.0003,seed=1"
  assert len(set(names)) == len(names) == 8
  assert sw.run_names(g) == names  # stable
  assert sw.run_name({"seed": 0, "optim.learning_rate": 1e-3}) == \
      sw.run_name({"optim.learning_rate": 1e-3, "seed": 0})  # key order does not matter
  assert sw.run_name({}) == "base"
  # Keys sharing their last part keep their full names; unsafe characters are replaced.
  assert sw.run_name({"mesh.data": 2, "a.data": 1}) == "a.data=1,mesh.data=2"
  assert "/" not in sw.run_name({"data.source": "/data/x y/*.jsonl"})
  # Names that would collide get a hash of their overrides; duplicates are an error.
  clash = sw.run_names([{"data.source": "a/b"}, {"data.source": "a b"}])
  assert clash[0] != clash[1] and all(n.startswith("source=a_b,") for n in clash)
  with pytest.raises(ValueError, match="same overrides twice"):
    sw.run_names([{"seed": 1}, {"seed": 1}])


def test_apply_overrides_checks_keys_and_types():
  base = default_config()
  base.lock()
  cfg = sw.apply_overrides(base, {"optim.learning_rate": 1e-4, "model.num_kv_heads": 1,
                                  "mesh.rules": [("act_seq", "tensor")]})
  assert cfg.optim.learning_rate == 1e-4 and cfg.model.num_kv_heads == 1
  assert cfg.mesh.rules == (("act_seq", "tensor"),)
  assert base.optim.learning_rate == 3e-3  # the base is not modified
  with pytest.raises(ConfigError, match=r"config.optim.learnig_rate: unknown key.*learning_rate"):
    sw.apply_overrides(base, {"optim.learnig_rate": 1e-4})
  with pytest.raises(ConfigError, match="config.model.num_layers: cannot set 'four'"):
    sw.apply_overrides(base, {"model.num_layers": "four"})
  with pytest.raises(ConfigError, match="config.seed: not a config section"):
    sw.apply_overrides(base, {"seed.x": 1})


def test_every_experiment_sweep_file_builds_valid_configs():
  files = sorted(ROOT.glob("experiments/*/sweep.py"))
  assert files
  for path in files:
    module = sw.load_sweep_file(path)
    base = module.get_config()
    validate(base)
    trials = ([*sw.sweep_from_file(path)] if hasattr(module, "sweep") else []) + \
        (sw.search_from_file(path).candidates() if hasattr(module, "search") else [])
    assert trials, path
    sw.run_names(trials)
    for overrides in trials:
      validate(sw.apply_overrides(base, overrides))


# -- a real sweep through the CLI ----------------------------------------------------------

@pytest.fixture(scope="module")
def swept(tmp_path_factory):
  """A 2-run sweep of the tiny config, run once for the tests below."""
  tmp = tmp_path_factory.mktemp("sweep")
  (tmp / "sweep.py").write_text(SWEEP_FILE)
  out = _lmjax("sweep", tmp / "sweep.py", "--workdir", tmp / "runs")
  return tmp, out


@pytest.mark.slow
def test_sweep_runs_each_config_and_writes_results(swept):
  tmp, out = swept
  names = ["num_kv_heads=4,learning_rate=0.01", "num_kv_heads=1,learning_rate=0.003"]
  assert "[1/2] num_kv_heads=4,learning_rate=0.01: training" in out
  with open(tmp / "runs" / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ["run", "model.num_kv_heads", "optim.learning_rate", "train_loss",
                           "eval_loss", "tokens_per_sec", "params", "steps"]
  assert [r["run"] for r in rows] == names
  for row, kv, lr in zip(rows, (4, 1), (1e-2, 3e-3)):
    run_dir = tmp / "runs" / row["run"]
    records = read_metrics(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["num_kv_heads"] == kv and config["optim"]["learning_rate"] == lr
    assert int(row["model.num_kv_heads"]) == kv and float(row["optim.learning_rate"]) == lr
    assert float(row["train_loss"]) == records[-1]["loss"]
    assert float(row["eval_loss"]) == [r["eval_loss"] for r in records if "eval_loss" in r][-1]
    tps = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r]
    assert math.isclose(float(row["tokens_per_sec"]), sum(tps) / len(tps), rel_tol=1e-12)
    assert int(row["steps"]) == records[-1]["step"] == 3
    assert json.loads((run_dir / "overrides.json").read_text())["overrides"] == \
        {"model.num_kv_heads": kv, "optim.learning_rate": lr}
  # Fewer KV heads, fewer parameters: 2 layers x 2 projections x 64 x 16 per KV head.
  assert int(rows[0]["params"]) - int(rows[1]["params"]) == 2 * 2 * 64 * 16 * 3
  md = (tmp / "runs" / "results.md").read_text().splitlines()
  assert md[0] == ("| run | model.num_kv_heads | optim.learning_rate | train_loss | eval_loss "
                   "| tokens_per_sec | params | steps |")
  assert md[2].startswith("| num_kv_heads=4,learning_rate=0.01 | 4 | 0.01 | ")
  assert len(md) == 4


@pytest.mark.slow
def test_rerunning_a_sweep_skips_finished_runs(swept):
  tmp, _ = swept
  before = {p: p.stat().st_mtime_ns for p in (tmp / "runs").glob("*/metrics.jsonl")}
  start = time.perf_counter()
  out = _lmjax("sweep", tmp / "sweep.py", "--workdir", tmp / "runs")
  assert out.count("finished, skipped") == 2 and "training in" not in out
  assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing rewritten
  assert time.perf_counter() - start < 30
  assert (tmp / "runs" / "results.csv").exists()


@pytest.mark.slow
def test_printed_commands_parse_back_to_the_overrides(swept):
  tmp, _ = swept
  spec = f"{tmp / 'sweep.py'}:print"
  out = _lmjax("sweep", spec, "--workdir", tmp / "cluster", "--print_commands",
               "--config.train.steps=7")
  lines = out.strip().splitlines()
  trials = sw.sweep_from_file(tmp / "sweep.py", "print")
  names = sw.run_names(trials)
  assert len(lines) == len(trials) == 4
  assert not (tmp / "cluster").exists()  # nothing ran
  for line, overrides, name in zip(lines, trials, names):
    args = shlex.split(line)
    assert args[:2] == ["lmjax", "train"]
    assert args[-2:] == ["--workdir", f"{tmp / 'cluster'}/{name}"]
    # Parse the arguments as `lmjax train` does.
    cfg = cli.parse(args[1:]).cfg
    assert cfg.train.steps == 7  # the command line's own override is kept
    for key, value in overrides.items():
      got = cfg
      for part in key.split("."):
        got = got[part]
      assert got == value, (key, got, value)
    validate(cfg)


@pytest.mark.slow
def test_lmjax_runs_prints_the_table_and_plots(swept):
  tmp, _ = swept
  out = _lmjax("runs", tmp / "runs", "--plot", tmp / "curves.png")
  header, rule, *rows = out.splitlines()[:4]
  assert header.split() == ["run", "model.num_kv_heads", "optim.learning_rate", "train_loss",
                            "eval_loss", "eval_perplexity", "tokens_per_sec", "params", "steps",
                            "status"]
  assert rows[0].split()[0] == "num_kv_heads=1,learning_rate=0.003"
  assert rows[0].split()[-1] == "done"
  png = (tmp / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
  # The library functions notebooks use.
  found = runs_lib.list_runs(tmp)
  assert [r.name for r in found] == ["runs/num_kv_heads=1,learning_rate=0.003",
                                     "runs/num_kv_heads=4,learning_rate=0.01"]
  table = runs_lib.runs_table(found)
  assert table[0]["steps"] == 3 and table[0]["status"] == "done"
  assert table[0]["eval_loss"] == found[0].last("eval_loss")
  fig = runs_lib.plot_runs(found, tmp / "curves.svg")
  assert [ax.get_title() for ax in fig.axes] == ["train loss", "eval loss"]
  assert len(fig.axes[0].lines) == 2


def test_list_runs_finds_nested_runs_in_reading_order(tmp_path):
  for name, steps, target in (("b/lr=0.001", 4, 4), ("b/lr=0.0003", 2, 10), ("a/run10", 1, 1),
                              ("a/run9", 1, 1)):
    run = tmp_path / name
    (run / "checkpoints" / "4").mkdir(parents=True)
    cfg = default_config()
    cfg.train.steps = target
    (run / "config.json").write_text(cfg.to_json())
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 7.0 - s, "tokens_per_sec": 100.0 * s}) + "\n"
        for s in range(1, steps + 1)))
  (tmp_path / "b" / "lr=0.001" / "checkpoints" / "4" / "config.json").write_text("{}")  # not a run
  found = runs_lib.list_runs(tmp_path)
  assert [r.name for r in found] == ["a/run9", "a/run10", "b/lr=0.0003", "b/lr=0.001"]
  table = runs_lib.runs_table(found)
  assert "eval_loss" not in table[0] and "mfu" not in table[0]  # no run has them
  assert table[2]["status"] == "2/10" and table[3]["status"] == "done"
  assert table[3]["train_loss"] == 3.0 and table[3]["tokens_per_sec"] == 250.0
  assert table[3]["params"] == 524_928  # the default model
  text = runs_lib.format_table(table)
  assert text.splitlines()[0].split() == ["run", "train_loss", "tokens_per_sec", "params", "steps",
                                          "status"]


def test_a_halted_run_is_reported_and_the_sweep_goes_on(tmp_path):
  from lmjax.trainer import TrainingHalted

  def train(cfg, workdir):
    if cfg.optim.learning_rate > 1:
      raise TrainingHalted("step 3: loss nan, grad norm nan (train.nan_policy='halt')")
    (workdir / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 5.0}) + "\n")

  logged = []
  rows = sw.run_sweep(default_config(), sw.grid({"optim.learning_rate": [10.0, 1e-3]}), tmp_path,
                      train_fn=train, log=logged.append, compile_cache=False)
  assert rows[0]["error"].startswith("step 3: loss nan") and rows[0]["train_loss"] is None
  assert rows[1]["train_loss"] == 5.0 and "error" not in rows[1]
  assert any("learning_rate=10.0: halted: step 3" in line for line in logged)
  assert "error" in (tmp_path / "results.csv").read_text().splitlines()[0]


# -- successive halving --------------------------------------------------------------------

def _fake_train(calls):
  """A stand-in for lmjax.train: eval loss falls with steps and is lowest at lr = 1e-2."""

  def train(cfg, workdir):
    calls.append((Path(workdir).name, cfg.train.steps, cfg.optim.decay_steps))
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(cfg.to_json())
    gap = abs(math.log10(cfg.optim.learning_rate) + 2) + cfg.optim.warmup_steps / 1000
    with open(workdir / "metrics.jsonl", "a") as f:
      f.write(json.dumps({"step": cfg.train.steps, "loss": 3 + gap,
                          "eval_loss": 3 + gap + 1 / cfg.train.steps}) + "\n")
    return []

  return train


def test_successive_halving_keeps_the_best_by_eval_loss(tmp_path):
  space = {"optim.learning_rate": sw.log_uniform(1e-4, 1.0),
           "optim.warmup_steps": sw.int_uniform(0, 10)}
  calls = []
  base = default_config()
  result = sw.successive_halving(base, space, n=9, min_steps=2, eta=3, workdir=tmp_path,
                                 train_fn=_fake_train(calls), log=lambda _: None,
                                 compile_cache=False)
  trials = sw.random_search(space, 9, seed=0)
  names = sw.run_names(trials)
  gap = lambda o: abs(math.log10(o["optim.learning_rate"]) + 2) + o["optim.warmup_steps"] / 1000
  ranked = sorted(names, key=lambda n: gap(trials[names.index(n)]))
  assert [(r["steps"], len(r["scores"]), len(r["kept"])) for r in result.rungs] == \
      [(2, 9, 3), (6, 3, 1), (18, 1, 1)]
  assert result.rungs[0]["kept"] == ranked[:3]
  assert result.rungs[1]["kept"] == ranked[:1] == [result.best]
  assert result.best_overrides == trials[names.index(ranked[0])]
  # Survivors continue in their own workdirs with the schedule of the final budget.
  assert [c[1] for c in calls] == [2] * 9 + [6] * 3 + [18]
  assert [c[0] for c in calls[9:12]] == ranked[:3] and calls[12][0] == ranked[0]
  for name, _, decay in calls:
    assert decay == 18 - trials[names.index(name)]["optim.warmup_steps"]
  rows = {r["run"]: r for r in result.rows}
  assert rows[ranked[0]]["rung"] == 2 and rows[ranked[0]]["steps"] == 18
  assert rows[ranked[-1]]["rung"] == 0 and rows[ranked[-1]]["steps"] == 2
  assert json.loads((tmp_path / "search.json").read_text())["best"] == ranked[0]
  # Rerunning reads the finished rungs back (the fake leaves no checkpoints, so it is called
  # again, and must reach the same decisions).
  again = sw.successive_halving(base, space, n=9, min_steps=2, eta=3, workdir=tmp_path,
                                train_fn=_fake_train([]), log=lambda _: None, compile_cache=False)
  assert again.rungs == result.rungs


@pytest.mark.slow
def test_search_through_the_cli_continues_the_best_run(swept):
  tmp, _ = swept
  out = _lmjax("sweep", tmp / "sweep.py", "--search", "--workdir", tmp / "search")
  search = json.loads((tmp / "search" / "search.json").read_text())
  first = search["rungs"][0]
  losses = {}
  for name in search["names"]:
    records = read_metrics(tmp / "search" / name)
    losses[name] = next(r["eval_loss"] for r in records if r["step"] == 2)
  assert first["scores"] == losses
  best = min(losses, key=losses.get)
  assert first["kept"] == [best] == [search["best"]]
  # The best resumed from step 2 to 4 (eta = 2 times longer); the other stopped at 2.
  for name in search["names"]:
    steps = [r["step"] for r in read_metrics(tmp / "search" / name)]
    assert steps == ([1, 2, 3, 4] if name == best else [1, 2])
  assert sorted(os.listdir(tmp / "search" / best / "checkpoints")) == ["2", "4"]
  with open(tmp / "search" / "results.csv") as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  assert rows[best]["rung"] == "1" and rows[best]["steps"] == "4"
  assert f"best: {tmp / 'search'}/{best}" in out
