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

The helpers that build sweeps (search spaces, grids, products, run names) live in
:mod:`lmjax.sweep_space`; this module re-exports them and runs sweeps and searches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections

from lmjax import config_file, storage
from lmjax import runs as runs_lib
from lmjax.config import ConfigError
from lmjax.config_file import split_path_arg
from lmjax.checkpoint import MANIFEST
from lmjax.sweep_space import (Choice, IntUniform, LogUniform, Overrides, Uniform, apply_overrides,
                               chain, choice, grid, int_uniform, log_uniform, product,
                               random_search, run_name, run_names, seeds, train_command, uniform,
                               zipped)
from lmjax.trainer import TrainingHalted, train

__all__ = [  # building sweeps (lmjax.sweep_space), then running them
    "Choice", "IntUniform", "LogUniform", "Overrides", "Uniform", "apply_overrides", "chain",
    "choice", "grid", "int_uniform", "log_uniform", "product", "random_search", "run_name",
    "run_names", "seeds", "train_command", "uniform", "zipped",
    "RESULT_COLUMNS", "SearchResult", "SuccessiveHalving", "TrainFn", "is_finished",
    "load_sweep_file", "run_sweep", "search_from_file", "split_path_arg", "successive_halving",
    "sweep_from_file", "use_compilation_cache", "write_results"]

TrainFn = Callable[[ml_collections.ConfigDict, Any], Any]
# Columns of results.csv after the run name and the overrides.
RESULT_COLUMNS = ("train_loss", "eval_loss", "tokens_per_sec", "params", "steps")


# -- sweep files -------------------------------------------------------------------------

def load_sweep_file(path: str | os.PathLike) -> Any:
  """Imports a sweep file (``path`` without any ``:arg``) as a module; mistakes in it are
  ConfigErrors naming ``file:line``."""
  module = config_file.load_file(path, kind="sweep")
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: a sweep file defines get_config(arg=None), the base config")
  return module


def sweep_from_file(path: str | os.PathLike, arg: str | None = None) -> list[Overrides]:
  """The overrides the file's ``sweep()`` (or ``sweep(arg)``) yields, as a list."""
  return [dict(o) for o in config_file.call(load_sweep_file(path), "sweep", arg)]


def search_from_file(path: str | os.PathLike, arg: str | None = None) -> "SuccessiveHalving":
  """The :class:`SuccessiveHalving` the file's ``search()`` (or ``search(arg)``) returns."""
  return config_file.call(load_sweep_file(path), "search", arg)


# -- running -----------------------------------------------------------------------------

def is_finished(workdir: str | os.PathLike, steps: int) -> bool:
  """Whether ``workdir`` holds a committed, manifest-checked checkpoint at or beyond ``steps``."""
  directory = storage.path(workdir) / "checkpoints"
  if not directory.is_dir():
    return False
  return any(p.name.isdigit() and int(p.name) >= steps and (p / MANIFEST).exists()
             for p in directory.iterdir())


def _write_overrides(run_dir: os.PathLike, name: str, overrides: Overrides) -> None:
  storage.write_text(storage.join(run_dir, runs_lib.OVERRIDES_FILE),
                     json.dumps({"name": name, "overrides": overrides}, indent=2, default=list) + "\n")


def use_compilation_cache(directory: str | os.PathLike) -> None:
  """Keeps compiled programs in ``directory`` (JAX's persistent compilation cache) unless
  one is configured already. Runs of a sweep that share a model reuse its init and eval
  programs, and a run resumed with the same schedule (successive halving) its train step.
  Takes effect only if set before this process's first compilation. A sweep in a bucket
  keeps it in lmjax's local cache instead (``<cache>/compile_cache``)."""
  if storage.is_url(directory):
    directory = os.path.join(storage.cache_root(), "compile_cache")
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", os.fspath(storage.absolute(directory)))


def _train_fn(train_fn: TrainFn | None) -> TrainFn:
  if train_fn is not None:
    return train_fn
  return train


def run_sweep(base_cfg: ml_collections.ConfigDict, sweep: Sequence[Overrides], workdir: str | os.PathLike,
              train_fn: TrainFn | None = None, log: Callable[[str], None] = print,
              compile_cache: bool = True) -> list[dict[str, Any]]:
  """Trains each entry of ``sweep`` in ``workdir/<run name>``, one after another on the
  local devices; finished runs are skipped and partial ones resumed. A run halted by a
  non-finite loss (``train.nan_policy="halt"``) is reported in the ``error`` column and the
  sweep goes on. Writes and returns the results table (``workdir/results.csv`` and
  ``results.md``). ``compile_cache``: :func:`use_compilation_cache` in ``workdir/compile_cache``."""
  workdir = storage.path(workdir)
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


def _train_or_halt(train_fn: TrainFn, cfg: ml_collections.ConfigDict, run_dir: os.PathLike) -> str | None:
  """Trains; returns the message if the run was halted by a non-finite loss, else None."""
  try:
    train_fn(cfg, run_dir)
  except TrainingHalted as e:
    return str(e)
  return None


def write_results(workdir: str | os.PathLike, names: Sequence[str], sweep: Sequence[Overrides],
                  extra: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
  """Writes ``results.csv`` and ``results.md`` for the named runs under ``workdir``:
  run, overrides, final train/eval loss, tokens/s, parameters, steps (and ``extra``
  columns per run name). Returns the rows."""
  workdir = storage.path(workdir)
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

  def run(self, base_cfg: ml_collections.ConfigDict, workdir: str | os.PathLike,
          train_fn: TrainFn | None = None, log: Callable[[str], None] = print,
          compile_cache: bool = True) -> "SearchResult":
    """Runs the search in ``workdir`` (one subdirectory per candidate; rerunning resumes)
    and writes ``search.json``, ``results.csv`` and ``results.md`` there."""
    workdir = storage.path(workdir)
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
    storage.write_text(workdir / "search.json", json.dumps(record, indent=2) + "\n")
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


def _score(run_dir: os.PathLike, steps: int, metric: str) -> float:
  """``metric`` at ``steps`` from the run's metrics.jsonl; +inf if missing or not finite."""
  for record in reversed(runs_lib.read_metrics(run_dir)):
    if int(record["step"]) == steps and metric in record:
      value = float(record[metric])
      return value if math.isfinite(value) else math.inf
  return math.inf


def successive_halving(base_cfg: ml_collections.ConfigDict, space: Mapping[str, Any], n: int,
                       min_steps: int, eta: int = 3, *, workdir: str | os.PathLike, seed: int = 0,
                       metric: str = "eval_loss", train_fn: TrainFn | None = None,
                       log: Callable[[str], None] = print,
                       compile_cache: bool = True) -> SearchResult:
  """Runs :class:`SuccessiveHalving` over ``n`` random draws from ``space``."""
  search = SuccessiveHalving(space=space, n=n, min_steps=min_steps, eta=eta, seed=seed,
                             metric=metric)
  return search.run(base_cfg, workdir, train_fn=train_fn, log=log, compile_cache=compile_cache)
