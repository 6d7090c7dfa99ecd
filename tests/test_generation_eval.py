"""Generation tasks: BLEU, ROUGE and exact match equal the libraries' own numbers; the
batched, cached generation gives what lmjax.generate gives; the CLI end to end; the bench
section."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
from rouge_score import rouge_scorer

import lmjax
from lmjax import generation_eval as ge
from lmjax.config import ConfigError, default_config
from lmjax.data import DataError
from lmjax.generate import generate

ROOT = Path(__file__).resolve().parents[1]

OUTPUTS = ["the cats were sitting on the mat", "Hello  World", "running quickly home", "x = 1"]
REFERENCES = [["the cat sat on the mat", "a cat was sitting on a mat"], ["hello world"],
              ["he runs quick to his home"], ["y = 2", "x = 1 ", "x=1"]]


def test_scores_equal_the_libraries_own_numbers():
  got = ge.score_outputs(OUTPUTS, REFERENCES)
  # sacrebleu: one reference stream per reference position, None where an item has fewer.
  streams = [[r[0] for r in REFERENCES], [r[1] if len(r) > 1 else None for r in REFERENCES],
             [r[2] if len(r) > 2 else None for r in REFERENCES]]
  assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(OUTPUTS, streams).score, abs=1e-9)
  assert got["bleu"] != pytest.approx(sacrebleu.corpus_bleu(OUTPUTS, streams[:1]).score)
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
  for kind in ("rouge1", "rouge2", "rougeL"):
    best = [max(scorer.score(r, o)[kind].fmeasure for r in refs)
            for o, refs in zip(OUTPUTS, REFERENCES)]
    assert got[kind] == pytest.approx(100 * np.mean(best), abs=1e-9)
  # Stemming counts: "sitting"/"sit" and "runs"/"running" match stemmed, not otherwise.
  plain = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=False)
  unstemmed = np.mean([max(plain.score(r, o)["rouge1"].fmeasure for r in refs)
                       for o, refs in zip(OUTPUTS, REFERENCES)])
  assert got["rouge1"] > 100 * unstemmed
  # By hand: "Hello  World" = "hello world" and "x = 1" = "x = 1 " after lower-casing and
  # whitespace; the cat sentence and the running one match no reference.
  assert got["exact_match"] == 50.0


def test_exact_match_normalises_case_and_whitespace_only():
  assert ge.normalize("  The\tCat\n sat. ") == "the cat sat."
  assert ge.score_outputs(["The cat."], [["the cat"]])["exact_match"] == 0.0  # punctuation kept
  assert ge.score_outputs([" THE  cat "], [["x", "the cat"]])["exact_match"] == 100.0


def test_outputs_are_cut_at_the_first_stop_string():
  assert ge.cut_at_stop("a b\nc.d", ["\n", "."]) == "a b"
  assert ge.cut_at_stop("a b\nc.d", [".", "zz"]) == "a b\nc"
  assert ge.cut_at_stop("abc", []) == "abc"
  assert ge.unescape(r"\n") == "\n" and ge.unescape(r"a\tb\\n") == "a\tb\\n"


def test_items_read_with_configurable_fields_and_limit(tmp_path):
  path = tmp_path / "task.jsonl"
  path.write_text('{"q": "2+2=", "a": "4"}\n\n{"q": "x", "a": ["y", "z"]}\n{"q": "w", "a": "v"}\n')
  items = ge.read_generation_items(path, "q", "a", limit=2)
  assert items == [{"source": "2+2=", "references": ["4"]}, {"source": "x", "references": ["y", "z"]}]


@pytest.mark.parametrize("line", ['{"source": "a"}', '{"source": 1, "reference": "b"}',
                                  '{"source": "a", "reference": []}', '{"source": "a", "reference": [2]}',
                                  "not json"])
def test_a_malformed_line_is_a_data_error_naming_file_and_line(tmp_path, line):
  path = tmp_path / "task.jsonl"
  path.write_text('{"source": "ok", "reference": "fine"}\n' + line + "\n")
  with pytest.raises(DataError, match=rf"^{path}:2: expected \{{'source': str, 'reference'"):
    ge.read_generation_items(path)


def test_a_missing_or_empty_file_is_a_data_error(tmp_path):
  with pytest.raises(DataError, match="no such file"):
    ge.read_generation_items(tmp_path / "none.jsonl")
  (tmp_path / "empty.jsonl").write_text("\n")
  with pytest.raises(DataError, match="no generation items"):
    ge.read_generation_items(tmp_path / "empty.jsonl")


@pytest.mark.parametrize("missing", ["sacrebleu", "rouge_score"])
def test_without_the_eval_extra_one_line_names_it(monkeypatch, missing):
  # A None entry in sys.modules makes the import raise ImportError, as if not installed.
  monkeypatch.setitem(sys.modules, missing, None)
  if missing == "rouge_score":
    monkeypatch.setitem(sys.modules, "rouge_score.rouge_scorer", None)
  with pytest.raises(ConfigError) as info:
    ge.score_outputs(["a"], [["a"]])
  message = str(info.value)
  assert 'pip install "lmjax[eval]"' in message and "\n" not in message
  assert info.value.__cause__ is None and info.value.__suppress_context__


# -- with a model --------------------------------------------------------------------------

def _cfg():
  c = default_config()
  c.model.num_layers, c.model.embed_dim, c.model.mlp_dim = 2, 32, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 2, 1, 16
  c.model.max_seq_len = c.data.seq_len = 32
  c.data.global_batch_size = 8
  c.optim.learning_rate, c.optim.warmup_steps = 1e-2, 1
  c.train.steps, c.train.log_every, c.train.eval_every, c.train.progress_bar = 2, 1, 0, False
  c.train.checkpoint_every = 2
  return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("genrun")
  lmjax.train(_cfg(), workdir)
  return lmjax.load(workdir)


def _task(path, n=5):
  sources = ["The Python language", "def f(x):", "A function returns", "import os\n", "x = 1"]
  lines = [{"source": s, "reference": [s.lower(), "x"] if i % 2 else s} for i, s in
           enumerate(sources[:n])]
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  return path


@pytest.mark.slow
def test_batched_generation_equals_generate_and_the_scores_its_outputs(run, tmp_path):
  path = _task(tmp_path / "task.jsonl")
  out = ge.evaluate_run(run, path, max_new_tokens=6, stop=["\n", "("], batch_size=2)
  items = ge.read_generation_items(path)
  want = generate(run.setup, run.params, run.tokenizer, [it["source"] for it in items],
                  max_new_tokens=6, temperature=0)
  assert [o["output"] for o in out["outputs"]] == [ge.cut_at_stop(w, ["\n", "("]) for w in want]
  assert out["scores"] == {**ge.score_outputs([o["output"] for o in out["outputs"]],
                                              [it["references"] for it in items]), "examples": 5}
  assert 0 < out["timing"]["generated_tokens"] <= 5 * 6


@pytest.mark.slow
def test_eval_cli_scores_a_generation_task(run, tmp_path):
  path = _task(tmp_path / "task.jsonl")
  output = tmp_path / "gen.json"
  proc = subprocess.run([sys.executable, "-m", "lmjax.cli", "eval", "--workdir", str(run.workdir),
                         "--eval_batches=1", "--generation", str(path), "--max_new_tokens=6",
                         "--stop", r"\n", "--limit=3", "--batch_size=2", "--output", str(output)],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  saved = json.loads(output.read_text())
  want = ge.evaluate_run(run, path, max_new_tokens=6, stop=["\n"], limit=3, batch_size=2)
  assert [o["output"] for o in saved["outputs"]] == [o["output"] for o in want["outputs"]]
  assert saved["stop"] == ["\n"] and saved["scores"]["examples"] == 3
  for k, v in want["scores"].items():
    assert saved["scores"][k] == pytest.approx(v)
  results = json.loads((run.workdir / "eval.json").read_text())
  assert results["generation"] == {"file": str(path), **saved["scores"]}
  assert "| metric | value |" in proc.stdout and "| rougeL |" in proc.stdout


@pytest.mark.slow
def test_bench_generation_section_reports_each_batch_size():
  sys.path.insert(0, str(ROOT / "tools"))
  try:
    import bench
  finally:
    sys.path.remove(str(ROOT / "tools"))
  rows = bench.generation_rows(_cfg(), batch_sizes=(1, 2), examples=2, max_new_tokens=4)
  assert [r["batch"] for r in rows] == [1, 2]
  for r in rows:
    assert r["examples_per_sec"] > 0 and r["tokens_per_sec"] > 0
    assert 2 <= r["generated_tokens"] <= 8


@pytest.mark.slow
@pytest.mark.parametrize("argv,missing", [
    (["eval", "--workdir", "w", "--generation", "t.jsonl"], ["sacrebleu"]),
    (["harness", "--workdir", "w", "--tasks", "t"], ["lm_eval", "lm_eval.api.model"]),
])
def test_cli_without_the_eval_extra_is_one_line_naming_it(argv, missing):
  code = (f"import sys; sys.modules.update(dict.fromkeys({missing!r})); "
          f"sys.argv = ['lmjax'] + {argv!r}; from lmjax.cli import main; main()")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False, cwd=ROOT)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip().startswith("error: ") and "\n" not in result.stderr.strip()
  assert result.stderr.strip().endswith('not installed: pip install "lmjax[eval]".')
