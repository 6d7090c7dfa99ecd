"""Every notebook under experiments/ runs headless, top to bottom, on CPU with its smoke
settings (``LMJAX_SMOKE=1``), so that the notebooks never rot."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.slow  # each test here trains or runs a whole program

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(ROOT.glob("experiments/**/*.ipynb"))
# Collection fails rather than the test below silently running for no notebook.
assert NOTEBOOKS, "experiments/ should hold at least one notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_notebook_runs_headless(path, tmp_path, monkeypatch):
  # The kernel inherits this environment: JAX on CPU (tests/conftest.py), the tokenizer
  # cache ($LMJAX_CACHE), smoke settings, and a scratch directory for the runs.
  monkeypatch.setenv("LMJAX_SMOKE", "1")
  monkeypatch.setenv("LMJAX_WORKDIR", str(tmp_path / "runs"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # one CPU device, as on a laptop
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError naming the failing cell
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  assert list((tmp_path / "runs").iterdir()), "the notebook should write its runs to $LMJAX_WORKDIR"
