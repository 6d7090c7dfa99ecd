"""Plan a run before launch: per-device memory and step time of the real train step, compiled
for the target mesh with abstract inputs on fake CPU devices (nothing is allocated).

>>> p = plan(cfg, 256, accelerator="h100")  # needs 256 JAX devices: `lmjax plan` fakes them
>>> print(format_plan(p))
>>> p.fits, p.total_bytes, p.suggestion.flags() if p.suggestion else None

Memory per device is XLA's lower bound on what the compiled program needs (``CompiledMemoryStats``
in XLA's ``pjrt_executable.h``: arguments + outputs - aliased + temporaries + generated code).
The arguments are the train state and the batch, whose bytes are exact (each array's
``sharding.shard_shape``); the outputs alias the donated state, so what remains is the
temporaries: activations saved for the backward pass, gradients, gathered weights, workspace.
They come from XLA's CPU compiler (see :mod:`lmjax.cpu_compile`), whose fusion and buffer
assignment differ from the GPU and TPU compilers: an estimate, usually within tens of percent.

If the plan does not fit, single changes are compiled in order of cost, cheapest first:
1. more FSDP (``mesh.data`` or ``mesh.tensor`` folded into ``mesh.fsdp``): no extra FLOPs;
2. a stronger remat policy (none -> dots -> dots_no_batch -> full): recompute FLOPs, measured
   from the compiled program, spent on the same large matmuls;
3. gradient accumulation x2, x4, x8: no extra FLOPs, but smaller per-device matmuls and the
   FSDP weights gathered (and gradients reduce-scattered) once per microbatch;
4. tensor parallelism 2, 4, 8: activation all-reduces in every layer, on the critical path.
The first that fits is the suggestion (within a family the weakest that fits; a family whose
strongest option does not fit is skipped after one compile). If none fits, combinations of
each family's strongest option are tried, at most ``max_compiles`` compiles in all.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import textwrap
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lmjax import config as config_lib
from lmjax import cpu_compile
from lmjax.metrics import PEAK_FLOPS, flops_per_token
from lmjax.model.attention import BLOCK, check_backend
from lmjax.state import build
from lmjax.trainer import compile_train_step

GiB = 2**30
DEFAULT_MFU = 0.4  # what well-tuned dense LLM training reaches on H100s and TPUs
DEFAULT_MEMORY_FRACTION = 0.9  # plan against 90%: fragmentation and runtime buffers need the rest
JAX_GPU_PREALLOCATE = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION on GPUs
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # weakest (most memory) to strongest
MAX_COMPILES = 8  # compiles spent on suggestions, beyond the plan itself
MAX_TENSOR = 8  # tensor parallelism stays inside one NVLink node / ICI neighbourhood


@dataclasses.dataclass(frozen=True)
class Accelerator:
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

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40, "p": 2**50,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15}


def parse_bytes(text: str | int) -> int:
  """'80GiB', '80GB' (10^9 bytes), '16G' (= 16GiB), '1.5TiB', '512MiB' or a number of bytes."""
  if isinstance(text, int):
    return text
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgtp]?)(i?)(b?)\s*", str(text), re.IGNORECASE)
  if not m or (m.group(3) and not m.group(2)):
    raise ValueError(f"cannot read {text!r} as a size; write e.g. 80GiB, 80GB, 16G or 1.5TiB.")
  decimal = m.group(2) and m.group(4) and not m.group(3)
  return int(float(m.group(1)) * _UNITS[m.group(2).lower() + ("b" if decimal else "")])


def format_bytes(n: float) -> str:
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
  collective_bytes: float  # analytic: what the device sends per step (see _collective_bytes)
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


def plan(cfg: ml_collections.ConfigDict, devices: int, *, memory_bytes: int | str | None = None,
         accelerator: str = "h100", mfu: float = DEFAULT_MFU,
         memory_fraction: float = DEFAULT_MEMORY_FRACTION, suggest: bool = True,
         max_compiles: int = MAX_COMPILES) -> Plan:
  """Compiles the train step of ``cfg`` for ``devices`` devices (the first of ``jax.devices()``)
  and returns its per-device memory and FLOPs and, if it does not fit, the cheapest change
  that does (``suggest``). ``memory_bytes`` defaults to the accelerator's; the plan fits if
  its total is at most ``memory_fraction`` of it.

  Raises ConfigError naming the key for a bad config or a mesh that does not cover
  ``devices``, before compiling anything.
  """
  if accelerator not in ACCELERATORS:
    raise ValueError(f"unknown accelerator {accelerator!r}; known: {', '.join(ACCELERATORS)} "
                     "(for another, pass the nearest and --memory).")
  acc = ACCELERATORS[accelerator]
  memory = acc.memory_bytes if memory_bytes is None else parse_bytes(memory_bytes)
  if not 0 < memory_fraction <= 1:
    raise ValueError(f"memory_fraction must be in (0, 1], got {memory_fraction}.")
  if not 0 < mfu <= 1:
    raise ValueError(f"mfu must be in (0, 1], got {mfu}.")
  config_lib.validate(cfg, num_devices=devices)
  if jax.device_count() < devices:
    raise RuntimeError(
        f"planning for {devices} devices needs as many JAX devices, but there are "
        f"{jax.device_count()} ({jax.default_backend()}). Use `lmjax plan`, which fakes them on "
        f"the CPU, or call jax.config.update('jax_num_cpu_devices', {devices}) right after "
        "`import jax`, before anything touches devices.")
  cfg = copy.deepcopy(cfg)
  setup = _setup(cfg, devices)
  base = _measure(cfg, devices)
  p = Plan(cfg=cfg, devices=devices, mesh=dict(setup.mesh.shape), accelerator=acc,
           memory_bytes=memory, memory_fraction=memory_fraction, mfu=mfu,
           num_params=setup.num_params, measured=base,
           **_layout(setup, needs_stand_in(cfg)))
  if p.fits or not suggest:
    return p
  tried, best = _search(cfg, devices, base, p.usable_bytes, max_compiles)
  state = sum(x.size * x.dtype.itemsize for key in ("params", "opt_state")
              for x in jax.tree.leaves(setup.abstract_state[key]))
  return dataclasses.replace(p, candidates=tuple(tried), suggestion=best,
                             min_devices=0 if best else math.ceil(state / p.usable_bytes))


# --- compiling -----------------------------------------------------------------------------

def needs_stand_in(cfg: ml_collections.ConfigDict) -> bool:
  """Whether ``config.model.attention`` (a cudnn or splash kernel) cannot compile here."""
  try:
    check_backend(cfg.model.attention, jax.devices()[0].platform)
    return False
  except ValueError:
    return True


def _compilable(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``cfg`` with a kernel this platform cannot compile replaced by the 'blockwise' backend,
  which keeps what the kernels keep (q, k, v, the output, a log-sum-exp; one block of scores
  at a time)."""
  if not needs_stand_in(cfg):
    return cfg
  cfg = copy.deepcopy(cfg)
  cfg.model.attention = "blockwise"
  return cfg


