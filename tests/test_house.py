"""The shape of the code base, as DESIGN.md draws it: one direction of imports (no cycle,
function-level imports included), files short enough to read in one sitting, a short
rules table, no public name that hides a module, tools that import the installed package."""

import ast
import importlib
import re
from pathlib import Path

import lmjax
from lmjax import mesh

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lmjax"
MAX_LINES = 500
MAX_RULES = 12


def _modules(root: Path = ROOT) -> dict[str, Path]:
  out = {}
  for path in (root / "lmjax").rglob("*.py"):
    parts = path.relative_to(root).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
  """The lmjax modules ``name`` imports anywhere in its body (a package's __init__ importing
  its own submodules, and a submodule importing its package, excluded)."""
  is_package = path.name == "__init__.py"
  base = name.split(".") if is_package else name.split(".")[:-1]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      module = node.module or ""
      if node.level:
        module = ".".join(base[:len(base) - node.level + 1] + ([module] if module else []))
      targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module for a in node.names]
    for target in targets:
      while target and target not in modules:
        target = target.rpartition(".")[0]
      if not target or target == name or not target.startswith("lmjax"):
        continue
      if name.startswith(target + ".") and modules[target].name == "__init__.py":
        continue  # a submodule importing its own package
      if is_package and target.startswith(name + "."):
        continue  # a package re-exporting its submodules
      found.add(target)
  return found


def test_no_import_cycle():
  modules = _modules()
  graph = {name: _imports(name, path, modules) for name, path in modules.items()}
  # Depth-first search for a back edge; report the cycle it closes.
  state: dict[str, int] = {}
  stack: list[str] = []
  cycles = []

  def visit(node: str) -> None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == 1:
        cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
      elif nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = 2

  for node in sorted(graph):
    if node not in state:
      visit(node)
  assert not cycles, "import cycles in lmjax/:\n" + "\n".join(cycles)


def test_the_cycle_finder_sees_a_cycle(tmp_path):
  # The check above can fail: two modules importing each other are found.
  pkg = tmp_path / "lmjax"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("def f():\n  from lmjax import b\n")
  (pkg / "b.py").write_text("from lmjax.a import f\n")
  modules = _modules(tmp_path)
  assert _imports("lmjax.a", modules["lmjax.a"], modules) == {"lmjax.b"}
  assert _imports("lmjax.b", modules["lmjax.b"], modules) == {"lmjax.a"}


def test_no_file_over_500_lines():
  long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, f"files over {MAX_LINES} lines (split them by idea): {long}"


def test_rules_table_is_short():
  assert len(mesh.RULES) <= MAX_RULES, [name for name, _ in mesh.RULES]


def test_no_public_name_hides_a_module():
  for name in lmjax.__all__:
    path = PACKAGE / f"{name}.py"
    if path.exists() or (PACKAGE / name / "__init__.py").exists():
      assert getattr(lmjax, name) is importlib.import_module(f"lmjax.{name}"), (
          f"lmjax.{name} is not the module lmjax/{name}: the public name hides it")


def test_tools_import_the_installed_package():
  edits = [f"{p.relative_to(ROOT)}:{i}" for p in (ROOT / "tools").rglob("*.py")
           for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"sys\.path\.(insert|append)|sys\.path\s*[+=]", line)]
  assert not edits, f"tools edit sys.path instead of importing the installed lmjax: {edits}"
