"""Sweeps: lists of config overrides, run one after another or printed as commands.

A sweep file lives with its experiment (``experiments/<name>/sweep.py``) and defines
``get_config(arg=None)``, the base config, and ``sweep()``, the runs as override dicts
(dotted keys to values) built from the helpers here::

  from lmjax import sweep as sw

  def sweep():
    return sw.product(sw.grid({"model.num_kv_heads": [4, 2, 1]}), sw.seeds(2))

``sweep(arg)`` and ``get_config(arg)`` receive the ``arg`` of ``sweep.py:arg`` (e.g. a
smoke-test size). A file may define ``search()`` returning a :class:`SuccessiveHalving`
instead (or as well): an automated search that trains many configs briefly and continues
the best ones.

  lmjax sweep experiments/gqa_vs_mha/sweep.py --workdir runs/gqa   # run here, resumable
  lmjax sweep experiments/gqa_vs_mha/sweep.py --workdir runs/gqa --print_commands

Each run trains in ``workdir/<run name>`` (the name is made from its overrides), so
rerunning a sweep skips finished runs and resumes partial ones; ``workdir/results.csv``
and ``results.md`` list the overrides and final metrics of every run.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import json
import math
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import ml_collections
import numpy as np

from lmjax import runs as runs_lib
from lmjax.checkpoint import MANIFEST
from lmjax.config import ConfigError
from lmjax.trainer import TrainingHalted, train

Overrides = dict[str, Any]  # dotted config key -> value, e.g. {"optim.learning_rate": 1e-3}
TrainFn = Callable[[ml_collections.ConfigDict, Path], Any]
# Columns of results.csv after the run name and the overrides.
RESULT_COLUMNS = ("train_loss", "eval_loss", "tokens_per_sec", "params", "steps")


# -- search spaces -----------------------------------------------------------------------

def _round(x: float, digits: int | None) -> float:
  """``x`` to ``digits`` significant digits, so that names and commands stay short."""
  return float(x) if digits is None else float(f"{x:.{digits}g}")


@dataclasses.dataclass(frozen=True)
class LogUniform:
  """Log-uniform between ``low`` and ``high`` (learning rates, weight decay)."""
  low: float
  high: float
  digits: int | None = 3

  def sample(self, rng: np.random.Generator) -> float:
    return _round(math.exp(rng.uniform(math.log(self.low), math.log(self.high))), self.digits)


@dataclasses.dataclass(frozen=True)
class Uniform:
  """Uniform between ``low`` and ``high``."""
  low: float
  high: float
  digits: int | None = 3

  def sample(self, rng: np.random.Generator) -> float:
    return _round(rng.uniform(self.low, self.high), self.digits)


@dataclasses.dataclass(frozen=True)
class IntUniform:
  """An integer from ``low`` to ``high`` inclusive (warmup steps, layer counts)."""
  low: int
  high: int

  def sample(self, rng: np.random.Generator) -> int:
    return int(rng.integers(self.low, self.high + 1))


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of ``values``, each equally likely."""
  values: tuple[Any, ...]

  def sample(self, rng: np.random.Generator) -> Any:
    value = self.values[int(rng.integers(len(self.values)))]
    return value.item() if isinstance(value, np.generic) else value


def log_uniform(low: float, high: float, digits: int | None = 3) -> LogUniform:
  return LogUniform(low, high, digits)


def uniform(low: float, high: float, digits: int | None = 3) -> Uniform:
  return Uniform(low, high, digits)


def int_uniform(low: int, high: int) -> IntUniform:
  return IntUniform(low, high)


def choice(*values: Any) -> Choice:
  return Choice(tuple(values))


# -- building sweeps ---------------------------------------------------------------------

def grid(space: Mapping[str, Sequence[Any]]) -> list[Overrides]:
  """Every combination of the values, the last key varying fastest:
  ``grid({"a": [1, 2], "b": [3, 4]})`` is a=1,b=3; a=1,b=4; a=2,b=3; a=2,b=4."""
  keys = list(space)
  for k in keys:
    if isinstance(space[k], (str, bytes)) or not isinstance(space[k], Iterable):
      raise TypeError(f"grid: {k!r} needs a list of values, got {space[k]!r}")
  return [dict(zip(keys, values)) for values in itertools.product(*(list(space[k]) for k in keys))]


