"""What a plan says: the accelerators it targets, what one compile of the train step tells,
the plan itself with the changes tried, and the plan as a readable report.

:func:`lmjax.plan.plan` fills these in; :func:`format_plan` prints one::

  print(format_plan(plan(cfg, 256, accelerator="h100")))
"""

from __future__ import annotations

import dataclasses
import textwrap
from typing import Any

import ml_collections

from lmjax import config as config_lib
from lmjax.metrics import PEAK_FLOPS, inactive_params

OPT_STATE = {  # optim.name -> what its state holds (the memory table's note)
    "adamw": "AdamW moments, counts", "adafactor": "Adafactor factored second moments, counts",
    "lion": "Lion momentum, counts", "muon": "Muon momentum, AdamW moments of the rest, counts"}

GiB = 2**30
JAX_GPU_PREALLOCATE = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION on GPUs


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A device to plan for."""
  name: str
  peak_flops: float  # dense bf16 FLOP/s per device
  memory_bytes: int  # per device, as sold (the driver shows a little less, e.g. H100 79.6 GiB)
  gpu: bool


_PEAK = dict(PEAK_FLOPS)
ACCELERATORS = {a.name: a for a in (
    Accelerator("h100", _PEAK["H100"], 80 * GiB, True),
    Accelerator("h200", _PEAK["H200"], 141 * GiB, True),
    Accelerator("a100-40gb", _PEAK["A100"], 40 * GiB, True),
    Accelerator("a100-80gb", _PEAK["A100"], 80 * GiB, True),
    Accelerator("l4", _PEAK["L4"], 24 * GiB, True),
    Accelerator("tpu-v4", _PEAK["TPU v4"], 32 * GiB, False),
    Accelerator("tpu-v5e", _PEAK["TPU v5e"], 16 * GiB, False),
    Accelerator("tpu-v5p", _PEAK["TPU v5p"], 95 * GiB, False),
    Accelerator("tpu-v6e", _PEAK["TPU v6"], 32 * GiB, False),
)}


def format_bytes(n: float) -> str:
  """``n`` bytes in binary units, e.g. '80.00 GiB' (the units `lmjax plan --memory` reads)."""
  for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-device bytes of one compiled train step."""
  params: int  # exact, from the shardings
  opt_state: int  # exact
  other_state: int  # step, loss window, skip counter
  batch: int  # exact
  temp: int  # XLA temp_size_in_bytes: activations, gradients, gathered weights, workspace
  outputs: int  # outputs that do not alias a donated argument (the metrics)
  code: int  # generated code (0 on CPU)
  xla_arguments: int  # XLA's argument_size_in_bytes: a cross-check of the exact sums

  @property
  def state_and_batch(self) -> int:
    return self.params + self.opt_state + self.other_state + self.batch

  @property
  def total(self) -> int:
    return self.state_and_batch + self.temp + self.outputs + self.code


@dataclasses.dataclass(frozen=True)
class Measured:
  """What one compile tells (per device)."""
  memory: Memory
  xla_flops: float  # compiled.cost_analysis()["flops"]: a loop body counted once
  dot_flops: float  # matmul FLOPs of the compiled HLO, loops x trip count
  collective_bytes: float  # analytic: what the device sends per step (lmjax.plan._collective_bytes)
  compile_s: float


@dataclasses.dataclass(frozen=True)
class Candidate:
  """A change tried when the plan does not fit, as --config overrides."""
  overrides: dict[str, Any]
  family: str  # fsdp | remat | grad_accum | tensor | combination
  cost: str  # what it costs, against the plan
  measured: Measured
  rank: tuple[int, int] = (0, 0)  # (family, option) in order of cost

  def flags(self) -> str:
    return " ".join(f"--config.{k}={v}" for k, v in self.overrides.items())


@dataclasses.dataclass(frozen=True)
class Plan:
  cfg: ml_collections.ConfigDict
  devices: int
  mesh: dict[str, int]
  accelerator: Accelerator
  memory_bytes: int  # per device
  memory_fraction: float
  mfu: float
  num_params: int
  measured: Measured
  largest_shard: tuple[str, tuple[int, ...], tuple[int, ...], int]  # name, shape, shard, bytes
  replicated: tuple[int, int, str]  # parameters whole on every device: count, bytes, largest
  batch_rows: int  # rows of the step's batch per device
  micro_rows: int  # rows of one microbatch per device
  model_flops: float  # per step, all devices
  tokens: int  # per step
  stand_in: bool  # the attention kernel was planned with the 'blockwise' backend
  scores_bytes: int  # f32 (b, n, t, t) attention scores per layer per device on the XLA path
  block_bytes: int  # one block of the stand-in's scores
  logits_bytes: int  # f32 (b, t, v) logits of one microbatch per device, if held whole
  loss_chunk_bytes: int  # f32 (b, c, v) logits of one loss chunk per device (0: whole logits)
  platform: str
  candidates: tuple[Candidate, ...] = ()  # tried, in order
  suggestion: Candidate | None = None
  min_devices: int = 0  # when nothing fits: devices that parameters + optimizer state need

  @property
  def usable_bytes(self) -> int:
    return int(self.memory_bytes * self.memory_fraction)

  @property
  def total_bytes(self) -> int:
    return self.measured.memory.total

  @property
  def fits(self) -> bool:
    return self.total_bytes <= self.usable_bytes

  def step_seconds(self, mfu: float = 1.0) -> float:
    return self.model_flops / (self.devices * self.accelerator.peak_flops * mfu)

  @property
  def tokens_per_second(self) -> float:
    return self.tokens / self.step_seconds(self.mfu)


