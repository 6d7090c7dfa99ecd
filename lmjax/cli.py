"""``lmjax <command> [--config configs/x.py[:arg]] [--config.KEY=VALUE ...] [flags]``.

Argument plumbing only: every command calls a function of the library. Each command takes
its own flags (``lmjax <command> --help`` lists them) and refuses any other; ``--config.KEY=VALUE``
(or ``--config.KEY VALUE``) overrides one field of the config file, parsed by the field's type.
A mistake the user can fix is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import warnings
from typing import Callable

import jax
from absl import logging

from lmjax import config_file, distributed, generation_eval, runs, storage, sweep
from lmjax.checkpoint import CheckpointError
from lmjax.config import ConfigError, error_line
from lmjax.data import DataError
from lmjax.generate import generate, load_run
from lmjax.plan import format_plan, plan
from lmjax.preflight import input_problems
from lmjax.rundir import check_vocab
from lmjax.trained import load
from lmjax.trainer import train

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


@flags("eval")
def _eval_flags(p):
  _workdir_flag(p, "a trained run (its eval.json is written there)")
  _step_flag(p)
  p.add_argument("--eval_source", metavar="PATH", help="text/JSONL file, dir or glob to score "
                 "instead of the run's held-out split")
  p.add_argument("--eval_batches", type=_count("batches"), metavar="N",
                 help="batches of held-out data (default: all of the split)")
  p.add_argument("--choices", metavar="JSONL", help='multiple-choice JSONL ({"context", '
                 '"choices", "label"} per line) to score for accuracy')
  g = p.add_argument_group("generation tasks (BLEU, ROUGE-1/2/L, exact match; the eval extra)")
  g.add_argument("--generation", metavar="JSONL", help='JSONL of {"source": str, "reference": '
                 'str or [str, ...]} per line: the model continues each source (greedy)')
  g.add_argument("--source_field", default="source", help="--generation's source field (source)")
  g.add_argument("--reference_field", default="reference",
                 help="--generation's reference field (reference)")
  g.add_argument("--max_new_tokens", type=_count("tokens"), default=64,
                 help="new tokens per source, at most (64)")
  g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                 help="cut each output before this text; repeatable; \\n and \\t are read as "
                      "newline and tab (--stop '\\n': one line)")
  g.add_argument("--limit", type=_count("items"), metavar="N", help="the first N items only")
  g.add_argument("--batch_size", type=_count("sources"), default=8, metavar="B",
                 help="sources generated together (8)")
  g.add_argument("--output", metavar="FILE", help="scores, timing and every output as JSON "
                 "(default: eval_generation.json in the run directory)")
  _distributed_flags(p)


@command("eval", "held-out loss, perplexity, bits per byte (and --choices accuracy, "
                 "--generation BLEU / ROUGE / exact match) of --workdir")
def _eval(args) -> None:
  if args.generation:
    generation_eval.scorers()  # a missing extra is named before the run loads
  run = load(args.workdir, args.step)
  results = {"step": run.step}
  name = "source" if args.eval_source else "held_out"
  results[name] = run.evaluate(args.eval_source, args.eval_batches)
  if args.choices:
    results["choices"] = run.multiple_choice(args.choices)
  if args.generation:
    stop = [generation_eval.unescape(s) for s in args.stop]
    try:
      out = generation_eval.evaluate_run(
          run, args.generation, source_field=args.source_field,
          reference_field=args.reference_field, limit=args.limit,
          max_new_tokens=args.max_new_tokens, stop=stop, batch_size=args.batch_size)
    except ValueError as e:  # max_new_tokens leaving no room for a prompt
      raise ConfigError(f"--max_new_tokens: {e}") from None
    results["generation"] = {"file": args.generation, **out["scores"]}
    output = args.output or storage.join(args.workdir, "eval_generation.json")
    storage.write_text(output, json.dumps({"step": run.step, "file": args.generation,
                                           "max_new_tokens": args.max_new_tokens, "stop": stop,
                                           **out}, indent=2))
  storage.write_text(storage.join(args.workdir, "eval.json"), json.dumps(results, indent=2))
  print(json.dumps(results, indent=2))
  if args.generation:
    print(f"\n{args.generation}: {out['scores']['examples']} items, "
          f"{out['timing']['tokens_per_sec']:.1f} generated tokens/s; outputs in {output}")
    print(generation_eval.format_table(out["scores"]))


@flags("harness")
def _harness_flags(p):
  _workdir_flag(p, "a trained run (its harness.json is written there)")
  _step_flag(p)
  p.add_argument("--tasks", required=True, metavar="T1,T2", help="lm-evaluation-harness tasks, "
                 "comma-separated: names of lm_eval's own or of task YAML under --include_path")
  p.add_argument("--include_path", metavar="DIR", help="directory of task YAML files (e.g. "
                 "dataset_path: json with local data_files; runs offline)")
  p.add_argument("--limit", type=_count("examples"), metavar="N", help="the first N examples per task")
  p.add_argument("--num_fewshot", type=int, metavar="K", help="few-shot examples per prompt")
  p.add_argument("--batch_size", type=_count("rows"), metavar="B",
                 help="rows scored or prompts generated together (default: data.global_batch_size)")
  p.add_argument("--output", metavar="FILE", help="results JSON (default: harness.json in the run "
                 "directory)")
  _distributed_flags(p)


@command("harness", "lm-evaluation-harness tasks (--tasks) on the model in --workdir (the eval extra)")
def _harness(args) -> None:
  from lmjax import harness  # lm_eval: the eval extra, imported only here
  tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
  if not tasks:
    raise ConfigError("--tasks: name at least one task, e.g. --tasks hellaswag,my_task")
  results = harness.run_harness(args.workdir, tasks, include_path=args.include_path,
                                limit=args.limit, num_fewshot=args.num_fewshot, step=args.step,
                                batch_size=args.batch_size)
  output = args.output or storage.join(args.workdir, "harness.json")
  storage.write_text(output, harness.to_json(results))
  print(harness.format_results(results))
  print(f"results: {output}")


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


@flags("generate")
def _generate_flags(p):
  _workdir_flag(p, "a trained run")
  _config_flags(p, required=False, what="optional: a config file instead of the run's own;")
  p.add_argument("--prompt", action="append", required=True,
                 help="a prompt to continue; repeat for a batch")
  p.add_argument("--max_new_tokens", type=int, default=64, help="new tokens per prompt, at most (64)")
  p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature; 0 is greedy (1)")
  p.add_argument("--top_k", type=int, default=0, help="draw from the k most likely tokens; 0 = all")
  p.add_argument("--top_p", type=float, default=1.0,
                 help="draw from the fewest most likely tokens that hold this probability; 1 = all")
  p.add_argument("--seed", type=int, default=0, help="seed of the random draws")
  _step_flag(p)
  _distributed_flags(p)


@command("generate", "continue each --prompt with the model in --workdir")
def _generate(args) -> None:
  run = load_run(args.workdir, args.cfg, args.step)
  run.text_tokenizer()
  check_vocab(run.cfg, run.tokenizer)
  try:
    texts = generate(run.setup, run.params, run.tokenizer, args.prompt,
                     max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, seed=args.seed)
  except ValueError as e:  # a sampling setting out of range, a prompt too long
    raise ConfigError(str(e)) from None
  print(f"# {args.workdir} step {run.step}: temperature {args.temperature}, top_k "
        f"{args.top_k}, top_p {args.top_p}, seed {args.seed}")
  for i, (prompt, text) in enumerate(zip(args.prompt, texts)):
    print(f"--- {i + 1}/{len(texts)}")
    print(prompt + text)


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


def parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
  """The ``lmjax`` parser and each command's own."""
  top = _Parser(prog="lmjax", description="Train, evaluate and sample Transformer language "
                "models with JAX; `lmjax COMMAND --help` lists a command's flags.",
                epilog="Config fields are overridden with --config.KEY=VALUE after --config.")
  sub = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
  subs = {}
  for name, (help_text, _) in COMMANDS.items():
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
    top.error(f"{rest[0]!r} is no command; choose one of {', '.join(COMMANDS)}")
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
