"""lmjax against MaxText on one shape on CPU: tokens/s of each, taking turns, per dtype.

  python tools/bench_peer.py                       # fp32 and bf16, 3 rounds, lmjax defaults
  python tools/bench_peer.py --dtypes bfloat16 --lmjax-remat none,full --rounds 5

The shape is ``../shared/peers/run_maxtext_cpu.sh``'s (a Llama block: d=256, 4 layers, 4
heads and 4 key/value heads of 64, SwiGLU 1024, vocabulary 32000 untied, sequence 256,
global batch 8, one CPU device, synthetic data). MaxText runs as that script does (its
defaults: remat full, dot-product attention, fp32 weights; ``DTYPE`` sets the compute dtype)
in its own virtualenv (``../shared/peers/install_maxtext.sh``, under ``--peer-dir``), and
reports the median step after its warm-up; lmjax's compiled train step runs in this process
on random tokens of the same shape, timed the same way (median of ``--steps`` steps after
a warm-up). Each round runs MaxText, then lmjax, for every dtype: a change in machine load
hits both alike. The medians over rounds and their ratio are printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lmjax.config import default_config
from lmjax.mesh import host_to_global
from lmjax.state import build, init_state
from lmjax.trainer import compile_train_step

ROOT = Path(__file__).resolve().parents[1]
BATCH, SEQ, VOCAB = 8, 256, 32000


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--peer-dir", default=os.environ.get("PEER_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "peer")),
                 help="where install_maxtext.sh put the MaxText virtualenv (mt12/)")
  p.add_argument("--peer-script", default=str(ROOT.parent / "shared" / "peers" / "run_maxtext_cpu.sh"))
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--lmjax-remat", default="", help="comma-separated remat policies for lmjax "
                 "(default: the config default)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=30, help="steps per run (the first 5 are warm-up)")
  return p.parse_args(argv)


def config(dtype: str, remat: str = ""):
  c = default_config()
  m = c.model
  m.num_layers, m.embed_dim, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 4, 256, 4, 4, 64, 1024
  m.vocab_size, m.tie_embeddings, m.compute_dtype = VOCAB, False, dtype
  if remat:
    m.remat = remat
  m.max_seq_len = c.data.seq_len = SEQ
  c.data.global_batch_size = BATCH
  c.mesh.fsdp = 1
  return c


class Lmjax:
  """lmjax's compiled train step on the shape, ready to time."""

  def __init__(self, dtype: str, remat: str):
    self.cfg = config(dtype, remat)
    setup = build(self.cfg, jax.devices()[:1])
    self.state = init_state(setup)
    rng = np.random.default_rng(0)
    host = {k: rng.integers(0, VOCAB, (BATCH, SEQ), dtype=np.int32) for k in ("inputs", "targets")}
    host["segment_ids"] = np.ones((BATCH, SEQ), np.int32)
    host["positions"] = np.tile(np.arange(SEQ, dtype=np.int32), (BATCH, 1))
    self.batch = host_to_global(host, setup.mesh, setup.batch_sharding)
    self.step = compile_train_step(setup).lower(self.state, self.batch).compile()

  def tokens_per_s(self, steps: int, warmup: int = 5) -> float:
    times = []
    for i in range(steps):
      t0 = time.perf_counter()
      self.state, metrics = self.step(self.state, self.batch)
      jax.block_until_ready(metrics)
      if i >= warmup:
        times.append(time.perf_counter() - t0)
    return BATCH * SEQ / statistics.median(times)


def maxtext_tokens_per_s(args, dtype: str) -> float:
  env = dict(os.environ, DTYPE=dtype, STEPS=str(args.steps), VENV=str(Path(args.peer_dir) / "mt12"),
             OUT=str(Path(args.peer_dir) / "out"))
  env.pop("XLA_FLAGS", None)
  out = subprocess.run(["bash", args.peer_script], env=env, capture_output=True, text=True)
  found = re.search(r"maxtext tokens_per_s=([\d.]+)", out.stdout)
  if out.returncode or not found:
    sys.exit(f"bench_peer.py: the MaxText run failed (exit {out.returncode}); install it with "
             f"PEER_DIR={args.peer_dir} bash ../shared/peers/install_maxtext.sh.\n{out.stdout[-2000:]}")
  return float(found.group(1))


def main() -> None:
  args = parse_args()
  if not Path(args.peer_dir, "mt12", "bin", "python").exists():
    sys.exit(f"bench_peer.py: no MaxText virtualenv in {args.peer_dir}/mt12; run "
             f"PEER_DIR={args.peer_dir} bash ../shared/peers/install_maxtext.sh first.")
  dtypes = args.dtypes.split(",")
  remats = args.lmjax_remat.split(",") if args.lmjax_remat else [default_config().model.remat]
  runs = {(d, r): Lmjax(d, r) for d in dtypes for r in remats}
  results: dict = {}
  for i in range(args.rounds):
    for d in dtypes:
      results.setdefault(("maxtext", d), []).append(maxtext_tokens_per_s(args, d))
      for r in remats:
        results.setdefault((f"lmjax remat={r}", d), []).append(runs[d, r].tokens_per_s(args.steps))
      print(f"round {i + 1} {d}: " + ", ".join(f"{who} {v[-1]:.0f}" for (who, dd), v in results.items()
                                               if dd == d), flush=True)
  dev = jax.devices()[0]
  print(f"\nMachine: {dev.device_kind}, {os.cpu_count()} CPU cores; jax {jax.__version__}; "
        f"{args.rounds} rounds, {args.steps} steps per run (median step after 5 warm-up steps).\n")
  print("| program | dtype | tokens/s (median of rounds) | rounds | vs MaxText same dtype |")
  print("| --- | --- | --- | --- | --- |")
  for (who, d), v in results.items():
    mt = statistics.median(results["maxtext", d])
    print(f"| {who} | {d} | {statistics.median(v):,.0f} | {', '.join(f'{x:.0f}' for x in v)} | "
          f"{statistics.median(v) / mt:.2f}x |")
  if len(dtypes) == 2:
    print("\nbf16 / fp32: " + ", ".join(
        f"{who} {statistics.median(results[who, dtypes[1]]) / statistics.median(results[who, dtypes[0]]):.2f}"
        for who in dict.fromkeys(w for w, _ in results)))


if __name__ == "__main__":
  main()
