"""lmjax benchmarks: step time and per-device memory per mesh layout, pipeline bubble.

  python tools/bench.py layouts          # every layout of one fixed model on 8 devices
  python tools/bench.py pipeline         # bubble fraction vs (S-1)/(M*R+S-1)
  python tools/bench.py checkpoint       # save/restore throughput against dd
  python tools/bench.py processes        # 1 process x 8 devices vs 2 x 4 over gloo
  python tools/bench.py --quick layouts  # fewer steps, a smaller model

On a CPU the script fakes 8 devices (XLA_FLAGS) before importing JAX. Fake CPU devices
share the machine's cores, so step times measure *total work* across devices, not
parallel speed-up: a layout that computes redundantly or idles (a pipeline bubble, which
on CPU still runs the stage on garbage) is slower by exactly that extra work. Memory
figures come from the compiled step's memory analysis and are per device.
Results are printed as Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if "jax" not in sys.modules and "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.config import default_config
from lmjax.mesh import host_to_global
from lmjax.model.pipeline import bubble_fraction
from lmjax.train import build, compile_steps, init_state

LAYOUTS = [
    ("data=8", dict(data=8), {}),
    ("fsdp=8", dict(fsdp=8), {}),
    ("tensor=8", dict(tensor=8), {}),
    ("data=2,fsdp=2,tensor=2", dict(data=2, fsdp=2, tensor=2), {}),
    ("stage=4,data=2 (M=8)", dict(stage=4, data=2), dict(pipeline_microbatches=8)),
    ("stage=2,fsdp=2,tensor=2 (M=4)", dict(stage=2, fsdp=2, tensor=2), dict(pipeline_microbatches=4)),
]


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
  """Median step time (s) and per-device memory (bytes) of the compiled train step."""
  n = 1
  for a in ("data", "stage", "fsdp", "tensor"):
    n *= max(cfg.mesh[a], 1)
  setup = build(cfg, jax.devices()[:n])
  state = init_state(setup)
  rng = np.random.default_rng(0)
  shape = (cfg.data.global_batch_size, cfg.data.seq_len)
  batch = host_to_global({
      "inputs": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
      "targets": rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int32),
      "segment_ids": np.ones(shape, np.int32),
      "positions": np.tile(np.arange(shape[1], dtype=np.int32), (shape[0], 1))},
      setup.mesh, setup.batch_sharding)
  step_fn, _ = compile_steps(setup)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return {"step_s": statistics.median(times), "compile_s": compile_s,
          "state_bytes": mem.argument_size_in_bytes, "temp_bytes": mem.temp_size_in_bytes,
          "params": setup.num_params, "loss": float(metrics["loss"])}


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
  """Measured bubble = 1 - T(no pipeline) / T(pipeline) on the same 8 devices.

  Both layouts do the same useful work per device (data=8 vs stage=S x data=8/S); the
  pipelined step additionally runs every stage during fill and drain, so on fake CPU
  devices its extra time is the bubble's work (plus the shift and bookkeeping).
  """
  ref = measure(model_config(quick, dict(data=8), {}), steps)
  print("| stages S | microbatches M | repeats R | step (s) | measured bubble | (S-1)/(M*R+S-1) |")
  print("| --- | --- | --- | --- | --- | --- |")
  for s, m, r in [(4, 4, 1), (4, 8, 1), (4, 16, 1), (2, 4, 1), (2, 4, 2), (4, 4, 2)]:
    cfg = model_config(quick, dict(stage=s, data=8 // s),
                       dict(pipeline_microbatches=m, pipeline_repeats=r))
    if cfg.data.global_batch_size % (m * (8 // s)) or cfg.model.num_layers % (s * r):
      continue
    t = measure(cfg, steps)["step_s"]
    print(f"| {s} | {m} | {r} | {t:.3f} | {1 - ref['step_s'] / t:.3f} | {bubble_fraction(s, m, r):.3f} |")
  print(f"\nReference (data=8, no pipeline): {ref['step_s']:.3f} s/step.")


def checkpoint(quick: bool) -> None:
  """Save/restore throughput of a few-hundred-MB train state against the disk (dd)."""
  import shutil
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
    def get_state(self):
      return b"{}"
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
  from lmjax.data import prepared
  from lmjax.metrics import read_metrics
  root = Path(tempfile.mkdtemp(prefix="lmjax-bench-mp-"))
  tok = data_lib.get_tokenizer(default_config().data, 1024)
  prepared.prepare(["default"], str(root / "data"), tok, seq_len=128)
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("section", choices=["layouts", "pipeline", "checkpoint", "processes", "all"], nargs="?",
                      default="all")
  parser.add_argument("--quick", action="store_true", help="smaller model, fewer steps")
  parser.add_argument("--steps", type=int, default=0, help="timed steps per layout")
  args = parser.parse_args()
  steps = args.steps or (3 if args.quick else 10)
  if args.section in ("layouts", "all"):
    layouts(args.quick, steps)
    print()
  if args.section in ("pipeline", "all"):
    pipeline(args.quick, steps)
    print()
  if args.section in ("checkpoint", "all"):
    checkpoint(args.quick)
    print()
  if args.section in ("processes", "all"):
    processes(args.quick, steps)


if __name__ == "__main__":
  main()
