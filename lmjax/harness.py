"""lm-evaluation-harness on an lmjax run: the model ``"lmjax"`` of ``lm_eval`` (the "eval" extra).

  lmjax harness --workdir runs/tiny --tasks my_task --include_path tasks/   # the CLI
  import lmjax.harness                  # registers "lmjax" with lm_eval
  lm_eval.simple_evaluate(model="lmjax", model_args="workdir=runs/tiny,batch_size=16",
                          tasks=["my_task"], task_manager=TaskManager(include_path="tasks/"))
  results = run_harness("runs/tiny", ["my_task"], include_path="tasks/")  # the same, offline

model_args: ``workdir`` (a run directory), ``step`` (default: the newest checkpoint),
``batch_size`` (rows per scored batch and prompts per generated batch; default the run's
``data.global_batch_size``; rounded up to a multiple of the devices the batch is split over),
``max_length`` (tokens per row, default ``model.max_seq_len``), ``max_gen_toks`` (256).
A notebook passes a loaded run instead: ``LmjaxLM(run=lmjax.load(...))``.

Requests are answered as lm_eval's own causal models answer them:

- ``loglikelihood(context, continuation)``: the context's trailing whitespace moves to the
  continuation; the continuation's tokens are ``encode(context + continuation)`` after
  ``encode(context)``'s; the row is ``[bos] + context + continuation`` (an empty context
  is ``[bos]``), cut from the left to ``max_length + 1`` tokens. The summed log-probability
  comes from ``Setup.score`` on :func:`lmjax.evaluate.token_batches` rows: the code that
  ``lmjax eval --choices`` scores with. ``is_greedy``: every continuation token is the argmax.
  (``lmjax eval``'s choice ``"is"`` after context ``"The cat"`` is lm_eval's continuation
  ``" is"``: the sentencepiece tokenizer puts the word's space in its first piece.)
- ``loglikelihood_rolling(text)``: the log-probability of ``encode(text)`` after ``[bos]``,
  in disjoint windows of ``max_length`` predictions (``lm_eval.utils.get_rolling_token_windows``
  with ``context_len=1``); the last window keeps a full context.
- ``generate_until(context, gen_kwargs)``: ``[bos] + encode(context)`` (cut from the left to
  leave room) continued by :func:`lmjax.generation_eval.generate_texts` (KV cache,
  greedy unless ``do_sample`` with a temperature), up to ``max_gen_toks`` tokens or eos, the
  text cut before the first ``until`` string.

Tasks run offline: :func:`run_harness` sets ``HF_DATASETS_OFFLINE`` and ``HF_HUB_OFFLINE``
(unless set) before ``datasets`` is imported, so tasks read local files, e.g. a task YAML with
``dataset_path: json`` and ``dataset_kwargs: {data_files: {test: /data/task.jsonl}}``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmjax import evaluate as ev
from lmjax import generation_eval
from lmjax.config import ConfigError
from lmjax.generate import load_run
from lmjax.mesh import host_to_global, replicated

try:
  from lm_eval import utils as lm_utils
  from lm_eval.api.model import LM
  from lm_eval.api.registry import register_model
except ImportError:
  raise ConfigError('lmjax harness needs lm-evaluation-harness, which is not installed: '
                    'pip install "lmjax[eval]".') from None

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


@functools.lru_cache(maxsize=8)
def _greedy_fn(setup: Any):
  """Per row: whether every weighted target is the model's most likely next token. The
  logits are taken ``model.loss_chunk`` positions at a time (never all (b, t, v) at once)."""
  chunk = setup.cfg.model.loss_chunk

  def greedy(params, batch):
    model = nnx.merge(setup.graphdef, params)
    features = model.forward(batch["inputs"], batch["positions"], batch["segment_ids"])[0]
    b, t, d = features.shape
    c = chunk if 0 < chunk < t and t % chunk == 0 else t
    parts = features.reshape(b, t // c, c, d).swapaxes(0, 1)  # (n, b, c, d)
    best = jax.lax.map(lambda f: jnp.argmax(model.logits(f), axis=-1), parts)  # (n, b, c)
    best = best.swapaxes(0, 1).reshape(b, t)
    return jnp.all((best == batch["targets"]) | (batch["weights"] == 0), axis=1)

  return jax.jit(greedy, in_shardings=(setup.state_shardings["params"], setup.batch_sharding),
                 out_shardings=replicated(setup.mesh))


def _batch_shards(setup: Any) -> int:
  """Devices a batch's rows are split over (a batch size must be a multiple)."""
  axes = setup.batch_sharding.spec[0] if setup.batch_sharding.spec else None
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(setup.mesh.shape[a] for a in axes)


