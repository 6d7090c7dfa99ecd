"""Compiling an accelerator's train step on the CPU, for planning: what XLA's CPU compiler
needs to act like the GPU/TPU one, and the matmul FLOPs of a compiled program.

>>> compiled = step.lower(state, batch).compile(CPU_COMPILER_OPTIONS)
>>> hlo_matmul_flops(compiled.as_text())  # per device, loops x trip count
"""

from __future__ import annotations

import functools
import math
import re

# XLA's CPU compiler computes bf16 matmuls in f32; loop-invariant code motion then hoists the
# conversion of the layer scan's stacked residuals out of the loop: an f32 copy of every layer's
# saved activations at once, which no GPU/TPU compile makes. Planning on CPU turns that pass off.
CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \((.*)\) -> .* \{$")
_PARAMETER = re.compile(r"([\w.\-]+): \w+\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")


def hlo_matmul_flops(hlo_text: str) -> float:
  """2 * M * N * K summed over the dots of a compiled HLO module, with while-loop bodies
  multiplied by their known trip count (XLA's cost_analysis counts a loop body once).

  Per device for an SPMD-partitioned program; includes remat recompute and any redundant work.
  """
  dims = lambda s: [int(x) for x in s.split(",") if x]
  comps: dict[str, dict] = {}
  entry = current = None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = head.group(1)
      comps[current] = {"shapes": {p: dims(d) for p, d in _PARAMETER.findall(head.group(2))},
                        "flops": 0.0, "calls": []}
      entry = current if line.startswith("ENTRY") else entry
      continue
    if current is None or line == "}":
      current = None
      continue
    ins = _INSTRUCTION.match(line)
    if not ins:
      continue
    name, shape, op, rest = ins.groups()
    comp = comps[current]
    out = re.match(r"\w+\[([\d,]*)\]", shape)
    comp["shapes"][name] = dims(out.group(1)) if out else []
    if op == "dot":
      lhs = re.match(r"[^%]*%([\w.\-]+)", rest).group(1)
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
      k = math.prod(comp["shapes"][lhs][i] for i in dims(contracting.group(1))) if contracting else 1
      comp["flops"] += 2.0 * math.prod(comp["shapes"][name]) * k
    trips = re.search(r'known_trip_count":\{"n":"(\d+)"', rest)
    for kind, callee in re.findall(r"\b(calls|body)=%([\w.\-]+)", rest):
      comp["calls"].append((callee, int(trips.group(1)) if kind == "body" and trips else 1))

  @functools.cache
  def total(name: str) -> float:
    return comps[name]["flops"] + sum(n * total(c) for c, n in comps[name]["calls"] if c in comps)

  return total(entry) if entry else 0.0
