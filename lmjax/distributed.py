"""Multi-process start-up: one JAX process per host, through ``jax.distributed``.

Call :func:`initialize` once, before anything touches devices. It connects the processes of
a multi-host job and does nothing for a single process. Where the coordinator (process 0's
``host:port``), the process count and this process's id come from, first match wins:

* explicit ``coordinator``/``num_processes``/``process_id`` (the CLI's ``--coordinator``,
  ``--num_processes``, ``--process_id``); what they leave out comes from the environment;
* ``LMJAX_COORDINATOR`` + ``LMJAX_NUM_PROCESSES`` + ``LMJAX_PROCESS_ID``;
* :func:`detect` on the environment, in this order (count, id; coordinator host):

  - torchrun: ``WORLD_SIZE``, ``RANK``; ``MASTER_ADDR``, port ``MASTER_PORT`` + 1;
  - Open MPI (``mpirun``): ``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_RANK``; Open MPI 4's
    launcher address in ``OMPI_MCA_orte_hnp_uri``;
  - MPICH / Intel MPI (``mpiexec``): ``PMI_SIZE``, ``PMI_RANK``;
  - SLURM (``srun``): ``SLURM_NTASKS``, ``SLURM_PROCID``; the first host of
    ``SLURM_STEP_NODELIST`` (or ``SLURM_JOB_NODELIST``), e.g. node001 of ``node[001-004]``;
  - Cloud TPU (VM or GKE): the workers in ``TPU_WORKER_HOSTNAMES`` (or
    ``TPU_PROCESS_ADDRESSES``) times ``MEGASCALE_NUM_SLICES``, ``TPU_WORKER_ID`` (or
    ``CLOUD_TPU_TASK_ID``) plus ``MEGASCALE_SLICE_ID`` x workers;
    ``MEGASCALE_COORDINATOR_ADDRESS``, else the first worker;
  - Kubernetes JobSet: ``LMJAX_NUM_PROCESSES`` over ``REPLICATED_JOB_REPLICAS`` Jobs,
    ``JOB_INDEX`` x pods per Job + ``JOB_COMPLETION_INDEX``;
    ``<JOBSET_NAME>-<REPLICATED_JOB_NAME>-0-0.<JOBSET_NAME>`` (pass the JobSet's labels in
    through the downward API);
  - Kubernetes Indexed Job: ``LMJAX_NUM_PROCESSES``, ``JOB_COMPLETION_INDEX``;
    ``LMJAX_COORDINATOR`` (pod 0 through a headless Service: ``<job>-0.<service>``).

  MPI launchers other than Open MPI 4 name no address of rank 0: processes that all share
  one host use loopback, otherwise ``LMJAX_COORDINATOR`` names rank 0's host (``mpirun -x
  LMJAX_COORDINATOR=...``). An environment describing a single process counts as none;
* on a Cloud TPU VM started without those variables, the TPU metadata server, read through
  JAX's own detection.

``LMJAX_COORDINATOR`` (``host`` or ``host:port``; also ``JAX_COORDINATOR_ADDRESS``) replaces
any detected coordinator host, ``LMJAX_COORDINATOR_PORT`` (also ``JAX_COORDINATOR_PORT``) its
port. Default ports are those of JAX's own detection: SLURM and Open MPI one of 61440-65535
derived from the job id, TPU 8482, Kubernetes 55527; otherwise 8476. A malformed environment
(a missing rank, a non-integer) is a :class:`~lmjax.config.ConfigError` naming the variable.
``python -m lmjax.distributed`` prints what this process would connect with, as JSON.

On CPU the processes talk through gloo collectives (loopback or a network). A process that
dies is noticed by the others within ``heartbeat_timeout`` seconds: they then stop with
"the JAX distributed service detected fatal errors ... another task died" instead of
waiting forever.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import os
import re
import sys
from collections.abc import Mapping

import jax

from lmjax.config import ConfigError, error_line

DEFAULT_PORT = 8476
TPU_PORT = 8482  # jax/_src/clusters/cloud_tpu_cluster.py
K8S_PORT = 55527  # jax/_src/clusters/k8s_cluster.py
_EPHEMERAL = 65536 - 4096  # SLURM and Open MPI: job id % 4096 + this, as jax/_src/clusters

_initialized = False


@dataclasses.dataclass(frozen=True)
class Cluster:
  """Where this process belongs: ``jax.distributed.initialize(coordinator, num_processes,
  process_id)``; ``kind`` names the environment it was read from."""
  kind: str
  coordinator: str
  num_processes: int
  process_id: int


# -- reading variables ------------------------------------------------------------------------

def _int(env: Mapping[str, str], name: str) -> int | None:
  """``env[name]`` as an integer; None when unset or empty."""
  value = env.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name}={env[name]!r} is not an integer") from None


def _need(env: Mapping[str, str], name: str, why: str) -> int:
  value = _int(env, name)
  if value is None:
    raise ConfigError(f"{name} is not set but {why}")
  return value


def _count(env: Mapping[str, str], name: str) -> int | None:
  """A process count: None when unset or 1 (a single process needs no coordination)."""
  n = _int(env, name)
  if n is not None and n < 1:
    raise ConfigError(f"{name}={n}: a process count is at least 1")
  return n if n and n > 1 else None


def _split(address: str, name: str) -> tuple[str, int | None]:
  """``host[:port]`` (an IPv6 host in brackets when it has a port) as (host, port)."""
  address = address.strip()
  host, sep, port = address.rpartition(":")
  if not sep or (":" in host and not host.endswith("]")):
    return address, None  # no port, or a bare IPv6 address
  if not port.isdigit():
    raise ConfigError(f"{name}={address!r}: the port after ':' is not a number")
  return host, int(port)


def _port(value: int, name: str) -> int:
  if not 0 < value < 65536:
    raise ConfigError(f"{name}={value} is not a TCP port (1-65535)")
  return value


def _cluster(env: Mapping[str, str], kind: str, host: str | None, port: int, n: int, i: int,
             count_name: str, id_name: str, hint: str = "") -> Cluster:
  """The cluster, with the coordinator overrides applied and the process id checked."""
  for name in ("LMJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"):
    if env.get(name, "").strip():
      host, given = _split(env[name], name)
      port = _port(given, name) if given is not None else port
      break
  if not host:
    raise ConfigError(f"LMJAX_COORDINATOR is not set: {hint}")
  for name in ("LMJAX_COORDINATOR_PORT", "JAX_COORDINATOR_PORT"):
    if (given := _int(env, name)) is not None:
      port = _port(given, name)
      break
  if not 0 <= i < n:
    raise ConfigError(f"{id_name}={i} is outside 0..{n - 1} ({count_name}={n})")
  if ":" in host and not host.startswith("["):
    host = f"[{host}]"
  return Cluster(kind, f"{host}:{port}", n, i)


# -- environments ------------------------------------------------------------------------------

def _lmjax(env):
  if _int(env, "LMJAX_PROCESS_ID") is None:
    return None
  n = _need(env, "LMJAX_NUM_PROCESSES", "LMJAX_PROCESS_ID is: set both (and LMJAX_COORDINATOR)")
  return _cluster(env, "lmjax", None, DEFAULT_PORT, n, _int(env, "LMJAX_PROCESS_ID"),
                  "LMJAX_NUM_PROCESSES", "LMJAX_PROCESS_ID",
                  "LMJAX_PROCESS_ID is set: name process 0's host:port there")


def _torchrun(env):
  if "MASTER_ADDR" not in env or not (n := _count(env, "WORLD_SIZE")):
    return None
  rank = _need(env, "RANK", f"WORLD_SIZE={n} and MASTER_ADDR are (torchrun sets all three)")
  port = (_int(env, "MASTER_PORT") or 29500) + 1  # torch's own store keeps MASTER_PORT
  return _cluster(env, "torchrun", env["MASTER_ADDR"], port, n, rank, "WORLD_SIZE", "RANK")


def _loopback(env, local_size: str, n: int) -> str | None:
  """127.0.0.1 when the launcher says all ``n`` processes share this host."""
  return "127.0.0.1" if _int(env, local_size) == n else None


def _openmpi(env):
  if not (n := _count(env, "OMPI_COMM_WORLD_SIZE")):
    return None
  rank = _need(env, "OMPI_COMM_WORLD_RANK", f"OMPI_COMM_WORLD_SIZE={n} is")
  host, port = _loopback(env, "OMPI_COMM_WORLD_LOCAL_SIZE", n), DEFAULT_PORT
  if uri := env.get("OMPI_MCA_orte_hnp_uri"):  # Open MPI 4: mpirun's own address and job id
    match = re.search(r"tcp://(.+?)[,:]|tcp6://\[(.+?)[,\]]", uri)
    job = uri.split(".", 1)[0]
    if not match or not job.isdigit():
      raise ConfigError(f"OMPI_MCA_orte_hnp_uri={uri!r} is not '<job id>.<vpid>;tcp://<ip>:<port>'")
    host, port = match.group(1) or match.group(2), int(job) // 4096 % 4096 + _EPHEMERAL
  return _cluster(env, "openmpi", host, port, n, rank, "OMPI_COMM_WORLD_SIZE",
                  "OMPI_COMM_WORLD_RANK",
                  "this Open MPI (5 or later) names no mpirun address and the ranks span "
                  "several hosts: mpirun -x LMJAX_COORDINATOR=<host of rank 0> ...")


def _pmi(env):
  if not (n := _count(env, "PMI_SIZE")):
    return None
  if "SLURM_STEP_NODELIST" in env and _int(env, "SLURM_NTASKS") == n:
    return None  # srun --mpi=pmi2 started these processes: SLURM describes them
  rank = _need(env, "PMI_RANK", f"PMI_SIZE={n} is")
  return _cluster(env, "mpi", _loopback(env, "MPI_LOCALNRANKS", n), DEFAULT_PORT, n, rank,
                  "PMI_SIZE", "PMI_RANK",
                  "an MPI launcher (PMI_SIZE) names no address of rank 0 and the ranks span "
                  "several hosts: mpiexec -genv LMJAX_COORDINATOR=<host of rank 0> ...")


def hostnames(nodelist: str, name: str = "SLURM_JOB_NODELIST") -> list[str]:
  """A SLURM node list written out, in order: ``gpu[01-02,07],cpu1`` -> gpu01, gpu02, gpu07,
  cpu1 (zero padding kept; several bracket groups in one name multiply)."""
  parts = re.findall(r"(?:[^,\[\]]|\[[^\[\]]*\])+", nodelist)
  if not parts or ",".join(parts) != nodelist.strip():
    raise ConfigError(f"{name}={nodelist!r} is not a SLURM node list like 'node[001-004],gpu1'")
  out = []
  for part in parts:
    pieces = re.split(r"\[([^\]]*)\]", part)  # literal, group, literal, group, ..., literal
    choices = []
    for k, piece in enumerate(pieces):
      if k % 2 == 0:
        choices.append([piece])
        continue
      items = []
      for item in piece.split(","):
        lo, _, hi = item.partition("-")
        if not lo.isdigit() or not (hi or lo).isdigit() or int(hi or lo) < int(lo):
          raise ConfigError(f"{name}={nodelist!r}: '[{piece}]' is not a list of numbers and "
                            "ranges like [001-004,007]")
        items += [str(v).zfill(len(lo)) for v in range(int(lo), int(hi or lo) + 1)]
      choices.append(items)
    out += ["".join(p) for p in itertools.product(*choices)]
  return out


def _slurm(env):
  if not (n := _count(env, "SLURM_NTASKS")):
    return None
  rank = _need(env, "SLURM_PROCID", f"SLURM_NTASKS={n} is: start lmjax with srun")
  name = next((v for v in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
               if env.get(v)), None)
  if name is None:
    raise ConfigError(f"SLURM_STEP_NODELIST is not set but SLURM_NTASKS={n} is: start lmjax "
                      "with srun")
  job = _int(env, "SLURM_JOB_ID")
  port = DEFAULT_PORT if job is None else job % 4096 + _EPHEMERAL
  return _cluster(env, "slurm", hostnames(env[name], name)[0], port, n, rank, "SLURM_NTASKS",
                  "SLURM_PROCID")


def _tpu(env):
  workers_name = next((v for v in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES") if v in env),
                      None)
  if workers_name is None:
    return None
  workers = [w.strip() for w in env[workers_name].split(",") if w.strip()]
  slices = _int(env, "MEGASCALE_NUM_SLICES") or 1
  if len(workers) * slices <= 1:
    return None
  id_name = "CLOUD_TPU_TASK_ID" if "TPU_WORKER_ID" not in env and "CLOUD_TPU_TASK_ID" in env \
      else "TPU_WORKER_ID"
  worker = _need(env, id_name, f"{workers_name} lists {len(workers)} workers")
  if not 0 <= worker < len(workers):
    raise ConfigError(f"{id_name}={worker} is outside 0..{len(workers) - 1} "
                      f"({workers_name} lists {len(workers)} workers)")
  slice_id = _int(env, "MEGASCALE_SLICE_ID") or 0
  if not 0 <= slice_id < slices:
    raise ConfigError(f"MEGASCALE_SLICE_ID={slice_id} is outside 0..{slices - 1} "
                      f"(MEGASCALE_NUM_SLICES={slices})")
  first = env.get("MEGASCALE_COORDINATOR_ADDRESS", "").strip() or workers[0]
  n = len(workers) * slices
  return _cluster(env, "tpu", _split(first, workers_name)[0], TPU_PORT, n,
                  slice_id * len(workers) + worker, "workers x slices", id_name)


def _kubernetes(env):
  if "JOB_COMPLETION_INDEX" not in env or not (n := _count(env, "LMJAX_NUM_PROCESSES")):
    return None
  index = _int(env, "JOB_COMPLETION_INDEX")
  if not env.get("JOBSET_NAME"):
    return _cluster(env, "kubernetes", None, K8S_PORT, n, index, "LMJAX_NUM_PROCESSES",
                    "JOB_COMPLETION_INDEX", "an Indexed Job's pods reach pod 0 through a "
                    "headless Service: LMJAX_COORDINATOR=<job name>-0.<service name>")
  jobset, replicas = env["JOBSET_NAME"], _int(env, "REPLICATED_JOB_REPLICAS") or 1
  if not env.get("REPLICATED_JOB_NAME"):
    raise ConfigError("REPLICATED_JOB_NAME is not set but JOBSET_NAME is: pass the "
                      "jobset.sigs.k8s.io/replicatedjob-name label through the downward API")
  if n % replicas:
    raise ConfigError(f"LMJAX_NUM_PROCESSES={n} is not a multiple of "
                      f"REPLICATED_JOB_REPLICAS={replicas}")
  per_job, job = n // replicas, _int(env, "JOB_INDEX") or 0
  if not 0 <= index < per_job:
    raise ConfigError(f"JOB_COMPLETION_INDEX={index} is outside 0..{per_job - 1} "
                      f"(LMJAX_NUM_PROCESSES={n} / REPLICATED_JOB_REPLICAS={replicas})")
  if not 0 <= job < replicas:
    raise ConfigError(f"JOB_INDEX={job} is outside 0..{replicas - 1} "
                      f"(REPLICATED_JOB_REPLICAS={replicas})")
  host = f"{jobset}-{env['REPLICATED_JOB_NAME']}-0-0.{jobset}"
  return _cluster(env, "jobset", host, K8S_PORT, n, job * per_job + index,
                  "LMJAX_NUM_PROCESSES", "JOB_COMPLETION_INDEX")


_DETECTORS = (_lmjax, _torchrun, _openmpi, _pmi, _slurm, _tpu, _kubernetes)


def detect(env: Mapping[str, str] | None = None) -> Cluster | None:
  """The multi-process job described by ``env`` (default: this process's environment), or
  None for a single process. Reads only ``env``; raises ConfigError naming a variable that
  is missing or malformed."""
  env = os.environ if env is None else env
  for find in _DETECTORS:
    if cluster := find(env):
      return cluster
  given = [v for v in ("LMJAX_COORDINATOR", "LMJAX_NUM_PROCESSES") if env.get(v, "").strip()]
  if given and (given != ["LMJAX_NUM_PROCESSES"] or _count(env, "LMJAX_NUM_PROCESSES")):
    raise ConfigError(f"{given[0]} is set but no launcher gives this process's id: set "
                      "LMJAX_COORDINATOR, LMJAX_NUM_PROCESSES and LMJAX_PROCESS_ID together")
  return None


def _tpu_metadata(env: Mapping[str, str], timeout: int) -> Cluster | None:
  """A Cloud TPU VM pod started without TPU_WORKER_HOSTNAMES: JAX's own detection asks the
  TPU metadata server for the workers."""
  if importlib.util.find_spec("libtpu") is None:
    return None
  try:
    from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster
  except ImportError:
    return None
  if not GceTpuCluster.is_env_present() or (n := GceTpuCluster.get_process_count()) <= 1:
    return None
  host = _split(GceTpuCluster.get_coordinator_address(timeout, None), "metadata")[0]
  return _cluster(env, "tpu-metadata", host, TPU_PORT, n, GceTpuCluster.get_process_id(),
                  "the TPU metadata server's worker count", "agent-worker-number")


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env: Mapping[str, str] | None = None, *,
            timeout: int = 300) -> Cluster | None:
  """What :func:`initialize` connects with: the explicit arguments, completed from the
  environment (:func:`detect`, then the TPU metadata server); None for a single process."""
  env = os.environ if env is None else env
  explicit = dict(coordinator=coordinator, num_processes=num_processes, process_id=process_id)
  if all(v is None for v in explicit.values()):
    return detect(env) or _tpu_metadata(env, timeout)
  if any(v is None for v in explicit.values()):
    found = detect(env)
    for key, value in explicit.items():
      if value is None and found is None:
        raise ConfigError(f"--{key} is missing: give --coordinator, --num_processes and "
                          "--process_id together, or start under a launcher lmjax detects")
      explicit[key] = getattr(found, key) if value is None else value
  host, port = _split(explicit["coordinator"], "--coordinator")
  port = DEFAULT_PORT if port is None else port
  return _cluster({}, "explicit", host, port, explicit["num_processes"], explicit["process_id"],
                  "--num_processes", "--process_id")


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout: int = 100,
               initialization_timeout: int = 300) -> bool:
  """Connects this process to the others; returns True if the job has several processes."""
  global _initialized
  if _initialized:
    return jax.process_count() > 1
  cluster = resolve(coordinator, num_processes, process_id, timeout=initialization_timeout)
  if cluster is None:
    return False  # a single process needs nothing
  if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not _has_accelerator_plugin():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # "deactivate": JAX's own detection neither overrides these values nor, under SLURM or
  # Open MPI, narrows each process to one local GPU (lmjax runs one process per host).
  jax.distributed.initialize(cluster.coordinator, num_processes=cluster.num_processes,
                             process_id=cluster.process_id, cluster_detection_method="deactivate",
                             heartbeat_timeout_seconds=heartbeat_timeout,
                             initialization_timeout=initialization_timeout)
  _initialized = True
  return jax.process_count() > 1


def _has_accelerator_plugin() -> bool:
  """Whether a GPU or TPU JAX plugin is installed (checked without starting a backend)."""
  return any(importlib.util.find_spec(m) is not None
             for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu"))


def is_main() -> bool:
  """Process 0 writes logs, metrics and the progress bar; every process checkpoints."""
  return jax.process_index() == 0


def main(argv: list[str] | None = None) -> None:
  """``python -m lmjax.distributed``: this process's cluster as JSON (``null``: a single
  process); ``--hostnames NODELIST``: a SLURM node list written out, one host a line."""
  argv = sys.argv[1:] if argv is None else argv
  try:
    if argv[:1] == ["--hostnames"] and len(argv) == 2:
      print("\n".join(hostnames(argv[1])))
    elif not argv:
      cluster = resolve()
      print(json.dumps(cluster and dataclasses.asdict(cluster)))
    else:
      raise ConfigError(f"unknown arguments {' '.join(argv)}: python -m lmjax.distributed "
                        "[--hostnames NODELIST]")
  except ConfigError as e:
    sys.stderr.write(error_line(e) + "\n")
    sys.exit(2)


if __name__ == "__main__":
  main()
