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

The records (:class:`Plan`, :class:`Measured`, the accelerator table) and :func:`format_plan`
live in :mod:`lmjax.plan_report` and are reachable from here.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from lmjax import config as config_lib
from lmjax import config_file, cpu_compile
from lmjax.metrics import flops_per_token
from lmjax.model.attention import check_backend
from lmjax.model.config import ModelConfig
from lmjax.model.kernels import BLOCK
from lmjax.plan_report import (ACCELERATORS, GiB, JAX_GPU_PREALLOCATE, Accelerator, Candidate,
                               Measured, Memory, Plan, format_bytes, format_plan)
from lmjax.state import build
from lmjax.trainer import compile_train_step

__all__ = ["ACCELERATORS", "Accelerator", "Candidate", "DEFAULT_MEMORY_FRACTION", "DEFAULT_MFU",
           "GiB", "JAX_GPU_PREALLOCATE", "MAX_COMPILES", "Measured", "Memory", "Plan",
           "format_bytes", "format_plan", "needs_stand_in", "plan"]

DEFAULT_MFU = 0.4  # what well-tuned dense LLM training reaches on H100s and TPUs
DEFAULT_MEMORY_FRACTION = 0.9  # plan against 90%: fragmentation and runtime buffers need the rest
REMAT_ORDER = ("none", "dots", "dots_no_batch", "full")  # weakest (most memory) to strongest
MAX_COMPILES = 8  # compiles spent on suggestions, beyond the plan itself
MAX_TENSOR = 8  # tensor parallelism stays inside one NVLink node / ICI neighbourhood


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
  memory = acc.memory_bytes if memory_bytes is None else config_file.parse_size(memory_bytes)
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


def _measure(cfg: ml_collections.ConfigDict, devices: int) -> Measured:
  """What compiling ``cfg``'s train step for ``devices`` devices tells; each config is compiled
  once per process and backend (re-planning compiles nothing)."""
  return _measure_saved(cfg.to_json(), devices, jax.default_backend())


@functools.lru_cache(maxsize=None)
def _measure_saved(cfg_json: str, devices: int, backend: str) -> Measured:
  del backend  # a key only: the compile is for the backend of the moment
  cfg = config_lib.from_saved(json.loads(cfg_json))
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
  return Measured(memory=memory, xla_flops=float(cost.get("flops", 0.0)),
                  dot_flops=cpu_compile.hlo_matmul_flops(compiled.as_text()),
                  collective_bytes=_collective_bytes(setup), compile_s=seconds)


def _device_bytes(tree: Any) -> int:
  """Bytes one device holds of ``tree``'s arrays (ShapeDtypeStructs with shardings)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _micro_rows(setup) -> tuple[int, int]:
  """Rows per device of the step's batch and of one microbatch (inside a pipeline stage)."""
  cfg, m, shape = setup.cfg, setup.cfg.model, setup.mesh.shape
  rows = setup.batch_sharding.shard_shape((cfg.data.global_batch_size, cfg.data.seq_len))[0]
  micro = cfg.data.global_batch_size // cfg.optim.grad_accum_steps // (shape["data"] * shape["fsdp"] * shape["expert"])
  if shape["stage"] > 1:
    micro //= m.pipeline_microbatches if m.pipeline_microbatches > 0 else shape["stage"]
  return rows, max(micro, 1)


