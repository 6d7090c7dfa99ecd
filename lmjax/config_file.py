"""Configs from files and command lines.

A config file is Python defining ``get_config(arg=None)``; ``path:arg`` passes ``arg``, which the
file reads with :func:`parse_arg`. :func:`load` runs the file and applies ``--config.KEY=VALUE``
overrides; every mistake (no such file, a syntax error, an exception in the file, an unknown
key, a value that does not parse) is a ConfigError naming the file and line or the key.

  cfg = load("configs/tiny.py:runlocal", {"optim.learning_rate": "3e-3"})
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import sys
import traceback
import types
from pathlib import Path
from typing import Any, Iterable

import ml_collections

from lmjax.config import ConfigError, _parse_text, override


def lock(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the structure so that a misspelt override fails instead of adding a field."""
  cfg.lock()
  return cfg


def split_path_arg(spec: str) -> tuple[str, str | None]:
  """``"experiments/x/sweep.py:smoke"`` -> ``("experiments/x/sweep.py", "smoke")``. A ``:``
  in a directory name (``runs/a:b/c.py:smoke``) splits after the first prefix that is a file."""
  spec = str(spec)
  if Path(spec).is_file():
    return spec, None
  for i, c in enumerate(spec):
    if c == ":" and Path(spec[:i]).is_file():
      return spec[:i], spec[i + 1:]
  path, sep, arg = spec.partition(":")
  return path, (arg if sep else None)


def _where(error: BaseException, path: Path) -> str:
  """``path:line`` of the innermost frame of ``error``'s traceback that runs ``path``."""
  line = None
  for frame in traceback.extract_tb(error.__traceback__):
    if Path(frame.filename).resolve() == path.resolve():
      line = frame.lineno
  return f"{path}:{line}" if line else str(path)


def load_file(path: str | Path, kind: str = "config") -> types.ModuleType:
  """Runs the Python file ``path`` as a module; a missing file, a syntax error or an
  exception while it runs is a ConfigError naming ``path:line``."""
  path = Path(path)
  if not path.is_file():
    hint = " (a directory)" if path.is_dir() else ""
    raise ConfigError(f"{path}: no such {kind} file{hint}; give a Python file defining "
                      "get_config(), e.g. configs/tiny.py.")
  try:
    source = path.read_bytes().decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); a {kind} file is Python source.") from None
  try:
    code = compile(source, str(path), "exec")
  except SyntaxError as e:
    raise ConfigError(f"{path}:{e.lineno}: syntax error: {e.msg}.") from None
  name = f"lmjax_{kind}_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}"
  module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader=None))
  module.__file__ = str(path)
  sys.modules[name] = module  # dataclasses and pickling look their module up by name
  try:
    exec(code, module.__dict__)  # noqa: S102 - a config file is code by design
  except ConfigError as e:
    raise ConfigError(f"{_where(e, path)}: {e}") from None
  except (Exception, SystemExit) as e:  # noqa: BLE001 - any mistake in the file is the user's to fix there
    raise ConfigError(_failed(e, path)) from None
  return module


def _failed(error: BaseException, path: Path) -> str:
  """``path:line: Error: message`` for an exception raised while running ``path``."""
  if isinstance(error, SystemExit):
    return f"{_where(error, path)}: called sys.exit({error.code!r}); raise an exception instead."
  return f"{_where(error, path)}: {type(error).__name__}: {error}"


def call(module: types.ModuleType, fn_name: str, arg: str | None) -> Any:
  """``module.fn_name(arg)`` (or ``()`` without an argument), its exceptions as ConfigError
  naming the file and line."""
  path = Path(module.__file__)
  fn = getattr(module, fn_name, None)
  if not callable(fn):
    raise ConfigError(f"{path}: defines no {fn_name}().")
  takes_arg = bool(inspect.signature(fn).parameters)
  if arg is not None and not takes_arg:
    raise ConfigError(f"{path}: {fn_name}() takes no argument, but {path}:{arg} gives one.")
  try:
    return fn(arg) if takes_arg else fn()
  except ConfigError as e:  # names the key or the argument itself
    raise ConfigError(f"{path}{'' if arg is None else ':' + arg}: {e}") from None
  except (Exception, SystemExit) as e:  # noqa: BLE001
    raise ConfigError(_failed(e, path)) from None


