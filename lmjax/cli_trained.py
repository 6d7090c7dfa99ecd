"""The ``lmjax`` commands on a trained run: ``eval`` (held-out loss, multiple choice,
generation tasks), ``harness`` (lm-evaluation-harness), ``generate`` and ``chat``.
Registered with :mod:`lmjax.cli_args` when :mod:`lmjax.cli` imports this module."""

from __future__ import annotations

import json
import sys

from lmjax import chat, generation_eval, storage
from lmjax.cli_args import _count, _distributed_flags, _step_flag, _workdir_flag, _config_flags, command, flags
from lmjax.config import ConfigError
from lmjax.generate import generate, load_run
from lmjax.rundir import check_vocab
from lmjax.trained import load


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


@flags("chat")
def _chat_flags(p):
  _workdir_flag(p, "a trained run (fine-tuned on conversations, or with a chat template)")
  _step_flag(p)
  p.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation")
  p.add_argument("--max_new_tokens", type=int, default=256, help="tokens per reply, at most (256)")
  p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy (0.7)")
  p.add_argument("--top_p", type=float, default=1.0,
                 help="draw from the fewest most likely tokens that hold this probability; 1 = all")
  p.add_argument("--seed", type=int, default=0, help="seed of the random draws (reply i uses seed + i)")
  p.add_argument("--template", metavar="NAME|FILE", help="chat template: a built-in ("
                 + ", ".join(chat.BUILTIN_TEMPLATES) + ") or a .jinja file; default: the run's "
                 "data.chat_template, else its tokenizer's")
  _distributed_flags(p)


@command("chat", "chat with the model in --workdir: one message per line of stdin, replies on "
                 "stdout; /reset clears the conversation, /exit or end of input ends")
def _chat(args) -> None:
  if args.max_new_tokens < 1 or not args.temperature >= 0 or not 0 < args.top_p <= 1:
    raise ConfigError(f"chat: need --max_new_tokens >= 1, --temperature >= 0 and 0 < --top_p <= 1, "
                      f"got {args.max_new_tokens}, {args.temperature}, {args.top_p}")
  run = load_run(args.workdir, None, args.step)
  check_vocab(run.cfg, run.text_tokenizer())
  session = chat.Chat(run, system=args.system, template=args.template,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_p=args.top_p, seed=args.seed)
  chat.run_terminal(session, sys.stdin, sys.stdout, sys.stderr, sys.stdin.isatty())
