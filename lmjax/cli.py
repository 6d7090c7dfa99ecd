"""``lmjax <command> --config configs/x.py [--config.a.b=value ...] --workdir DIR``.

Argument plumbing only: every command calls a function of the library.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file defining get_config(); override fields with --config.a.b=v.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")

USAGE = """usage: lmjax <command> --config configs/tiny.py [--config.KEY=VALUE ...] [flags]

commands:
  train      train (or resume) the config in --workdir
  validate   check the config and print it, without touching devices
"""


def _train(argv) -> None:
  del argv
  from lmjax.train import train
  if not _WORKDIR.value:
    raise app.UsageError("train needs --workdir")
  history = train(_CONFIG.value, _WORKDIR.value)
  if history:
    last = history[-1]
    print(f"done: step {int(last['step'])}, loss {last['loss']:.4f}"
          + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
          + f"; run directory {_WORKDIR.value}")
  else:
    print(f"nothing to do: {_WORKDIR.value} already holds the final step")


def _validate(argv) -> None:
  del argv
  from lmjax.config import validate
  validate(_CONFIG.value)
  print(_CONFIG.value)


COMMANDS = {"train": _train, "validate": _validate}


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    sys.stderr.write(USAGE)
    sys.exit(2)
  command = COMMANDS[sys.argv[1]]
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain are chatty at INFO

  def run(argv):
    if _CONFIG.value is None:
      raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
    from lmjax.config import ConfigError
    try:
      command(argv)
    except ConfigError as e:
      sys.stderr.write(f"error: {e}\n")
      sys.exit(2)

  app.run(run, argv=[f"lmjax {sys.argv[1]}"] + sys.argv[2:])


if __name__ == "__main__":
  main()
