"""Kubernetes launcher: fills a manifest's ``lmjax-storage`` Secret with the storage settings
of this shell and prints the manifest for ``kubectl apply -f -``. With ``--dry-run`` (or
``DRY_RUN=1``) it prints instead, for each pod of the Indexed Job, the environment and the
command that pod would run (as Kubernetes would build them; secret values shown as ***), and
applies nothing.

  python tools/launch/render.py tools/launch/k8s_indexed_job.yaml | kubectl apply -f -
  python tools/launch/render.py --dry-run tools/launch/k8s_indexed_job.yaml
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shlex
import sys
from pathlib import Path

import yaml

# The variables Google's and AWS's own client libraries (and TensorStore) read.
STORAGE_VARS = ("GOOGLE_APPLICATION_CREDENTIALS", "STORAGE_EMULATOR_HOST",
                "TENSORSTORE_GCS_HTTP_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION",
                "AWS_REGION", "AWS_ENDPOINT_URL_S3", "LMJAX_TENSORSTORE_RETRIES")
HIDDEN = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
SECRET = "lmjax-storage"
KEY_FILE = "gcp-key.json"  # GOOGLE_APPLICATION_CREDENTIALS's file, inside the Secret
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class RenderError(ValueError):
  """The manifest or the environment cannot be rendered; the message says why."""


def _find(docs: list[dict], kind: str, name: str | None = None) -> dict | None:
  return next((d for d in docs if d and d.get("kind") == kind
               and (name is None or d["metadata"]["name"] == name)), None)


def _mount_path(job: dict) -> str:
  """Where the pods see the storage Secret as files."""
  spec = job["spec"]["template"]["spec"]
  volumes = {v["name"] for v in spec.get("volumes", [])
             if v.get("secret", {}).get("secretName") == SECRET}
  for mount in spec["containers"][0].get("volumeMounts", []):
    if mount["name"] in volumes:
      return mount["mountPath"]
  raise RenderError(f"GOOGLE_APPLICATION_CREDENTIALS is set but the Job mounts no volume of "
                    f"the Secret {SECRET}: its key file would not reach the pods")


def render(docs: list[dict], environ: dict[str, str]) -> list[dict]:
  """``docs`` with the Secret's stringData set from the storage variables of ``environ``."""
  secret, job = _find(docs, "Secret", SECRET), _find(docs, "Job")
  if secret is None or job is None:
    raise RenderError(f"the manifest needs a Job and a Secret named {SECRET}")
  data = {}
  for var in STORAGE_VARS:
    if not (value := environ.get(var)):
      continue
    if var == "GOOGLE_APPLICATION_CREDENTIALS":
      try:
        data[KEY_FILE] = Path(value).read_text()
      except OSError as e:
        raise RenderError(f"GOOGLE_APPLICATION_CREDENTIALS={value}: cannot read the key file "
                          f"({e.strerror})") from None
      value = f"{_mount_path(job).rstrip('/')}/{KEY_FILE}"
    data[var] = value
  secret["stringData"] = data
  return docs


def _expand(text: str, env: dict[str, str]) -> str:
  """Kubernetes' ``$(VAR)`` references (``$$`` escapes a ``$``)."""
  return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), text)


def _secret_data(doc: dict) -> dict[str, str]:
  data = {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}
  return {**data, **(doc.get("stringData") or {})}


def pods(docs: list[dict]) -> list[tuple[str, dict[str, str], list[str]]]:
  """(pod name, environment, command) of each pod of the Indexed Job, as Kubernetes builds
  them: JOB_COMPLETION_INDEX and HOSTNAME, then envFrom, then env (later wins)."""
  job = _find(docs, "Job")
  if job is None or job["spec"].get("completionMode") != "Indexed":
    raise RenderError("the manifest has no Job with completionMode: Indexed")
  spec, name = job["spec"], job["metadata"]["name"]
  completions = spec.get("completions", 1)
  if spec.get("parallelism", 1) != completions:
    raise RenderError(f"Job {name}: parallelism {spec.get('parallelism', 1)} != completions "
                      f"{completions}: every process must run at once")
  container = spec["template"]["spec"]["containers"][0]
  out = []
  for index in range(completions):
    env = {"JOB_COMPLETION_INDEX": str(index), "HOSTNAME": f"{name}-{index}"}
    for source in container.get("envFrom", []):
      ref = source.get("secretRef") or source.get("configMapRef") or {}
      kind = "Secret" if "secretRef" in source else "ConfigMap"
      doc = _find(docs, kind, ref.get("name"))
      if doc is None and not ref.get("optional"):
        raise RenderError(f"envFrom names the {kind} {ref.get('name')}, not in the manifest")
      for key, value in (_secret_data(doc) if doc else {}).items():
        if _ENV_NAME.match(source.get("prefix", "") + key):  # as the kubelet: others skipped
          env[source.get("prefix", "") + key] = value
    for var in container.get("env", []):
      field = var.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath", "")
      if "value" in var:
        env[var["name"]] = _expand(str(var["value"]), env)
      elif "job-completion-index" in field:
        env[var["name"]] = str(index)
      else:
        raise RenderError(f"env {var['name']}: render.py evaluates only value and the "
                          "job-completion-index fieldRef")
    command = [_expand(str(a), env)
               for a in container.get("command", []) + container.get("args", [])]
    out.append((f"{name}-{index}", env, command))
  declared = out[0][1].get("LMJAX_NUM_PROCESSES")
  if declared is not None and declared != str(completions):
    raise RenderError(f"LMJAX_NUM_PROCESSES={declared} but Job {name} has completions: "
                      f"{completions}: make them equal")
  return out


def dry_run_lines(docs: list[dict]) -> list[str]:
  lines = []
  for pod, env, command in pods(docs):
    shown = {k: "***" if k in HIDDEN else v for k, v in env.items()}
    lines.append(f"# pod {pod} (JOB_COMPLETION_INDEX={env['JOB_COMPLETION_INDEX']})")
    lines.append(shlex.join(["env", *(f"{k}={v}" for k, v in shown.items()), *command]))
  return lines


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("manifest", help="the Kubernetes manifest (e.g. k8s_indexed_job.yaml)")
  parser.add_argument("--dry-run", action="store_true", default=bool(os.environ.get("DRY_RUN")),
                      help="print each pod's environment and command instead of the manifest")
  args = parser.parse_args(argv)
  try:
    docs = [d for d in yaml.safe_load_all(Path(args.manifest).read_text()) if d]
    docs = render(docs, dict(os.environ))
    print("\n".join(dry_run_lines(docs)) if args.dry_run
          else yaml.safe_dump_all(docs, sort_keys=False), end="\n" if args.dry_run else "")
  except (OSError, yaml.YAMLError, KeyError, RenderError) as e:
    detail = f"missing field {e}" if isinstance(e, KeyError) else str(e).replace("\n", " ")
    sys.stderr.write(f"error: {args.manifest}: {detail}\n")
    sys.exit(2)


if __name__ == "__main__":
  main()
