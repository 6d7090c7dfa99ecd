"""Building sweeps: search spaces, grids, products and random draws of config overrides,
each applied to a config, named, and written as an ``lmjax train`` command.

A sweep is a list of override dicts (dotted keys to values)::

  grid({"model.num_kv_heads": [4, 2, 1]})                   # 3 runs
  product(grid({"optim.learning_rate": [1e-3, 3e-4]}), seeds(2))  # 4 runs
  random_search({"optim.learning_rate": log_uniform(1e-4, 1e-2)}, n=8)

:mod:`lmjax.sweep` re-exports all of these and runs the sweeps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import re
import shlex
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from lmjax import config as config_lib

Overrides = dict[str, Any]  # dotted config key -> value, e.g. {"optim.learning_rate": 1e-3}


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


# -- applying, naming, commands ----------------------------------------------------------

# A copy of a config with dotted keys set, each checked (ConfigError naming a bad key).
apply_overrides = config_lib.with_overrides


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