def load(spec: str | Path, overrides: dict[str, Any] | Iterable[tuple[str, Any]] = ()) -> ml_collections.ConfigDict:
  """The locked config of ``path[:arg]`` with ``overrides`` (dotted key -> value; strings are
  parsed by the field's type) applied in order."""
  path, arg = split_path_arg(str(spec))
  cfg = call(load_file(path), "get_config", arg)
  if isinstance(cfg, ml_collections.FrozenConfigDict):
    cfg = cfg.as_configdict()
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not an "
                      "ml_collections.ConfigDict; start from lmjax.config.default_config().")
  items = overrides.items() if isinstance(overrides, dict) else overrides
  for key, value in items:
    override(cfg, key, value)
  return lock(cfg)


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(?:([kmgtp])(i?b)?|b)?\s*", re.IGNORECASE)


def parse_size(text: str | int) -> int:
  """Bytes from a size such as '80GiB', '16G', '80GB', '500MB', '1.5TiB' or a plain number.

  One rule: a unit with ``iB`` or a bare letter K/M/G/T/P is binary ('16G' = 16 GiB, as
  ``free`` and XLA print); a letter with ``B`` alone is decimal ('80GB' = 80 * 10^9, as
  disks and Hugging Face's ``max_shard_size``); case is ignored.
  """
  if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
    return text
  match = _SIZE.fullmatch(text) if isinstance(text, str) else None
  if not match:
    raise ValueError(f"cannot read {text!r} as a size; write e.g. 80GiB, 80GB, 16G or 1.5TiB.")
  number, letter, suffix = match.groups()
  if not letter:
    return int(float(number))
  power = "kmgtp".index(letter.lower()) + 1
  decimal = suffix is not None and suffix.lower() == "b"
  return int(float(number) * (10**(3 * power) if decimal else 2**(10 * power)))


def _parse_arg_value(name: str, text: str, default: Any, known: str) -> Any:
  try:
    if isinstance(default, bool):
      return _parse_text(text, default)
    return type(default)(text)
  except ValueError:
    raise ConfigError(f"config argument {name}={text!r}: expected {type(default).__name__}. "
                      f"Known arguments: {known}.") from None


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """The ``get_config(arg)`` string as typed values, as big_vision's ``parse_arg``.

  ``arg`` is comma-separated ``key=value`` items (``--config configs/x.py:runlocal,variant=gpt2``);
  a bare ``key`` sets a bool to True. Each value takes its default's type (bool: true/false
  in any case, int, float, str). When the first key's default is a string, a first item that
  names no key is its value, with any following ``k=v`` items whose ``k`` is no key (a sweep
  run's directory, ``runs/sweep/lr=0.001,seed=1``): ``finetune.py:runs/tiny,runlocal`` reads as
  ``run=runs/tiny,runlocal``. An unknown key, a value of the wrong type or a key given twice
  raises ConfigError naming the key and listing the known ones.
  """
  for name, default in defaults.items():
    if not isinstance(default, (bool, int, float, str)):
      raise TypeError(f"parse_arg default {name}={default!r}: use a bool, int, float or str.")
  known = ", ".join(f"{k} ({type(v).__name__})" for k, v in defaults.items()) or "none"
  key_of = lambda item: item.partition("=")[0].strip()
  items = [item for item in (arg or "").split(",") if item.strip()]
  values, seen = dict(defaults), set()
  first = next(iter(defaults), None)
  if items and isinstance(defaults.get(first), str) and key_of(items[0]) not in defaults:
    n = 1  # positional: the first (string) argument
    while n < len(items) and "=" in items[n] and key_of(items[n]) not in defaults:
      n += 1
    values[first], items = ",".join(items[:n]), items[n:]
    seen.add(first)
  for item in items:
    name, sep, text = key_of(item), "=" in item, item.partition("=")[2]
    if name not in defaults:
      raise ConfigError(f"config argument {name!r}: unknown. Known arguments: {known}.")
    if name in seen:
      raise ConfigError(f"config argument {name!r}: given twice in {arg!r}.")
    seen.add(name)
    if sep:
      values[name] = _parse_arg_value(name, text, defaults[name], known)
    elif isinstance(defaults[name], bool):
      values[name] = True
    else:
      raise ConfigError(f"config argument {name!r}: needs a value, {name}=... "
                        f"({type(defaults[name]).__name__}). Known arguments: {known}.")
  return ml_collections.ConfigDict(values)
