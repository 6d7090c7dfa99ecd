"""lmjax benchmarks: MFU against the measured limit, compile time, memory, mesh layouts.

  python tools/bench.py --quick          # the MFU table in under a minute (default section: mfu)
  python tools/bench.py mfu              # peak matmul FLOP/s; lmjax vs a hand-written step; MFU
  python tools/bench.py mfu --gpu        # one GPU: gpt2_small and llama_1b, bf16 and fp8, cuDNN attention
  python tools/bench.py mfu --profile DIR  # also a jax.profiler trace of a few steps per config
  python tools/bench.py loss             # chunked vs whole-logits loss: temp bytes, step time
  python tools/bench.py moe              # MoE vs dense at equal active FLOPs; dropless vs capacity; expert=8 memory
  python tools/bench.py lora             # full fine-tune vs LoRA (q,v and all): optimizer state, temporaries, step time
  python tools/bench.py compile          # compile time vs depth, scanned vs unrolled layers
  python tools/bench.py memory           # per-device bytes per mesh layout, peak host RSS
  python tools/bench.py layouts          # step time and memory of every layout on 8 devices
  python tools/bench.py pipeline         # bubble vs (S-1)/(M*R+S-1), GPipe and 1F1B; activation memory vs M
  python tools/bench.py checkpoint       # save/restore throughput against dd
  python tools/bench.py processes        # 1 process x 8 devices vs 2 x 4 over gloo
  python tools/bench.py generation       # generation-task eval: examples/s, tokens/s at batch 1, 8, 32
  python tools/bench.py all              # every section; --quick: smaller models, fewer steps

``mfu`` (the default) measures, in one process: the peak, as the median FLOP/s of a large
square matmul in each of the configs' compute dtypes (float32 and bfloat16 on CPU, where
every shape runs in both, with the bf16/fp32 ratio; bfloat16 on GPU, with fp8 rows), best
over a few sizes, measured before and after the rest (the larger counts); for a few fixed
configs, lmjax's compiled train step (tokens/s, model FLOP/s from
``lmjax.metrics.flops_per_token``, MFU = model FLOP/s / measured peak); and the same step
written by hand in plain JAX (``tools/reference_step.py``, same shapes and math, checked to
give the same loss): lmjax's framework overhead is its step time over the reference's.
On CPU it also splits each step's thread time into matmuls, layout copies and the rest
(``tools/step_profile.py``). On a GPU (found, or ``--gpu``) the XLA GPU flags that
docs/scaling.md recommends are set before JAX is imported.

The multi-device sections (layouts, pipeline, memory, checkpoint) fake 8 CPU devices
(XLA_FLAGS) before importing JAX. Fake CPU devices share the machine's cores, so step times
there measure *total work* across devices, not parallel speed-up: a layout that computes
redundantly or idles (a pipeline bubble, which on CPU still runs the stage on garbage) is
slower by exactly that extra work. Memory figures come from the compiled step's memory
analysis and are per device. Results are printed as Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # configs/ lives there

SECTIONS = ("mfu", "loss", "moe", "lora", "compile", "memory", "layouts", "pipeline", "context",
            "checkpoint", "processes", "generation", "all")
_FAKE_DEVICES = {"moe", "memory", "layouts", "pipeline", "context", "checkpoint", "all"}
# docs/scaling.md ("XLA flags that matter"), as tools/launch/slurm.sbatch sets them.
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true",
                 "--xla_gpu_enable_while_loop_double_buffering=true",
                 "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
                 "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
                 "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("section", choices=SECTIONS, nargs="?", default="mfu")
  parser.add_argument("--quick", action="store_true", help="smaller models, fewer steps")
  parser.add_argument("--steps", type=int, default=0, help="timed steps per layout / per config")
  parser.add_argument("--gpu", action="store_true", help="expect a GPU: set the XLA GPU flags, "
                      "benchmark configs/gpt2_small.py and configs/llama_1b.py")
  parser.add_argument("--batch", type=int, default=0, help="mfu on GPU: global batch of every config "
                      "(default: per config, see GPU_CONFIGS)")
  parser.add_argument("--profile", default="", metavar="DIR",
                      help="mfu: write a jax.profiler trace of a few steps per config to DIR")
  return parser.parse_args(argv)


def _gpu_visible() -> bool:
  """An NVIDIA GPU on this machine (checked before JAX is imported)."""
  return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def set_xla_flags(args: argparse.Namespace) -> None:
  """XLA_FLAGS for the run; must happen before JAX is imported."""
  flags = os.environ.get("XLA_FLAGS", "").split()
  if args.section in _FAKE_DEVICES and not any("xla_force_host_platform_device_count" in f for f in flags):
    flags.append("--xla_force_host_platform_device_count=8")
  if args.gpu or _gpu_visible():
    flags += [f for f in GPU_XLA_FLAGS if f.split("=")[0] not in " ".join(flags)]
  os.environ["XLA_FLAGS"] = " ".join(flags)


if __name__ == "__main__" and "jax" not in sys.modules:
  set_xla_flags(parse_args())

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lmjax.config import MESH_AXES, default_config  # noqa: E402
from lmjax.mesh import host_to_global  # noqa: E402
from lmjax.metrics import flops_per_token, peak_flops_per_device  # noqa: E402
from lmjax.model import lora as lora_lib  # noqa: E402
from lmjax.model.pipeline import bubble_fraction  # noqa: E402
from lmjax.state import build, init_state  # noqa: E402
from lmjax.trainer import compile_train_step  # noqa: E402
import reference_step  # noqa: E402  (a sibling: Python puts this script's directory on sys.path)
import step_profile  # noqa: E402

LAYOUTS = [
    ("data=8", dict(data=8), {}),
    ("fsdp=8", dict(fsdp=8), {}),
    ("tensor=8", dict(tensor=8), {}),
    ("data=2,fsdp=2,tensor=2", dict(data=2, fsdp=2, tensor=2), {}),
    ("stage=4,data=2 (M=8)", dict(stage=4, data=2), dict(pipeline_microbatches=8)),
    ("stage=2,fsdp=2,tensor=2 (M=4)", dict(stage=2, fsdp=2, tensor=2), dict(pipeline_microbatches=4)),
]

# mfu on CPU: name -> (model overrides, global batch, sequence length). Widths 256-512 and
# sequences 256-512 keep the step mostly matmuls while a step takes about a second.
_D256 = dict(num_layers=4, embed_dim=256, num_heads=4, num_kv_heads=2, head_dim=64, mlp_dim=768,
             vocab_size=4096)
CPU_CONFIGS = {
    "d256-l4-s256": (_D256, 8, 256),
    # ../shared/peers/run_maxtext_cpu.sh's shape (tools/bench_peer.py): a 32k vocabulary
    "d256-l4-s256-v32k-untied": (dict(_D256, num_kv_heads=4, mlp_dim=1024, vocab_size=32000,
                                      tie_embeddings=False), 8, 256),
    "d512-l4-s512-untied": (dict(num_layers=4, embed_dim=512, num_heads=8, num_kv_heads=4, head_dim=64,
                                 mlp_dim=1536, vocab_size=8192, tie_embeddings=False), 4, 512),
}
CPU_DTYPES = ("float32", "bfloat16")
DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16"}
QUICK_CPU_CONFIGS = {
    "d256-l2-s256": (dict(_D256, num_layers=2), 4, 256),
}
# mfu on one GPU: name -> (config file, global batch), with the configs' bf16 compute and
# remat and cuDNN attention. Their own batches (256 x 1024, 512 x 2048) do not fit one
# device; these should, with both train states held (llama_1b: ~30 GB of states + ~40 GB
# for a step, estimated; on an 80 GB GPU that runs out, pass --batch 4).
GPU_CONFIGS = {
    "gpt2_small": ("configs/gpt2_small.py", 32),
    "llama_1b": ("configs/llama_1b.py", 8),
}


def _devices(n: int) -> list[jax.Device]:
  """``n`` of the multi-device sections' devices: the default ones if there are 8, else the
  (fake) CPU devices, so that every layout of a table runs on the same kind."""
  pool = jax.devices() if jax.device_count() >= 8 else jax.devices("cpu")
  return pool[:n]


def _random_batch(cfg) -> dict[str, np.ndarray]:
  """One document per row, random tokens."""
  rng = np.random.default_rng(0)
  shape = (cfg.data.global_batch_size, cfg.data.seq_len)
  return {"inputs": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
          "targets": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
          "segment_ids": np.ones(shape, np.int32),
          "positions": np.tile(np.arange(shape[1], dtype=np.int32), (shape[0], 1))}


# ---------------------------------------------------------------------------------------------
# mfu

def matmul_peak(dtype, sizes: tuple[int, ...], seconds: float) -> tuple[float, dict[int, float]]:
  """FLOP/s of an (n, n) x (n, n) matmul in ``dtype`` per size n (median of 7 repeats of
  about ``seconds`` each, after a warm-up) and the best of them."""
  rates = {}
  for n in sizes:
    a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.float32).astype(dtype) for i in (0, 1))
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    calls = max(1, int(seconds / max(time.perf_counter() - t0, 1e-6)))
    times = []
    for _ in range(7):
      t0 = time.perf_counter()
      for _ in range(calls):
        out = f(a, b)
      out.block_until_ready()
      times.append((time.perf_counter() - t0) / calls)
    rates[n] = 2 * n ** 3 / statistics.median(times)
  return max(rates.values()), rates


def _config_file(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def mfu_configs(gpu: bool, quick: bool, batch: int) -> dict:
  """name -> config of the mfu section (one device, no data loading)."""
  out = {}
  if gpu:  # each config in bf16 and with fp8 projections (compared with the bf16 reference)
    for name, (path, rows) in GPU_CONFIGS.items():
      for quantization in ("none", "fp8"):
        c = _config_file(path)
        c.model.attention = "cudnn"
        c.model.quantization = quantization
        c.data.global_batch_size = batch or rows
        c.optim.grad_accum_steps = 1
        out[name + (" fp8" if quantization == "fp8" else "")] = c
  else:  # every shape in float32 and in bfloat16 (the second name ends in "bf16")
    for name, (model, rows, seq) in (QUICK_CPU_CONFIGS if quick else CPU_CONFIGS).items():
      for dtype in CPU_DTYPES:
        c = default_config()
        for k, v in model.items():
          c.model[k] = v
        c.model.max_seq_len = c.data.seq_len = seq
        c.model.compute_dtype = dtype
        c.data.global_batch_size = rows
        out[f"{name} {DTYPE_NAMES[dtype]}"] = c
  for c in out.values():
    c.mesh.fsdp = 1
  return out


def _interleaved(fns: dict, states: dict, batch, rounds: int, steps: int) -> dict[str, list[float]]:
  """Seconds per step of each ``fn(state, batch) -> (state, out)`` in each of ``rounds``
  rounds of ``steps`` back-to-back steps; the functions take turns every round, so a
  change in machine load hits all of them alike."""
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(steps):
        states[name], out = fn(states[name], batch)
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / steps)
  return times


def _run_config(name: str, cfg, device, rounds: int, per_round: int, breakdown: bool,
                profile: str) -> dict:
  """lmjax's compiled step and the reference step on ``cfg``, timed taking turns."""
  setup = build(cfg, [device])
  state = init_state(setup)
  batch = host_to_global(_random_batch(cfg), setup.mesh, setup.batch_sharding)
  ref_state = reference_step.init_from_lmjax(cfg, state["params"])
  step_fn = compile_train_step(setup)
  fns = {"lmjax": step_fn.lower(state, batch).compile(),
         "reference": reference_step.compile_step(cfg).lower(ref_state, batch).compile()}
  states = {"lmjax": state, "reference": ref_state}
  # Warm-up, and the check that both compute the same loss from the same parameters.
  states["lmjax"], metrics = fns["lmjax"](states["lmjax"], batch)
  states["reference"], ref_loss = fns["reference"](states["reference"], batch)
  r = {"name": name, "cfg": cfg, "params": setup.num_params, "loss": float(metrics["loss"]),
       "ref_loss": float(ref_loss), "tokens": cfg.data.global_batch_size * cfg.data.seq_len,
       "flops_per_token": flops_per_token(cfg, setup.num_params)}
  tol = 1e-4 if cfg.model.compute_dtype == "float32" and cfg.model.quantization == "none" else 2e-2
  if not abs(r["loss"] - r["ref_loss"]) <= tol * abs(r["loss"]):
    sys.exit(f"bench.py: {name}: lmjax's first-step loss {r['loss']} differs from the reference's "
             f"{r['ref_loss']}; the comparison would not be like for like.")
  r["times"] = _interleaved(fns, states, batch, rounds, per_round)
  if breakdown:  # thread seconds per step by kind, and lmjax's by JAX operation
    for who in fns:
      states[who], r[f"busy_{who}"], r[f"ops_{who}"] = step_profile.breakdown(fns[who], states[who], batch)
  if profile:
    with jax.profiler.trace(str(Path(profile) / name)):
      for who in fns:
        for i in range(3):
          with jax.profiler.StepTraceAnnotation(who, step_num=i):
            states[who], out = fns[who](states[who], batch)
          jax.block_until_ready(out)
  return r