@register_model("lmjax")
class LmjaxLM(LM):
  """An lmjax run as an ``lm_eval`` language model (module docstring: what each request does)."""

  def __init__(self, workdir: str | None = None, step: int | None = None,
               batch_size: int | str | None = None, max_length: int | None = None,
               max_gen_toks: int = 256, run: Any = None, **unused: Any):
    super().__init__()  # unused: lm_eval's max_batch_size and device, which lmjax decides itself
    if run is None:
      if not workdir:
        raise ConfigError("the lmjax model needs model_args workdir=RUN (a run directory)")
      step = None if step is None or int(step) < 0 else int(step)
      run = load_run(str(workdir), step=step)
    self.run = run
    self.tokenizer = run.text_tokenizer()
    cfg = run.cfg
    self.max_length = int(max_length or cfg.model.max_seq_len)
    if not 2 <= self.max_length <= cfg.model.max_seq_len:
      raise ConfigError(f"model_args max_length={self.max_length}: must be in [2, "
                        f"model.max_seq_len={cfg.model.max_seq_len}]")
    self.max_gen_toks = int(max_gen_toks)
    size = cfg.data.global_batch_size if batch_size in (None, "", "auto") else int(batch_size)
    shards = _batch_shards(run.setup)
    self.batch_size = -(-size // shards) * shards

  # -- tokenisation at the boundary ---------------------------------------------------------

  def tok_encode(self, text: str) -> list[int]:
    return self.tokenizer.encode(text)

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(``[bos] + context`` tokens, continuation tokens), split as lm_eval's causal models do."""
    bos = self.tokenizer.bos_id
    if not context:
      return [bos], self.tok_encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, head = self.tok_encode(context + continuation), self.tok_encode(context)
    return [bos] + head, whole[len(head):]

  # -- scoring ------------------------------------------------------------------------------

  def score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]],
                   greedy: bool = True) -> list[tuple[float, bool]]:
    """(summed log-probability, is_greedy) of each continuation after its context, token
    lists both; rows cut from the left to ``max_length`` predictions."""
    rows, weights = [], []
    for i, (context, continuation) in enumerate(pairs):
      if not continuation:
        raise ValueError(f"request {i}: the continuation has no tokens")
      if len(continuation) > self.max_length:
        raise ValueError(f"request {i}: the continuation's {len(continuation)} tokens exceed "
                         f"max_length={self.max_length}")
      ids = (list(context) + list(continuation))[-(self.max_length + 1):]
      w = np.zeros(len(ids) - 1, np.float32)
      w[-len(continuation):] = 1.0
      rows.append((ids[:-1], ids[1:]))
      weights.append(w)
    setup, params = self.run.setup, self.run.params
    out = []
    for batch in ev.token_batches(rows, weights, self.max_length, self.batch_size):
      logprob = setup.score(params, batch)["logprob"]
      if greedy:
        with setup.context():
          hits = _greedy_fn(setup)(params, host_to_global(batch, setup.mesh, setup.batch_sharding))
        hits = jax.device_get(hits)
      else:
        hits = np.zeros(len(logprob), bool)
      out.extend((float(lp), bool(h)) for lp, h in zip(logprob, hits))
    return out[:len(rows)]

  def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
    args = [req.args for req in requests]
    results = self.score_tokens([self.encode_pair(c, x) for c, x in args])
    for a, r in zip(args, results):
      self.cache_hook.add_partial("loglikelihood", a, r)
    return results

  def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
    """The disjoint (context, continuation) windows that cover ``encode(text)`` after bos."""
    windows = lm_utils.get_rolling_token_windows(
        token_list=self.tok_encode(text), prefix_token=self.tokenizer.bos_id,
        max_seq_len=self.max_length, context_len=1)
    return [lm_utils.make_disjoint_window(w) for w in windows]

  def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
    windows, owners = [], []
    for i, req in enumerate(requests):
      for w in self.rolling_windows(req.args[0]):
        windows.append(w)
        owners.append(i)
    scores = self.score_tokens(windows, greedy=False)
    totals = [0.0] * len(requests)
    for i, (lp, _) in zip(owners, scores):
      totals[i] += lp
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  # -- generation ---------------------------------------------------------------------------

  def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
    groups: dict[str, list[int]] = {}  # requests with the same gen_kwargs run together
    for i, req in enumerate(requests):
      groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
    out = [""] * len(requests)
    for indices in groups.values():
      kwargs = dict(requests[indices[0]].args[1])
      until = kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      n = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks)))
      if not 1 <= n < self.max_length:
        raise ValueError(f"generate_until: max_gen_toks={n} must be in [1, max_length="
                         f"{self.max_length})")
      temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
      texts, _ = generation_eval.generate_texts(
          self.run.setup, self.run.params, self.tokenizer,
          [requests[i].args[0] for i in indices], max_new_tokens=n, stop=until,
          batch_size=self.batch_size, temperature=temperature, max_seq_len=self.max_length)
      for i, text in zip(indices, texts):
        out[i] = text
        self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return out


def run_harness(workdir: str, tasks: Sequence[str], *, include_path: str | None = None,
                limit: int | float | None = None, num_fewshot: int | None = None,
                step: int | None = None, batch_size: int | None = None,
                lm: LmjaxLM | None = None, **kwargs: Any) -> dict[str, Any]:
  """``lm_eval.simple_evaluate`` of the run in ``workdir`` (or ``lm``) on ``tasks``, offline;
  returns its results dict. Other keyword arguments go to ``simple_evaluate``."""
  for key, value in OFFLINE.items():
    os.environ.setdefault(key, value)
  import lm_eval
  from lm_eval.tasks import TaskManager
  # Tasks found under include_path alone spare indexing lm_eval's own thousands.
  manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
  if manager is None or len(manager.match_tasks(list(tasks))) < len(tasks):
    manager = TaskManager(include_path=include_path)
  unknown = [t for t in tasks if not manager.match_tasks([t])]
  if unknown:
    where = f" or under --include_path {include_path}" if include_path else "; give --include_path DIR"
    raise ConfigError(f"--tasks: no task {', '.join(map(repr, unknown))} among lm_eval's tasks{where}")
  kwargs.setdefault("log_samples", False)
  lm = lm if lm is not None else LmjaxLM(workdir=workdir, step=step, batch_size=batch_size)
  results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit,
                                    num_fewshot=num_fewshot, task_manager=manager, **kwargs)
  results["config"]["model"] = f"lmjax:{workdir}@{lm.run.step}"
  return results


def format_results(results: dict[str, Any]) -> str:
  """lm_eval's own results table (``lm_eval.utils.make_table``)."""
  return lm_utils.make_table(results)


def to_json(results: dict[str, Any]) -> str:
  """The results as JSON, values JSON lacks written as lm_eval writes them."""
  return json.dumps(results, indent=2, default=lm_utils.handle_non_serializable) + "\n"
