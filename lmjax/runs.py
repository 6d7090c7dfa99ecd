"""Finding runs under a directory, their final metrics as a table, and their curves.

A run is any directory holding ``metrics.jsonl`` or ``config.json`` (what
:func:`lmjax.train` writes); a sweep adds ``overrides.json`` with the fields it changed.
``lmjax runs DIR [--plot out.png]`` prints :func:`runs_table` and draws :func:`plot_runs`;
in a notebook::

  from lmjax import runs
  found = runs.list_runs("runs/gqa_vs_mha")
  print(runs.format_table(runs.runs_table(found)))
  runs.plot_runs(found)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import os
import re
from typing import Any, Sequence

import jax
from flax import nnx

from lmjax import config as config_lib
from lmjax import storage
from lmjax.metrics import read_metrics
from lmjax.model import Transformer, count_params

OVERRIDES_FILE = "overrides.json"
# Summary columns in table order; override columns come between "run" and these.
SUMMARY_COLUMNS = ("train_loss", "eval_loss", "eval_perplexity", "tokens_per_sec", "mfu",
                   "params", "steps", "status")


@dataclasses.dataclass
class Run:
  """One run directory: its saved config, the overrides a sweep gave it, its metric records."""
  name: str  # path relative to the directory searched ("." for that directory itself)
  path: Any
  config: dict[str, Any] | None
  overrides: dict[str, Any]
  metrics: list[dict[str, float]]

  def curve(self, key: str) -> tuple[list[int], list[float]]:
    """Steps and values of every record that has ``key``."""
    points = [(int(r["step"]), r[key]) for r in self.metrics if key in r]
    return [s for s, _ in points], [v for _, v in points]

  def last(self, key: str) -> float | None:
    """The newest value of ``key``, or None if no record has it."""
    for r in reversed(self.metrics):
      if key in r:
        return r[key]
    return None

  def summary(self) -> dict[str, Any]:
    """Final metrics: the last train loss and eval loss/perplexity, the mean tokens/s (and
    MFU) over the logged windows, the parameter count, the last step and whether the run
    reached its configured ``train.steps``."""
    steps = int(self.metrics[-1]["step"]) if self.metrics else 0
    target = (self.config or {}).get("train", {}).get("steps")
    out: dict[str, Any] = {
        "train_loss": self.last("loss"),
        "eval_loss": self.last("eval_loss"),
        "eval_perplexity": self.last("eval_perplexity"),
        "tokens_per_sec": _mean(self.curve("tokens_per_sec")[1]),
        "mfu": _mean(self.curve("mfu")[1]),
        "params": count_parameters(self.config) if self.config else None,
        "steps": steps,
        "status": "done" if target is not None and steps >= target else
                  (f"{steps}/{target}" if target is not None else "?"),
    }
    return out


def _mean(values: Sequence[float]) -> float | None:
  finite = [v for v in values if math.isfinite(v)]
  return sum(finite) / len(finite) if finite else None


def _read_json(path: Any) -> dict | None:
  """The JSON object in ``path``; None if it is missing or damaged (a run killed mid-write
  is still listed)."""
  try:
    value = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def load_run(path: str | os.PathLike, name: str | None = None) -> Run:
  """Reads one run directory."""
  path = storage.path(path)
  config = _read_json(path / "config.json")
  overrides = (_read_json(path / OVERRIDES_FILE) or {}).get("overrides", {})
  return Run(name=name or path.name, path=path, config=config, overrides=overrides,
             metrics=read_metrics(path))


def is_run_dir(path: str | os.PathLike) -> bool:
  path = storage.path(path)
  return (path / "metrics.jsonl").exists() or (path / "config.json").exists()


def list_runs(root: str | os.PathLike) -> list[Run]:
  """Every run under ``root`` (``root`` itself included), sorted by path; the search does
  not descend into a run's own subdirectories (checkpoints, TensorBoard)."""
  storage.check(root)
  root = storage.path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: no such directory")
  if storage.is_url(root):
    return sorted(_list_remote_runs(os.fspath(root)), key=lambda r: _natural_key(r.name))
  found = []
  for dirpath, dirnames, _ in os.walk(root):
    if is_run_dir(dirpath):
      dirnames[:] = []
      rel = os.path.relpath(dirpath, root)
      found.append(load_run(dirpath, name=rel))
    else:
      dirnames.sort()
  return sorted(found, key=lambda r: _natural_key(r.name))


def _list_remote_runs(root: str) -> list[Run]:
  """The runs under bucket prefix ``root``: one listing of the files that mark a run."""
  marks = [name for name in storage.files(root)
           if os.path.basename(name) in ("config.json", "metrics.jsonl")]
  dirs = sorted({os.path.dirname(name) for name in marks}, key=len)
  runs: list[str] = []
  for d in dirs:  # a run's own subdirectories are not runs
    if not any(d == r or d.startswith(r + "/") or r == "" for r in runs):
      runs.append(d)
  return [load_run(storage.join(root, d) if d else root, name=d or ".") for d in runs]


_NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)")