def _report(r: dict, peak: float) -> tuple[str, str]:
  """The table row and the notes of one config's results."""
  m, d = r["cfg"].model, r["cfg"].data
  secs = {who: statistics.median(t) for who, t in r["times"].items()}
  best = {who: min(t) for who, t in r["times"].items()}
  tokens, fpt = r["tokens"], r["flops_per_token"]
  flops = fpt * tokens / secs["lmjax"]
  row = (f"| {r['name']} | {r['params'] / 1e6:.2f}M | {tokens} | {tokens / secs['lmjax']:.0f} | "
         f"{flops / 1e12:.4g} | {flops / peak:.1%} | {tokens / secs['reference']:.0f} | "
         f"{secs['lmjax'] / secs['reference']:.3f} |")
  note = (f"- {r['name']}: l={m.num_layers} d={m.embed_dim} n={m.num_heads} k={m.num_kv_heads} "
          f"h={m.head_dim} f={m.mlp_dim} v={m.vocab_size} {'tied' if m.tie_embeddings else 'untied'}, "
          f"batch {d.global_batch_size} x {d.seq_len}, {m.compute_dtype}, attention {m.attention}, "
          f"remat {m.remat}; {fpt / 1e6:.1f} MFLOP/token; first-step loss {r['loss']:.6f} (reference "
          f"{r['ref_loss']:.6f}); step {secs['lmjax']:.3f} s (reference {secs['reference']:.3f} s); "
          f"best round {best['lmjax']:.3f} s (reference {best['reference']:.3f} s, overhead "
          f"{best['lmjax'] / best['reference']:.3f})")
  nominal = peak_flops_per_device(r["cfg"])
  if nominal:
    note += f"; MFU vs the nominal {nominal / 1e12:.0f} TFLOP/s: {flops / nominal:.1%}"
  if "busy_lmjax" in r:
    parts = []
    for who in secs:
      busy = r[f"busy_{who}"]
      total = sum(busy.values())
      rate = fpt * tokens / (secs[who] * busy["matmul"] / total)  # if the shares were of wall time
      parts.append(f"{who} " + ", ".join(f"{k} {v / total:.0%}" for k, v in busy.items())
                   + f" (matmuls at ~{rate / 1e12:.3g} TFLOP/s = {rate / peak:.0%} of peak)")
    total = sum(r["busy_lmjax"].values())
    top = [(op, t) for (kind, op), t in r["ops_lmjax"].most_common() if kind != "matmul"][:8]
    note += ("\n  thread time: " + "; ".join(parts)
             + "\n  lmjax's costliest non-matmul operations (share of thread time): "
             + ", ".join(f"{op or '(no JAX op)'} {t / total:.1%}" for op, t in top))
  return row, note


