"""The ``lmjax`` command line: each command's own flags, and every everyday mistake as one
``error:`` line with exit status 2 (in process: no devices are touched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmjax import cli
from lmjax.data import default_documents, prepare, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


def _run(capsys, *argv):
  """(exit status, stdout, stderr) of ``lmjax *argv`` in this process."""
  try:
    cli.main(list(argv))
    code = 0
  except SystemExit as e:
    code = e.code
  out = capsys.readouterr()
  return code, out.out, out.err


def _one_error(capsys, *argv) -> str:
  code, _, err = _run(capsys, *argv)
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
  return lines[0]


@pytest.mark.parametrize("args,needle", [
    (["--config.model.nonexistent_key=1"], "config.model.nonexistent_key: unknown key. Known keys under model:"),
    (["--config.optim.learning_rate=abc"], "config.optim.learning_rate: cannot set 'abc': expected float"),
    (["--config.optim.learning_rate", "abc"], "config.optim.learning_rate: cannot set 'abc'"),
    (["--config.model"], "--config.model: needs a value"),
    (["--config.model.num_kv_heads=3"], "config.model.num_kv_heads: model.num_heads (4) must be divisible"),
    (["--config.train.trackers=('nope',)"], "config.train.trackers: unknown tracker 'nope'"),
])
def test_override_mistakes_name_the_key(capsys, args, needle):
  assert needle in _one_error(capsys, "validate", "--config", TINY, *args)


def test_config_file_mistakes_name_file_and_line(capsys, tmp_path):
  line = _one_error(capsys, "validate", "--config", str(tmp_path / "nope.py"))
  assert f"{tmp_path / 'nope.py'}: no such config file" in line
  bad = tmp_path / "bad.py"
  bad.write_text("from lmjax.config import default_config\n\ndef get_config(:\n  pass\n")
  assert f"{bad}:3: syntax error" in _one_error(capsys, "validate", "--config", str(bad))
  bad.write_text("from lmjax.config import default_config\n\ndef get_config():\n"
                 "  c = default_config()\n  c.model.num_layers = num_layerz\n  return c\n")
  line = _one_error(capsys, "validate", "--config", str(bad))
  assert f"{bad}:5: NameError" in line and "num_layerz" in line
  bad.write_text("import nonexistent_module_xyz\n")
  assert f"{bad}:1: ModuleNotFoundError" in _one_error(capsys, "validate", "--config", str(bad))
  bad.write_text("def get_config():\n  return {'model': 1}\n")
  assert "get_config() returned dict" in _one_error(capsys, "validate", "--config", str(bad))
  bad.write_text("x = 1\n")
  assert f"{bad}: defines no get_config()" in _one_error(capsys, "validate", "--config", str(bad))
  line = _one_error(capsys, "validate", "--config", f"{TINY}:bogus")
  assert f"{TINY}:bogus: config argument 'bogus': unknown. Known arguments: runlocal" in line
  line = _one_error(capsys, "validate", "--config", str(tmp_path))
  assert "no such config file (a directory)" in line


@pytest.mark.parametrize("argv,needle", [
    (["validate", "--config", TINY, "--temperature", "0.5"], "lmjax validate: unrecognized arguments: --temperature 0.5"),
    (["train", "--config", TINY, "--workdir", "w", "--plot", "x.png"], "lmjax train: unrecognized arguments: --plot"),
    (["generate", "--workdir", "w", "--prompt", "a", "--temp", "0.5"], "unrecognized arguments: --temp"),
    (["eval", "--workdir", "w", "--devices", "8"], "lmjax eval: unrecognized arguments: --devices"),
    (["train", "--config", TINY], "lmjax train: the following arguments are required: --workdir"),
    (["plan", "--config", TINY], "the following arguments are required: --devices"),
    (["frobnicate"], "'frobnicate' is no command; choose one of train, validate"),
    (["eval", "--workdir", "w", "--config.model.num_layers=2"], "--config.model.num_layers: an override needs --config FILE"),
    (["sweep", "--workdir", "w"], "sweep: give the sweep file"),
    (["runs"], "runs: give one directory"),
])
def test_each_command_takes_only_its_own_flags(capsys, argv, needle):
  assert needle in _one_error(capsys, *argv)


@pytest.mark.parametrize("command,flags", [
    ("train", ["--config", "--workdir", "--coordinator"]),
    ("validate", ["--config", "--devices"]),
    ("eval", ["--workdir", "--step", "--eval_source", "--choices"]),
    ("generate", ["--prompt", "--temperature", "--top_p", "--max_new_tokens"]),
    ("sweep", ["--print_commands", "--search"]),
    ("runs", ["--plot"]),
    ("plan", ["--devices", "--accelerator", "--memory"]),
])
def test_help_lists_the_commands_own_flags(capsys, command, flags):
  for flag in ("--help", "-h"):
    code, out, _ = _run(capsys, command, flag)
    assert code == 0 and out.startswith(f"usage: lmjax {command}")
    assert all(f in out for f in flags), out
    assert "--temperature" not in out or command == "generate"
  code, out, _ = _run(capsys, "--help")
  assert code == 0 and all(name in out for name in cli.COMMANDS)
  code, _, err = _run(capsys)
  assert code == 2 and "usage: lmjax" in err


def test_missing_runs_and_directories_are_one_line(capsys, tmp_path):
  assert "not an lmjax run" in _one_error(capsys, "eval", "--workdir", str(tmp_path / "none"))
  assert str(tmp_path / "none") in _one_error(capsys, "runs", str(tmp_path / "none"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("prepared")
  corpus = root / "docs.jsonl"
  corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in default_documents()[:40]))
  tok = train_tokenizer(default_documents(), 512, str(root / "tok.model"))
  prepare([str(corpus)], str(root / "ds"), tok, seq_len=256)
  return root


def test_validate_reports_every_mismatch_with_the_data_at_once(capsys, prepared, tmp_path):
  """Prepared data fixes seq_len and the vocabulary: one command names all three fields."""
  code, _, err = _run(capsys, "validate", "--config", TINY, f"--config.data.source={prepared / 'ds'}")
  lines = err.strip().splitlines()
  assert code == 2 and len(lines) == 4 and all(l.startswith("error: ") for l in lines), err
  assert "config.data.seq_len=128, but the prepared dataset" in lines[0] and "--config.data.seq_len=256" in lines[0]
  assert "config.model.max_seq_len=128 is shorter" in lines[1]
  assert "config.model.vocab_size=1024, but the tokenizer" in lines[2] and "has 512 pieces" in lines[2]
  fix = lines[3].split("all at once: ")[1].split()
  assert sorted(fix) == ["--config.data.seq_len=256", "--config.model.max_seq_len=256",
                         "--config.model.vocab_size=512"]
  # With the suggested overrides the config validates; train refuses the same way before
  # writing anything.
  code, out, err = _run(capsys, "validate", "--config", TINY, f"--config.data.source={prepared / 'ds'}", *fix)
  assert code == 0 and "seq_len: 256" in out, err
  code, _, err = _run(capsys, "train", "--config", TINY, f"--config.data.source={prepared / 'ds'}",
                      "--workdir", str(tmp_path / "run"))
  assert code == 2 and len(err.strip().splitlines()) == 4 and not (tmp_path / "run").exists()
  line = _one_error(capsys, "validate", "--config", TINY, "--config.data.source=/nonexistent/*.jsonl")
  assert "config.data.source: /nonexistent/*.jsonl: the glob matches no files" in line


@pytest.mark.slow
def test_command_line_mistakes_in_a_real_process():
  """The installed entry point: exit 2, one line, no traceback, nothing on stdout."""
  for args in (["validate", "--config", "configs/tiny.py", "--config.model.nonexistent_key=1"],
               ["validate", "--config", "configs/missing.py"],
               ["train", "--config", "configs/tiny.py", "--workdir", "w", "--temperature", "1"]):
    out = subprocess.run([sys.executable, "-m", "lmjax.cli", *args], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 2 and out.stdout == "", (args, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("argv,needle", [
    (["validate", "--config="], "lmjax validate: --config is empty"),
    (["validate", "--config", ""], "lmjax validate: --config is empty"),
    (["validate", "--config", TINY, "--config", TINY], "lmjax validate: --config given twice"),
    (["train", "--config", TINY, "--workdir", ""], "lmjax train: --workdir is empty"),
    (["eval", "--workdir="], "lmjax eval: --workdir is empty"),
    (["eval", "--workdir", "a", "--workdir", "b"], "lmjax eval: --workdir given twice ('a' and 'b')"),
    (["validate", "--config", TINY, "--devices", "0"], "argument --devices: a number of devices, 1 or more; got '0'"),
    (["validate", "--config", TINY, "--devices", "-1"], "argument --devices: a number of devices, 1 or more"),
    (["plan", "--config", TINY, "--devices", "0"], "argument --devices: a number of devices, 1 or more"),
    (["eval", "--workdir", "w", "--eval_batches", "0"], "argument --eval_batches: a number of batches, 1 or more"),
])
def test_empty_repeated_and_out_of_range_flags_are_one_line(capsys, monkeypatch, tmp_path, argv, needle):
  """``--workdir ""`` would train in the current directory; a second --config would win
  silently; --devices 0 divided by zero."""
  monkeypatch.chdir(tmp_path)
  assert needle in _one_error(capsys, *argv)


def test_workdir_that_is_a_file_is_one_line(capsys, tmp_path):
  (tmp_path / "f").write_text("x")
  for workdir in (tmp_path / "f", tmp_path / "f" / "run"):
    line = _one_error(capsys, "train", "--config", TINY, "--workdir", str(workdir))
    assert f"{workdir}: a file is in the way of the run directory" in line
  assert (tmp_path / "f").read_text() == "x"


def test_config_files_that_exit_or_freeze(capsys, tmp_path):
  """sys.exit() in a config file is a mistake there; Ctrl-C is one line, exit 130; a
  FrozenConfigDict is a config."""
  bad = tmp_path / "bad.py"
  bad.write_text("import sys\nsys.exit(3)\n")
  assert f"{bad}:2: called sys.exit(3)" in _one_error(capsys, "validate", "--config", str(bad))
  bad.write_text("import sys\n\ndef get_config():\n  sys.exit('bye')\n")
  assert f"{bad}:4: called sys.exit('bye')" in _one_error(capsys, "validate", "--config", str(bad))
  bad.write_text("def get_config():\n  raise KeyboardInterrupt\n")
  assert _run(capsys, "validate", "--config", str(bad)) == (130, "", "interrupted\n")
  bad.write_text("import ml_collections\nfrom lmjax.config import default_config\n\n"
                 "def get_config():\n  return ml_collections.FrozenConfigDict(default_config())\n")
  code, out, err = _run(capsys, "validate", "--config", str(bad), "--config.train.steps=7")
  assert code == 0 and "steps: 7" in out, err


def test_config_path_with_a_colon_in_a_directory(capsys, tmp_path):
  """``a:b/c.py:arg`` splits after the first prefix that is a file."""
  folder = tmp_path / "runs:v2" / "ünï"
  folder.mkdir(parents=True)
  cfg = folder / "c.py"
  cfg.write_text("from lmjax.config import default_config\nfrom lmjax.config_file import parse_arg\n\n"
                 "def get_config(arg=None):\n  c = default_config()\n"
                 "  c.train.steps = parse_arg(arg, steps=5).steps\n  return c\n")
  for spec, steps in ((str(cfg), 5), (f"{cfg}:steps=9", 9)):
    code, out, err = _run(capsys, "validate", "--config", spec)
    assert code == 0 and f"steps: {steps}" in out, err


def test_multi_line_messages_are_one_line(capsys, tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  raise ValueError('no usable documents; skipped:\\n  empty_file: 1\\n')\n")
  line = _one_error(capsys, "validate", "--config", str(bad))
  assert line.endswith("ValueError: no usable documents; skipped: empty_file: 1"), line


def test_bad_multiple_choice_files_are_data_errors(tmp_path):
  """``lmjax eval --choices`` on binary or empty files: DataError, which the CLI prints as one line."""
  from lmjax.data import DataError
  from lmjax.evaluate import read_choices
  path = tmp_path / "mc.jsonl"
  for content, needle in ((bytes(range(256)), "invalid UTF-8 at byte 128"), (b"\n\n", "no multiple-choice items")):
    path.write_bytes(content)
    with pytest.raises(DataError, match=needle):
      read_choices(path)


def test_runs_lists_a_run_with_a_damaged_config(capsys, tmp_path):
  """A config.json cut short by a kill (or edited by hand) leaves the run listed."""
  for name, text in (("cut", '{"model": {"num_lay'), ("list", "[1, 2]"), ("empty", "")):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(text)
    (tmp_path / name / "metrics.jsonl").write_text('{"step": 3, "loss": 2.5}\n')
  (tmp_path / "list" / "overrides.json").write_text("{")
  code, out, err = _run(capsys, "runs", str(tmp_path))
  assert code == 0 and all(name in out for name in ("cut", "list", "empty")), err
