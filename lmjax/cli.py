"""``lmjax <command> --config configs/x.py [--config.a.b=value ...] --workdir DIR``.

Argument plumbing only: every command calls a function of the library.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from lmjax import distributed, runs, sweep
from lmjax.checkpoint import CheckpointError
from lmjax.config import ConfigError, validate
from lmjax.data import DataError
from lmjax.generate import generate, load_run
from lmjax.plan import format_plan, plan
from lmjax.rundir import check_vocab
from lmjax.trained import load
from lmjax.trainer import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file defining get_config(); override fields with --config.a.b=v.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
_PRINT_COMMANDS = flags.DEFINE_bool(
    "print_commands", False, "sweep: print one `lmjax train` command per run instead of running them.")
_SEARCH = flags.DEFINE_bool("search", False, "sweep: run the file's search() even if it defines sweep().")
_PLOT = flags.DEFINE_string("plot", None, "runs: also draw the loss and eval-loss curves into this image.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 for a multi-process "
                                   "job (else detected: SLURM, Open MPI, TPU pods, torchrun env).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (with --coordinator).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", 100, "Seconds after which a silent process "
                                  "is taken for dead and the others stop with an error.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (eval, generate); default newest.")
_EVAL_SOURCE = flags.DEFINE_string("eval_source", None, "eval: text/JSONL file, dir or glob to "
                                   "score instead of the run's held-out split.")
_EVAL_BATCHES = flags.DEFINE_integer("eval_batches", None, "eval: batches of held-out data "
                                     "(default: all of the split).")
_CHOICES = flags.DEFINE_string("choices", None, "eval: multiple-choice JSONL "
                               '({"context", "choices", "label"} per line) to score for accuracy.')

_PROMPT = flags.DEFINE_multi_string("prompt", None, "generate: a prompt to continue; repeat "
                                    "for a batch.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "generate: new tokens per prompt, "
                                       "at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "generate: sampling temperature; 0 is "
                                  "greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "generate: draw from the k most likely tokens; 0 = all.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "generate: draw from the fewest most likely tokens that "
                            "hold this probability; 1 = all.")
_SEED = flags.DEFINE_integer("seed", 0, "generate: seed of the random draws.")

_DEVICES = flags.DEFINE_integer("devices", None, "plan: devices of the target mesh (faked on the CPU).")
_ACCELERATOR = flags.DEFINE_string("accelerator", "h100", "plan: h100, h200, a100-40gb, a100-80gb, "
                                   "l4, tpu-v4, tpu-v5e, tpu-v5p or tpu-v6e (peak FLOP/s, memory).")
_MEMORY = flags.DEFINE_string("memory", None, "plan: memory per device: 80GiB or 16G (binary), "
                              "80GB (10^9 bytes); default: the accelerator's.")
_MEMORY_FRACTION = flags.DEFINE_float("memory_fraction", 0.9, "plan: the share of --memory the run "
                                      "may use (set XLA_PYTHON_CLIENT_MEM_FRACTION to match on GPUs).")
_MFU = flags.DEFINE_float("mfu", 0.4, "plan: model FLOPs utilisation for the expected step time.")

USAGE = """usage: lmjax <command> [--config configs/tiny.py] [--config.KEY=VALUE ...] [flags]