def mfu(quick: bool, steps: int, gpu: bool, batch_rows: int, profile: str) -> None:
  backend = jax.default_backend()
  if gpu and backend != "gpu":
    sys.exit(f"bench.py: --gpu, but JAX's backend is {backend!r} (install jax[cuda12]: "
             f"pip install -e '.[cuda]').")
  configs = mfu_configs(backend == "gpu", quick, batch_rows)
  device = jax.devices()[0]
  dtypes = sorted({c.model.compute_dtype for c in configs.values()})  # bf16 on GPU, both on CPU
  sizes = (((1024,), (512, 1024, 2048)) if backend == "cpu" else ((8192,), (4096, 8192, 16384)))[not quick]
  seconds = 0.05 if quick else 0.25
  peaks = {d: matmul_peak(jnp.dtype(d), sizes, seconds) for d in dtypes}  # d -> (peak, rates)
  rounds, per_round = (8, 2) if quick else (max(5, steps // 2), 2)
  results = [_run_config(name, cfg, device, rounds, per_round, backend == "cpu" and not quick, profile)
             for name, cfg in configs.items()]

  print(f"Machine: {device.device_kind} ({device.platform}), {os.cpu_count()} CPU cores; "
        f"jax {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  for d, (peak, rates) in list(peaks.items()):
    # The peak again at the end: on a shared machine the larger one is the less disturbed.
    best_n = max(rates, key=rates.get)
    after, _ = matmul_peak(jnp.dtype(d), (best_n,), seconds)
    peaks[d] = (max(peak, after), rates)
    print(f"Measured peak: {peaks[d][0] / 1e12:.4g} TFLOP/s ({d} (n, n) x (n, n) matmul, median of "
          f"7 repeats: " + ", ".join(f"n={n}: {r / 1e12:.4g}" for n, r in rates.items())
          + f"; n={best_n} again after the configs: {after / 1e12:.4g})")
  print()
  reports = [_report(r, peaks[r["cfg"].model.compute_dtype][0]) for r in results]
  print("| config | params | tokens/step | lmjax tokens/s | model TFLOP/s | MFU vs measured peak | "
        "reference tokens/s | overhead (lmjax/reference) |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  print("\n".join(row for row, _ in reports))
  print(f"\nMedian of {rounds} rounds of {per_round} step(s), lmjax and the reference taking turns, "
        f"after one warm-up step; model FLOPs/token = 6 x matmul parameters + 12 l n h t.")
  print("\n".join(note for _, note in reports))
  by_name = {r["name"]: r for r in results}
  pairs = [(n.removesuffix(" fp32"), by_name[n], by_name[n.removesuffix("fp32") + "bf16"])
           for n in by_name if n.endswith(" fp32") and n.removesuffix("fp32") + "bf16" in by_name]
  for shape, fp32, bf16 in pairs:
    ratio = {who: statistics.median(fp32["times"][who]) / statistics.median(bf16["times"][who])
             for who in fp32["times"]}
    print(f"- {shape}: bf16 / fp32 tokens/s: lmjax {ratio['lmjax']:.2f}, reference "
          f"{ratio['reference']:.2f}; matmul peak bf16 / fp32 "
          f"{peaks['bfloat16'][0] / peaks['float32'][0]:.2f}")
  if profile:
    print(f"\nProfiler traces: {profile}/<config> (3 steps of each step function).")


# ---------------------------------------------------------------------------------------------
# compile

def compile_times(quick: bool) -> None:
  """Lower + compile time of the train step vs depth, layers scanned and unrolled."""
  jax.config.update("jax_enable_compilation_cache", False)
  print("| layers | scanned: lower + compile (s) | unrolled: lower + compile (s) |")
  print("| --- | --- | --- |")
  for layers in (2, 8) if quick else (2, 8, 32):
    cells = []
    for scan in (True, False):
      c = default_config()
      c.model.num_layers, c.model.scan_layers, c.mesh.fsdp = layers, scan, 1
      setup = build(c, jax.devices()[:1])
      batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=setup.batch_sharding)
               for k, v in _random_batch(c).items()}
      jax.clear_caches()  # nothing traced or compiled before counts
      step_fn = compile_train_step(setup)
      t0 = time.perf_counter()
      lowered = step_fn.lower(setup.abstract_state, batch)
      t1 = time.perf_counter()
      lowered.compile()
      t2 = time.perf_counter()
      cells.append(f"{t2 - t0:.2f} ({t1 - t0:.2f} + {t2 - t1:.2f})")
    print(f"| {layers} | {cells[0]} | {cells[1]} |")
  c = default_config()
  print(f"\nwidth {c.model.embed_dim}, {c.model.num_heads} heads / {c.model.num_kv_heads} KV heads, "
        f"SwiGLU {c.model.mlp_dim}, vocab {c.model.vocab_size}, batch {c.data.global_batch_size} x "
        f"{c.data.seq_len}, fp32, one device; caches cleared before each, persistent cache off.")


# ---------------------------------------------------------------------------------------------
# loss

def loss(quick: bool, steps: int) -> None:
  """The train step's temporaries (XLA's temp_size_in_bytes, one device) and step time with
  whole logits (``model.loss_chunk=0``) and chunked, for vocabularies of 32k and 128k, in
  bf16; the step times alternate, one round per chunk setting at a time."""
  vocabs, chunks = ((32000,), (0, 128)) if quick else ((32000, 128256), (0, 1024, 256))
  rows, seq = (2, 512) if quick else (2, 1024)
  print(f"Model: 2 layers, width 256, untied, bf16 compute; batch {rows} x {seq}; one device "
        f"({jax.devices()[0].device_kind}).\n")
  print("| vocab | loss_chunk | f32 logits (b, t, v) | temp bytes | step s (median) | vs whole |")
  print("| --- | --- | --- | --- | --- | --- |")
  for vocab in vocabs:
    fns, states, temp = {}, {}, {}
    for chunk in chunks:
      c = default_config()
      c.model.update(num_layers=2, embed_dim=256, num_heads=4, num_kv_heads=4, head_dim=64,
                     mlp_dim=1024, vocab_size=vocab, tie_embeddings=False, compute_dtype="bfloat16",
                     loss_chunk=chunk, max_seq_len=seq)
      c.data.seq_len, c.data.global_batch_size, c.mesh.fsdp = seq, rows, 1
      setup = build(c, jax.devices()[:1])
      states[chunk] = init_state(setup)
      batch = host_to_global(_random_batch(c), setup.mesh, setup.batch_sharding)
      fns[chunk] = compile_train_step(setup).lower(states[chunk], batch).compile()
      temp[chunk] = fns[chunk].memory_analysis().temp_size_in_bytes
      states[chunk], _ = fns[chunk](states[chunk], batch)
    times = _interleaved(fns, states, batch, rounds=max(3, steps // 2), steps=1)
    for chunk in chunks:
      secs = statistics.median(times[chunk])
      print(f"| {vocab} | {chunk or 'whole'} | {rows * seq * vocab * 4 / 2**20:.0f} MiB | "
            f"{temp[chunk] / 2**20:.0f} MiB | {secs:.3f} | "
            f"{secs / statistics.median(times[0]):.2f}x time, {temp[chunk] / temp[0]:.2f}x memory |")


# ---------------------------------------------------------------------------------------------
# moe

def moe(quick: bool, steps: int) -> None:
  """A mixture of experts (8 experts of width f/2, top-2: the dense MLP's active FLOPs)
  against the dense model, dropless and with capacity factor 1.25, step times alternating on
  one device; then per-device memory of the MoE step on 8 devices, experts split
  (expert=8) and replicated (data=8)."""
  layers, width, seq, rows = (2, 128, 128, 8) if quick else (4, 256, 256, 8)
  dense = dict(num_layers=layers, embed_dim=width, num_heads=4, num_kv_heads=2,
               head_dim=width // 4, mlp_dim=4 * width, vocab_size=4096, max_seq_len=seq)
  sparse = dict(dense, num_experts=8, experts_per_token=2, expert_mlp_dim=2 * width)
  variants = {"dense": dense, "moe dropless": sparse,
              "moe capacity 1.25": dict(sparse, capacity_factor=1.25)}

  def config(model, mesh=None):
    c = default_config()
    c.model.update(**model)
    c.data.seq_len, c.data.global_batch_size, c.mesh.fsdp = seq, rows, 1
    for k, v in (mesh or {}).items():
      c.mesh[k] = v
    return c

  fns, states, flops, params = {}, {}, {}, {}
  for name, model in variants.items():
    c = config(model)
    setup = build(c, _devices(1))
    states[name] = init_state(setup)
    batch = host_to_global(_random_batch(c), setup.mesh, setup.batch_sharding)
    fns[name] = compile_train_step(setup).lower(states[name], batch).compile()
    states[name], _ = fns[name](states[name], batch)
    flops[name], params[name] = flops_per_token(c, setup.num_params), setup.num_params
  times = _interleaved(fns, states, batch, rounds=max(3, steps // 2), steps=2)
  base = statistics.median(times["dense"])
  print(f"Model: {layers} layers, width {width}, dense MLP {4 * width} against 8 experts of "
        f"{2 * width}, top-2; batch {rows} x {seq}; fp32; one device "
        f"({_devices(1)[0].device_kind}); {len(times['dense'])} alternating rounds of 2 steps.\n")
  print("| model | parameters | model FLOPs / token | step s (median) | vs dense |")
  print("| --- | --- | --- | --- | --- |")
  for name in variants:
    secs = statistics.median(times[name])
    print(f"| {name} | {params[name] / 1e6:.2f}M | {flops[name] / 1e6:.1f}M | {secs:.3f} | "
          f"{secs / base:.2f}x |")
  print("\n| MoE on 8 devices | expert params / device (MiB) | state / device (MiB) | "
        "temp / device (MiB) |")
  print("| --- | --- | --- | --- |")
  for name, mesh in (("data=8 (experts replicated)", dict(data=8)),
                     ("expert=8", dict(expert=8))):
    c = config(sparse, mesh)
    setup = build(c, _devices(8))
    up = setup.abstract_state["params"]["blocks"]["moe"]
    expert = sum(math.prod(a.sharding.shard_shape(a.shape)) * 4 for a in up.values()
                 if a.ndim == 4)
    r = measure(c, 1)
    print(f"| {name} | {expert / 2**20:.2f} | {r['state_bytes'] / 2**20:.2f} | "
          f"{r['temp_bytes'] / 2**20:.2f} |")


# ---------------------------------------------------------------------------------------------
# lora

LORA_VARIANTS = {"full fine-tune": {}, "LoRA r=8 q,v": dict(lora_rank=8, lora_targets=("q", "v")),
                 "LoRA r=8 all": dict(lora_rank=8, lora_targets=("q", "k", "v", "o", "gate", "up", "down"))}


def lora_rows(model: dict, seq: int, rows: int, rounds: int, steps: int = 1,
              variants: dict = LORA_VARIANTS) -> dict[str, dict]:
  """Per variant of ``variants`` (model overrides on ``model``), one device: trained
  parameters, optimizer-state bytes, the compiled step's temporaries (XLA's
  temp_size_in_bytes) and its step times over ``rounds`` alternating rounds of ``steps``."""
  fns, states, out = {}, {}, {}
  for name, overrides in variants.items():
    c = default_config()
    c.model.update(**model, **overrides)
    c.data.seq_len, c.data.global_batch_size, c.mesh.fsdp = seq, rows, 1
    setup = build(c, _devices(1))
    states[name] = init_state(setup)
    batch = host_to_global(_random_batch(c), setup.mesh, setup.batch_sharding)
    fns[name] = compile_train_step(setup).lower(states[name], batch).compile()
    abstract = setup.abstract_state
    out[name] = {
        "params": setup.num_params,
        "trained": sum(x.size for x in jax.tree.leaves(lora_lib.trainable(abstract["params"]))),
        "opt_bytes": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract["opt_state"])),
        "temp_bytes": fns[name].memory_analysis().temp_size_in_bytes}
    states[name], _ = fns[name](states[name], batch)  # warm-up
  times = _interleaved(fns, states, batch, rounds=rounds, steps=steps)
  for name in variants:
    out[name]["step_s"] = statistics.median(times[name])
  return out


def lora(quick: bool, steps: int) -> None:
  """The same model fine-tuned in full and with LoRA (rank 8 on q, v; rank 8 on every
  projection), AdamW, one device: trained parameters, optimizer-state bytes, the compiled
  step's temporaries and step time, the variants taking turns each round."""
  layers, width, seq, rows = (2, 256, 256, 4) if quick else (4, 512, 512, 4)
  model = dict(num_layers=layers, embed_dim=width, num_heads=width // 64, num_kv_heads=width // 128,
               head_dim=64, mlp_dim=3 * width, vocab_size=8192, max_seq_len=seq,
               tie_embeddings=False)
  rounds = max(3, steps // 2)
  r = lora_rows(model, seq, rows, rounds, steps=2)
  full = r["full fine-tune"]
  print(f"Model: {full['params'] / 1e6:.1f}M parameters, {layers} layers, width {width}, SwiGLU "
        f"{3 * width}, vocab 8192 untied; batch {rows} x {seq}; fp32; AdamW; one device "
        f"({_devices(1)[0].device_kind}); {rounds} alternating rounds of 2 steps (median).\n")
  print("| fine-tune | trained params | optimizer state (MiB) | step temporaries (MiB) | "
        "step s | vs full |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, x in r.items():
    print(f"| {name} | {x['trained'] / 1e6:.3f}M ({x['trained'] / x['params']:.2%}) | "
          f"{x['opt_bytes'] / 2**20:.2f} | {x['temp_bytes'] / 2**20:.1f} | {x['step_s']:.3f} | "
          f"{x['step_s'] / full['step_s']:.2f}x |")


# ---------------------------------------------------------------------------------------------
# memory

def memory(quick: bool) -> None:
  """Per-device bytes of the compiled step per layout, and the process's peak host RSS."""
  cfg = model_config(quick, {}, {})
  print(f"Model: {cfg.model.num_layers} layers, width {cfg.model.embed_dim}; batch "
        f"{cfg.data.global_batch_size} x {cfg.data.seq_len}; fp32; 8 devices "
        f"({_devices(8)[0].device_kind}).\n")
  print("| layout | state + batch / device (MiB) | temp / device (MiB) | total / device (MiB) | "
        "peak host RSS after (MiB) |")
  print("| --- | --- | --- | --- | --- |")
  for name, mesh, model in [("1 device", {}, {})] + LAYOUTS:
    r = measure(model_config(quick, mesh, model), 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"| {name} | {r['state_bytes'] / 2**20:.2f} | {r['temp_bytes'] / 2**20:.2f} | "
          f"{r['total_bytes'] / 2**20:.2f} | {rss:.0f} |")
  print("\ntotal = arguments + outputs - donated (aliased) outputs + temporaries; "
        "RSS: resource.getrusage(RUSAGE_SELF).ru_maxrss, after that layout's compile and one step.")


# ---------------------------------------------------------------------------------------------
# layouts, pipeline, checkpoint, processes

def model_config(quick: bool, mesh: dict, model: dict):
  c = default_config()
  m = c.model
  m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = 1024, 8, 128, 8, 4
  m.head_dim, m.mlp_dim, m.max_seq_len = 16, 384, 128
  c.data.seq_len, c.data.global_batch_size = 128, 32
  if quick:
    m.num_layers, m.embed_dim, m.mlp_dim = 4, 64, 192
    c.data.global_batch_size = 16
  c.mesh.fsdp = 1
  for k, v in mesh.items():
    c.mesh[k] = v
  for k, v in model.items():
    m[k] = v
  return c


def measure(cfg, steps: int) -> dict:
  """Median step time (s), wall and process CPU, and per-device memory (bytes) of the
  compiled train step."""
  n = 1
  for a in MESH_AXES:
    n *= max(cfg.mesh[a], 1)
  setup = build(cfg, _devices(n))
  state = init_state(setup)
  batch = host_to_global(_random_batch(cfg), setup.mesh, setup.batch_sharding)
  step_fn = compile_train_step(setup)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times, cpu = [], []
  for _ in range(steps):
    t0, c0 = time.perf_counter(), time.process_time()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes)
  return {"step_s": statistics.median(times), "cpu_s": statistics.median(cpu), "compile_s": compile_s,
          "state_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
          "total_bytes": total, "params": setup.num_params, "loss": float(metrics["loss"])}


def layouts(quick: bool, steps: int) -> None:
  base = measure(model_config(quick, {}, {}), steps)  # one device
  cfg = model_config(quick, {}, {})
  print(f"Model: {base['params'] / 1e6:.2f}M parameters, {cfg.model.num_layers} layers, width "
        f"{cfg.model.embed_dim}; batch {cfg.data.global_batch_size} x {cfg.data.seq_len}; "
        f"{steps} timed steps (median). Devices: {jax.devices()[0].device_kind} x {jax.device_count()}.\n")
  print("| layout | step (s) | compile (s) | state / device (MiB) | state vs 1 device | temp / device (MiB) |")
  print("| --- | --- | --- | --- | --- | --- |")
  rows = [("1 device", base)] + [(name, measure(model_config(quick, mesh, model), steps))
                                 for name, mesh, model in LAYOUTS]
  for name, r in rows:
    print(f"| {name} | {r['step_s']:.3f} | {r['compile_s']:.1f} | {r['state_bytes'] / 2**20:.2f} | "
          f"{r['state_bytes'] / base['state_bytes']:.3f} | {r['temp_bytes'] / 2**20:.2f} |")


def pipeline(quick: bool, steps: int) -> None:
  """Measured bubble = 1 - T(no pipeline) / T(pipeline) on the same 8 devices, per schedule,
  and the compiled step's activation memory as the microbatches grow.

  Both layouts do the same useful work per device (data=8 vs stage=S x data=8/S); the
  pipelined step additionally runs every stage during fill and drain, so on fake CPU
  devices its extra time is the bubble's work (plus the shift and bookkeeping). 1F1B
  recomputes each stage's forward in its backward, so its reference is data=8 with
  ``model.remat = "full"`` (the same recomputation, no pipeline). The bubble is measured in
  process CPU time per step (the work of all 8 fake devices), which other jobs on a shared
  machine disturb far less than wall time.
  """
  load = [os.getloadavg()[0]]  # other jobs on a shared machine slow every figure
  ref = measure(model_config(quick, dict(data=8), {}), steps)
  ref_remat = measure(model_config(quick, dict(data=8), dict(remat="full")), steps)
  print("| schedule | stages S | microbatches M | repeats R | step (s) | CPU s / step | "
        "temp / device (MiB) | measured bubble (CPU) | (S-1)/(M*R+S-1) |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for schedule in ("gpipe", "1f1b"):
    base = ref if schedule == "gpipe" else ref_remat
    for s, m, r in [(4, 4, 1), (4, 8, 1), (4, 16, 1), (2, 4, 1), (2, 4, 2), (4, 4, 2)]:
      cfg = model_config(quick, dict(stage=s, data=8 // s),
                         dict(pipeline_microbatches=m, pipeline_repeats=r, pipeline_schedule=schedule))
      if cfg.data.global_batch_size % (m * (8 // s)) or cfg.model.num_layers % (s * r):
        continue
      got = measure(cfg, steps)
      load.append(os.getloadavg()[0])
      print(f"| {schedule} | {s} | {m} | {r} | {got['step_s']:.3f} | {got['cpu_s']:.3f} | "
            f"{got['temp_bytes'] / 2**20:.2f} | {1 - base['cpu_s'] / got['cpu_s']:.3f} | "
            f"{bubble_fraction(s, m, r):.3f} |")
  print(f"\nReferences (data=8, no pipeline): {ref['step_s']:.3f} s/step, {ref['cpu_s']:.3f} CPU s; "
        f"with remat='full' (1F1B's): {ref_remat['step_s']:.3f} s/step, {ref_remat['cpu_s']:.3f} "
        f"CPU s (medians of {steps} steps). "
        f"1-minute load average while measuring: {min(load):.1f} to {max(load):.1f} "
        f"({os.cpu_count()} CPUs).\n")
  pipeline_memory(quick)


def pipeline_memory(quick: bool) -> None:
  """Compiled temp bytes per device of the train step on stage=4 x data=2 (interleaved:
  stage=2 x data=4, R=2) as the microbatches grow, each microbatch 2 rows per device (the
  batch grows with M): GPipe keeps every iteration's activations, 1F1B a fixed buffer."""
  rows = {}
  kinds = [("gpipe", 4, 1, "none"), ("gpipe", 4, 1, "full"), ("1f1b", 4, 1, "none"),
           ("1f1b", 2, 2, "none")]
  counts = (4, 8, 16) if quick else (4, 8, 16, 32)
  for schedule, s, r, remat in kinds:
    for m in counts:
      cfg = model_config(quick, dict(stage=s, data=8 // s),
                         dict(pipeline_microbatches=m, pipeline_repeats=r, remat=remat,
                              pipeline_schedule=schedule))
      cfg.data.global_batch_size = 2 * (8 // s) * m
      setup = build(cfg, _devices(8))
      state = setup.abstract_state
      batch = {k: jax.ShapeDtypeStruct((cfg.data.global_batch_size, cfg.data.seq_len), jnp.int32,
                                       sharding=setup.batch_sharding)
               for k in ("inputs", "targets", "segment_ids", "positions")}
      compiled = compile_train_step(setup).lower(state, batch).compile()
      rows.setdefault((schedule, s, r, remat), []).append(compiled.memory_analysis().temp_size_in_bytes)
  print("| schedule | S | R | remat | " + " | ".join(f"M={m}" for m in counts) + f" | M={counts[-1]} / M={counts[0]} |")
  print("| --- | --- | --- | --- |" + " --- |" * (len(counts) + 1))
  for (schedule, s, r, remat), temps in rows.items():
    print(f"| {schedule} | {s} | {r} | {remat} | " + " | ".join(f"{t / 2**20:.2f}" for t in temps)
          + f" | {temps[-1] / temps[0]:.2f} |")
  print("\nTemp MiB per device of the compiled train step; microbatches of 2 rows per device.")


def _context_config(c: int, seq: int, kind: str):
  """A 2-layer model (width 256, 8 heads, 4 KV heads) on one sequence of ``seq`` tokens split
  over ``c`` context devices, remat off: the activations grow with the sequence."""
  cfg = model_config(False, dict(context=c), dict(context_attention=kind, remat="none"))
  m = cfg.model
  m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 2, 256, 8, 4, 32, 768
  m.max_seq_len = cfg.data.seq_len = seq
  cfg.data.global_batch_size = 1
  return cfg


def _compiled_bytes(cfg) -> int:
  """Per-device bytes (arguments + outputs - donated + temporaries) of the compiled step."""
  setup = build(cfg, _devices(cfg.mesh.context))
  batch = {k: jax.ShapeDtypeStruct((1, cfg.data.seq_len), np.int32, sharding=setup.batch_sharding)
           for k in ("inputs", "targets", "segment_ids", "positions")}
  mem = compile_train_step(setup).lower(setup.abstract_state, batch).compile().memory_analysis()
  return (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
          + mem.temp_size_in_bytes)


def context(quick: bool, steps: int, budget_mib: float = 512.0) -> None:
  """The longest sequence (a power of 2) whose compiled step fits ``budget_mib`` per device
  with the sequence over 1, 2, 4, 8 context devices, ring and all-gather attention; then the
  step time of each at one length."""
  budget = budget_mib * 2**20
  print(f"Model: 2 layers, width 256, 8 heads (4 KV), batch 1, fp32, XLA attention, no remat; "
        f"budget {budget_mib:.0f} MiB per device (compiled step). Devices: "
        f"{jax.devices()[0].device_kind} x {jax.device_count()}.\n")
  print("| context C | attention | longest sequence that fits | its bytes / device (MiB) |")
  print("| --- | --- | --- | --- |")
  for c in (1, 2, 4, 8):
    for kind in (("ring",) if c == 1 else ("ring", "allgather")):
      seq, used = 0, 0
      for length in (2 ** p for p in range(10, 16 if quick else 18)):
        b = _compiled_bytes(_context_config(c, length, kind))
        if b > budget:
          break
        seq, used = length, b
      print(f"| {c} | {kind if c > 1 else 'one device'} | {seq:,} | {used / 2**20:.1f} |")
  length = 2048 if quick else 4096
  print(f"\nStep time at {length:,} tokens ({steps} timed steps, median):\n")
  print("| context C | attention | step (s) | vs one device |")
  print("| --- | --- | --- | --- |")
  base = measure(_context_config(1, length, "ring"), steps)["step_s"]
  print(f"| 1 | one device | {base:.3f} | 1.00 |")
  for c in (2, 4, 8):
    for kind in ("ring", "allgather"):
      t = measure(_context_config(c, length, kind), steps)["step_s"]
      print(f"| {c} | {kind} | {t:.3f} | {t / base:.2f} |")


def checkpoint(quick: bool) -> None:
  """Save/restore throughput of a few-hundred-MB train state against the disk (dd)."""
  import subprocess
  import tempfile
  from lmjax.checkpoint import Checkpointer

  c = default_config()
  m = c.model
  m.vocab_size, m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads = 8192, 8, 512, 8, 4
  m.head_dim, m.mlp_dim = 64, 1536
  if quick:
    m.num_layers = 2
  c.mesh.fsdp = -1
  c.train.async_checkpointing = True
  setup = build(c)
  # Fresh Adam moments are zeros, which compress to nothing; fill every array with
  # incompressible values so the disk sees the whole state.
  noise = lambda k, x: jax.random.normal(k, x.shape, x.dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  fill = jax.jit(lambda s: jax.tree.map(noise, list(jax.random.split(jax.random.key(0), len(jax.tree.leaves(s)))),
                                        jax.tree.leaves(s)), out_shardings=jax.tree.leaves(setup.state_shardings))
  state = jax.tree.unflatten(jax.tree.structure(setup.abstract_state), fill(init_state(setup)))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  root = Path(tempfile.mkdtemp(prefix="lmjax-bench-ckpt-", dir=os.environ.get("BENCH_DIR", "/tmp")))

  class _NoData:
    def get_state(self):  # JSON state, as the data iterators' (lmjax.checkpoint.DataHandler)
      return {}
    def set_state(self, state):
      pass
    def start_prefetch(self):
      pass

  try:
    ckpt = Checkpointer(root / "ckpt", c)
    t0 = time.perf_counter()
    blocked = ckpt.save(1, state, _NoData(), c)
    ckpt.manager.wait_until_finished()
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt.wait()  # writes the SHA-256 manifest
    manifest = time.perf_counter() - t0
    os.sync()
    t0 = time.perf_counter()
    restored = ckpt.restore(1, setup.abstract_state)
    jax.block_until_ready(restored)
    read = time.perf_counter() - t0
    ckpt.close()
    mib = nbytes / 2**20
    on_disk = sum(p.stat().st_size for p in (root / "ckpt").rglob("*") if p.is_file()) / 2**20
    dd_w = subprocess.run(["dd", "if=/dev/zero", f"of={root / 'dd'}", "bs=4M", f"count={int(mib // 4)}",
                           "conv=fdatasync"], capture_output=True, text=True).stderr.strip().splitlines()[-1]
    dd_r = subprocess.run(["dd", f"if={root / 'dd'}", "of=/dev/null", "bs=4M"],
                          capture_output=True, text=True).stderr.strip().splitlines()[-1]
    print(f"Train state: {mib:.0f} MiB ({setup.num_params / 1e6:.1f}M parameters, fp32 params + "
          f"Adam moments; {on_disk:.0f} MiB on disk) on {jax.device_count()} devices, fsdp.\n")
    print("| what | seconds | MiB/s |")
    print("| --- | --- | --- |")
    print(f"| save: training blocked (device->host copy, start) | {blocked:.3f} | |")
    print(f"| save: until committed (background write) | {written:.3f} | {mib / written:.0f} |")
    print(f"| manifest (SHA-256 of every file) | {manifest:.3f} | {mib / manifest:.0f} |")
    print(f"| restore (sharded, onto the same mesh) | {read:.3f} | {mib / read:.0f} |")
    print(f"\ndd write (fdatasync): {dd_w}\ndd read (page cache may be warm): {dd_r}")
  finally:
    shutil.rmtree(root, ignore_errors=True)


def processes(quick: bool, steps: int) -> None:
  """The same model and global mesh (data=2, fsdp=4) as 1 process x 8 devices and as 2
  processes x 4 devices over loopback gloo: the cost of crossing processes."""
  import socket
  import subprocess
  import tempfile
  from lmjax import data as data_lib
  from lmjax.metrics import read_metrics
  root = Path(tempfile.mkdtemp(prefix="lmjax-bench-mp-"))
  tok = data_lib.get_tokenizer(default_config().data, 1024)
  data_lib.prepare(["default"], str(root / "data"), tok, seq_len=128)
  n_steps = 10 if quick else 40
  args = ["--config", "configs/tiny.py", f"--config.data.source={root / 'data'}",
          "--config.mesh.data=2", "--config.mesh.fsdp=4", f"--config.train.steps={n_steps}",
          "--config.train.log_every=5", "--config.train.eval_every=0",
          "--config.train.checkpoint_every=0", "--config.train.progress_bar=False"]
  print("| processes x devices | median tokens/s | median step (s) |")
  print("| --- | --- | --- |")
  for n in (1, 2):
    with socket.socket() as sock:
      sock.bind(("127.0.0.1", 0))
      port = sock.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // n}"}
    workdir = root / f"run{n}"
    dist = lambda i: [] if n == 1 else [f"--coordinator=127.0.0.1:{port}", f"--num_processes={n}",
                                         f"--process_id={i}"]
    procs = [subprocess.Popen([sys.executable, "-m", "lmjax.cli", "train", *args, "--workdir",
                               str(workdir), *dist(i)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for i in range(n)]
    for p in procs:
      p.wait()
    rates = [r["tokens_per_sec"] for r in read_metrics(workdir)[1:] if "tokens_per_sec" in r]
    tps = statistics.median(rates)
    print(f"| {n} x {8 // n} | {tps:.0f} | {16 * 128 / tps:.3f} |")


# ---------------------------------------------------------------------------------------------
# generation

def generation_rows(cfg, batch_sizes: tuple[int, ...], examples: int, max_new_tokens: int) -> list[dict]:
  """Throughput of ``lmjax.generation_eval.generate_texts`` (greedy, KV cache) on one device:
  the same ``examples`` sources (lines of the default corpus, 40 characters) at each batch
  size, timed on a second pass after a first one compiled every prompt length."""
  from lmjax import data as data_lib
  from lmjax.generation_eval import generate_texts
  setup = build(cfg, jax.devices()[:1])
  params = init_state(setup)["params"]
  tok = data_lib.get_tokenizer(cfg.data, cfg.model.vocab_size)
  lines = [l.strip() for d in data_lib.default_documents() for l in d.splitlines() if len(l.strip()) >= 40]
  sources = [l[:40] for l in lines[:examples]]
  rows = []
  for b in batch_sizes:
    kwargs = dict(max_new_tokens=max_new_tokens, batch_size=b)
    generate_texts(setup, params, tok, sources, **kwargs)  # compiles
    _, timing = generate_texts(setup, params, tok, sources, **kwargs)
    rows.append({"batch": b, **timing})
  return rows


def generation(quick: bool) -> None:
  """Generation-task evaluation throughput (``lmjax eval --generation``) of the default tiny
  model (random weights) at batch sizes 1, 8 and 32."""
  examples, new = (32, 16) if quick else (64, 32)
  cfg = default_config()
  cfg.mesh.fsdp = 1
  rows = generation_rows(cfg, (1, 8, 32), examples, new)
  m = cfg.model
  print(f"Model: {m.num_layers} layers, width {m.embed_dim}, vocab {m.vocab_size}, fp32, random "
        f"weights; {examples} sources of 40 characters, greedy, {new} new tokens each (eos "
        f"ends a row sooner); one {jax.devices()[0].device_kind} device, second pass (compiled).\n")
  print("| batch | seconds | examples/s | generated tokens | tokens/s |")
  print("| --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['batch']} | {r['seconds']:.2f} | {r['examples_per_sec']:.1f} | "
          f"{r['generated_tokens']} | {r['tokens_per_sec']:.0f} |")


def main() -> None:
  args = parse_args()
  quick, section = args.quick, args.section
  steps = args.steps or (3 if quick else 10)
  sections = {
      "mfu": lambda: mfu(quick, steps, args.gpu, args.batch, args.profile),
      "loss": lambda: loss(quick, steps),
      "moe": lambda: moe(quick, steps),
      "lora": lambda: lora(quick, steps),
      "compile": lambda: compile_times(quick),
      "memory": lambda: memory(quick),
      "layouts": lambda: layouts(quick, steps),
      "pipeline": lambda: pipeline(quick, steps),
      "context": lambda: context(quick, steps),
      "checkpoint": lambda: checkpoint(quick),
      "processes": lambda: processes(quick, steps),
      "generation": lambda: generation(quick),
  }
  for name, fn in sections.items():
    if section in (name, "all"):
      fn()
      print()


if __name__ == "__main__":
  main()
