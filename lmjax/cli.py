"""``lmjax <command> [--config configs/x.py[:arg]] [--config.KEY=VALUE ...] [flags]``.

Argument plumbing only: every command calls a function of the library. Each command takes
its own flags (``lmjax <command> --help`` lists them) and refuses any other; ``--config.KEY=VALUE``
(or ``--config.KEY VALUE``) overrides one field of the config file, parsed by the field's type.
A mistake the user can fix is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings

import jax
from absl import logging

from lmjax import cli_trained  # noqa: F401 - registers eval, harness, generate and chat
from lmjax import config_file, distributed, runs, sweep
from lmjax.cli_args import (COMMANDS, PARSERS, _config_flags, _count, _distributed_flags, _Parser,
                            _workdir_flag, command, flags)
from lmjax.checkpoint import CheckpointError
from lmjax.config import ConfigError, error_line
from lmjax.data import DataError
from lmjax.plan import format_plan, plan
from lmjax.preflight import input_problems
from lmjax.trainer import train

# -- commands ------------------------------------------------------------------------------

@flags("train")
def _train_flags(p):
  _config_flags(p, required=True)
  _workdir_flag(p, "run directory: checkpoints, metrics, config; rerun to resume")
  _distributed_flags(p)


@command("train", "train (or resume) the config in --workdir")
def _train(args) -> None:
  _refuse(input_problems(args.cfg, workdir=args.workdir))
  history = train(args.cfg, args.workdir)
  if history:
    last = history[-1]
    stopped = int(last["step"]) < args.cfg.train.steps  # by a signal: the summary says which
    print(f"{'stopped' if stopped else 'done'}: step {int(last['step'])}, loss {last['loss']:.4f}"
          + (f", eval loss {last['eval_loss']:.4f}" if "eval_loss" in last else "")
          + f"; run directory {args.workdir}" + ("; rerun the same command to resume" if stopped else ""))
  else:
    print(f"nothing to do: {args.workdir} already holds the final step")


@flags("validate")
def _validate_flags(p):
  _config_flags(p, required=True)
  p.add_argument("--devices", type=_count("devices"), metavar="N",
                 help="also check that the mesh covers N devices")


@command("validate", "check the config against itself, its data and its tokenizer (every "
                     "mismatch at once) and print it, without touching devices")
def _validate(args) -> None:
  _refuse(input_problems(args.cfg, args.devices))
  print(args.cfg)


def _refuse(problems: list[str]) -> None:
  """Exits with status 2 after one ``error:`` line per problem, if there are any."""
  for problem in problems:
    sys.stderr.write(error_line(problem) + "\n")
  if problems:
    sys.exit(2)


@flags("sweep")
def _sweep_flags(p):
  p.add_argument("sweep_file", nargs="?", metavar="FILE[:ARG]",
                 help="sweep file: get_config() (the base config) and sweep() or search()")
  _config_flags(p, required=False, what="the sweep file, if not given as the first argument;")
  _workdir_flag(p, "directory that holds one run per subdirectory")
  p.add_argument("--print_commands", action="store_true",
                 help="print one `lmjax train` command per run instead of running them")
  p.add_argument("--search", action="store_true",
                 help="run the file's search() even if it defines sweep()")
  _distributed_flags(p)


@command("sweep", "train each run of a sweep file's sweep() (or its search()) in --workdir/<run name>")
def _sweep(args) -> None:
  path, arg = config_file.split_path_arg(args.spec)
  module = sweep.load_sweep_file(path)
  if args.search or not hasattr(module, "sweep"):
    if not hasattr(module, "search"):
      raise ConfigError(f"{path} defines neither sweep() nor search()")
    if args.print_commands:
      raise ConfigError("--print_commands: a search picks each rung's runs from the previous "
                        "rung's results, so it has no fixed list of commands; run it without")
    result = sweep.search_from_file(path, arg).run(args.cfg, args.workdir)
    print(runs.format_table(result.rows))
    print(f"best: {args.workdir}/{result.best}; results in {args.workdir}/results.md")
    return
  trials = sweep.sweep_from_file(path, arg)
  if args.print_commands:
    for name, overrides in zip(sweep.run_names(trials), trials):
      print(sweep.train_command(args.spec, {**args.overrides, **overrides}, f"{args.workdir}/{name}"))
    return
  rows = sweep.run_sweep(args.cfg, trials, args.workdir)
  print(runs.format_table(rows))
  print(f"results: {args.workdir}/results.csv, {args.workdir}/results.md")


@flags("runs")
def _runs_flags(p):
  p.add_argument("dir", nargs="?", metavar="DIR", help="a run directory or a directory of runs")
  _workdir_flag(p, "the same as DIR", required=False)
  p.add_argument("--plot", metavar="PNG", help="also draw the loss and eval-loss curves into this image")


@command("runs", "the runs under DIR with their final metrics [--plot curves.png]")
def _runs(args) -> None:
  directory = args.dir or args.workdir
  if not directory or (args.dir and args.workdir):
    raise ConfigError("runs: give one directory, lmjax runs DIR")
  if args.plot:
    try:
      import matplotlib  # noqa: F401 - optional: the notebook extra
    except ImportError:
      raise ConfigError('--plot draws with matplotlib, which is not installed: '
                        'pip install "lmjax[notebook]".') from None
  found = runs.list_runs(directory)
  print(runs.format_table(runs.runs_table(found)))
  if args.plot:
    runs.plot_runs(found, args.plot)
    print(f"curves: {args.plot}")


@flags("plan")
def _plan_flags(p):
  _config_flags(p, required=True)
  p.add_argument("--devices", type=_count("devices"), required=True, metavar="N",
                 help="devices of the target mesh (faked on the CPU)")
  p.add_argument("--accelerator", default="h100", help="h100, h200, a100-40gb, a100-80gb, l4, "
                 "tpu-v4, tpu-v5e, tpu-v5p or tpu-v6e (peak FLOP/s, memory); default h100")
  p.add_argument("--memory", help="memory per device: 80GiB or 16G (binary), 80GB (10^9 bytes); "
                 "default: the accelerator's")
  p.add_argument("--memory_fraction", type=float, default=0.9, help="the share of --memory the "
                 "run may use (set XLA_PYTHON_CLIENT_MEM_FRACTION to match on GPUs); default 0.9")
  p.add_argument("--mfu", type=float, default=0.4,
                 help="model FLOPs utilisation for the expected step time (0.4)")


@command("plan", "per-device memory and step time on --devices N, compiled on fake CPU devices; "
                 "if it does not fit, the cheapest --config change that does")
def _plan(args) -> None:
  # N fake CPU devices; must happen before anything initialises a JAX backend (importing
  # lmjax initialises none).
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", args.devices)
  try:
    result = plan(args.cfg, args.devices, memory_bytes=args.memory, accelerator=args.accelerator,
                  mfu=args.mfu, memory_fraction=args.memory_fraction)
  except ValueError as e:  # an unknown accelerator, a size that does not parse
    raise ConfigError(str(e)) from None
  print(format_plan(result))


# -- parsing -------------------------------------------------------------------------------

def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """``argv`` without its ``--config.KEY=VALUE`` / ``--config.KEY VALUE`` items, and those
  as (KEY, VALUE) pairs in order."""
  rest, overrides, i = [], [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      key, sep, value = arg[len("--config."):].partition("=")
      if not sep:
        if i + 1 >= len(argv):
          raise ConfigError(f"{arg}: needs a value, {arg}=VALUE")
        value, i = argv[i + 1], i + 1
      if not key:
        raise ConfigError(f"{arg}: name a field, e.g. --config.optim.learning_rate=3e-4")
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides


def _ordered() -> list[str]:
  """The command names in the order ``lmjax --help`` lists them."""
  order = ("train", "validate", "plan", "eval", "harness", "generate", "chat", "sweep", "runs")
  return sorted(COMMANDS, key=lambda n: order.index(n) if n in order else len(order))


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
  """The ``lmjax`` parser and each command's own."""
  top = _Parser(prog="lmjax", description="Train, evaluate and sample Transformer language "
                "models with JAX; `lmjax COMMAND --help` lists a command's flags.",
                epilog="Config fields are overridden with --config.KEY=VALUE after --config.")
  sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  subs = {}
  for name in _ordered():
    help_text = COMMANDS[name][0]
    subs[name] = sub.add_parser(name, help=help_text, description=help_text)
    PARSERS[name](subs[name])
  return top, subs


