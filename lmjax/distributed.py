"""Multi-process start-up: one JAX process per host, through ``jax.distributed``.

Call :func:`initialize` once, before anything touches devices. It connects the processes of
a multi-host job and does nothing for a single process:

* explicit ``coordinator``/``num_processes``/``process_id`` (the CLI's ``--coordinator``,
  ``--num_processes``, ``--process_id``), or the ``LMJAX_COORDINATOR``,
  ``LMJAX_NUM_PROCESSES``, ``LMJAX_PROCESS_ID`` environment variables;
* ``torchrun``-style ``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``RANK``;
* what ``jax.distributed.initialize()`` detects itself: TPU pods (all workers), SLURM
  (``srun``) and Open MPI (``mpirun``) jobs with more than one task.

On CPU the processes talk through gloo collectives (loopback or a network). A process that
dies is noticed by the others within ``heartbeat_timeout`` seconds: they then stop with
"the JAX distributed service detected fatal errors ... another task died" instead of
waiting forever.
"""

from __future__ import annotations

import os

import jax

_initialized = False


def _from_env() -> tuple[str | None, int | None, int | None]:
  env = os.environ
  if "LMJAX_COORDINATOR" in env:
    return env["LMJAX_COORDINATOR"], int(env["LMJAX_NUM_PROCESSES"]), int(env["LMJAX_PROCESS_ID"])
  if "MASTER_ADDR" in env and "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) > 1:
    port = int(env.get("MASTER_PORT", "29500")) + 1  # torch's own store keeps MASTER_PORT
    return f"{env['MASTER_ADDR']}:{port}", int(env["WORLD_SIZE"]), int(env["RANK"])
  return None, None, None


def _cluster_detected() -> bool:
  env = os.environ
  return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
          or "TPU_WORKER_HOSTNAMES" in env and "," in env["TPU_WORKER_HOSTNAMES"]
          or "MEGASCALE_COORDINATOR_ADDRESS" in env)


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout: int = 100,
               initialization_timeout: int = 300) -> bool:
  """Connects this process to the others; returns True if the job has several processes."""
  global _initialized
  if _initialized:
    return jax.process_count() > 1
  if coordinator is None:
    coordinator, num_processes, process_id = _from_env()
  explicit = coordinator is not None
  if not explicit and not _cluster_detected():
    return False  # a single process needs nothing
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_plugin():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = dict(heartbeat_timeout_seconds=heartbeat_timeout,
                initialization_timeout=initialization_timeout)
  if explicit:
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id,
                               **kwargs)
  else:
    jax.distributed.initialize(**kwargs)
  _initialized = True
  return jax.process_count() > 1


def _has_accelerator_plugin() -> bool:
  """Whether a GPU or TPU JAX plugin is installed (checked without starting a backend)."""
  import importlib.util
  return any(importlib.util.find_spec(m) is not None
             for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def is_main() -> bool:
  """Process 0 writes logs, metrics and the progress bar; every process checkpoints."""
  return jax.process_index() == 0
