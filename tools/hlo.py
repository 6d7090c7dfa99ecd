"""The HLO module of a jitted function right after XLA's SPMD partitioner, and its collectives.

``compiled.as_text()`` is the program after every pass, including backend rewrites: XLA:CPU
has no bfloat16 collectives, so its ``float-normalization-bf16`` pass upcasts a bf16
all-gather to f32 there, while GPU and TPU keep it bf16. The module right after
``spmd-partitioning`` is the program the partitioner wrote, the same on every backend:
read that one to see which dtype the collectives move.

  >>> text = partitioned_hlo(compile_train_step(setup), state, batch)
  >>> [(c.dtype, c.shape, c.runs) for c in collectives(text, "all-gather")]
  [('bf16', (32, 64), 4), ...]  # dtype, per-device result shape, executions per call

Used by the tests (tests/layouts.py) and importable by the benchmarks (``import hlo``).
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import tempfile
from typing import Any

_PASS = "spmd-partitioning"
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.-]+) \(.*\{$")
_RESULT = re.compile(r"^\s*(?:ROOT )?%([\w.-]+) = (\w+)\[([\d,]*)\]\S* ([\w-]+)\(")
_WHILE = re.compile(r"while\(.*condition=%([\w.-]+), body=%([\w.-]+)")
_CALLS = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%([\w.-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_LIMIT = re.compile(r"s32\[\] constant\((\d+)\)")


@dataclasses.dataclass(frozen=True)
class Collective:
  name: str  # the instruction, e.g. "all-gather.3"
  op: str  # all-gather, all-reduce, reduce-scatter, collective-permute, all-to-all
  dtype: str  # HLO element type: "bf16", "f32", "s32"
  shape: tuple[int, ...]  # per-device result shape
  computation: str  # the computation it is in (a while body for a scanned layer)
  runs: int  # executions per call of the program (while trip counts multiplied in)

  @property
  def bytes(self) -> int:
    """Bytes of one result, per device."""
    return math.prod(self.shape) * _BYTES[self.dtype]


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
          "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def compile_partitioned(lowered: Any, options: dict[str, Any] | None = None
                        ) -> tuple[Any, str | None]:
  """``lowered.compile(options)`` and the text of its HLO module right after SPMD partitioning
  (None for a program on one device: XLA runs no partitioner there)."""
  with tempfile.TemporaryDirectory(prefix="lmjax-hlo-") as tmp:
    dump = {"xla_dump_to": tmp, "xla_dump_hlo_pass_re": _PASS}
    compiled = lowered.compile(compiler_options={**(options or {}), **dump})
    files = glob.glob(os.path.join(tmp, f"*after_{_PASS}*.txt"))
    if len(files) > 1:
      raise RuntimeError(f"expected one module after {_PASS} in the XLA dump, found {files}")
    if not files:
      return compiled, None
    with open(files[0]) as f:
      return compiled, f.read()


def partitioned_hlo(fn: Any, *args: Any) -> str:
  """The HLO text of ``fn(*args)`` right after SPMD partitioning; ``fn`` is a jitted function
  (or anything with ``.lower``, as ``compile_train_step``'s step) over several devices."""
  text = compile_partitioned(fn.lower(*args))[1]
  if text is None:
    raise ValueError("the program runs on one device: XLA did not partition it")
  return text


def collectives(hlo: str, op: str | None = None) -> list[Collective]:
  """The collectives (of kind ``op``, or all) of an HLO module's text, each with how often it
  runs per call: a while loop's body runs its trip count times (the s32 constant its
  condition compares the counter with, as ``lax.scan`` writes it), nested loops multiply."""
  bodies: dict[str, list[str]] = {}
  name = None
  entry = None
  for line in hlo.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      name = m.group(1)
      bodies[name] = []
      if line.startswith("ENTRY"):
        entry = name
    elif line == "}":
      name = None
    elif name is not None:
      bodies[name].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")

  runs: dict[str, int] = {}

  def visit(comp: str, times: int) -> None:
    runs[comp] = runs.get(comp, 0) + times
    for line in bodies[comp]:
      w = _WHILE.search(line)
      if w:
        limits = _LIMIT.findall("\n".join(bodies[w.group(1)]))
        if len(limits) != 1:
          raise ValueError(f"cannot read the trip count of the while loop in {line[:120]!r}")
        visit(w.group(2), times * int(limits[0]))
        continue
      called = _CALLS.findall(line) + [c.strip().lstrip("%") for b in _BRANCHES.findall(line)
                                       for c in b.split(",")]
      for c in called:
        if c in bodies:
          visit(c, times)

  visit(entry, 1)
  kinds = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
  found = []
  for comp, lines in bodies.items():
    for line in lines:
      m = _RESULT.match(line)
      if m and m.group(4) in kinds and (op is None or m.group(4) == op):
        shape = tuple(int(d) for d in m.group(3).split(",") if d)
        found.append(Collective(m.group(1), m.group(4), m.group(2), shape, comp, runs.get(comp, 0)))
  return found
