"""Where a compiled step's time goes on CPU: thunk times from a ``jax.profiler`` trace, by kind.

XLA's CPU runtime records one trace event per executed thunk (one HLO instruction of the
compiled program: a fusion, a dot, a copy). :func:`breakdown` traces a few steps, sums the
events by instruction and classifies each instruction from the compiled HLO text:

* ``matmul``: a dot, alone or inside a fusion (on CPU, XNNPACK/YNNPACK fusions);
* ``copy``: layout copies and transposes (fusions of nothing but copy / transpose / bitcast);
* ``other``: everything else: elementwise fusions, reductions, slicing, scatter, sorting.

Times are summed over XLA's worker threads (thunks run concurrently), so they are thread
seconds; their shares say what the cores spend the step on. Used by ``tools/bench.py mfu``.
"""

from __future__ import annotations

import collections
import re
import tempfile
from pathlib import Path

import jax

KINDS = ("matmul", "copy", "other")
_CONTAINERS = {"while", "conditional", "call", "parameter", "constant", "get-tuple-element",
               "tuple", "bitcast"}
_LAYOUT_OPS = {"copy", "transpose", "bitcast", "reshape", "parameter"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.-]+) = .*? ([\w-]+)\((.*)$")
_CALLS = re.compile(r"calls=%?([\w.-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_JVP = re.compile(r"(transpose\()?jvp\(([^)]*)\)\)?/?(.*)")


def short_op_name(op_name: str) -> str:
  """``jit(train_step)/transpose(jvp())/while/body/closed_call/jit(silu)`` -> ``bwd jit(silu)``:
  the pass (fwd, bwd, or update for what follows the gradient) and the JAX operation."""
  s = re.sub(r"^jit\([^)]*\)/", "", op_name).replace("while/body/", "").replace("closed_call/", "")
  m = _JVP.fullmatch(s)
  if m is None:
    return f"update {s}"
  return ("bwd " if m.group(1) else "fwd ") + "/".join(x for x in m.group(2, 3) if x)


def instruction_kinds(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (kind, short JAX op name) for every non-container instruction of
  a compiled HLO module's text (kinds: see the module docstring)."""
  ops: dict[str, set[str]] = collections.defaultdict(set)  # computation -> opcodes in it
  instructions = []  # (name, opcode, computation called or None, op_name)
  computation = None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace() and line.rstrip().endswith("{"):
      computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      continue
    match = _INSTRUCTION.match(line)
    if match is None or computation is None:
      continue
    name, opcode, rest = match.groups()
    ops[computation].add(opcode)
    called, op_name = _CALLS.search(rest), _OP_NAME.search(rest)
    instructions.append((name, opcode, called.group(1) if called else None,
                         short_op_name(op_name.group(1)) if op_name else ""))
  kinds = {}
  for name, opcode, called, op_name in instructions:
    if opcode in _CONTAINERS:
      continue
    inner = ops.get(called, set()) if opcode == "fusion" else {opcode}
    if "dot" in inner or "convolution" in inner:
      kind = "matmul"
    elif inner and inner <= _LAYOUT_OPS:
      kind = "copy"
    else:
      kind = "other"
    kinds[name] = (kind, op_name)
  return kinds


def breakdown(compiled, state, batch, steps: int = 2):
  """Runs ``steps`` steps of ``compiled(state, batch) -> (state, out)`` under the profiler.

  Returns the new state, {kind: thread seconds per step} and {(kind, JAX op): thread
  seconds per step} (a Counter: ``.most_common()`` lists the costliest operations).
  """
  from jax.profiler import ProfileData

  kinds = instruction_kinds(compiled.as_text())
  with tempfile.TemporaryDirectory(prefix="lmjax-step-profile-") as d:
    with jax.profiler.trace(d):
      for _ in range(steps):
        state, out = compiled(state, batch)
      jax.block_until_ready((state, out))
    trace = sorted(Path(d).rglob("*.xplane.pb"))[-1]
    data = ProfileData.from_file(str(trace))
  seconds, by_op = dict.fromkeys(KINDS, 0.0), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in kinds:
          kind, op = kinds[event.name]
          seconds[kind] += event.duration_ns * 1e-9 / steps
          by_op[kind, op] += event.duration_ns * 1e-9 / steps
  return state, seconds, by_op