def _collective_bytes(setup) -> float:
  """Bytes a device sends per step, by ring collectives (about 2(s-1)/s of an all-reduced
  buffer, (s-1)/s of a gathered or reduce-scattered one, over an axis of size s): FSDP weight
  all-gathers (forward and backward) and gradient reduce-scatters, the gradient all-reduce
  over ``data``, all once per microbatch, and four (b, t, d) activation all-reduces per layer and
  microbatch over ``tensor`` (six under full remat), MoE token exchanges
  (:func:`_all_to_all_bytes`), and with context parallelism every other context device's
  keys and values per layer (forward; about twice that backward, with their gradients).
  Weights are stored split over ``fsdp`` x ``context``. An estimate for comparing layouts."""
  cfg, m = setup.cfg, setup.cfg.model
  shape = setup.mesh.shape
  d, t, ep, c = shape["data"], shape["tensor"], shape["expert"], shape["context"]
  f = shape["fsdp"] * c  # the weights' storage split
  k = cfg.optim.grad_accum_steps
  size = jnp.dtype(m.param_dtype).itemsize / t  # bytes per parameter of a tensor shard
  # Routed experts are split over the expert axis; everything else is replicated on it, so
  # its gradients are all-reduced over data x expert.
  experts = _expert_params(m) * size / ep
  rest = (setup.num_params - _expert_params(m)) * size
  fsdp = 3 * k * (rest + experts) * (f - 1) / f
  data = 2 * k * (rest / f * (d * ep - 1) / (d * ep) + experts / f * (d - 1) / d)
  rows = _micro_rows(setup)[1]
  tokens = rows * cfg.data.seq_len // c  # a device's positions
  itemsize = jnp.dtype(m.compute_dtype).itemsize
  act = tokens * m.embed_dim * itemsize
  tensor = k * m.num_layers * (6 if m.remat == "full" else 4) * act * 2 * (t - 1) / t
  kv = 2 * tokens * m.num_kv_heads * m.head_dim * itemsize  # a device's keys and values
  context = k * m.num_layers * 3 * kv * (c - 1)
  return fsdp + data + tensor + context + k * _all_to_all_bytes(m, shape, rows, cfg.data.seq_len)


def _expert_params(m) -> int:
  """Parameters of all routed experts (0 for a dense model)."""
  if not m.num_experts:
    return 0
  moe_layers = len(ModelConfig.from_config(m).moe_layers)
  return moe_layers * m.num_experts * (3 if m.mlp == "swiglu" else 2) * m.embed_dim * (
      m.expert_mlp_dim or m.mlp_dim)


def _all_to_all_bytes(m, shape, rows: int, t: int) -> float:
  """Bytes a device sends per microbatch in MoE token exchanges: four all-to-alls per MoE
  layer (to the experts and back, forward and backward) of its fixed-size buffers, of which
  (ep - 1) / ep leave the device: dropless, rows x t x k token rows per destination;
  with a capacity, E x rows x capacity rows in all (lmjax.model.moe)."""
  ep = shape["expert"]
  if not m.num_experts or ep == 1:
    return 0.0
  k, e = m.experts_per_token, m.num_experts
  if m.capacity_factor > 0:
    buffer = e * rows * max(1, math.ceil(m.capacity_factor * t * k / e))
  else:
    buffer = ep * rows * t * k
  row = m.embed_dim * jnp.dtype(m.compute_dtype).itemsize
  return 4 * len(ModelConfig.from_config(m).moe_layers) * buffer * row * (ep - 1) / ep


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
              logits_bytes=micro * t * math.ceil(m.vocab_size / tensor) * 4,
              loss_chunk_bytes=micro * min(m.loss_chunk, t) * math.ceil(m.vocab_size / tensor) * 4,
              platform=jax.devices()[0].platform)


# --- suggestions ---------------------------------------------------------------------------

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
           if cfg.data.global_batch_size % (shape["data"] * shape["fsdp"] * shape["expert"] * k * f) == 0]
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
  compiled_before = _measure_saved.cache_info().misses

  def valid(overrides: dict) -> bool:
    try:
      config_lib.validate(config_lib.with_overrides(cfg, overrides), num_devices=devices)
      return True
    except config_lib.ConfigError:
      return False

  def attempt(overrides: dict, family: str, rank: tuple[int, int]) -> Candidate | None:
    if _measure_saved.cache_info().misses - compiled_before >= budget:
      return None  # the budget is spent; configs compiled earlier in the process were free
    measured = _measure(config_lib.with_overrides(cfg, overrides), devices)
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
