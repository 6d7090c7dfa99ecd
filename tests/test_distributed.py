"""Where a process belongs in a multi-host job: lmjax.distributed.detect on each launcher's
environment (the same answer as JAX's own cluster detection where JAX reads the environment),
the start-up in real subprocesses with those variables, a real 2-process connection from a
SLURM-style environment, and the launchers' dry runs (each host's command and environment)."""

import importlib.util
import json
import os
import random
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmjax import distributed
from lmjax.config import ConfigError
from lmjax.distributed import Cluster, detect, hostnames, resolve

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "tools" / "launch"

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0",
         "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_JOB_NODELIST": "node[001-004]"}
OPENMPI = {"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
           "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}
TPU = {"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3", "TPU_WORKER_ID": "1"}
MULTISLICE = {**TPU, "MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1",
              "MEGASCALE_COORDINATOR_ADDRESS": "localhost"}

# (kind, environment, expected coordinator, processes, process id)
KINDS = [
    ("lmjax", {"LMJAX_COORDINATOR": "h0:1234", "LMJAX_NUM_PROCESSES": "3",
               "LMJAX_PROCESS_ID": "2"}, "h0:1234", 3, 2),
    ("torchrun", {"MASTER_ADDR": "m0", "MASTER_PORT": "29400", "WORLD_SIZE": "4", "RANK": "3"},
     "m0:29401", 4, 3),
    ("openmpi", OPENMPI, f"10.96.0.1:{1531576320 // 4096 % 4096 + 61440}", 8, 5),
    ("mpi", {"PMI_SIZE": "4", "PMI_RANK": "1", "MPI_LOCALNRANKS": "4"}, "127.0.0.1:8476", 4, 1),
    ("slurm", SLURM, f"node001:{4242 % 4096 + 61440}", 4, 2),
    ("tpu", MULTISLICE, "localhost:8482", 8, 5),
    ("jobset", {"JOBSET_NAME": "llm", "REPLICATED_JOB_NAME": "worker", "JOB_INDEX": "1",
                "REPLICATED_JOB_REPLICAS": "2", "JOB_COMPLETION_INDEX": "3",
                "LMJAX_NUM_PROCESSES": "8"}, "llm-worker-0-0.llm:55527", 8, 7),
    ("kubernetes", {"JOB_COMPLETION_INDEX": "2", "LMJAX_NUM_PROCESSES": "4",
                    "LMJAX_COORDINATOR": "lmjax-0.lmjax"}, "lmjax-0.lmjax:55527", 4, 2),
]


@pytest.mark.parametrize("kind,env,coordinator,n,i", KINDS, ids=[k[0] for k in KINDS])
def test_detect_each_environment(kind, env, coordinator, n, i):
  assert detect(env) == Cluster(kind, coordinator, n, i)


@pytest.mark.parametrize("env,cluster", [
    # SLURM's node list: the first host, a bracket range written out; the job's list if no step
    ({**SLURM, "SLURM_STEP_NODELIST": "gpu7,node[001-004]"}, Cluster("slurm", "gpu7:61586", 4, 2)),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_NODELIST": "a[08-09]-b[2,5]"},
     Cluster("slurm", "a08-b2:8476", 2, 0)),
    # Open MPI over IPv6; Open MPI 5 (no hnp uri) with every rank on this host
    ({**OPENMPI, "OMPI_MCA_orte_hnp_uri": "1314521088.0;tcp6://[fe80::b9b,2620:10d::2]:43370"},
     Cluster("openmpi", f"[fe80::b9b]:{1314521088 // 4096 % 4096 + 61440}", 8, 5)),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, Cluster("openmpi", "127.0.0.1:8476", 2, 1)),
    # MPICH across hosts: rank 0's host from LMJAX_COORDINATOR; srun --mpi=pmi2 is SLURM's
    ({"PMI_SIZE": "4", "PMI_RANK": "3", "LMJAX_COORDINATOR": "r0"}, Cluster("mpi", "r0:8476", 4, 3)),
    ({**SLURM, "PMI_SIZE": "4", "PMI_RANK": "2"}, Cluster("slurm", "node001:61586", 4, 2)),
    # a TPU slice: worker 0; CLOUD_TPU_TASK_ID; TPU_PROCESS_ADDRESSES first
    (TPU, Cluster("tpu", "t0:8482", 4, 1)),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1", "CLOUD_TPU_TASK_ID": "1"}, Cluster("tpu", "t0:8482", 2, 1)),
    ({**TPU, "TPU_PROCESS_ADDRESSES": "p0:8476,p1:8476"}, Cluster("tpu", "p0:8482", 2, 1)),
    # torchrun inside SLURM: the inner launcher wins
    ({**SLURM, "MASTER_ADDR": "m0", "WORLD_SIZE": "8", "RANK": "7"},
     Cluster("torchrun", "m0:29501", 8, 7)),
    # overrides: the coordinator host and port of any environment
    ({**SLURM, "LMJAX_COORDINATOR": "head:99"}, Cluster("slurm", "head:99", 4, 2)),
    ({**SLURM, "LMJAX_COORDINATOR_PORT": "5000"}, Cluster("slurm", "node001:5000", 4, 2)),
    ({**SLURM, "JAX_COORDINATOR_PORT": "5001"}, Cluster("slurm", "node001:5001", 4, 2)),
    ({**TPU, "JAX_COORDINATOR_ADDRESS": "10.0.0.9"}, Cluster("tpu", "10.0.0.9:8482", 4, 1)),
])
def test_detect_variants(env, cluster):
  assert detect(env) == cluster