def random_search(space: Mapping[str, Any], n: int, seed: int = 0) -> list[Overrides]:
  """``n`` draws from ``space``: each key maps to a distribution (:func:`log_uniform`,
  :func:`uniform`, :func:`int_uniform`, :func:`choice`), a list (a choice) or a fixed
  value. The same ``seed`` gives the same draws."""
  rng = np.random.default_rng(seed)
  dists = {k: (Choice(tuple(v)) if isinstance(v, (list, tuple)) else v) for k, v in space.items()}
  return [{k: (d.sample(rng) if hasattr(d, "sample") else d) for k, d in dists.items()}
          for _ in range(n)]


def product(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """Every combination of one entry from each sweep, merged (later sweeps win on a key)."""
  return [_merge(combo) for combo in itertools.product(*sweeps)]


def zipped(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """The i-th entries of equally long sweeps, merged: ``zipped(grid(a), grid(b))``."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise ValueError(f"zipped: sweeps have different lengths {[len(s) for s in sweeps]}")
  return [_merge(combo) for combo in zip(*sweeps)]


def chain(*sweeps: Sequence[Overrides]) -> list[Overrides]:
  """The sweeps one after another."""
  return [dict(o) for s in sweeps for o in s]


def seeds(n: int | Sequence[int], key: str = "seed") -> list[Overrides]:
  """``seeds(3)`` is seed=0, 1, 2; ``seeds([7, 8])`` is seed=7, 8. Combine with :func:`product`."""
  values = range(n) if isinstance(n, int) else n
  return [{key: int(s)} for s in values]


def _merge(parts: Iterable[Overrides]) -> Overrides:
  out: Overrides = {}
  for p in parts:
    out.update(p)
  return out


# -- applying and naming -----------------------------------------------------------------

def apply_overrides(cfg: ml_collections.ConfigDict,
                    overrides: Overrides) -> ml_collections.ConfigDict:
  """A copy of ``cfg`` with the dotted keys set; an unknown key or a value of the wrong
  type raises ConfigError naming the key."""
  cfg = copy.deepcopy(cfg)
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = cfg
    for i, part in enumerate(parents):
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise ConfigError(f"config.{'.'.join(parents[:i + 1])}: not a config section "
                          f"(sweep override {key!r}).")
      node = node[part]
    if leaf not in node:
      known = ", ".join(sorted(node.keys()))
      raise ConfigError(f"config.{key}: unknown key (sweep override). Known keys here: {known}.")
    if isinstance(value, list):
      value = tuple(value)
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(f"config.{key}: cannot set {value!r} (sweep override): {e}") from None
  return cfg


def _value_text(value: Any) -> str:
  text = repr(value) if isinstance(value, float) else str(value)
  return re.sub(r"[^\w.+\-=]+", "_", text).strip("_") or "_"


def run_name(overrides: Overrides) -> str:
  """A readable directory name from the overrides, e.g. ``learning_rate=0.001,seed=1``
  (keys sorted; the last part of each key unless two keys share it); ``base`` if empty."""
  if not overrides:
    return "base"
  keys = sorted(overrides)
  leaves = [k.rsplit(".", 1)[-1] for k in keys]
  parts = [f"{k if leaves.count(leaf) > 1 else leaf}={_value_text(overrides[k])}"
           for k, leaf in zip(keys, leaves)]
  name = ",".join(parts)
  if len(name) > 120:
    name = name[:100] + "," + _digest(overrides)
  return name


def _digest(overrides: Overrides) -> str:
  text = json.dumps(overrides, sort_keys=True, default=repr)
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def run_names(sweep: Sequence[Overrides]) -> list[str]:
  """:func:`run_name` of each entry, made unique: runs whose readable names would
  collide get a short hash of their overrides appended. Equal overrides are an error."""
  seen: dict[str, Overrides] = {}
  for o in sweep:
    key = json.dumps(o, sort_keys=True, default=repr)
    if key in seen:
      raise ValueError(f"the sweep has the same overrides twice: {o}")
    seen[key] = o
  names = [run_name(o) for o in sweep]
  counts = {n: names.count(n) for n in names}
  return [f"{n},{_digest(o)}" if counts[n] > 1 else n for n, o in zip(names, sweep)]


# -- sweep files -------------------------------------------------------------------------

def load_sweep_file(path: str | Path) -> Any:
  """Imports a sweep file (``path`` without any ``:arg``) as a module."""
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such sweep file")
  spec = importlib.util.spec_from_file_location(f"lmjax_sweep_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path}: a sweep file defines get_config(arg=None), the base config")
  return module


def split_path_arg(spec: str) -> tuple[str, str | None]:
  """``"experiments/x/sweep.py:smoke"`` -> ``("experiments/x/sweep.py", "smoke")``."""
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def _call(fn: Callable, arg: str | None) -> Any:
  return fn(arg) if inspect.signature(fn).parameters else fn()


def sweep_from_file(path: str | Path, arg: str | None = None) -> list[Overrides]:
  """The overrides the file's ``sweep()`` (or ``sweep(arg)``) yields, as a list."""
  module = load_sweep_file(path)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{path}: defines no sweep()")
  return [dict(o) for o in _call(module.sweep, arg)]


def search_from_file(path: str | Path, arg: str | None = None) -> "SuccessiveHalving":
  """The :class:`SuccessiveHalving` the file's ``search()`` (or ``search(arg)``) returns."""
  module = load_sweep_file(path)
  if not hasattr(module, "search"):
    raise ValueError(f"{path}: defines no search()")
  return _call(module.search, arg)


def _flag_value(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))
  return repr(value) if isinstance(value, float) else str(value)


def train_command(config: str, overrides: Overrides, workdir: str | Path) -> str:
  """The ``lmjax train`` command line for one run, quoted for a POSIX shell."""
  args = ["lmjax", "train", "--config", config]
  args += [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
  args += ["--workdir", str(workdir)]
  return " ".join(shlex.quote(a) for a in args)


# -- running -----------------------------------------------------------------------------

def is_finished(workdir: str | Path, steps: int) -> bool:
  """Whether ``workdir`` holds a committed, manifest-checked checkpoint at or beyond ``steps``."""
  directory = Path(workdir) / "checkpoints"
  if not directory.is_dir():
    return False
  return any(p.name.isdigit() and int(p.name) >= steps and (p / MANIFEST).exists()
             for p in directory.iterdir())


def _write_overrides(run_dir: Path, name: str, overrides: Overrides) -> None:
  run_dir.mkdir(parents=True, exist_ok=True)
  (run_dir / runs_lib.OVERRIDES_FILE).write_text(
      json.dumps({"name": name, "overrides": overrides}, indent=2, default=list) + "\n")


def use_compilation_cache(directory: str | Path) -> None:
  """Keeps compiled programs in ``directory`` (JAX's persistent compilation cache) unless
  one is configured already. Runs of a sweep that share a model reuse its init and eval
  programs, and a run resumed with the same schedule (successive halving) its train step.
  Takes effect only if set before this process's first compilation."""
  import jax
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(Path(directory).absolute()))


def _train_fn(train_fn: TrainFn | None) -> TrainFn:
  if train_fn is not None:
    return train_fn
  return train


def run_sweep(base_cfg: ml_collections.ConfigDict, sweep: Sequence[Overrides], workdir: str | Path,
              train_fn: TrainFn | None = None, log: Callable[[str], None] = print,
              compile_cache: bool = True) -> list[dict[str, Any]]:
  """Trains each entry of ``sweep`` in ``workdir/<run name>``, one after another on the
  local devices; finished runs are skipped and partial ones resumed. A run halted by a
  non-finite loss (``train.nan_policy="halt"``) is reported in the ``error`` column and the
  sweep goes on. Writes and returns the results table (``workdir/results.csv`` and
  ``results.md``). ``compile_cache``: :func:`use_compilation_cache` in ``workdir/compile_cache``."""
  workdir = Path(workdir)
  names = run_names(sweep)
  cfgs = [apply_overrides(base_cfg, o) for o in sweep]  # every override checked up front
  if compile_cache:
    use_compilation_cache(workdir / "compile_cache")
  train_fn = _train_fn(train_fn)
  errors = {}
  for i, (name, overrides, cfg) in enumerate(zip(names, sweep, cfgs)):
    run_dir = workdir / name
    if is_finished(run_dir, cfg.train.steps):
      log(f"[{i + 1}/{len(sweep)}] {name}: finished, skipped")
      continue
    log(f"[{i + 1}/{len(sweep)}] {name}: training in {run_dir}")
    _write_overrides(run_dir, name, overrides)
    error = _train_or_halt(train_fn, cfg, run_dir)
    if error:
      log(f"[{i + 1}/{len(sweep)}] {name}: halted: {error}")
      errors[name] = {"error": error if len(error) < 80 else error[:77] + "..."}
  return write_results(workdir, names, sweep, extra=errors)


def _train_or_halt(train_fn: TrainFn, cfg: ml_collections.ConfigDict, run_dir: Path) -> str | None:
  """Trains; returns the message if the run was halted by a non-finite loss, else None."""
  try:
    train_fn(cfg, run_dir)
  except TrainingHalted as e:
    return str(e)
  return None


def write_results(workdir: str | Path, names: Sequence[str], sweep: Sequence[Overrides],
                  extra: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
  """Writes ``results.csv`` and ``results.md`` for the named runs under ``workdir``:
  run, overrides, final train/eval loss, tokens/s, parameters, steps (and ``extra``
  columns per run name). Returns the rows."""
  workdir = Path(workdir)
  keys = list(dict.fromkeys(k for o in sweep for k in o))
  rows = []
  for name, overrides in zip(names, sweep):
    summary = runs_lib.load_run(workdir / name, name=name).summary()
    row = {"run": name, **{k: overrides.get(k) for k in keys},
           **{c: summary.get(c) for c in RESULT_COLUMNS},
           **(extra or {}).get(name, {})}
    rows.append(row)
  runs_lib.write_table(rows, workdir / "results.csv", workdir / "results.md")
  return rows


# -- automated search: successive halving ------------------------------------------------

@dataclasses.dataclass
class SuccessiveHalving:
  """Successive halving (Jamieson & Talwalkar, 2016): train ``n`` configs for
  ``min_steps``, keep the best ``1/eta`` by ``metric`` (eval loss at the rung's last step),
  continue those ``eta`` times longer by resuming their workdirs, until one remains; that
  one is trained to the final budget ``min_steps * eta**rungs``.

  Candidates are ``n`` draws of :func:`random_search` over ``space``, or ``trials``.
  Every candidate's learning-rate schedule spans the final budget from the start (when
  ``optim.decay_steps`` is -1), so a continued run follows the schedule it began with.
  """
  space: Mapping[str, Any] | None = None
  n: int = 9
  min_steps: int = 50
  eta: int = 3
  seed: int = 0
  trials: Sequence[Overrides] | None = None
  metric: str = "eval_loss"

  def candidates(self) -> list[Overrides]:
    if self.trials is not None:
      return [dict(t) for t in self.trials]
    if self.space is None:
      raise ValueError("SuccessiveHalving needs a search space or a list of trials")
    return random_search(self.space, self.n, self.seed)

  def schedule(self, num: int | None = None) -> list[tuple[int, int]]:
    """``(configs, steps)`` per rung, e.g. n=9, eta=3: (9, m), (3, 3m), (1, 9m)."""
    if self.eta < 2 or self.min_steps < 1:
      raise ValueError(f"SuccessiveHalving needs eta >= 2 and min_steps >= 1, got eta={self.eta}, "
                       f"min_steps={self.min_steps}")
    counts = [len(self.candidates()) if num is None else num]
    while counts[-1] > 1:
      counts.append(math.ceil(counts[-1] / self.eta))
    return [(c, self.min_steps * self.eta ** r) for r, c in enumerate(counts)]

  def configure(self, base_cfg: ml_collections.ConfigDict, overrides: Overrides,
                steps: int, max_steps: int) -> ml_collections.ConfigDict:
    """The config of one candidate trained to ``steps`` of a ``max_steps`` budget."""
    cfg = apply_overrides(base_cfg, overrides)
    cfg.train.steps = steps
    if cfg.optim.decay_steps <= 0:
      cfg.optim.decay_steps = max(max_steps - cfg.optim.warmup_steps, 1)
    if cfg.train.eval_every == 0:  # the rung's last step is always evaluated when > 0
      cfg.train.eval_every = max_steps
    return cfg

  def run(self, base_cfg: ml_collections.ConfigDict, workdir: str | Path,
          train_fn: TrainFn | None = None, log: Callable[[str], None] = print,
          compile_cache: bool = True) -> "SearchResult":
    """Runs the search in ``workdir`` (one subdirectory per candidate; rerunning resumes)
    and writes ``search.json``, ``results.csv`` and ``results.md`` there."""
    workdir = Path(workdir)
    trials = self.candidates()
    names = run_names(trials)
    by_name = dict(zip(names, trials))
    schedule = self.schedule(len(trials))
    max_steps = schedule[-1][1]
    for name in names:  # every override checked before anything trains
      self.configure(base_cfg, by_name[name], max_steps, max_steps)
    if compile_cache:
      use_compilation_cache(workdir / "compile_cache")
    train_fn = _train_fn(train_fn)
    alive, rungs, reached = list(names), [], {}
    for r, (_, steps) in enumerate(schedule):
      log(f"rung {r}: {len(alive)} config(s) to {steps} steps")
      for name in alive:
        cfg = self.configure(base_cfg, by_name[name], steps, max_steps)
        run_dir = workdir / name
        if not is_finished(run_dir, steps):
          _write_overrides(run_dir, name, by_name[name])
          error = _train_or_halt(train_fn, cfg, run_dir)  # its score is then +inf
          if error:
            log(f"  {name}: halted: {error}")
        reached[name] = r
      scores = {name: _score(workdir / name, steps, self.metric) for name in alive}
      keep = schedule[r + 1][0] if r + 1 < len(schedule) else 1
      ranked = sorted(alive, key=lambda n: (scores[n], names.index(n)))
      rungs.append({"rung": r, "steps": steps, "scores": scores, "kept": ranked[:keep]})
      log("  " + ", ".join(f"{n}: {self.metric} {scores[n]:.4f}" for n in ranked))
      alive = ranked[:keep]
    best = alive[0]
    result = SearchResult(best=best, best_overrides=by_name[best], rungs=rungs, names=names,
                          trials=trials)
    record = {k: v for k, v in dataclasses.asdict(result).items() if k != "rows"}
    (workdir / "search.json").write_text(json.dumps(record, indent=2) + "\n")
    result.rows = write_results(workdir, names, trials,
                                extra={n: {"rung": reached[n]} for n in names})
    last = rungs[-1]
    log(f"best: {best} ({self.metric} {last['scores'][best]:.4f} after {last['steps']} steps)")
    return result


@dataclasses.dataclass
class SearchResult:
  """What a search found: the best run's name and overrides, each rung's scores."""
  best: str
  best_overrides: Overrides
  rungs: list[dict[str, Any]]
  names: list[str]
  trials: list[Overrides]
  rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def _score(run_dir: Path, steps: int, metric: str) -> float:
  """``metric`` at ``steps`` from the run's metrics.jsonl; +inf if missing or not finite."""
  for record in reversed(runs_lib.read_metrics(run_dir)):
    if int(record["step"]) == steps and metric in record:
      value = float(record[metric])
      return value if math.isfinite(value) else math.inf
  return math.inf


def successive_halving(base_cfg: ml_collections.ConfigDict, space: Mapping[str, Any], n: int,
                       min_steps: int, eta: int = 3, *, workdir: str | Path, seed: int = 0,
                       metric: str = "eval_loss", train_fn: TrainFn | None = None,
                       log: Callable[[str], None] = print,
                       compile_cache: bool = True) -> SearchResult:
  """Runs :class:`SuccessiveHalving` over ``n`` random draws from ``space``."""
  search = SuccessiveHalving(space=space, n=n, min_steps=min_steps, eta=eta, seed=seed,
                             metric=metric)
  return search.run(base_cfg, workdir, train_fn=train_fn, log=log, compile_cache=compile_cache)