commands:
  train      train (or resume) the config in --workdir
  validate   check the config and print it, without touching devices
  eval       held-out loss, perplexity, bits per byte (and --choices accuracy) of --workdir
  sweep      lmjax sweep experiments/x/sweep.py --workdir DIR [--print_commands] [--search]:
             train each run of the file's sweep() (or its search()) in DIR/<run name>
  runs       lmjax runs DIR [--plot curves.png]: the runs under DIR with their final metrics
  generate   continue each --prompt with the model in --workdir (the run's config, or --config):
             [--max_new_tokens N] [--temperature T] [--top_k K] [--top_p P] [--seed S] [--step N]
  plan       per-device memory and step time on --devices N [--accelerator h100] [--memory 80GiB]
             [--memory_fraction 0.9] [--mfu 0.4], compiled on fake CPU devices; if it does not
             fit, the cheapest --config change that does
"""


def _train(argv) -> None:
  del argv
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


def _eval(argv) -> None:
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("eval needs --workdir (a trained run)")
  run = load(_WORKDIR.value, _STEP.value)
  results = {"step": run.step}
  name = "source" if _EVAL_SOURCE.value else "held_out"
  results[name] = run.evaluate(_EVAL_SOURCE.value, _EVAL_BATCHES.value)
  if _CHOICES.value:
    results["choices"] = run.multiple_choice(_CHOICES.value)
  (Path(_WORKDIR.value) / "eval.json").write_text(json.dumps(results, indent=2))
  print(json.dumps(results, indent=2))


def _validate(argv) -> None:
  del argv
  validate(_CONFIG.value)
  print(_CONFIG.value)


def _sweep(argv) -> None:
  if _CONFIG.value is None or len(argv) > 1:
    raise app.UsageError("usage: lmjax sweep experiments/x/sweep.py[:arg] --workdir DIR "
                         "[--config.KEY=VALUE ...] [--print_commands] [--search]")
  if not _WORKDIR.value:
    raise app.UsageError("sweep needs --workdir, the directory that holds one run per subdirectory")
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  path, arg = sweep.split_path_arg(spec)
  module = sweep.load_sweep_file(path)
  if _SEARCH.value or not hasattr(module, "sweep"):
    if not hasattr(module, "search"):
      raise app.UsageError(f"{path} defines neither sweep() nor search()")
    if _PRINT_COMMANDS.value:
      raise app.UsageError("a search picks each rung's runs from the previous rung's results, so "
                           "it has no fixed list of commands; run it without --print_commands")
    result = sweep.search_from_file(path, arg).run(_CONFIG.value, _WORKDIR.value)
    print(runs.format_table(result.rows))
    print(f"best: {_WORKDIR.value}/{result.best}; results in {_WORKDIR.value}/results.md")
    return
  trials = sweep.sweep_from_file(path, arg)
  if _PRINT_COMMANDS.value:
    base = config_flags.get_override_values(flags.FLAGS["config"])  # --config.* given here
    for name, overrides in zip(sweep.run_names(trials), trials):
      print(sweep.train_command(spec, {**base, **overrides}, f"{_WORKDIR.value}/{name}"))
    return
  rows = sweep.run_sweep(_CONFIG.value, trials, _WORKDIR.value)
  print(runs.format_table(rows))
  print(f"results: {_WORKDIR.value}/results.csv, {_WORKDIR.value}/results.md")


def _runs(argv) -> None:
  dirs = argv[1:] or ([_WORKDIR.value] if _WORKDIR.value else [])
  if len(dirs) != 1:
    raise app.UsageError("usage: lmjax runs DIR [--plot curves.png]")
  if _PLOT.value:
    try:
      import matplotlib  # noqa: F401 - optional: the notebook extra
    except ImportError:
      raise ConfigError('--plot draws with matplotlib, which is not installed: '
                        'pip install "lmjax[notebook]".') from None
  try:
    found = runs.list_runs(dirs[0])
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  print(runs.format_table(runs.runs_table(found)))
  if _PLOT.value:
    runs.plot_runs(found, _PLOT.value)
    print(f"curves: {_PLOT.value}")


def _generate(argv) -> None:
  del argv
  if not _WORKDIR.value:
    raise app.UsageError("generate needs --workdir (a trained run)")
  if not _PROMPT.value:
    raise app.UsageError("generate needs at least one --prompt")
  try:
    run = load_run(_WORKDIR.value, _CONFIG.value, _STEP.value)
    run.text_tokenizer()
    check_vocab(run.cfg, run.tokenizer)
    texts = generate(run.setup, run.params, run.tokenizer, _PROMPT.value,
                     max_new_tokens=_MAX_NEW_TOKENS.value, temperature=_TEMPERATURE.value,
                     top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)
  except (FileNotFoundError, CheckpointError, ValueError) as e:  # ConfigError, DataError: ValueErrors
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  print(f"# {_WORKDIR.value} step {run.step}: temperature {_TEMPERATURE.value}, top_k "
        f"{_TOP_K.value}, top_p {_TOP_P.value}, seed {_SEED.value}")
  for i, (prompt, text) in enumerate(zip(_PROMPT.value, texts)):
    print(f"--- {i + 1}/{len(texts)}")
    print(prompt + text)


def _plan(argv) -> None:
  del argv
  if not _DEVICES.value or _DEVICES.value < 1:
    raise app.UsageError("plan needs --devices N, the number of devices of the target mesh")
  # N fake CPU devices; must happen before anything initialises a JAX backend (importing
  # lmjax initialises none).
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", _DEVICES.value)
  try:
    result = plan(_CONFIG.value, _DEVICES.value, memory_bytes=_MEMORY.value,
                  accelerator=_ACCELERATOR.value, mfu=_MFU.value,
                  memory_fraction=_MEMORY_FRACTION.value)
  except ValueError as e:  # ConfigError is a ValueError
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  print(format_plan(result))


COMMANDS = {"train": _train, "validate": _validate, "eval": _eval, "sweep": _sweep, "runs": _runs,
            "generate": _generate, "plan": _plan}
NEEDS_CONFIG = {"train", "validate", "plan"}  # the others read the run's own config
LOCAL_ONLY = {"plan"}  # one process, fake devices: no jax.distributed


def main() -> None:
  if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
    sys.stderr.write(USAGE)
    sys.exit(2)
  command = COMMANDS[sys.argv[1]]
  args = sys.argv[2:]
  if sys.argv[1] == "sweep" and args and not args[0].startswith("-"):
    args = [f"--config={args[0]}"] + args[1:]  # the sweep file is also the base config
  logging.set_verbosity(logging.WARNING)  # Orbax and Grain are chatty at INFO

  def run(argv):
    if _CONFIG.value is None and sys.argv[1] in NEEDS_CONFIG:
      raise app.UsageError("--config is required, e.g. --config configs/tiny.py")
    if sys.argv[1] not in LOCAL_ONLY:
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                             heartbeat_timeout=_HEARTBEAT.value)
    try:
      command(argv)
    except (ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
      sys.stderr.write(f"error: {e}\n")
      sys.exit(2)

  app.run(run, argv=[f"lmjax {sys.argv[1]}"] + args)


if __name__ == "__main__":
  main()