@pytest.mark.parametrize("env", [
    {}, {"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, {"OMPI_COMM_WORLD_SIZE": "1"},
    {"TPU_WORKER_HOSTNAMES": "localhost"}, {"JOB_COMPLETION_INDEX": "3"},  # a sweep's pod
    {"MASTER_ADDR": "m0", "WORLD_SIZE": "1"}, {"LMJAX_NUM_PROCESSES": "1"},
], ids=str)
def test_a_single_process_environment_is_none(env):
  assert detect(env) is None


@pytest.mark.parametrize("env,message", [
    ({"SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n1"}, "SLURM_PROCID is not set"),
    ({"SLURM_NTASKS": "four"}, "SLURM_NTASKS='four' is not an integer"),
    ({**SLURM, "SLURM_PROCID": "4"}, "SLURM_PROCID=4 is outside 0..3"),
    ({**SLURM, "SLURM_STEP_NODELIST": "node[001-"}, "SLURM_STEP_NODELIST='node[001-' is not"),
    ({**SLURM, "SLURM_STEP_NODELIST": "node[a-b]"}, "SLURM_STEP_NODELIST='node[a-b]'"),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, "SLURM_STEP_NODELIST is not set"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "OMPI_COMM_WORLD_RANK is not set"),
    ({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "0"}, "LMJAX_COORDINATOR is not set"),
    ({**OPENMPI, "OMPI_MCA_orte_hnp_uri": "garbage"}, "OMPI_MCA_orte_hnp_uri='garbage'"),
    ({"PMI_SIZE": "2", "PMI_RANK": "0"}, "mpiexec -genv LMJAX_COORDINATOR"),
    ({"TPU_WORKER_HOSTNAMES": "a,b"}, "TPU_WORKER_ID is not set"),
    ({**TPU, "TPU_WORKER_ID": "4"}, "TPU_WORKER_ID=4 is outside 0..3"),
    ({**MULTISLICE, "MEGASCALE_SLICE_ID": "2"}, "MEGASCALE_SLICE_ID=2 is outside 0..1"),
    ({"JOB_COMPLETION_INDEX": "0", "LMJAX_NUM_PROCESSES": "2"}, "LMJAX_COORDINATOR=<job name>-0"),
    ({"JOB_COMPLETION_INDEX": "0", "LMJAX_NUM_PROCESSES": "2", "JOBSET_NAME": "j"},
     "REPLICATED_JOB_NAME is not set"),
    ({"MASTER_ADDR": "m0", "WORLD_SIZE": "2"}, "RANK is not set"),
    ({"LMJAX_PROCESS_ID": "0", "LMJAX_COORDINATOR": "h"}, "LMJAX_NUM_PROCESSES is not set"),
    ({"LMJAX_COORDINATOR": "h:1"}, "LMJAX_COORDINATOR is set but no launcher"),
    ({**SLURM, "LMJAX_COORDINATOR": "h:port"}, "LMJAX_COORDINATOR='h:port'"),
    ({**SLURM, "LMJAX_COORDINATOR_PORT": "70000"}, "LMJAX_COORDINATOR_PORT=70000 is not a TCP"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_malformed_environment_names_the_variable(env, message):
  with pytest.raises(ConfigError) as e:
    detect(env)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_hostnames():
  assert hostnames("gpu[01-03,07],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu1"]
  assert hostnames("r[1-2]-n[9-10]") == ["r1-n9", "r1-n10", "r2-n9", "r2-n10"]
  with pytest.raises(ConfigError, match="SLURM_JOB_NODELIST='n,,m'"):
    hostnames("n,,m")


def _patch_environ(monkeypatch, env):
  for key in list(os.environ):
    monkeypatch.delenv(key)
  for key, value in env.items():
    monkeypatch.setenv(key, value)


@pytest.mark.parametrize("name,env", [("SlurmCluster", SLURM), ("OmpiCluster", OPENMPI),
                                      ("GkeTpuCluster", MULTISLICE)])
def test_the_same_answer_as_jax(monkeypatch, name, env):
  """Where JAX's own detection reads only the environment, it finds the same coordinator,
  process count and id (ports included)."""
  from jax._src import clusters
  cls = getattr(clusters, name)
  _patch_environ(monkeypatch, env)
  assert cls.is_env_present() or name == "GkeTpuCluster"  # that one checks for a TPU first
  jax_says = (cls.get_coordinator_address(5, None), cls.get_process_count(), cls.get_process_id())
  ours = detect(env)
  assert (ours.coordinator, ours.num_processes, ours.process_id) == jax_says


def test_the_ports_are_jaxs():
  from jax._src.clusters import cloud_tpu_cluster, k8s_cluster
  assert distributed.TPU_PORT == int(cloud_tpu_cluster.coordinator_port)
  assert distributed.K8S_PORT == int(k8s_cluster.K8sCluster._coordinator_port)


def test_resolve_explicit_arguments_completed_from_the_environment():
  assert resolve("h", 2, 1, env={}) == Cluster("explicit", "h:8476", 2, 1)
  assert resolve("[::1]:9", 2, 0, env=SLURM) == Cluster("explicit", "[::1]:9", 2, 0)
  assert resolve(None, None, 3, env=SLURM) == Cluster("explicit", "node001:61586", 4, 3)
  assert resolve(env={}) is None
  with pytest.raises(ConfigError, match="--process_id is missing"):
    resolve("h:1", 2, env={})


def test_a_tpu_vm_without_variables_asks_the_metadata_server_through_jax(monkeypatch):
  from jax._src.clusters.cloud_tpu_cluster import GceTpuCluster
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: object() if name == "libtpu" else find_spec(name, *a))
  monkeypatch.setattr(GceTpuCluster, "is_env_present", classmethod(lambda cls: True))
  monkeypatch.setattr(GceTpuCluster, "get_process_count", classmethod(lambda cls: 4))
  monkeypatch.setattr(GceTpuCluster, "get_process_id", classmethod(lambda cls: 3))
  monkeypatch.setattr(GceTpuCluster, "get_coordinator_address",
                      classmethod(lambda cls, timeout, port: "10.0.0.1:8482"))
  assert resolve(env={}) == Cluster("tpu-metadata", "10.0.0.1:8482", 4, 3)
  assert resolve(env={"LMJAX_COORDINATOR_PORT": "7"}).coordinator == "10.0.0.1:7"
  assert resolve(env={**SLURM}).kind == "slurm"  # variables first


def _load_render():
  spec = importlib.util.spec_from_file_location("render", LAUNCH / "render.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_render_fills_the_storage_secret(tmp_path):
  render = _load_render()
  key = tmp_path / "key.json"
  key.write_text('{"type": "service_account"}')
  docs = list(yaml.safe_load_all((LAUNCH / "k8s_indexed_job.yaml").read_text()))
  env = {"GOOGLE_APPLICATION_CREDENTIALS": str(key), "AWS_ENDPOINT_URL": "http://minio:9000",
         "HOME": "/root"}
  secret = render._find(render.render(docs, env), "Secret", "lmjax-storage")
  assert secret["stringData"] == {
      "gcp-key.json": '{"type": "service_account"}',
      "GOOGLE_APPLICATION_CREDENTIALS": "/var/run/lmjax-storage/gcp-key.json",
      "AWS_ENDPOINT_URL": "http://minio:9000"}
  with pytest.raises(render.RenderError, match="GOOGLE_APPLICATION_CREDENTIALS=/nonexistent"):
    render.render(docs, {"GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent"})
  docs[2]["spec"]["template"]["spec"]["containers"][0]["env"][1]["value"] = "3"
  with pytest.raises(render.RenderError, match="LMJAX_NUM_PROCESSES=3 but Job lmjax has"):
    render.pods(docs)


# -- subprocesses ------------------------------------------------------------------------------

def _base_env() -> dict[str, str]:
  """A clean environment: no launcher variables of the machine running the tests."""
  return {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
          "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}


@pytest.mark.slow
@pytest.mark.parametrize("kind,env,coordinator,n,i", KINDS, ids=[k[0] for k in KINDS])
def test_start_up_in_a_subprocess(kind, env, coordinator, n, i):
  out = subprocess.run([sys.executable, "-m", "lmjax.distributed"], env={**_base_env(), **env},
                       capture_output=True, text=True, timeout=120, check=True).stdout
  assert json.loads(out) == dict(kind=kind, coordinator=coordinator, num_processes=n,
                                 process_id=i)


@pytest.mark.slow
def test_start_up_in_a_subprocess_refuses_a_malformed_environment():
  env = {**_base_env(), "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-4]"}
  p = subprocess.run([sys.executable, "-m", "lmjax.cli", "train", "--config", "configs/tiny.py",
                      "--workdir", "/nonexistent/run"], cwd=ROOT, env=env, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 2
  assert p.stderr.strip() == ("error: SLURM_PROCID is not set but SLURM_NTASKS=4 is: start "
                              "lmjax with srun")


def _free_slurm_job_id() -> int:
  """A job id whose SLURM port (61440 + id % 4096) is free on loopback."""
  for _ in range(100):
    job = random.randrange(4096)
    with socket.socket() as s:
      try:
        s.bind(("127.0.0.1", 61440 + job))
        return job
      except OSError:
        continue
  pytest.skip("no free port in 61440-65535")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_connect_from_a_slurm_environment():
  script = ("import json, jax; from lmjax import distributed; "
            "multi = distributed.initialize(heartbeat_timeout=10, initialization_timeout=60); "
            "print(json.dumps([multi, jax.process_index(), jax.process_count(), "
            "jax.device_count(), jax.local_device_count()]))")
  job = _free_slurm_job_id()
  procs = [subprocess.Popen(
      [sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, env={**_base_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                      "SLURM_JOB_ID": str(job), "SLURM_NTASKS": "2", "SLURM_PROCID": str(i),
                      "SLURM_LOCALID": "0", "SLURM_STEP_NODELIST": "localhost"})
      for i in range(2)]
  outs = [p.communicate(timeout=180) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert [json.loads(out) for out, _ in outs] == [[True, i, 2, 4, 2] for i in range(2)]


# -- launchers' dry runs -----------------------------------------------------------------------

STORAGE = {"GOOGLE_APPLICATION_CREDENTIALS": "/secrets/gcp.json",
           "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9023",
           "TENSORSTORE_GCS_HTTP_URL": "http://127.0.0.1:9023",
           "AWS_ENDPOINT_URL": "http://minio:9000", "AWS_ACCESS_KEY_ID": "AKIA0",
           "AWS_SECRET_ACCESS_KEY": "s3cr3t", "AWS_PROFILE": "lab", "AWS_DEFAULT_REGION": "eu-west-1",
           "LMJAX_TENSORSTORE_RETRIES": '{"max_retries": 3}'}


def _hosts(stdout: str) -> list[tuple[dict[str, str], list[str]]]:
  """Each host's (environment, command) from the lines ``[cd DIR &&] env K=V ... command``."""
  out = []
  for line in stdout.splitlines():
    if line.startswith("#") or not line.strip():
      continue
    words = shlex.split(line)
    words = words[words.index("env") + 1:]
    k = next(k for k, w in enumerate(words) if "=" not in w or w.startswith("-"))
    out.append((dict(w.split("=", 1) for w in words[:k]), words[k:]))
  return out


def _check_hosts(stdout, n, coordinator, kind, workdir, storage):
  hosts = _hosts(stdout)
  assert len(hosts) == n, stdout
  clusters = [detect(env) for env, _ in hosts]
  assert clusters == [Cluster(kind, coordinator, n, i) for i in range(n)]
  for env, command in hosts:
    assert command[:2] == ["lmjax", "train"]
    assert workdir in command or f"--workdir={workdir}" in command, command
    for var, value in storage.items():
      assert env[var] == ("***" if var == "AWS_SECRET_ACCESS_KEY" else value), var


def _run(args, env):
  return subprocess.run(args, cwd=ROOT, env={**_base_env(), "DRY_RUN": "1", **env},
                        capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_slurm_dry_run():
  p = _run(["bash", str(LAUNCH / "slurm.sbatch"), "configs/llama_1b.py", "s3://bucket/runs/x",
            "--config.mesh.fsdp=8"],
           {**STORAGE, "SLURM_JOB_NODELIST": "gpu[01-03]", "SLURM_JOB_ID": "77",
            "PYTHON": sys.executable})
  assert p.returncode == 0, p.stderr
  _check_hosts(p.stdout, 3, "gpu01:61517", "slurm", "s3://bucket/runs/x", STORAGE)
  assert "s3cr3t" not in p.stdout
  p = _run(["bash", str(LAUNCH / "slurm.sbatch"), "c.py", "s3://b/r"], {})
  assert p.returncode != 0 and "SLURM_JOB_NODELIST: not set" in p.stderr


@pytest.mark.slow
def test_tpu_pod_dry_run():
  p = _run(["bash", str(LAUNCH / "tpu_pod.sh"), "my-tpu", "us-east5-a", "configs/llama_1b.py",
            "gs://bucket/runs/x", "--config.mesh.fsdp=-1"],
           {**STORAGE, "WORKERS": "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5"})
  assert p.returncode == 0, p.stderr
  _check_hosts(p.stdout, 4, "10.0.0.2:8482", "tpu", "gs://bucket/runs/x", STORAGE)
  assert "--worker=3" in p.stdout and "s3cr3t" not in p.stdout


@pytest.mark.slow
def test_kubernetes_dry_run(tmp_path):
  key = tmp_path / "key.json"
  key.write_text("{}")
  storage = {**STORAGE, "GOOGLE_APPLICATION_CREDENTIALS": str(key)}
  p = _run([sys.executable, str(LAUNCH / "render.py"), str(LAUNCH / "k8s_indexed_job.yaml")],
           storage)
  assert p.returncode == 0, p.stderr
  _check_hosts(p.stdout, 4, "lmjax-0.lmjax:55527", "kubernetes", "gs://BUCKET/runs/llama1b",
               {**storage, "GOOGLE_APPLICATION_CREDENTIALS": "/var/run/lmjax-storage/gcp-key.json"})