def parse(argv: list[str]) -> argparse.Namespace:
  """The namespace of ``lmjax`` arguments ``argv`` (without the program name), with the
  loaded config as ``cfg`` (None when the command has none)."""
  rest, overrides = split_overrides(argv)
  top, subs = parser()
  if not rest or rest[0] not in COMMANDS:
    if not rest or rest[0] in ("-h", "--help"):
      top.print_help(sys.stdout if rest else sys.stderr)
      sys.exit(0 if rest else 2)
    top.error(f"{rest[0]!r} is no command; choose one of {', '.join(_ordered())}")
  args, unknown = top.parse_known_args(rest)
  if unknown:
    subs[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
  if args.command == "sweep":
    if args.sweep_file and args.config:
      raise ConfigError("sweep: give the sweep file once, as the first argument or as --config")
    args.config = args.sweep_file or args.config
    if not args.config:
      raise ConfigError("sweep: give the sweep file, lmjax sweep experiments/x/sweep.py --workdir DIR")
  args.spec, args.overrides = getattr(args, "config", None), dict(overrides)
  if overrides and not args.spec:
    raise ConfigError(f"--config.{overrides[0][0]}: an override needs --config FILE "
                      f"(`lmjax {args.command}` has no config here)")
  args.cfg = config_file.load(args.spec, overrides) if args.spec else None
  return args


def _drop_orbax_traceback(record) -> bool:
  return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


def _drop_closed_loop(unraisable, report) -> None:
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed"):
    report(unraisable)


def _quiet_failed_saves() -> None:
  """A checkpoint save that fails in the background (a store that keeps failing) is reported
  by lmjax in one line (CheckpointError). Before that, Orbax logs it with its traceback, and
  the save's other writes report, as they end, that the save's event loop is gone, or were
  never awaited: those reports alone are dropped."""
  logging.get_absl_logger().addFilter(_drop_orbax_traceback)
  warnings.filterwarnings("ignore", r"coroutine '\w+CheckpointHandler\.", RuntimeWarning)
  if getattr(sys.unraisablehook, "func", None) is not _drop_closed_loop:
    sys.unraisablehook = functools.partial(_drop_closed_loop, report=sys.unraisablehook)


def main(argv: list[str] | None = None) -> None:
  argv = sys.argv[1:] if argv is None else argv
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain are chatty at INFO
  _quiet_failed_saves()
  try:
    args = parse(argv)
    if args.command not in ("validate", "runs", "plan"):  # these touch no devices
      distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                             heartbeat_timeout=args.heartbeat_timeout)
    COMMANDS[args.command][1](args)
  except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
    sys.stderr.write(error_line(e) + "\n")
    sys.exit(2)
  except KeyboardInterrupt:  # a second Ctrl-C (the first stops training after its step)
    sys.stderr.write("interrupted\n")
    sys.exit(130)


if __name__ == "__main__":
  main()