# --- the report ----------------------------------------------------------------------------

def _count(n: float) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _wrap(text: str, indent: str = "    ") -> list[str]:
  return textwrap.wrap(text, width=100, initial_indent="  - ", subsequent_indent=indent)


def format_plan(p: Plan) -> str:
  """The plan as a readable report."""
  cfg, m, mem, f, acc = p.cfg, p.cfg.model, p.measured.memory, p.measured, p.accelerator
  mesh = ", ".join(f"{a} {p.mesh[a]}" for a in config_lib.MESH_AXES)
  active = (f", {_count(p.num_params - inactive_params(m))} active: {m.experts_per_token} of "
            f"{m.num_experts} experts per token" if m.num_experts else "")
  lines = [
      f"model   {_count(p.num_params)} parameters{active} ({m.param_dtype}, {m.compute_dtype} compute), "
      f"{m.num_layers} layers, seq {cfg.data.seq_len}, global batch {cfg.data.global_batch_size} "
      f"({_count(p.tokens)} tokens/step)",
      f"mesh    {p.devices} devices: {mesh}; remat {m.remat}, attention {m.attention}, grad "
      f"accum {cfg.optim.grad_accum_steps} ({p.micro_rows} row{'s' if p.micro_rows != 1 else ''}/device "
      "per microbatch)",
      f"target  {acc.name}: {format_bytes(p.memory_bytes)} and {acc.peak_flops / 1e12:.0f} TFLOP/s "
      f"(bf16 dense) per device; planning against {p.memory_fraction:.0%} = {format_bytes(p.usable_bytes)}",
      "",
      "memory per device",
  ]
  name, shape, shard, size = p.largest_shard
  rows = [("parameters", mem.params, f"exact; largest shard {name} {tuple(shape)} -> {tuple(shard)}, "
                                     f"{format_bytes(size)}"),
          ("optimizer state", mem.opt_state, f"exact ({OPT_STATE[cfg.optim.name]})"),
          ("batch + step counters", mem.batch + mem.other_state,
           f"exact (4 x int32 ({p.batch_rows}, {cfg.data.seq_len // p.mesh['context']}))"),
          ("activations, temporaries", mem.temp, "XLA temp_size_in_bytes (gradients, saved "
                                                 "activations, gathered weights)")]
  if mem.outputs + mem.code:
    rows.append(("outputs, code", mem.outputs + mem.code, "outputs not donated, generated code"))
  lines += [f"  {label:<26}{format_bytes(value):>11}   {note}" for label, value, note in rows]
  verdict = "fits" if p.fits else f"DOES NOT FIT (over by {format_bytes(p.total_bytes - p.usable_bytes)})"
  lines.append(f"  {'total':<26}{format_bytes(p.total_bytes):>11}   of {format_bytes(p.usable_bytes)} "
               f"usable ({p.total_bytes / p.memory_bytes:.0%} of the device): {verdict}")
  if p.replicated[0]:
    arrays = f"{p.replicated[0]} parameter array{'s are' if p.replicated[0] > 1 else ' is'}"
    lines.append(f"  ({arrays} whole on every device, {format_bytes(p.replicated[1])}; "
                 f"largest {p.replicated[2]})")
  if abs(mem.xla_arguments - mem.state_and_batch) > 2**20:
    lines.append(f"  (XLA counts {format_bytes(mem.xla_arguments)} of arguments; the exact sum "
                 f"is {format_bytes(mem.state_and_batch)})")
  lines += [
      "",
      "compute per step",
      f"  model FLOPs        {p.model_flops:9.3g}   6 x {'active ' if m.num_experts else ''}matmul parameters + 12 x l n h t attention, "
      f"x {_count(p.tokens)} tokens",
      f"  XLA matmul FLOPs   {f.dot_flops * p.devices:9.3g}   compiled HLO, {f.dot_flops:.3g}/device x "
      f"{p.devices}, loops x trip count ({f.dot_flops * p.devices / p.model_flops - 1:+.0%}: remat "
      "recompute, attention)",
      f"  XLA cost_analysis  {f.xla_flops:9.3g}   per device (of the partitioned program); counts the "
      f"layer scan's body once, not x {m.num_layers}",
      f"  collectives        {format_bytes(f.collective_bytes):>9}   sent per device (analytic: FSDP "
      f"gathers and reduce-scatters, data all-reduce, tensor all-reduces"
      f"{', expert all-to-alls' if m.num_experts else ''}"
      f"{', context key/value exchanges' if p.mesh['context'] > 1 else ''})",
      f"  step time          {p.step_seconds():7.3g} s   at 100% MFU; {p.step_seconds(p.mfu):.3g} s at "
      f"{p.mfu:.0%} MFU -> {p.tokens_per_second:,.0f} tokens/s "
      f"({p.tokens_per_second / p.devices:,.0f}/device)",
      "",
      "notes",
  ]
  heads = m.num_heads // p.mesh["tensor"] if m.num_heads % p.mesh["tensor"] == 0 else m.num_heads
  dims = f"b={p.micro_rows}, n={heads}, t={cfg.data.seq_len}"
  if p.stand_in:
    lines += _wrap(f"attention {m.attention!r} cannot compile on {p.platform}: planned with the "
                   "'blockwise' backend, which keeps what the kernel keeps (q, k, v, output, log-sum-exp) and "
                   f"one block of scores at a time ({format_bytes(p.block_bytes)}, which the kernel holds "
                   "on chip). The plain 'xla' backend would materialise f32 scores (b, n, t, t) of "
                   f"{format_bytes(p.scores_bytes)} per layer per device ({dims}).")
  elif m.attention == "xla":
    lines += _wrap(f"attention 'xla' materialises f32 scores (b, n, t, t) of {format_bytes(p.scores_bytes)} "
                   f"per layer per device ({dims}); the cudnn and splash kernels hold none of it.")
  logits = f"f32 logits (b, t, v) of {format_bytes(p.logits_bytes)} per device (b={p.micro_rows}, " \
           f"t={cfg.data.seq_len}, v={m.vocab_size}/{p.mesh['tensor']})"
  if m.loss_chunk:
    lines += _wrap(f"loss: {m.loss_chunk} positions at a time, at most {format_bytes(p.loss_chunk_bytes)} "
                   f"of f32 logits per device; whole logits (--config.model.loss_chunk=0) would keep "
                   f"{logits} from the forward to the backward pass, with their gradient as large.")
  else:
    lines += _wrap(f"loss: whole logits, {logits} kept for the backward pass, their gradient as "
                   "large; --config.model.loss_chunk=1024 computes them 1024 positions at a time.")
  if p.platform == "cpu":
    lines += _wrap("activations come from XLA's CPU compiler, whose fusion and buffer assignment "
                   "differ from the GPU/TPU compilers: an estimate, usually within tens of percent. "
                   "Parameters, optimizer state and batch are exact.")
  if acc.gpu and p.fits:
    lines += _wrap("fits within JAX's default GPU preallocation (75%) too."
                   if p.total_bytes <= p.memory_bytes * JAX_GPU_PREALLOCATE else
                   f"set XLA_PYTHON_CLIENT_MEM_FRACTION={p.memory_fraction:.2f}: JAX preallocates "
                   f"{JAX_GPU_PREALLOCATE:.0%} of GPU memory by default.")
  lines += _wrap(f"compiled in {f.compile_s:.0f} s.")
  if p.fits or not (p.candidates or p.min_devices):
    return "\n".join(lines)
  lines += ["", "changes tried, cheapest first (each compiled; cost against this plan):"]
  for c in p.candidates:
    ok = "fits" if c.measured.memory.total <= p.usable_bytes else "too big"
    lines.append(f"  {c.flags():<52} {format_bytes(c.measured.memory.total):>11}  {ok:<7}  {c.cost}")
  if p.suggestion:
    s = p.suggestion.measured.memory.total
    lines += ["", f"suggestion: add {p.suggestion.flags()}",
              f"  ({format_bytes(s)} per device, {s / p.memory_bytes:.0%} of the device"
              + (f"; set XLA_PYTHON_CLIENT_MEM_FRACTION={p.memory_fraction:.2f}"
                 if acc.gpu and s > p.memory_bytes * JAX_GPU_PREALLOCATE else "") + ")"]
  else:
    lines += ["", f"nothing tried fits: parameters and optimizer state alone need at least "
                  f"{p.min_devices} devices of {format_bytes(p.usable_bytes)}, and activations more; "
                  "plan again with more --devices."]
  return "\n".join(lines)
