"""The plumbing of the ``lmjax`` command line (:mod:`lmjax.cli`): the command and flag
registries, lmjax's argparse conventions (one-line errors, exit status 2, no abbreviated
flags) and the flag groups several commands share."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

COMMANDS: dict[str, tuple[str, Callable]] = {}  # name -> (one-line help, function(args))
PARSERS: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


class _Parser(argparse.ArgumentParser):
  """argparse with lmjax's error convention (one line, exit status 2) and no abbreviated
  flags (``--temp`` is no ``--temperature``)."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, allow_abbrev=False, **kwargs)

  def error(self, message: str):
    sys.stderr.write(f"error: {self.prog}: {message} (see {self.prog} --help)\n")
    sys.exit(2)


class _Once(argparse.Action):
  """A flag given once, with a value that is not empty (``--workdir ""`` is no directory)."""

  def __call__(self, parser, namespace, value, option_string=None):
    if getattr(namespace, self.dest, None) is not None:
      parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)!r} and {value!r}); give it once")
    if not value.strip():
      parser.error(f"{option_string} is empty; give a {self.metavar}")
    setattr(namespace, self.dest, value)


def _count(what: str) -> Callable[[str], int]:
  """An argparse type: a number of ``what``, 1 or more."""
  def parse(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
      raise argparse.ArgumentTypeError(f"a number of {what}, 1 or more; got {text!r}")
    return int(text)
  return parse


def command(name: str, help: str):
  def register(fn):
    COMMANDS[name] = (help, fn)
    return fn
  return register


def flags(name: str):
  def register(fn):
    PARSERS[name] = fn
    return fn
  return register


# -- shared flag groups --------------------------------------------------------------------

def _config_flags(p: argparse.ArgumentParser, required: bool, what: str = "config file") -> None:
  p.add_argument("--config", required=required, metavar="FILE[:ARG]", action=_Once,
                 help=f"{what} defining get_config(arg=None); FILE:ARG passes ARG. Override any "
                      "field with --config.KEY=VALUE (e.g. --config.optim.learning_rate=3e-4).")


def _workdir_flag(p: argparse.ArgumentParser, help: str, required: bool = True) -> None:
  p.add_argument("--workdir", required=required, metavar="DIR", action=_Once, help=help)


def _distributed_flags(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group("multi-process jobs (else detected: SLURM, MPI, TPU pods, Kubernetes, "
                           "torchrun env; see python -m lmjax.distributed)")
  g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0")
  g.add_argument("--num_processes", type=int, help="processes in the job (with --coordinator)")
  g.add_argument("--process_id", type=int, help="this process's index (with --coordinator)")
  g.add_argument("--heartbeat_timeout", type=int, default=100, metavar="SEC",
                 help="seconds after which a silent process is taken for dead and the others stop "
                      "with an error (default 100)")


def _step_flag(p: argparse.ArgumentParser) -> None:
  p.add_argument("--step", type=int, help="checkpoint step to load (default: the newest)")
