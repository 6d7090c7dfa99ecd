"""The lm-evaluation-harness model "lmjax": its log-likelihoods are lmjax eval's, rolling
windows cover a long document exactly once, generate_until honours until and max_gen_toks,
and lm_eval.simple_evaluate runs local task YAML offline, in process and through the CLI."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import optax
import pytest

import lmjax
from lmjax.config import ConfigError, default_config
from lmjax.evaluate import choice_loglikelihoods
from lmjax.generate import generate, generate_ids

pytestmark = pytest.mark.slow  # a tiny run is trained once for the module

ROOT = Path(__file__).resolve().parents[1]
MAX_LEN = 32


class _Request:
  """What lm_eval hands a model: an object with ``.args``."""

  def __init__(self, *args):
    self.args = args


def _cfg():
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 2, 32, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 2, 1, 16
  c.model.max_seq_len = c.data.seq_len = MAX_LEN
  c.model.loss_chunk = 8  # the greedy check walks the logits in chunks too
  c.data.global_batch_size = 8
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 1
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.progress_bar = 2, 1, 0, False
  c.train.checkpoint_every = 2
  return c


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  # lm_eval's datasets cache in this session's temporary directory, never the user's.
  os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="lmjax-test-hf-"))
  from lmjax.harness import LmjaxLM
  workdir = tmp_path_factory.mktemp("harnessrun")
  lmjax.train(_cfg(), workdir)
  return LmjaxLM(run=lmjax.load(workdir))


def _direct_logprobs(run, inputs, targets):
  logits = run.model()(np.asarray(inputs)[None])
  return -np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, np.asarray(targets)[None]))[0]


def test_loglikelihoods_equal_lmjax_eval_choice_scores(lm):
  run, tok = lm.run, lm.tokenizer
  items = [{"context": "The Python language", "choices": ["is", "was not", "123"], "label": 0},
           {"context": "A function returns", "choices": ["a value", "zebra"], "label": 0},
           {"context": "x " * 59 + "x", "choices": ["long context", "cut"], "label": 0}]  # left-cut
  want = choice_loglikelihoods(run.setup, run.params, tok, items)
  # lmjax eval's choice "is" is lm_eval's continuation " is": the same tokens.
  requests = [_Request(it["context"], " " + c) for it in items for c in it["choices"]]
  for r, it, c in zip(requests, [it for it in items for _ in it["choices"]],
                      [c for it in items for c in it["choices"]]):
    assert lm.encode_pair(*r.args) == ([tok.bos_id] + tok.encode(it["context"]),
                                       tok.encode(c))
  got = lm.loglikelihood(requests)
  np.testing.assert_allclose([lp for lp, _ in got], [s for row in want for s in row], rtol=1e-6)
  # The context's trailing spaces move to the continuation, as lm_eval's models do.
  assert lm.encode_pair("The cat ", "sat") == lm.encode_pair("The cat", " sat")
  # An empty context is bos alone.
  (lp, _), = lm.loglikelihood([_Request("", "The Python")])
  ids = [tok.bos_id] + tok.encode("The Python")
  np.testing.assert_allclose(lp, _direct_logprobs(run, ids[:-1], ids[1:]).sum(), rtol=1e-5)


def test_is_greedy_is_true_exactly_for_the_greedy_continuation(lm):
  run, tok = lm.run, lm.tokenizer
  context = "The Python language"
  prompt = [tok.bos_id] + tok.encode(context)
  greedy = generate_ids(run.setup, run.params, [prompt], max_new_tokens=12, temperature=0).tokens[0]
  greedy = [int(t) for t in greedy[:5]]
  other = list(greedy)
  other[2] = (other[2] + 1) % tok.vocab_size
  results = lm.score_tokens([(prompt, greedy), (prompt, other), (prompt, greedy[:1])])
  assert [g for _, g in results] == [True, False, True]
  lp = _direct_logprobs(run, (prompt + greedy)[:-1], (prompt + greedy)[1:])[-5:].sum()
  np.testing.assert_allclose(results[0][0], lp, rtol=1e-5)


def test_rolling_loglikelihood_covers_a_long_document_once(lm):
  run, tok = lm.run, lm.tokenizer
  text = " ".join(f"word{i} and more text," for i in range(30))
  ids = tok.encode(text)
  assert len(ids) > 3 * MAX_LEN and len(ids) % MAX_LEN  # several windows, the last one partial
  windows = lm.rolling_windows(text)
  assert [t for _, cont in windows for t in cont] == ids  # each token predicted once
  # By hand: full windows of MAX_LEN predictions after [bos] + the preceding tokens; the last
  # partial window keeps a full context of MAX_LEN inputs.
  total, start, context = 0.0, 0, [tok.bos_id]
  while start < len(ids):
    stop = min(start + MAX_LEN, len(ids))
    row = ([tok.bos_id] + ids)[max(0, stop - MAX_LEN):stop + 1]  # MAX_LEN inputs, + the last target
    lp = _direct_logprobs(run, row[:-1], row[1:])
    total += lp[-(stop - start):].sum()
    start = stop
  got, = lm.loglikelihood_rolling([_Request(text)])
  np.testing.assert_allclose(got, total, rtol=1e-5)


def test_generate_until_honours_until_and_max_gen_toks(lm):
  run, tok = lm.run, lm.tokenizer
  contexts = ["def f(x):", "The Python language"]
  free = generate(run.setup, run.params, tok, contexts, max_new_tokens=10, temperature=0)
  short = generate(run.setup, run.params, tok, contexts, max_new_tokens=3, temperature=0)
  # Cut at a piece of each free-running text: the text up to it.
  cuts = [text[len(text) // 2:len(text) // 2 + 2] for text in free]
  requests = [_Request(c, {"until": [u], "max_gen_toks": 10}) for c, u in zip(contexts, cuts)]
  requests += [_Request(c, {"until": "\x00", "max_gen_toks": 3, "do_sample": False}) for c in contexts]
  out = lm.generate_until(requests)
  assert out[:2] == [text[:text.find(u)] for text, u in zip(free, cuts)]
  assert all(u and u not in o for o, u in zip(out[:2], cuts))
  assert out[2:] == short
  assert all(f.startswith(s) for f, s in zip(free, short)) and short != free  # 3 of 10 tokens
  with pytest.raises(ValueError, match="max_gen_toks"):
    lm.generate_until([_Request("x", {"until": [], "max_gen_toks": MAX_LEN})])


def _tasks(directory: Path) -> Path:
  mc = [{"question": "The Python language", "choices": ["is", "zebra", "123"], "label": 0},
        {"question": "A function returns", "choices": ["a value", "zebra"], "label": 1}]
  gen = [{"source": "def f(x):", "target": "return x"}, {"source": "The", "target": "cat"}]
  (directory / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mc))
  (directory / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in gen))
  common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {}\n"
  (directory / "tiny_mc.yaml").write_text(
      "task: tiny_mc\n" + common.format(directory / "mc.jsonl") +
      'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
      "doc_to_target: label\nmetric_list:\n  - metric: acc\n")
  (directory / "tiny_gen.yaml").write_text(
      "task: tiny_gen\n" + common.format(directory / "gen.jsonl") +
      'output_type: generate_until\ndoc_to_text: "{{source}}"\ndoc_to_target: "{{target}}"\n'
      'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n'
      "metric_list:\n  - metric: exact_match\n")
  return directory


def test_simple_evaluate_runs_local_tasks_offline(lm, tmp_path):
  from lmjax.harness import run_harness
  tasks = _tasks(tmp_path)
  results = run_harness(str(lm.run.workdir), ["tiny_mc", "tiny_gen"], include_path=str(tasks), lm=lm)
  assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
  # acc by hand from the model's log-likelihoods of " " + each choice.
  mc = [json.loads(line) for line in (tasks / "mc.jsonl").read_text().splitlines()]
  scores = [[lp for lp, _ in lm.loglikelihood([_Request(d["question"], " " + c) for c in d["choices"]])]
            for d in mc]
  acc = np.mean([int(np.argmax(s)) == d["label"] for s, d in zip(scores, mc)])
  assert results["results"]["tiny_mc"]["acc,none"] == pytest.approx(acc)
  gen = [json.loads(line) for line in (tasks / "gen.jsonl").read_text().splitlines()]
  outs = lm.generate_until([_Request(d["source"], {"until": ["\n"], "max_gen_toks": 6}) for d in gen])
  em = np.mean([o == d["target"] for o, d in zip(outs, gen)])
  assert results["results"]["tiny_gen"]["exact_match,none"] == pytest.approx(em)


def test_harness_cli_writes_the_results(lm, tmp_path):
  tasks = _tasks(tmp_path)
  output = tmp_path / "results.json"
  env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf")}
  for key in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
    env.pop(key, None)  # lmjax harness sets them itself
  proc = subprocess.run([sys.executable, "-m", "lmjax.cli", "harness", "--workdir",
                         str(lm.run.workdir), "--tasks", "tiny_mc", "--include_path", str(tasks),
                         "--limit", "2", "--batch_size", "3", "--output", str(output)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(output.read_text())
  assert results["results"]["tiny_mc"]["acc,none"] in (0.0, 0.5, 1.0)
  assert "|tiny_mc |" in proc.stdout.replace("tiny_mc|", "tiny_mc |")


def test_an_unknown_task_is_one_line(lm, tmp_path):
  from lmjax.harness import run_harness
  with pytest.raises(ConfigError, match=r"^--tasks: no task 'no_such_task' among lm_eval's tasks "
                                        r"or under --include_path"):
    run_harness(str(lm.run.workdir), ["no_such_task"], include_path=str(_tasks(tmp_path)), lm=lm)


def test_without_lm_eval_one_line_names_the_extra(monkeypatch):
  for name in ("lm_eval", "lm_eval.api.model", "lm_eval.api.registry", "lm_eval.utils"):
    monkeypatch.setitem(sys.modules, name, None)
  monkeypatch.delitem(sys.modules, "lmjax.harness", raising=False)
  with pytest.raises(ConfigError) as info:
    import lmjax.harness  # noqa: F401
  assert 'pip install "lmjax[eval]"' in str(info.value) and "\n" not in str(info.value)