def _setup(cfg: ml_collections.ConfigDict, devices: int):
  return build(_compilable(cfg), jax.devices()[:devices])


_CACHE: dict[tuple, Measured] = {}  # re-planning a config in the same process compiles nothing


def _measure(cfg: ml_collections.ConfigDict, devices: int) -> Measured:
  key = (cfg.to_json(), devices, jax.default_backend())
  if key in _CACHE:
    return _CACHE[key]
  setup = _setup(cfg, devices)
  shape = (cfg.data.global_batch_size, cfg.data.seq_len)
  batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=setup.batch_sharding)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  step = compile_train_step(setup)
  start = time.perf_counter()
  lowered = step.lower(setup.abstract_state, batch)
  on_cpu = jax.default_backend() == "cpu"
  compiled = lowered.compile(cpu_compile.CPU_COMPILER_OPTIONS if on_cpu else None)
  seconds = time.perf_counter() - start
  stats = compiled.memory_analysis()
  state = setup.abstract_state
  memory = Memory(params=_device_bytes(state["params"]), opt_state=_device_bytes(state["opt_state"]),
                  other_state=_device_bytes([state[k] for k in state if k not in ("params", "opt_state")]),
                  batch=_device_bytes(batch), temp=stats.temp_size_in_bytes,
                  outputs=max(stats.output_size_in_bytes - stats.alias_size_in_bytes, 0),
                  code=stats.generated_code_size_in_bytes, xla_arguments=stats.argument_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  _CACHE[key] = Measured(memory=memory, xla_flops=float(cost.get("flops", 0.0)),
                         dot_flops=cpu_compile.hlo_matmul_flops(compiled.as_text()),
                         collective_bytes=_collective_bytes(setup), compile_s=seconds)
  return _CACHE[key]


def _device_bytes(tree: Any) -> int:
  """Bytes one device holds of ``tree``'s arrays (ShapeDtypeStructs with shardings)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _micro_rows(setup) -> tuple[int, int]:
  """Rows per device of the step's batch and of one microbatch (inside a pipeline stage)."""
  cfg, m, shape = setup.cfg, setup.cfg.model, setup.mesh.shape
  rows = setup.batch_sharding.shard_shape((cfg.data.global_batch_size, cfg.data.seq_len))[0]
  micro = cfg.data.global_batch_size // cfg.optim.grad_accum_steps // (shape["data"] * shape["fsdp"])
  if shape["stage"] > 1:
    micro //= m.pipeline_microbatches if m.pipeline_microbatches > 0 else shape["stage"]
  return rows, max(micro, 1)


def _collective_bytes(setup) -> float:
  """Bytes a device sends per step, by ring collectives (about 2(s-1)/s of an all-reduced
  buffer, (s-1)/s of a gathered or reduce-scattered one, over an axis of size s): FSDP weight
  all-gathers (forward and backward) and gradient reduce-scatters, the gradient all-reduce
  over ``data``, all once per microbatch, and four (b, t, d) activation all-reduces per layer and
  microbatch over ``tensor`` (six under full remat). An estimate for comparing layouts."""
  cfg, m = setup.cfg, setup.cfg.model
  shape = setup.mesh.shape
  f, d, t = shape["fsdp"], shape["data"], shape["tensor"]
  k = cfg.optim.grad_accum_steps
  params = setup.num_params * jnp.dtype(m.param_dtype).itemsize / t  # per tensor shard
  fsdp = 3 * k * params * (f - 1) / f
  data = 2 * k * params / f * (d - 1) / d
  act = _micro_rows(setup)[1] * cfg.data.seq_len * m.embed_dim * jnp.dtype(m.compute_dtype).itemsize
  tensor = k * m.num_layers * (6 if m.remat == "full" else 4) * act * 2 * (t - 1) / t
  return fsdp + data + tensor


def _layout(setup, stand_in: bool) -> dict[str, Any]:
  """The parts of a Plan that come from the abstract state and the config, not the compile."""
  cfg, m = setup.cfg, setup.cfg.model
  flat = jax.tree_util.tree_flatten_with_path(setup.abstract_state["params"])[0]
  arrays = []
  for path, x in flat:
    shard = x.sharding.shard_shape(x.shape)
    arrays.append((jax.tree_util.keystr(path, simple=True, separator="."), x.shape, shard,
                   math.prod(shard) * x.dtype.itemsize, x.sharding.is_fully_replicated))
  whole = [a for a in arrays if a[4]] if len(setup.mesh.devices.flat) > 1 else []
  largest_whole = max(whole, key=lambda a: a[3]) if whole else None
  rows, micro = _micro_rows(setup)
  tensor = setup.mesh.shape["tensor"]
  heads = m.num_heads // tensor if m.num_heads % tensor == 0 else m.num_heads
  t = cfg.data.seq_len
  tokens = cfg.data.global_batch_size * t
  return dict(largest_shard=max(arrays, key=lambda a: a[3])[:4],
              replicated=(len(whole), sum(a[3] for a in whole),
                          f"{largest_whole[0]} {largest_whole[1]}" if whole else ""),
              batch_rows=rows, micro_rows=micro,
              model_flops=flops_per_token(cfg, setup.num_params) * tokens, tokens=tokens,
              stand_in=stand_in, scores_bytes=micro * heads * t * t * 4,
              block_bytes=micro * heads * math.gcd(t, BLOCK) * t * 4 if stand_in else 0,
              platform=jax.devices()[0].platform)


# --- suggestions ---------------------------------------------------------------------------

def _with(cfg: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  cfg = copy.deepcopy(cfg)
  for key, value in overrides.items():
    section, field = key.split(".")
    cfg[section][field] = value
  return cfg


def _into_fsdp(cfg: ml_collections.ConfigDict, shape: dict[str, int], axes: tuple[str, ...]) -> dict:
  """Overrides that fold mesh ``axes`` into fsdp."""
  change = {f"mesh.{a}": 1 for a in axes}
  if cfg.mesh.fsdp != -1:
    moved = any(cfg.mesh[a] == -1 for a in axes)
    change["mesh.fsdp"] = -1 if moved else shape["fsdp"] * math.prod(shape[a] for a in axes)
  return change


def _options(cfg: ml_collections.ConfigDict, devices: int) -> list[tuple[str, list[dict], bool]]:
  """Per family, cheapest family first: (family, options weakest first, whether a stronger
  option always holds less)."""
  ms, m = cfg.mesh, cfg.model
  shape = dict(zip(config_lib.MESH_AXES, config_lib.resolve_mesh_shape(cfg, devices)))
  fsdp = [_into_fsdp(cfg, shape, (a,)) for a in ("data", "tensor") if shape[a] > 1]
  if len(fsdp) == 2:
    fsdp.append(_into_fsdp(cfg, shape, ("data", "tensor")))
  remat = [{"model.remat": r} for r in REMAT_ORDER[REMAT_ORDER.index(m.remat) + 1:]]
  k = cfg.optim.grad_accum_steps
  accum = [{"optim.grad_accum_steps": k * f} for f in (2, 4, 8)
           if cfg.data.global_batch_size % (shape["data"] * shape["fsdp"] * k * f) == 0]
  tensor = []
  fill = next((a for a in config_lib.MESH_AXES if ms[a] == -1), None)
  for t in (2, 4, 8):
    if t <= shape["tensor"] or t > MAX_TENSOR or m.num_heads % t:
      continue
    change = {"mesh.tensor": t}
    if fill not in ("data", "fsdp"):  # else the -1 axis shrinks to make room
      donor = "fsdp" if shape["fsdp"] % (t // shape["tensor"]) == 0 else "data"
      change[f"mesh.{donor}"] = -1 if fill == "tensor" else shape[donor] * shape["tensor"] // t
    tensor.append(change)
  # Folding tensor into fsdp grows the activations while it shrinks the state: not monotone.
  return [("fsdp", fsdp, False), ("remat", remat, True), ("grad_accum", accum, True),
          ("tensor", tensor, True)]


def _search(cfg, devices: int, base: Measured, usable: int,
            budget: int) -> tuple[list[Candidate], Candidate | None]:
  """Single changes family by family, then combinations of each family's strongest option.
  Returns what was tried, in order of cost, and the cheapest that fits."""
  tried: list[Candidate] = []
  strongest: list[tuple[dict, Candidate]] = []

  def valid(overrides: dict) -> bool:
    try:
      config_lib.validate(_with(cfg, overrides), num_devices=devices)
      return True
    except config_lib.ConfigError:
      return False

  def attempt(overrides: dict, family: str, rank: tuple[int, int]) -> Candidate | None:
    candidate = _with(cfg, overrides)
    if len(tried) >= budget and (candidate.to_json(), devices, jax.default_backend()) not in _CACHE:
      return None
    measured = _measure(candidate, devices)
    tried.append(Candidate(overrides, family, _cost(base, measured), measured, rank))
    return tried[-1]

  fits = lambda c: c is not None and c.measured.memory.total <= usable
  done = lambda best: (sorted(tried, key=lambda c: c.rank), best)
  for i, (family, options, monotone) in enumerate(_options(cfg, devices)):
    options = [o for o in options if valid(o)]
    if not options:
      continue
    if not monotone:  # each in turn; the smallest joins the combinations
      measured = []
      for j, option in enumerate(options):
        c = attempt(option, family, (i, j))
        if fits(c):
          return done(c)
        measured += [(option, c)] if c is not None else []
      if measured:
        strongest.append(min(measured, key=lambda d: d[1].measured.memory.total))
      continue
    top = attempt(options[-1], family, (i, len(options) - 1))
    if top is None:
      continue
    strongest.append((options[-1], top))
    if fits(top):
      for j, option in enumerate(options[:-1]):
        c = attempt(option, family, (i, j))
        if fits(c):
          return done(c)
      return done(top)
  combos = [(a, b) for i, a in enumerate(strongest) for b in strongest[i + 1:]]
  if len(strongest) > 2:
    combos.append(tuple(strongest))
  for j, combo in enumerate(combos):
    overrides = {k: v for o, _ in combo for k, v in o.items()}
    c = attempt(overrides, "combination", (99, j)) if valid(overrides) else None
    if fits(c):
      return done(c)
  return done(None)


def _cost(base: Measured, m: Measured) -> str:
  flops = m.dot_flops / base.dot_flops - 1 if base.dot_flops else 0.0
  comm = m.collective_bytes - base.collective_bytes
  return (f"{flops:+.0%} matmul FLOPs, {'+' if comm >= 0 else '-'}{format_bytes(abs(comm))} "
          "collectives/device/step")


# --- the report ----------------------------------------------------------------------------

def _count(n: float) -> str:
  return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _wrap(text: str, indent: str = "    ") -> list[str]:
  return textwrap.wrap(text, width=100, initial_indent="  - ", subsequent_indent=indent)


def format_plan(p: Plan) -> str:
  """The plan as a readable report."""
  cfg, m, mem, f, acc = p.cfg, p.cfg.model, p.measured.memory, p.measured, p.accelerator
  mesh = ", ".join(f"{a} {p.mesh[a]}" for a in config_lib.MESH_AXES)
  lines = [
      f"model   {_count(p.num_params)} parameters ({m.param_dtype}, {m.compute_dtype} compute), "
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
          ("optimizer state", mem.opt_state, "exact (AdamW moments, counts)"),
          ("batch + step counters", mem.batch + mem.other_state,
           f"exact (4 x int32 ({p.batch_rows}, {cfg.data.seq_len}))"),
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
      f"  model FLOPs        {p.model_flops:9.3g}   6 x matmul parameters + 12 x l n h t attention, "
      f"x {_count(p.tokens)} tokens",
      f"  XLA matmul FLOPs   {f.dot_flops * p.devices:9.3g}   compiled HLO, {f.dot_flops:.3g}/device x "
      f"{p.devices}, loops x trip count ({f.dot_flops * p.devices / p.model_flops - 1:+.0%}: remat "
      "recompute, attention)",
      f"  XLA cost_analysis  {f.xla_flops:9.3g}   per device (of the partitioned program); counts the "
      f"layer scan's body once, not x {m.num_layers}",
      f"  collectives        {format_bytes(f.collective_bytes):>9}   sent per device (analytic: FSDP "
      "gathers and reduce-scatters, data all-reduce, tensor all-reduces)",
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
