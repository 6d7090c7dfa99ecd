#!/bin/bash
# Train on a Cloud TPU pod slice: the same command on every worker at once.
#
#   tools/launch/tpu_pod.sh my-tpu-v5p-128 us-east5-a configs/llama_1b.py gs://bucket/runs/llama1b \
#       --config.mesh.fsdp=-1
#
# jax.distributed detects the pod (all workers), so lmjax needs no process flags. For
# several slices (multislice), set --config.mesh.dcn_data=<slices> so only data parallelism
# crosses the data-center network. The repository must be installed on every worker first:
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \
#     --command='git clone <repo> lmjax && cd lmjax && pip install -e ".[tpu]"'
set -euo pipefail
NAME=${1:?TPU name}; ZONE=${2:?zone}; CONFIG=${3:?config}; WORKDIR=${4:?workdir}; shift 4
LIBTPU_FLAGS="--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true \
--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true"
gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command="\
  cd lmjax && LIBTPU_INIT_ARGS='$LIBTPU_FLAGS' \
  lmjax train --config $CONFIG --workdir $WORKDIR $*"
