"""The tools on a missing, empty, binary or wrong input: one ``error:`` line naming it and exit
status 2 (the command line's convention), never a traceback. In process: their main()."""

import pytest

from lmjax.checkpoint import CheckpointError
from lmjax.config import error_line
from tools import convert_hf, inspect_checkpoint, prepare_data, train_tokenizer


def _one_error(capsys, main, argv) -> str:
  code = main(argv)
  err = capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert code == 2 and len(errors) == 1 and "Traceback" not in err, (code, err)
  return errors[0]


@pytest.fixture
def inputs(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  (tmp_path / "binary.txt").write_bytes(bytes(range(128, 256)) * 8)
  (tmp_path / "empty_dir").mkdir()
  (tmp_path / "hf_binary").mkdir()
  (tmp_path / "hf_binary" / "config.json").write_bytes(b"\xff\xfe{")
  return tmp_path


@pytest.mark.parametrize("name,needle", [("missing.txt", "no such file or directory"),
                                         ("empty.txt", "the file is empty"),
                                         ("binary.txt", "invalid UTF-8"),
                                         ("empty_dir", "the directory holds no")])
def test_text_tools_on_bad_sources(capsys, inputs, name, needle):
  source = str(inputs / name)
  for main, argv in ((train_tokenizer.main, ["--output", str(inputs / "tok.model")]),
                     (prepare_data.main, ["--vocab_size", "64", "--output", str(inputs / "ds")])):
    line = _one_error(capsys, main, ["--source", source, *argv])
    assert source in line and needle in line, line
  assert not (inputs / "ds").exists() and not (inputs / "tok.model").exists()


def test_prepare_data_on_a_bad_tokenizer(capsys, inputs):
  for tok, needle in (("missing.model", "no such file"), ("binary.txt", "not a valid sentencepiece model")):
    line = _one_error(capsys, prepare_data.main, ["--source", "default", "--tokenizer", str(inputs / tok),
                                                  "--output", str(inputs / "ds")])
    assert str(inputs / tok) in line and needle in line, line
  assert "give --tokenizer PATH" in _one_error(capsys, prepare_data.main,
                                               ["--source", "default", "--output", str(inputs / "ds")])


def test_inspect_checkpoint_on_no_run(capsys, inputs):
  for name, needle in (("missing", "no such directory"), ("empty.txt", "no such directory"),
                       ("empty_dir", "holds no checkpoint")):
    line = _one_error(capsys, inspect_checkpoint.main, [str(inputs / name)])
    assert str(inputs / name) in line and needle in line, line


def test_convert_hf_on_no_checkpoint(capsys, inputs):
  line = _one_error(capsys, convert_hf.main, ["import", str(inputs / "missing"), str(inputs / "run")])
  assert f"{inputs / 'missing' / 'config.json'}: no such file" in line
  line = _one_error(capsys, convert_hf.main, ["import", str(inputs / "hf_binary"), str(inputs / "run")])
  assert f"{inputs / 'hf_binary' / 'config.json'}: not valid JSON" in line
  line = _one_error(capsys, convert_hf.main, ["export", str(inputs / "empty_dir"), str(inputs / "hf")])
  assert "not an lmjax run" in line


def test_a_list_of_problems_prints_on_one_line():
  e = CheckpointError("no usable checkpoint in c (start afresh in a new --workdir):\n  step 3: a\n  step 2: b")
  assert error_line(e) == "error: no usable checkpoint in c (start afresh in a new --workdir): step 3: a; step 2: b"
