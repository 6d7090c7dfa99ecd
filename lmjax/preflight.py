"""Checks a config against itself, its data and its tokenizer before anything is compiled,
and reports every mismatch at once, with the overrides that fix them.

  for problem in input_problems(cfg):
    print(problem)

A prepared dataset fixes the sequence length and the tokenizer (hence the vocabulary) it was
made with; ``lmjax validate`` and ``lmjax train`` name each field that disagrees and the
value it needs, rather than one error per attempt.
"""

from __future__ import annotations

import ml_collections

from lmjax import rundir, storage
from lmjax.checkpoint import CheckpointError
from lmjax.config import ConfigError, validate
from lmjax.data import DataError, prepared_reader
from lmjax.data.sources import SkipLog, resolve_paths, sources_of, uses_prepared
from lmjax.metrics import check_trackers


def _raw_problems(cfg: ml_collections.ConfigDict) -> list[str]:
  problems = []
  for source, _ in sources_of(cfg.data):
    if source == "default":
      continue
    skips = SkipLog("skip", quiet=True)
    resolve_paths(source, skips)
    for reason, examples in skips.examples.items():
      problems.extend(f"config.data.source: {e}" for e in examples)
  return problems


def storage_problems(cfg: ml_collections.ConfigDict, workdir: str | None = None) -> list[str]:
  """One line per bucket URL of the run that cannot be used: the workdir (written), the data
  sources, the tokenizer and ``train.init_from`` (read); each URL is reached once, with
  short timeouts. Local paths are left to the other checks."""
  urls = [(workdir, True)] if workdir else []
  urls += [(source, False) for source, _ in sources_of(cfg.data) if source != "default"]
  urls += [(u, False) for u in (cfg.data.tokenizer, cfg.train.init_from) if u]
  problems, seen = [], set()
  for url, write in urls:
    try:
      if not storage.is_url(url) or (url, write) in seen:
        continue
      seen.add((url, write))
      storage.check(url, write=write)
    except storage.StorageError as e:
      problems.append(str(e))
  return problems


def input_problems(cfg: ml_collections.ConfigDict, num_devices: int | None = None,
                   workdir: str | None = None) -> list[str]:
  """One line per problem of ``cfg`` (its buckets, its fields, its trackers' packages, its
  data sources, its tokenizer's vocabulary against the model's), ending with the overrides
  that fix them all where they are known; empty if none. A bucket that cannot be used is
  reported alone (every later check would fail on it too). Trains no tokenizer: a raw-text
  run without ``data.tokenizer`` gets one made for its vocabulary."""
  problems = storage_problems(cfg, workdir)
  if problems:
    return problems
  fixes = {}
  for check in (lambda: validate(cfg, num_devices), lambda: check_trackers(cfg.train.trackers)):
    try:
      check()
    except ConfigError as e:
      problems.append(str(e))
  try:
    prepared = uses_prepared(cfg.data)
    problems += prepared_reader.problems(cfg, fixes) if prepared else _raw_problems(cfg)
    if prepared or cfg.data.tokenizer or cfg.train.init_from:
      tokenizer = rundir.run_tokenizer(cfg)
      if tokenizer.vocab_size != cfg.model.vocab_size:
        problems.append(f"config.model.vocab_size={cfg.model.vocab_size}, but the tokenizer "
                        f"{tokenizer.path} has {tokenizer.vocab_size} pieces; set "
                        f"--config.model.vocab_size={tokenizer.vocab_size}.")
        fixes["model.vocab_size"] = tokenizer.vocab_size
  except (DataError, ConfigError, CheckpointError, FileNotFoundError) as e:
    problems.append(str(e))
  if len(fixes) > 1:
    problems.append("all at once: " + " ".join(f"--config.{k}={v}" for k, v in fixes.items()))
  return problems
