#!/bin/bash
# Train on a Cloud TPU pod slice: one lmjax process per worker, started over ssh.
#
#   tools/launch/tpu_pod.sh my-tpu-v5p-128 us-east5-a configs/llama_1b.py \
#       gs://BUCKET/runs/llama1b --config.mesh.fsdp=-1
#
# Each worker gets TPU_WORKER_HOSTNAMES (all workers' addresses, from `gcloud ... describe`,
# or WORKERS=ip0,ip1,...) and its TPU_WORKER_ID: lmjax reads its place from them (coordinator:
# worker 0, port 8482). For several slices (multislice), set --config.mesh.dcn_data=<slices>
# so only data parallelism crosses the data-center network. The workdir is a bucket; the
# storage settings of this shell go to every worker: GOOGLE_APPLICATION_CREDENTIALS (a path
# that must exist on the workers), STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL,
# AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE,
# AWS_DEFAULT_REGION, AWS_REGION. The repository must be installed on every worker first
# (REMOTE_DIR, default lmjax):
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
#     --command='git clone <repo> lmjax && cd lmjax && pip install -e ".[tpu]"'
#
# Dry run: DRY_RUN=1 prints, per worker, the command it would run (environment included;
# secret values shown as ***) and runs nothing:
#   DRY_RUN=1 WORKERS=10.0.0.2,10.0.0.3 tools/launch/tpu_pod.sh NAME ZONE CONFIG gs://BUCKET/runs/x
set -euo pipefail
NAME=${1:?TPU name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}; shift 4
STORAGE_VARS="GOOGLE_APPLICATION_CREDENTIALS STORAGE_EMULATOR_HOST TENSORSTORE_GCS_HTTP_URL
  AWS_ENDPOINT_URL AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_SESSION_TOKEN AWS_PROFILE
  AWS_DEFAULT_REGION AWS_REGION AWS_ENDPOINT_URL_S3 LMJAX_TENSORSTORE_RETRIES"
LIBTPU_INIT_ARGS="${LIBTPU_INIT_ARGS:-} --xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true \
--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true"
WORKERS=${WORKERS:-$(gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" \
  --format='value[delimiter=","](networkEndpoints[].ipAddress)')}
IFS=, read -ra HOSTS <<< "$WORKERS"
if ((${#HOSTS[@]} == 0)); then echo "error: TPU $NAME in $ZONE lists no workers" >&2; exit 2; fi
printf -v command '%q ' lmjax train --config "$CONFIG" --workdir "$WORKDIR" "$@"

# The command worker $1 runs; $2 = 1 shows secret values as ***.
remote() {
  local line="cd ${REMOTE_DIR:-lmjax} && env TPU_WORKER_HOSTNAMES=$(printf %q "$WORKERS")"
  line+=" TPU_WORKER_ID=$1"
  line+=" LIBTPU_INIT_ARGS=$(printf %q "$LIBTPU_INIT_ARGS")"
  for var in LMJAX_COORDINATOR_PORT $STORAGE_VARS; do
    [[ -n "${!var:-}" ]] || continue
    local value=${!var}
    if [[ $2 == 1 && ($var == AWS_SECRET_ACCESS_KEY || $var == AWS_SESSION_TOKEN) ]]; then
      value='***'
    fi
    line+=" $var=$(printf %q "$value")"
  done
  echo "$line ${command% }"
}

if [[ -n "${DRY_RUN:-}" ]]; then
  for i in "${!HOSTS[@]}"; do
    echo "# worker $i (${HOSTS[$i]}): process $i of ${#HOSTS[@]}, through" \
      "gcloud compute tpus tpu-vm ssh $NAME --zone $ZONE --worker=$i --command=..."
    remote "$i" 1
  done
  exit 0
fi

PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null' INT TERM
for i in "${!HOSTS[@]}"; do
  gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker="$i" \
    --command="$(remote "$i" 0)" &
  PIDS+=($!)
done
status=0
for pid in "${PIDS[@]}"; do wait "$pid" || status=$?; done
exit $status