def _natural_key(name: str) -> list[Any]:
  """Sorts the way people read: "run9" before "run10", "lr=0.0003" before "lr=0.001"."""
  return [float(p) if i % 2 else p for i, p in enumerate(_NUMBER.split(name))]


@functools.lru_cache(maxsize=64)
def _count_parameters(model_json: str) -> int:
  # On today's defaults, as every saved config is read: fields added since the run keep them.
  model_cfg = config_lib.from_saved({"model": json.loads(model_json)}).model
  abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
  return count_params(jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def count_parameters(config: dict[str, Any] | Any) -> int | None:
  """Parameters of the model a config (a dict from ``config.json`` or a ConfigDict)
  describes, from the model's abstract shapes; nothing is allocated."""
  model = config["model"]
  model = model.to_dict() if hasattr(model, "to_dict") else model
  try:
    return _count_parameters(json.dumps(model, sort_keys=True))
  except Exception:  # noqa: BLE001 - a config from another lmjax version: leave it blank
    return None


def runs_table(runs: Sequence[Run],
               override_keys: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """One row per run: ``run``, the override keys (default: every key any run's sweep
  overrode, in first-seen order), then :data:`SUMMARY_COLUMNS`. Columns no run has
  (e.g. ``mfu`` on CPU) are left out."""
  if override_keys is None:
    override_keys = list(dict.fromkeys(k for r in runs for k in r.overrides))
  rows = []
  for r in runs:
    row = {"run": r.name}
    row.update({k: r.overrides.get(k) for k in override_keys})
    row.update(r.summary())
    rows.append(row)
  empty = [c for c in SUMMARY_COLUMNS if all(row[c] is None for row in rows)]
  return [{k: v for k, v in row.items() if k not in empty} for row in rows]


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    if not math.isfinite(value):
      return str(value)
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
  if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 1e4:
    return f"{value:,}"
  return str(value)


def format_table(rows: Sequence[dict[str, Any]], style: str = "text") -> str:
  """``rows`` as aligned plain text (``style="text"``) or a Markdown table (``"markdown"``)."""
  if not rows:
    return "(no runs)"
  columns = list(dict.fromkeys(k for row in rows for k in row))
  cells = [[_cell(row.get(c)) for c in columns] for row in rows]
  if style == "markdown":
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in cells]
    return "\n".join(lines)
  if style != "text":
    raise ValueError(f"style must be 'text' or 'markdown', got {style!r}")
  widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
  fmt = lambda line: "  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip()
  return "\n".join([fmt(columns), fmt(["-" * w for w in widths])] + [fmt(line) for line in cells])


def write_table(rows: Sequence[dict[str, Any]], csv_path: str | os.PathLike,
                md_path: str | os.PathLike | None = None) -> None:
  """Writes ``rows`` as CSV (full precision, so values equal those in ``metrics.jsonl``)
  and, optionally, as a Markdown table."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  out = io.StringIO(newline="")
  writer = csv.DictWriter(out, fieldnames=columns)
  writer.writeheader()
  for row in rows:
    writer.writerow({k: "" if row.get(k) is None else _csv_value(row[k]) for k in columns})
  storage.write_text(csv_path, out.getvalue())
  if md_path is not None:
    storage.write_text(md_path, format_table(rows, "markdown") + "\n")


def _csv_value(value: Any) -> Any:
  if isinstance(value, (list, tuple, dict)):
    return json.dumps(value)
  return repr(value) if isinstance(value, float) else value


def plot_runs(runs: Sequence[Run], path: str | os.PathLike | None = None,
              metrics: Sequence[str] = ("loss", "eval_loss"), logy: bool = False) -> Any:
  """Draws each metric's curves, one panel per metric side by side, one line per run.

  With ``path`` the figure is written there (PNG, PDF, SVG by suffix) without touching
  pyplot's global state or backend; without it, the figure comes from pyplot, so that a
  notebook shows it inline. Returns the matplotlib Figure.
  """
  metrics = [m for m in metrics if any(r.curve(m)[0] for r in runs)] or list(metrics[:1])
  ncol = 2 if any(len(r.name) > 30 for r in runs) else 3
  rows = math.ceil(len(runs) / ncol)
  size = (5.0 * len(metrics), 3.4 + 0.22 * rows)
  if path is None:
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=size, layout="constrained")
  else:
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, layout="constrained")
  from matplotlib.ticker import MaxNLocator
  axes = fig.subplots(1, len(metrics), squeeze=False)[0]
  titles = {"loss": "train loss", "eval_loss": "eval loss"}
  colors = [f"C{i % 10}" for i in range(len(runs))]
  for ax, metric in zip(axes, metrics):
    for r, color in zip(runs, colors):
      steps, values = r.curve(metric)
      ax.plot(steps, values, label=r.name, color=color, marker="o" if len(steps) < 4 else None)
    ax.set_title(titles.get(metric, metric))
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if logy:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  if runs:  # below the panels, so that it hides no curve
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=ncol,
               fontsize="small", frameon=False)
  if path is not None:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format=os.path.splitext(os.fspath(path))[1][1:] or "png")
    storage.write_bytes(path, buffer.getvalue())
  return fig
