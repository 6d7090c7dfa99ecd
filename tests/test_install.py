"""The core install: lmjax runs without the optional packages, and says which extra to add."""

import subprocess
import sys

import pytest

from lmjax.data import sources


def test_parquet_without_pyarrow_names_the_file_and_the_extra(tmp_path, monkeypatch):
  # A None entry in sys.modules makes `import pyarrow` raise ImportError, as if not installed.
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  path = tmp_path / "docs.parquet"
  path.write_bytes(b"PAR1 not read: the missing module is noticed first")
  with pytest.raises(sources.DataError) as info:
    sources.load_records(str(path))
  message = str(info.value)
  assert str(path) in message
  assert 'pip install "lmjax[parquet]"' in message
  assert "\n" not in message
  # No ImportError chained onto it: the CLI prints this one line and nothing else.
  assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.slow
def test_core_imports_need_neither_torch_transformers_nor_pyarrow():
  code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
          "sys.modules['pyarrow'] = None; "
          "import lmjax, lmjax.cli, lmjax.data, lmjax.hf, lmjax.plan")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_plot_without_matplotlib_is_one_line_naming_the_extra(tmp_path):
  code = ("import sys; sys.modules['matplotlib'] = None; "
          f"sys.argv = ['lmjax', 'runs', {str(tmp_path)!r}, '--plot', 'curves.png']; "
          "from lmjax.cli import main; main()")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
  assert result.returncode == 2, result.stderr
  assert result.stderr.strip() == ('error: --plot draws with matplotlib, which is not installed: '
                                   'pip install "lmjax[notebook]".')
